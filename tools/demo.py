#!/usr/bin/env python
"""
`make demo`: train ONE FPN-RPN (ImageNet EfficientNet-Lite0 backbone) on the embedded
synthetic dataset (generated first by tools/make_synthetic_dataset.py unless it is
there), on CPU, then evaluate that one set of weights with cross-level NMS and with
per-level NMS (an inference-time switch: same weights, paired over images), beside
Selective Search and the bare anchors (tools/nms_study.py).

Everything goes under output/demo/. Re-running resumes or re-evaluates what is there
(train_net.py --resume; cached proposals), so an interrupted demo loses at most one
checkpoint period.
"""
import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

from fpn_rpn import setup_cfg
from fpn_rpn.analysis.nms_study import Variant

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo" / "fpn_rpn_EffLite0_synthetic.yaml"
DATASET = "fpn_rpn_synthetic_val"
GOAL_AR100 = 0.5


def default_variant(opts=()) -> Variant:
    """The config's own post-processing (with ``opts``): per-level NMS (fpn_rpn's default) at IoU 0.7, top-K 1000."""
    return Variant.of_config(setup_cfg(str(CONFIG), list(opts)))


def run(step: str, cmd) -> None:
    print(f"\n=== {step}", flush=True)
    start = time.time()
    if subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO).returncode != 0:
        # the tools have printed the reason in one line
        sys.exit(f"demo: {step} failed; see above")
    print(f"=== {step}: done in {time.time() - start:.0f} s", flush=True)


def goal_line(study_csv: Path, default: Variant = None) -> str:
    """The goal's verdict on the study's row of ``default`` (the config's own post-processing)."""
    with open(study_csv) as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "sources" and r["definition"] == "d2"]
    ar = {r["source"]: float(r["AR@100"]) for r in rows}
    ours = ar[(default or default_variant()).name]  # the row name nms_study.py wrote
    ss = ar["Selective Search (fast)"]
    met = ours >= GOAL_AR100 and ours > ss
    return (f"Goal (AR@100 >= {GOAL_AR100} and above Selective Search): {'met' if met else 'NOT met'}: "
            f"per-level NMS (the default) AR@100 {ours:.3f}, Selective Search {ss:.3f}")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "    make demo                      # the same as: python tools/demo.py\n"
               "    python tools/demo.py --output-dir output/demo_lr SOLVER.BASE_LR 0.005\n"
               "What it prints and how long it takes: docs/demo.md.",
    )
    parser.add_argument("--output-dir", default=str(REPO / "output" / "demo"),
                        help="folder for the training run (efflite0/) and the study (study/) (default: output/demo)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="overrides of configs/demo/fpn_rpn_EffLite0_synthetic.yaml for the training, KEY VALUE ...")
    args = parser.parse_args()
    output = Path(args.output_dir)
    train_dir, study_dir = output / "efflite0", output / "study"
    default = default_variant(args.opts)
    start = time.time()
    run("synthetic dataset", [REPO / "tools" / "make_synthetic_dataset.py"])
    # No evaluation at the end of training: the study right after evaluates these weights.
    run(f"training (log in {train_dir / 'log.txt'})",
        [REPO / "tools" / "train_net.py", "--config-file", CONFIG, "--resume", "OUTPUT_DIR", train_dir,
         "DATASETS.TEST", "()", *args.opts])
    run("cross-level vs per-level NMS on the same weights, and baselines",
        [REPO / "tools" / "nms_study.py", "--config", CONFIG, "--checkpoints", f"final={train_dir / 'model_final.pth'}",
         "--datasets", DATASET, "--output-dir", study_dir,
         "--nms-threshs", default.nms_thresh, "--pre-nms-topks", default.pre_nms_topk,
         # Selective Search on images about the size the network sees (the config's MAX_SIZE_TEST):
         # at full size it ran at 3 s per image, about 5 minutes for the 100 val images
         "--ss-max-side", "test",
         # the untrained network's row costs half a minute of the 10 and is not part of the goal
         "--random-init-config", "none",
         "--opts", *args.opts])
    print(f"\n{goal_line(study_dir / 'study.csv', default)}")
    print(f"Demo took {time.time() - start:.0f} s. Tables: {study_dir / 'study.md'}; model in {train_dir}")


if __name__ == "__main__":
    main()
