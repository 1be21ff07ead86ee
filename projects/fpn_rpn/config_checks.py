"""
The checks of a config, in one place: each raises ConfigError (a ValueError) naming the
first key with a value no run can use, and the values it may take, so that a bad value
fails before any work or when the model is built, instead of deep inside Detectron2 or
late in a run (a negative test size fails at the first evaluation, after training).

The components' constructors check their own arguments, naming the arguments, for
LazyConfig users who never write a key.
"""
from typing import Dict

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import ANCHOR_GENERATOR_REGISTRY
from detectron2.modeling.backbone.build import BACKBONE_REGISTRY
from detectron2.modeling.meta_arch.build import META_ARCH_REGISTRY
from detectron2.modeling.proposal_generator.build import PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY
from detectron2.utils import comm

from .choices import (ADAPTIVE_CONV_IMPLS, BOX_REG_LOSS_TYPES, DECODED_BOX_LOSS_TYPES, EFFICIENTNET_NORMS,
                      EFFICIENTNET_STAGES, EFFICIENTNET_VARIANTS, LOSS_NORMALIZERS, NMS_MODES, OBJECTNESS_MODES)
from .data.categories import category_groups, category_ids
from .errors import ConfigError, is_int, is_number, require

__all__ = ["check_cascade_config", "check_component_names", "check_device", "check_efficientnet_config",
           "check_rpn_config", "check_run_config"]

DEVICES = "'cpu', 'cuda' or 'cuda:N'"


def _registered(registry):
    return sorted(name for name, _ in registry)


def check_component_names(cfg):
    """Raise ConfigError if a component NAME is not registered, listing the registered ones."""
    for key, registry, name in (
        ("MODEL.META_ARCHITECTURE", META_ARCH_REGISTRY, cfg.MODEL.META_ARCHITECTURE),
        ("MODEL.BACKBONE.NAME", BACKBONE_REGISTRY, cfg.MODEL.BACKBONE.NAME),
        ("MODEL.PROPOSAL_GENERATOR.NAME", PROPOSAL_GENERATOR_REGISTRY, cfg.MODEL.PROPOSAL_GENERATOR.NAME),
        ("MODEL.RPN.HEAD_NAME", RPN_HEAD_REGISTRY, cfg.MODEL.RPN.HEAD_NAME),
        ("MODEL.ANCHOR_GENERATOR.NAME", ANCHOR_GENERATOR_REGISTRY, cfg.MODEL.ANCHOR_GENERATOR.NAME),
    ):
        if name not in _registered(registry):
            raise ConfigError(f"{key} = {name!r} is not registered; registered: {_registered(registry)}")


def _check_box_weights(key: str, weights) -> None:
    """A Box2BoxTransform's (wx, wy, ww, wh): Detectron2 unpacks exactly four and divides by them."""
    weights = list(weights)
    require(len(weights) == 4 and all(is_number(w) and w > 0 for w in weights), key, weights,
            "must be 4 positive numbers (wx, wy, ww, wh)")


