"""Times Cascade RPN's "offset" adaptive convolution both ways, forward plus backward, side
by side with a plain 3x3 convolution of the same shape, rounds interleaved:

    .venv/bin/python benchmarks/adaptive_conv.py [--shape 4 128 112 112] [--rounds 7]

Prints, per implementation, the median [min, max] time over the rounds and its ratio to
the plain convolution measured in the same round. Offsets come from random boxes of 2 to
16 cells, as stage-1 boxes are; the input needs a gradient (it is the stage-1 feature).
"""
import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

from fpn_rpn.modeling.adaptive_conv import AdaptiveConv, box_aligned_offsets


def _boxes(n, h, w, stride):
    cy, cx = torch.meshgrid(torch.arange(h) * stride, torch.arange(w) * stride, indexing="ij")
    size = (torch.rand(n, h, w, 2) * 14 + 2) * stride
    ctr = torch.stack((cx, cy), -1).float()[None] + (torch.rand(n, h, w, 2) - 0.5) * stride
    return torch.cat((ctr - size / 2, ctr + size / 2), -1).view(n, h * w, 4)


def _time(fn, x):
    x.grad = None
    start = time.perf_counter()
    fn(x).sum().backward()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example:\n    .venv/bin/python benchmarks/adaptive_conv.py --rounds 7")
    parser.add_argument("--shape", type=int, nargs=4, default=[4, 128, 112, 112], metavar=("N", "C", "H", "W"),
                        help="input size (default: 4 128 112 112, P2 of the Lite0 configs at batch 4)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up (default: 7)")
    args = parser.parse_args()
    n, c, h, w = args.shape
    x = torch.randn(n, c, h, w, requires_grad=True)
    offsets = box_aligned_offsets(_boxes(n, h, w, 4), 4, h, w)
    plain = torch.nn.Conv2d(c, c, 3, padding=1)
    variants = {"plain conv3x3": lambda t: plain(t)}
    for impl in ("deform_conv2d", "grid_sample"):
        conv = AdaptiveConv(c, c, mode="offset", impl=impl)
        conv.weight.data.copy_(plain.weight.data)
        variants[impl] = lambda t, conv=conv: conv(t, offsets)
    times = {name: [] for name in variants}
    for round_ in range(args.rounds + 1):
        names = list(variants)
        random.shuffle(names)
        for name in names:
            t = _time(variants[name], x)
            if round_:
                times[name].append(t)
    base = times["plain conv3x3"]
    print(f"forward + backward, input {n}x{c}x{h}x{w}, {args.rounds} rounds, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)]
        print(f"{name:15s} {statistics.median(ts) * 1e3:8.1f} ms [{min(ts) * 1e3:.1f}, {max(ts) * 1e3:.1f}]   "
              f"x plain: {statistics.median(ratios):5.2f} [{min(ratios):.2f}, {max(ratios):.2f}]")


if __name__ == "__main__":
    main()
