"""The cost of Cascade RPN against the single-stage RPN on 2 CPU cores: whole training
iterations (backbone, FPN, RPN, losses, backward, optimizer step at LR 0) and whole
inference passes of the two Lite0 CPU configs, with Detectron2's stock RPN on the
single-stage config as the reference, timed side by side in one process (rounds in
shuffled order) on the same coco_mini images:

    .venv/bin/python benchmarks/cascade_cost.py [--repeats 7] [--batch-size 4]

Prints seconds per iteration / per image, median [min, max] over rounds, and per-round
ratios to the stock RPN and to the single-stage fpn_rpn.
"""
import argparse
import statistics

import torch

import fpn_rpn  # noqa: F401  (before detectron2)
from detectron2.modeling import build_model
from fpn_rpn import setup_cfg
from timing import time_calls  # benchmarks/
from whole_iteration import STOCK_RPN_OPTS, load_batch, whole_steps

CONFIGS = {
    "stock RPN": ("configs/fpn_rpn_EffLite0_FPN_coco_cpu_long.yaml", STOCK_RPN_OPTS),
    "fpn_rpn": ("configs/fpn_rpn_EffLite0_FPN_coco_cpu_long.yaml", []),
    "Cascade RPN": ("configs/cascade_rpn_EffLite0_FPN_coco_cpu_long.yaml", []),
}


def _range(values, fmt):
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: .venv/bin/python benchmarks/cascade_cost.py --repeats 7")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds, each runs every model once (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per call (default 4, the configs' batch)")
    parser.add_argument("--train-dataset", default="coco_mini_train", help="images of the training iterations")
    parser.add_argument("--test-dataset", default="coco_mini_val", help="images of the inference passes")
    args = parser.parse_args()
    models = {}
    for name, (config, opts) in CONFIGS.items():
        cfg = setup_cfg(config, opts)
        torch.manual_seed(0)
        models[name] = (cfg, build_model(cfg))
    cfg = models["fpn_rpn"][0]
    rows = []
    for setting in ("train", "inference"):
        is_train = setting == "train"
        batch = load_batch(cfg, args.train_dataset if is_train else args.test_dataset, args.batch_size, is_train)
        steps = whole_steps(models, batch, is_train)
        times = time_calls(steps, args.repeats, args.warmup, torch.device("cpu"), desc=setting)
        per = len(batch) if not is_train else 1
        for name, t in times.items():
            vs_stock = [a / b for a, b in zip(t, times["stock RPN"])]
            vs_single = [a / b for a, b in zip(t, times["fpn_rpn"])]
            unit = "s/iteration" if is_train else "s/image"
            rows.append(f"| {setting} | {name} | {_range([x / per for x in t], '{:.3f}')} {unit} | "
                        f"{_range(vs_stock, '{:.2f}x')} | {_range(vs_single, '{:.2f}x')} |")
    print(f"{args.repeats} rounds, batch {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| setting | model | time, median [min, max] | / stock RPN | / fpn_rpn single-stage |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