def check_rpn_config(cfg, input_shape: Dict[str, ShapeSpec]):
    """Raise ConfigError (a ValueError) naming the first ``MODEL.RPN.*`` key with an invalid value."""
    rpn = cfg.MODEL.RPN
    check_component_names(cfg)
    missing = [f for f in rpn.IN_FEATURES if f not in input_shape]
    require(len(rpn.IN_FEATURES) > 0 and not missing, "MODEL.RPN.IN_FEATURES", list(rpn.IN_FEATURES),
            f"must be a non-empty subset of the backbone's outputs {sorted(input_shape)}")
    thresholds = list(rpn.IOU_THRESHOLDS)
    require(all(0.0 <= t <= 1.0 for t in thresholds) and thresholds == sorted(thresholds),
            "MODEL.RPN.IOU_THRESHOLDS", thresholds, "must be increasing values in [0, 1], e.g. [0.3, 0.7]")
    require(len(rpn.IOU_LABELS) == len(thresholds) + 1 and set(rpn.IOU_LABELS) <= {-1, 0, 1},
            "MODEL.RPN.IOU_LABELS", list(rpn.IOU_LABELS),
            f"must have len(IOU_THRESHOLDS) + 1 = {len(thresholds) + 1} values from {{-1, 0, 1}}")
    require(0.0 <= rpn.POSITIVE_FRACTION <= 1.0, "MODEL.RPN.POSITIVE_FRACTION", rpn.POSITIVE_FRACTION,
            "must be in [0, 1]")
    require(rpn.BATCH_SIZE_PER_IMAGE > 0, "MODEL.RPN.BATCH_SIZE_PER_IMAGE", rpn.BATCH_SIZE_PER_IMAGE,
            "must be a positive integer")
    for key in ("PRE_NMS_TOPK_TRAIN", "PRE_NMS_TOPK_TEST", "POST_NMS_TOPK_TRAIN", "POST_NMS_TOPK_TEST"):
        value = rpn.get(key)
        require(value > 0, f"MODEL.RPN.{key}", value, "must be a positive integer")
    require(0.0 <= rpn.NMS_THRESH <= 1.0, "MODEL.RPN.NMS_THRESH", rpn.NMS_THRESH, "must be in [0, 1]")
    _check_box_weights("MODEL.RPN.BBOX_REG_WEIGHTS", rpn.BBOX_REG_WEIGHTS)
    # loss weights and the smooth-L1 transition: a negative one would reverse the loss
    for key in ("LOSS_WEIGHT", "BBOX_REG_LOSS_WEIGHT", "SMOOTH_L1_BETA"):
        value = rpn.get(key)
        require(is_number(value) and value >= 0, f"MODEL.RPN.{key}", value,
               "must be a number >= 0")
    low_high = list(cfg.MODEL.FPN_RPN.CENTERNESS_IOU_THRESHOLDS)
    require(len(low_high) == 2 and all(is_number(t) for t in low_high) and 0 < low_high[0] <= low_high[1] <= 1,
            "MODEL.FPN_RPN.CENTERNESS_IOU_THRESHOLDS", low_high,
            "must be [negative below, positive from] with 0 < first <= second <= 1, e.g. [0.1, 0.3]")
    require(len(rpn.CONV_DIMS) > 0, "MODEL.RPN.CONV_DIMS", list(rpn.CONV_DIMS),
            "give at least one conv width (-1 = input width)")
    _check_choices(cfg)
    require(cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE >= 0, "MODEL.PROPOSAL_GENERATOR.MIN_SIZE",
            cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE, "must be >= 0 (pixels)")
    # Cascade RPN's head and generator go together
    cascade_head = rpn.HEAD_NAME == "CascadeRPNHead"
    cascade_generator = cfg.MODEL.PROPOSAL_GENERATOR.NAME == "CascadeRPN"
    require(cascade_head == cascade_generator, "MODEL.RPN.HEAD_NAME", rpn.HEAD_NAME,
            f"MODEL.PROPOSAL_GENERATOR.NAME {cfg.MODEL.PROPOSAL_GENERATOR.NAME!r} needs "
            + ("'CascadeRPNHead'" if cascade_generator else "a single-stage head; 'CascadeRPNHead' goes with 'CascadeRPN'"))


def _check_choices(cfg):
    """The keys with a fixed set of values, each named with its values (fpn_rpn.choices)."""
    fpn_rpn = cfg.MODEL.FPN_RPN
    for key, value, choices in (
        ("MODEL.FPN_RPN.OBJECTNESS", fpn_rpn.OBJECTNESS, OBJECTNESS_MODES),
        ("MODEL.FPN_RPN.NMS_MODE", fpn_rpn.NMS_MODE, NMS_MODES),
        ("MODEL.FPN_RPN.CLS_LOSS_NORMALIZER", fpn_rpn.CLS_LOSS_NORMALIZER, LOSS_NORMALIZERS),
        ("MODEL.FPN_RPN.LOC_LOSS_NORMALIZER", fpn_rpn.LOC_LOSS_NORMALIZER, LOSS_NORMALIZERS),
        ("MODEL.RPN.BBOX_REG_LOSS_TYPE", cfg.MODEL.RPN.BBOX_REG_LOSS_TYPE, BOX_REG_LOSS_TYPES),
    ):
        require(value in choices, key, value, f"must be one of {choices}")
    require(is_number(fpn_rpn.SCORE_THRESH_TEST) and 0.0 <= fpn_rpn.SCORE_THRESH_TEST < 1.0,
            "MODEL.FPN_RPN.SCORE_THRESH_TEST", fpn_rpn.SCORE_THRESH_TEST, "must be in [0, 1)")


