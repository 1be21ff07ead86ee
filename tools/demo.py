#!/usr/bin/env python
"""
`make demo`: train fpn_rpn's FPN-RPN and Detectron2's stock RPN with the same small
backbone and budget on the embedded synthetic dataset (generated first, by
tools/make_synthetic_dataset.py, unless it is there), on CPU,
evaluate proposal recall on its val split and print both side by side.

Everything goes under output/demo/. Re-running resumes or re-evaluates what is there
(train_net.py --resume), so an interrupted demo loses at most one checkpoint period.
"""
import argparse
import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {
    "fpn_rpn (cross-level NMS)": REPO / "configs" / "demo" / "fpn_rpn_R_18_GN_synthetic.yaml",
    "Detectron2 stock RPN": REPO / "configs" / "demo" / "stock_rpn_R_18_GN_synthetic.yaml",
}
ROWS = [f"AR@{k}" for k in (10, 20, 50, 100, 300, 1000)] + [
    f"AR_{area}@{k}" for k in (100, 1000) for area in "sml"
]


def train_and_evaluate(name: str, config: Path, output_dir: Path, extra_opts) -> dict:
    """Run tools/train_net.py (resuming) and return its last evaluation from metrics.json."""
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(config),
           "--resume", "OUTPUT_DIR", str(output_dir), *extra_opts]
    print(f"\n=== {name}: training, log in {output_dir / 'log.txt'}", flush=True)
    start = time.time()
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        # train_net.py has printed the reason (one line for bad data, configs or checkpoints)
        sys.exit(f"demo: training {name} failed; see above and {output_dir / 'log.txt'}")
    print(f"=== {name}: done in {time.time() - start:.0f} s", flush=True)
    evaluations = [
        json.loads(line)
        for line in (output_dir / "metrics.json").read_text().splitlines()
        if "recall_d2/AR@100" in line
    ]
    return evaluations[-1]


def side_by_side(results: dict) -> str:
    names = list(results)
    lines = ["| metric (Detectron2 definition) | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for row in ROWS:
        values = [results[n].get(f"recall_d2/{row}", math.nan) for n in names]
        lines.append(f"| {row} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    values = [results[n].get("recall_coco/AR@100", math.nan) for n in names]
    lines.append("| AR@100 (COCO definition) | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=str(REPO / "output" / "demo"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for both runs, KEY VALUE ...")
    args = parser.parse_args()
    output = Path(args.output_dir)
    if subprocess.run([sys.executable, str(REPO / "tools" / "make_synthetic_dataset.py")], cwd=REPO).returncode:
        sys.exit("demo: generating the synthetic dataset failed; see above")
    results = {}
    for (name, config), folder in zip(RUNS.items(), ("fpn_rpn", "stock_rpn")):
        results[name] = train_and_evaluate(name, config, output / folder, args.opts)

    table = side_by_side(results)
    output.mkdir(parents=True, exist_ok=True)
    (output / "recall.md").write_text(table + "\n")
    with open(output / "recall.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", *results])
        for row in ROWS:
            writer.writerow([row, *(results[n].get(f"recall_d2/{row}") for n in results)])
    print("\nProposal recall on fpn_rpn_synthetic_val (fractions):\n")
    print(table)
    print(f"\nWritten: {output / 'recall.md'}, {output / 'recall.csv'}; runs in {output}/fpn_rpn, {output}/stock_rpn")


if __name__ == "__main__":
    main()
