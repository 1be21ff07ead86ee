"""Timing calls side by side: rounds in rotating order, so that a machine's drift hits every contender alike.

Kept beside ``torch.utils.benchmark``, which times one contender after another and has no
untimed per-call reset, because on shared cores the drift between contenders' blocks
exceeds the differences measured (``benchmarks/timing_order.py``;
docs/performance.md#why-rotating-rounds-not-torchutilsbenchmark).
"""
import time
from typing import Callable, Dict, List

import torch
from tqdm import tqdm

__all__ = ["synchronize", "time_calls"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(steps: Dict[str, Callable], repeats: int, warmup: int, device: torch.device,
               desc: str = "rounds") -> Dict[str, List[float]]:
    """
    {name: [seconds per round]}: every step once per round, in an order that rotates.
    A step may have a ``reset()``, called untimed before each timed call.
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    synchronize(device)
    times = {name: [] for name in names}
    for r in tqdm(range(repeats), desc=desc, leave=False):
        for name in names[r % len(names):] + names[:r % len(names)]:
            getattr(steps[name], "reset", lambda: None)()
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times