def check_cascade_config(cfg):
    """Raise ConfigError naming the first ``MODEL.FPN_RPN.CASCADE.*`` key with an invalid value."""
    cascade = cfg.MODEL.FPN_RPN.CASCADE
    _check_box_weights("MODEL.FPN_RPN.CASCADE.STAGE1_BBOX_REG_WEIGHTS", cascade.STAGE1_BBOX_REG_WEIGHTS)
    require(cascade.STAGE1_LOSS_WEIGHT >= 0, "MODEL.FPN_RPN.CASCADE.STAGE1_LOSS_WEIGHT", cascade.STAGE1_LOSS_WEIGHT,
            "must be >= 0")
    require(0 < cascade.CENTER_RATIO <= 1, "MODEL.FPN_RPN.CASCADE.CENTER_RATIO", cascade.CENTER_RATIO,
            "must be in (0, 1]")
    require(cascade.CENTER_RATIO <= cascade.IGNORE_RATIO <= 1, "MODEL.FPN_RPN.CASCADE.IGNORE_RATIO",
            cascade.IGNORE_RATIO, f"must be in [CENTER_RATIO ({cascade.CENTER_RATIO}), 1]")
    require(is_int(cascade.DILATION) and cascade.DILATION >= 1, "MODEL.FPN_RPN.CASCADE.DILATION",
            cascade.DILATION, "must be an integer >= 1")
    require(0 <= cascade.MIN_POS_IOU <= 1, "MODEL.FPN_RPN.CASCADE.MIN_POS_IOU", cascade.MIN_POS_IOU, "must be in [0, 1]")
    require(cascade.ADAPTIVE_CONV_IMPL in ADAPTIVE_CONV_IMPLS, "MODEL.FPN_RPN.CASCADE.ADAPTIVE_CONV_IMPL",
            cascade.ADAPTIVE_CONV_IMPL, f"must be one of {ADAPTIVE_CONV_IMPLS}")
    require(cfg.MODEL.RPN.BBOX_REG_LOSS_TYPE in DECODED_BOX_LOSS_TYPES, "MODEL.RPN.BBOX_REG_LOSS_TYPE",
            cfg.MODEL.RPN.BBOX_REG_LOSS_TYPE, f"Cascade RPN regresses decoded boxes: one of {DECODED_BOX_LOSS_TYPES}")


def check_efficientnet_config(cfg, input_channels: int, out_features) -> None:
    """
    Raise ConfigError naming the first key an EfficientNet-Lite backbone cannot be built
    from (``MODEL.FPN_RPN.EFFICIENTNET.*``, ``MODEL.BACKBONE.FREEZE_AT``, ``INPUT.FORMAT``, the
    pixel statistics' channels). ``out_features``: the stages the backbone must give.
    """
    ecfg = cfg.MODEL.FPN_RPN.EFFICIENTNET
    require(input_channels == 3, "MODEL.PIXEL_MEAN", list(cfg.MODEL.PIXEL_MEAN),
            f"gives {input_channels} input channels; EfficientNet-Lite takes 3 (RGB)")
    # Lite was trained on RGB: BGR input silently costs much of the pretraining's value
    require(cfg.INPUT.FORMAT == "RGB", "INPUT.FORMAT", cfg.INPUT.FORMAT, 'EfficientNet-Lite expects "RGB"')
    require(ecfg.VARIANT in EFFICIENTNET_VARIANTS, "MODEL.FPN_RPN.EFFICIENTNET.VARIANT", ecfg.VARIANT,
            f"must be one of {list(EFFICIENTNET_VARIANTS)}")
    require(ecfg.NORM in EFFICIENTNET_NORMS, "MODEL.FPN_RPN.EFFICIENTNET.NORM", ecfg.NORM,
            f"must be one of {list(EFFICIENTNET_NORMS)}")
    # torch's SyncBatchNorm raises in training on CPU tensors once several processes run
    require(not (ecfg.NORM == "SyncBN" and cfg.MODEL.DEVICE == "cpu" and comm.get_world_size() > 1),
            "MODEL.FPN_RPN.EFFICIENTNET.NORM", ecfg.NORM,
            "'SyncBN' needs GPUs with several processes (torch's SyncBatchNorm): use 'BN' or 'FrozenBN' on CPU")
    require(is_int(cfg.MODEL.BACKBONE.FREEZE_AT) and 0 <= cfg.MODEL.BACKBONE.FREEZE_AT <= 5,
            "MODEL.BACKBONE.FREEZE_AT", cfg.MODEL.BACKBONE.FREEZE_AT, "must be 0 .. 5 for EfficientNet-Lite")
    given = list(ecfg.OUT_FEATURES)
    require(len(given) > 0 and set(given) <= set(EFFICIENTNET_STAGES), "MODEL.FPN_RPN.EFFICIENTNET.OUT_FEATURES", given,
            f"must be names among {list(EFFICIENTNET_STAGES)}")
    missing = [f for f in out_features if f not in given]
    require(not missing, "MODEL.FPN.IN_FEATURES", list(out_features),
            f"names {missing}, which MODEL.FPN_RPN.EFFICIENTNET.OUT_FEATURES = {given} does not give")


