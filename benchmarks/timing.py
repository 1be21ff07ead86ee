"""Timing calls side by side (the benchmarks' own helper, not part of the fpn_rpn package): rounds in a shuffled order, so that a machine's drift hits every contender alike.

Kept beside ``torch.utils.benchmark``, which times one contender after another and has no
untimed per-call reset, because on shared cores the drift between contenders' blocks
exceeds the differences measured (``benchmarks/timing_order.py``;
docs/performance.md#why-shuffled-rounds-not-torchutilsbenchmark).
"""
import random
import time
from typing import Callable, Dict, List

import torch
from tqdm import tqdm

__all__ = ["synchronize", "time_calls"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(steps: Dict[str, Callable], repeats: int, warmup: int, device: torch.device,
               desc: str = "rounds", seed: int = 0) -> Dict[str, List[float]]:
    """
    {name: [seconds per round]}: every step once per round, in an order shuffled anew each
    round (seeded by ``seed``), so that no contender always follows the same one.
    A step may have a ``reset()``, called untimed before each timed call.
    """
    order = random.Random(seed)
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    synchronize(device)
    times = {name: [] for name in names}
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        for name in order.sample(names, len(names)):
            getattr(steps[name], "reset", lambda: None)()
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times
