"""
Whole training iterations and whole inference passes of the configs fpn_rpn ships:
what users live with (backbone, FPN, RPN, losses, backward and optimizer step), timed
for Detectron2's stock RPN, for fpn_rpn, and for fpn_rpn with its one speed-up, the
sparse head backward (``MODEL.FPN_RPN.SPARSE_HEAD_BACKWARD``, training only), switched
off, side by side in one process on the same images.

The speed-up's worth is the share of the whole iteration it saves: 1 - t(on) / t(off),
per round (the models take turns within a round), reported as the median and the
range over rounds. Data loading is left out (the images are mapped once, before).
"""
import copy
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage

from fpn_rpn import setup_cfg
from fpn_rpn.analysis.proposal_sources import get_dataset_dicts
from timing import time_calls  # benchmarks/

__all__ = ["SHIPPED_CONFIGS", "WholeResult", "benchmark_config", "format_whole_table", "load_batch", "whole_steps"]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# name -> (config file, images per iteration and process)
SHIPPED_CONFIGS = {
    "demo": (str(CONFIGS / "demo" / "fpn_rpn_EffLite0_synthetic.yaml"), 4),
    "Lite0 CPU": (str(CONFIGS / "fpn_rpn_EffLite0_FPN_coco_cpu.yaml"), 4),
    "R50-FPN 800px": (str(CONFIGS / "fpn_rpn_R_50_FPN_1x.yaml"), 2),  # its 16 images over 8 GPUs
}
STOCK_RPN_OPTS = ["MODEL.PROPOSAL_GENERATOR.NAME", "RPN", "MODEL.RPN.HEAD_NAME", "StandardRPNHead",
                  "MODEL.ANCHOR_GENERATOR.NAME", "DefaultAnchorGenerator"]
SPARSE_BACKWARD = "sparse_head_backward"
STOCK, OURS = "stock RPN", "fpn_rpn"
SETTINGS = ("train", "inference")


@dataclass
class WholeResult:
    config: str
    setting: str
    batch_size: int
    times: Dict[str, List[float]]  # variant -> seconds per round


def without(name: str) -> str:
    return f"fpn_rpn without {name}"


def load_batch(cfg, dataset_name: str, batch_size: int, is_train: bool) -> List[dict]:
    """The first ``batch_size`` images of the dataset that have boxes, mapped as the config's loader maps them."""
    dicts = [d for d in get_dataset_dicts(dataset_name, cfgs=[cfg])
             if any(not a.get("iscrowd", 0) for a in d.get("annotations", []))][:batch_size]
    np.random.seed(0)  # the train mapper's random size and flip
    mapper = DatasetMapper(cfg, is_train=is_train)
    return [mapper(copy.deepcopy(d)) for d in dicts]


def _train_step(model, optimizer, batch):
    def step():
        model.train()
        torch.manual_seed(0)  # anchor sampling
        with EventStorage():
            losses = model(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
    return step


def _inference_step(model, batch):
    def step():
        model.eval()
        with torch.no_grad():
            model(batch)
    return step


def whole_steps(models: Dict[str, tuple], batch: List[dict], is_train: bool) -> Dict[str, Callable]:
    """
    One whole training iteration (SGD at LR 0, so that every round computes the same thing)
    or inference pass on ``batch`` per model of ``models`` ({name: (cfg, model)}), for
    :func:`timing.time_calls`.
    """
    steps = {}
    for name, (cfg, model) in models.items():
        if is_train:
            optimizer = build_optimizer(cfg, model)
            for group in optimizer.param_groups:
                group["lr"] = 0.0
            steps[name] = _train_step(model, optimizer, batch)
        else:
            steps[name] = _inference_step(model, batch)
    return steps


def _dense_backward(step, model):
    """``step`` run with the head's sparse backward off."""
    head = model.proposal_generator.rpn_head

    def off():
        head.sparse_backward = False
        try:
            return step()
        finally:
            head.sparse_backward = True
    return off


def build_pair(config_file: str, opts: Sequence[str] = ()):
    """fpn_rpn's model of the config and the same model with Detectron2's stock RPN, same weights."""
    cfg = setup_cfg(config_file, list(opts))
    torch.manual_seed(0)
    ours = build_model(cfg)
    stock = build_model(setup_cfg(config_file, [*opts, *STOCK_RPN_OPTS]))
    stock.load_state_dict(ours.state_dict())
    if not ours.proposal_generator.rpn_head.sparse_backward:
        raise ValueError(f"{config_file} turns MODEL.FPN_RPN.SPARSE_HEAD_BACKWARD off: "
                         "the benchmark switches it off itself")
    return cfg, ours, stock


def benchmark_config(name: str, config_file: str, batch_size: int, train_dataset: str, test_dataset: str,
                     repeats: int, warmup: int, opts: Sequence[str] = ()) -> List[WholeResult]:
    cfg, ours, stock = build_pair(config_file, opts)
    results = []
    for setting in SETTINGS:
        is_train = setting == "train"
        batch = load_batch(cfg, train_dataset if is_train else test_dataset, batch_size, is_train)
        steps = whole_steps({STOCK: (cfg, stock), OURS: (cfg, ours)}, batch, is_train)
        if is_train:
            steps[without(SPARSE_BACKWARD)] = _dense_backward(steps[OURS], ours)
        times = time_calls(steps, repeats, warmup, torch.device(cfg.MODEL.DEVICE), desc=f"{name} {setting}")
        results.append(WholeResult(name, setting, len(batch), times))
    return results


def _median_range(values: Sequence[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def format_whole_table(results: Sequence[WholeResult]) -> str:
    """
    One row per config, setting and variant: seconds per call, and against fpn_rpn with
    everything on, per round: stock / fpn_rpn for the stock RPN, the share the speed-up saves
    (1 - on / off) for the variants without one.
    """
    lines = ["| config | setting | images | variant | s per call, median [min, max] | vs fpn_rpn, per round |",
             "|---|---|---|---|---|---|"]
    for r in results:
        ours = r.times[OURS]
        for variant, t in r.times.items():
            if variant == STOCK:
                versus = "stock / fpn_rpn " + _median_range([s / o for s, o in zip(t, ours)], "{:.2f}x")
            elif variant == OURS:
                versus = "-"
            else:
                versus = "saves " + _median_range([100 * (1 - o / s) for s, o in zip(t, ours)], "{:+.1f}%")
            lines.append(f"| {r.config} | {r.setting} | {r.batch_size} | {variant} | "
                         f"{_median_range(t, '{:.3f}')} | {versus} |")
    return "\n".join(lines)