def _check_input(cfg):
    sizes = cfg.INPUT.MIN_SIZE_TRAIN
    sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
    require(len(sizes) > 0 and all(is_int(s) and s > 0 for s in sizes), "INPUT.MIN_SIZE_TRAIN", sizes,
            "must be positive integers (pixels)")
    if cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range":
        require(len(sizes) == 2 and sizes[0] <= sizes[1], "INPUT.MIN_SIZE_TRAIN", sizes,
                'with MIN_SIZE_TRAIN_SAMPLING "range" it must be [low, high]')
    require(cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING in ("choice", "range"), "INPUT.MIN_SIZE_TRAIN_SAMPLING",
            cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING, 'must be "choice" or "range"')
    require(is_int(cfg.INPUT.MIN_SIZE_TEST) and cfg.INPUT.MIN_SIZE_TEST >= 0, "INPUT.MIN_SIZE_TEST",
            cfg.INPUT.MIN_SIZE_TEST, "must be an integer >= 0 (pixels; 0 keeps the image size)")
    for key in ("MAX_SIZE_TRAIN", "MAX_SIZE_TEST"):
        value = cfg.INPUT.get(key)
        require(is_int(value) and value > 0, f"INPUT.{key}", value, "must be a positive integer (pixels)")


def _check_pixel_statistics(cfg):
    # the model normalises each channel of the INPUT.FORMAT image by them: Detectron2 fails with an
    # assertion (lengths differ) or a broadcast error in the first forward pass (wrong length)
    channels = 1 if cfg.INPUT.FORMAT == "L" else 3
    for key, low in (("PIXEL_MEAN", None), ("PIXEL_STD", 0)):
        values = list(cfg.MODEL.get(key))
        require(len(values) == channels and all(is_number(v) and (low is None or v > low) for v in values),
                f"MODEL.{key}", values, f"must be {channels} {'positive ' if low is not None else ''}numbers, "
                f"one per channel of INPUT.FORMAT {cfg.INPUT.FORMAT!r}")


def _check_solver(cfg):
    solver = cfg.SOLVER
    for key in ("IMS_PER_BATCH", "MAX_ITER", "CHECKPOINT_PERIOD"):
        value = solver.get(key)
        require(is_int(value) and value > 0, f"SOLVER.{key}", value, "must be a positive integer")
    require(is_int(solver.WARMUP_ITERS) and solver.WARMUP_ITERS >= 0, "SOLVER.WARMUP_ITERS",
            solver.WARMUP_ITERS, "must be an integer >= 0")
    require(is_number(solver.BASE_LR) and solver.BASE_LR > 0, "SOLVER.BASE_LR", solver.BASE_LR,
            "must be a positive number")
    require(is_number(solver.WARMUP_FACTOR) and 0 <= solver.WARMUP_FACTOR <= 1, "SOLVER.WARMUP_FACTOR",
            solver.WARMUP_FACTOR, "must be in [0, 1]")
    require(is_number(solver.MOMENTUM) and 0 <= solver.MOMENTUM < 1, "SOLVER.MOMENTUM", solver.MOMENTUM,
            "must be in [0, 1)")
    require(is_number(solver.WEIGHT_DECAY) and solver.WEIGHT_DECAY >= 0, "SOLVER.WEIGHT_DECAY",
            solver.WEIGHT_DECAY, "must be a number >= 0")
    require(is_number(solver.GAMMA) and solver.GAMMA > 0, "SOLVER.GAMMA", solver.GAMMA, "must be a positive number")
    steps = list(solver.STEPS)
    require(all(is_int(s) and s > 0 for s in steps) and steps == sorted(steps), "SOLVER.STEPS", steps,
            "must be increasing positive iteration numbers")


def _check_test(cfg):
    require(is_int(cfg.TEST.EVAL_PERIOD) and cfg.TEST.EVAL_PERIOD >= 0, "TEST.EVAL_PERIOD", cfg.TEST.EVAL_PERIOD,
            "must be an integer >= 0 (0: evaluate at the end only)")
    budgets = list(cfg.TEST.RECALL_BUDGETS)
    require(len(budgets) > 0 and all(is_int(k) and k > 0 for k in budgets), "TEST.RECALL_BUDGETS", budgets,
            "must be positive integers (proposals per image)")
    require(is_int(cfg.DATALOADER.NUM_WORKERS) and cfg.DATALOADER.NUM_WORKERS >= 0, "DATALOADER.NUM_WORKERS",
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
