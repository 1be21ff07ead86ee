"""The benchmarks' timing: rounds in shuffled order, and ratios and savings taken per round."""
import fpn_rpn  # noqa: F401  # before detectron2

import sys
from pathlib import Path

import torch

# the benchmarks' helper modules live beside their scripts, outside the package
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from timing import time_calls  # noqa: E402
from whole_iteration import OURS, STOCK, WholeResult, format_whole_table, without  # noqa: E402


def test_ratios_and_savings_are_per_round():
    times = {STOCK: [2.0, 3.0, 4.0], OURS: [1.0, 2.0, 2.0], without("sparse_head_backward"): [2.0, 2.0, 4.0]}
    table = format_whole_table([WholeResult("demo", "train", 4, times)]).splitlines()
    assert table[0].startswith("| config | setting | images | variant |")
    rows = {line.split(" | ")[3]: line for line in table[2:]}
    # per round: 2/1, 3/2, 4/2 -> median 2.00, range [1.50, 2.00]
    assert rows[STOCK].endswith("| 3.000 [2.000, 4.000] | stock / fpn_rpn 2.00x [1.50x, 2.00x] |")
    assert rows[OURS].endswith("| 2.000 [1.000, 2.000] | - |")
    # per round 1 - on/off: 50%, 0%, 50%
    assert rows["fpn_rpn without sparse_head_backward"].endswith("| saves +50.0% [+0.0%, +50.0%] |")


def test_time_calls_runs_every_step_once_a_round_in_shuffled_orders():
    calls = []

    class Step:
        def __init__(self, name):
            self.name = name

        def __call__(self):
            calls.append(self.name)

        def reset(self):
            calls.append("reset " + self.name)

    names = ["a", "b", "c", "d"]
    times = time_calls({n: Step(n) for n in names}, repeats=6, warmup=1, device=torch.device("cpu"))
    assert {n: len(t) for n, t in times.items()} == {n: 6 for n in names}
    timed = calls[len(names):]  # after the warm-up round, which runs in the given order without resets
    assert calls[:len(names)] == names
    rounds = [timed[i:i + 2 * len(names)] for i in range(0, len(timed), 2 * len(names))]
    orders = [r[1::2] for r in rounds]
    assert all(r[0::2] == ["reset " + n for n in order] for r, order in zip(rounds, orders))  # reset just before
    assert all(sorted(order) == names for order in orders)
    assert len({tuple(order) for order in orders}) > 1  # seeded shuffles: the same orders each run
