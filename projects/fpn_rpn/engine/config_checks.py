"""Checks of the keys the trainer, data loader and evaluator read (INPUT, SOLVER, DATASETS,
DATALOADER, TEST), so that a bad value stops a tool before any work, naming the key,
instead of failing late (a negative test size fails at the first evaluation, after
training) or blaming an innocent image."""
import math
from numbers import Integral, Real

import torch

from ..data.categories import category_groups, category_ids
from ..errors import ConfigError, require

__all__ = ["check_device", "check_run_config"]

DEVICES = "'cpu', 'cuda' or 'cuda:N'"


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_input(cfg):
    sizes = cfg.INPUT.MIN_SIZE_TRAIN
    sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
    require(len(sizes) > 0 and all(_is_int(s) and s > 0 for s in sizes), "INPUT.MIN_SIZE_TRAIN", sizes,
            "must be positive integers (pixels)")
    if cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range":
        require(len(sizes) == 2 and sizes[0] <= sizes[1], "INPUT.MIN_SIZE_TRAIN", sizes,
                'with MIN_SIZE_TRAIN_SAMPLING "range" it must be [low, high]')
    require(cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING in ("choice", "range"), "INPUT.MIN_SIZE_TRAIN_SAMPLING",
            cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING, 'must be "choice" or "range"')
    require(_is_int(cfg.INPUT.MIN_SIZE_TEST) and cfg.INPUT.MIN_SIZE_TEST >= 0, "INPUT.MIN_SIZE_TEST",
            cfg.INPUT.MIN_SIZE_TEST, "must be an integer >= 0 (pixels; 0 keeps the image size)")
    for key in ("MAX_SIZE_TRAIN", "MAX_SIZE_TEST"):
        value = cfg.INPUT.get(key)
        require(_is_int(value) and value > 0, f"INPUT.{key}", value, "must be a positive integer (pixels)")


def _check_pixel_statistics(cfg):
    # the model normalises each channel of the INPUT.FORMAT image by them: Detectron2 fails with an
    # assertion (lengths differ) or a broadcast error in the first forward pass (wrong length)
    channels = 1 if cfg.INPUT.FORMAT == "L" else 3
    for key, low in (("PIXEL_MEAN", None), ("PIXEL_STD", 0)):
        values = list(cfg.MODEL.get(key))
        require(len(values) == channels and all(_is_number(v) and (low is None or v > low) for v in values),
                f"MODEL.{key}", values, f"must be {channels} {'positive ' if low is not None else ''}numbers, "
                f"one per channel of INPUT.FORMAT {cfg.INPUT.FORMAT!r}")


def _check_solver(cfg):
    solver = cfg.SOLVER
    for key in ("IMS_PER_BATCH", "MAX_ITER", "CHECKPOINT_PERIOD"):
        value = solver.get(key)
        require(_is_int(value) and value > 0, f"SOLVER.{key}", value, "must be a positive integer")
    require(_is_int(solver.WARMUP_ITERS) and solver.WARMUP_ITERS >= 0, "SOLVER.WARMUP_ITERS",
            solver.WARMUP_ITERS, "must be an integer >= 0")
    require(_is_number(solver.BASE_LR) and solver.BASE_LR > 0, "SOLVER.BASE_LR", solver.BASE_LR,
            "must be a positive number")
    require(_is_number(solver.WARMUP_FACTOR) and 0 <= solver.WARMUP_FACTOR <= 1, "SOLVER.WARMUP_FACTOR",
            solver.WARMUP_FACTOR, "must be in [0, 1]")
    require(_is_number(solver.MOMENTUM) and 0 <= solver.MOMENTUM < 1, "SOLVER.MOMENTUM", solver.MOMENTUM,
            "must be in [0, 1)")
    require(_is_number(solver.WEIGHT_DECAY) and solver.WEIGHT_DECAY >= 0, "SOLVER.WEIGHT_DECAY",
            solver.WEIGHT_DECAY, "must be a number >= 0")
    require(_is_number(solver.GAMMA) and solver.GAMMA > 0, "SOLVER.GAMMA", solver.GAMMA, "must be a positive number")
    steps = list(solver.STEPS)
    require(all(_is_int(s) and s > 0 for s in steps) and steps == sorted(steps), "SOLVER.STEPS", steps,
            "must be increasing positive iteration numbers")


def _check_test(cfg):
    require(_is_int(cfg.TEST.EVAL_PERIOD) and cfg.TEST.EVAL_PERIOD >= 0, "TEST.EVAL_PERIOD", cfg.TEST.EVAL_PERIOD,
            "must be an integer >= 0 (0: evaluate at the end only)")
    budgets = list(cfg.TEST.RECALL_BUDGETS)
    require(len(budgets) > 0 and all(_is_int(k) and k > 0 for k in budgets), "TEST.RECALL_BUDGETS", budgets,
            "must be positive integers (proposals per image)")
    require(_is_int(cfg.DATALOADER.NUM_WORKERS) and cfg.DATALOADER.NUM_WORKERS >= 0, "DATALOADER.NUM_WORKERS",
            cfg.DATALOADER.NUM_WORKERS, "must be an integer >= 0")


def _check_categories(cfg):
    # a name or id that COCO lacks, or a bad group entry; whether the datasets number their
    # categories as COCO does is known once they are loaded (fpn_rpn.data.build, the evaluator)
    category_ids(cfg.DATASETS.TRAIN_CATEGORIES, "DATASETS.TRAIN_CATEGORIES")
    category_groups(cfg.TEST.RECALL_CATEGORY_GROUPS, "TEST.RECALL_CATEGORY_GROUPS")


def check_device(device, key: str = "MODEL.DEVICE") -> None:
    """
    Raise ConfigError naming ``key`` unless ``device`` is 'cpu', 'cuda' or 'cuda:N' with a device N
    on this machine (torch would fail when the model is moved, after the datasets are loaded).
    setup_cfg has already turned a CUDA device into 'cpu' on a machine without CUDA.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{key} = {device!r} is invalid: must be {DEVICES}") from None
    require(parsed.type in ("cpu", "cuda"), key, device, f"must be {DEVICES}")
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        require(count > 0, key, device, "this machine has no CUDA device: use 'cpu'")
        require(parsed.index is None or parsed.index < count, key, device,
                f"this machine has {count} CUDA device{'s' if count > 1 else ''} (cuda:0 to cuda:{count - 1})")


def check_run_config(cfg, world_size: int = 1) -> None:
    """
    Raise ConfigError naming the first MODEL.DEVICE, INPUT, SOLVER, TEST, DATALOADER or DATASETS key
    with a value no run can use. ``world_size``: the number of processes, which must divide
    ``SOLVER.IMS_PER_BATCH`` (Detectron2 would stop with a bare assertion).
    """
    check_device(cfg.MODEL.DEVICE)
    _check_input(cfg)
    _check_pixel_statistics(cfg)
    _check_solver(cfg)
    _check_test(cfg)
    _check_categories(cfg)
    require(cfg.SOLVER.IMS_PER_BATCH % world_size == 0, "SOLVER.IMS_PER_BATCH", cfg.SOLVER.IMS_PER_BATCH,
            f"must be a multiple of the number of processes ({world_size})")
