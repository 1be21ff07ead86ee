"""Why :func:`timing.time_calls` (benchmarks/timing.py) rather than ``torch.utils.benchmark``:
two copies of the same call (an EfficientNet-Lite0 FPN backbone pass on a 320x320 image,
one CPU thread), timed as torch.utils.benchmark times them (one ``Timer`` per contender,
one after the other, ``blocked_autorange``) and as ``time_calls`` does (every contender
once per round, in shuffled order). Their true ratio is 1; the spread of the measured
ratio over sessions is the error a comparison inherits from the machine's drift:

    .venv/bin/python benchmarks/timing_order.py [--sessions 6]

Prints, per method, the A/B ratio of each session and the largest deviation from 1.
"""
import argparse
import statistics

import torch
import torch.utils.benchmark as benchmark

import fpn_rpn  # noqa: F401  (before detectron2)
from detectron2.modeling import build_backbone
from fpn_rpn import setup_cfg
from timing import time_calls  # benchmarks/


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example:\n    .venv/bin/python benchmarks/timing_order.py --sessions 6")
    parser.add_argument("--sessions", type=int, default=6, help="measurements of the ratio per method (default: 6)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per contender per session (default: 2)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    backbone = build_backbone(setup_cfg("configs/fpn_rpn_EffLite0_FPN_coco_cpu_long.yaml", ["MODEL.DEVICE", "cpu"]))
    backbone.eval()
    x = torch.zeros(1, 3, 320, 320)

    def step():
        with torch.no_grad():
            backbone(x)

    ratios = {"torch.utils.benchmark, one after the other": [], "time_calls, shuffled rounds": []}
    per_call = benchmark.Timer("step()", globals={"step": step}).timeit(3).median
    rounds = max(3, int(args.seconds / per_call))
    for _ in range(args.sessions):
        a, b = (benchmark.Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=args.seconds).median
                for _ in "ab")
        ratios["torch.utils.benchmark, one after the other"].append(a / b)
        times = time_calls({"a": step, "b": step}, rounds, 1, torch.device("cpu"))
        ratios["time_calls, shuffled rounds"].append(statistics.median(times["a"]) / statistics.median(times["b"]))
    for method, values in ratios.items():
        worst = max(abs(r - 1) for r in values)
        print(f"{method}: A/B = {', '.join(f'{r:.3f}' for r in values)}; largest deviation from 1: {worst:.1%}")


if __name__ == "__main__":
    main()
