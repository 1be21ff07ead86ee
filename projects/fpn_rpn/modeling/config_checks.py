"""Checks of the RPN-related config keys, so that a bad value fails when the model is
built, with the key and the allowed values named, instead of deep inside Detectron2."""
import math
from numbers import Real
from typing import Dict

from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import ANCHOR_GENERATOR_REGISTRY
from detectron2.modeling.backbone.build import BACKBONE_REGISTRY
from detectron2.modeling.meta_arch.build import META_ARCH_REGISTRY
from detectron2.modeling.proposal_generator.build import PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY

from ..errors import ConfigError, require as _check
from .adaptive_conv import ADAPTIVE_CONV_IMPLS
from .box_losses import DECODED_BOX_LOSS_TYPES

__all__ = ["check_cascade_config", "check_component_names", "check_rpn_config"]


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
    _check(len(weights) == 4 and all(isinstance(w, Real) and w > 0 for w in weights), key, weights,
           "must be 4 positive numbers (wx, wy, ww, wh)")


def check_rpn_config(cfg, input_shape: Dict[str, ShapeSpec]):
    """Raise ConfigError (a ValueError) naming the first ``MODEL.RPN.*`` key with an invalid value."""
    rpn = cfg.MODEL.RPN
    check_component_names(cfg)
    missing = [f for f in rpn.IN_FEATURES if f not in input_shape]
    _check(len(rpn.IN_FEATURES) > 0 and not missing, "MODEL.RPN.IN_FEATURES", list(rpn.IN_FEATURES),
           f"must be a non-empty subset of the backbone's outputs {sorted(input_shape)}")
    thresholds = list(rpn.IOU_THRESHOLDS)
    _check(all(0.0 <= t <= 1.0 for t in thresholds) and thresholds == sorted(thresholds),
           "MODEL.RPN.IOU_THRESHOLDS", thresholds, "must be increasing values in [0, 1], e.g. [0.3, 0.7]")
    _check(len(rpn.IOU_LABELS) == len(thresholds) + 1 and set(rpn.IOU_LABELS) <= {-1, 0, 1},
           "MODEL.RPN.IOU_LABELS", list(rpn.IOU_LABELS),
           f"must have len(IOU_THRESHOLDS) + 1 = {len(thresholds) + 1} values from {{-1, 0, 1}}")
    _check(0.0 <= rpn.POSITIVE_FRACTION <= 1.0, "MODEL.RPN.POSITIVE_FRACTION", rpn.POSITIVE_FRACTION,
           "must be in [0, 1]")
    _check(rpn.BATCH_SIZE_PER_IMAGE > 0, "MODEL.RPN.BATCH_SIZE_PER_IMAGE", rpn.BATCH_SIZE_PER_IMAGE,
           "must be a positive integer")
    for key in ("PRE_NMS_TOPK_TRAIN", "PRE_NMS_TOPK_TEST", "POST_NMS_TOPK_TRAIN", "POST_NMS_TOPK_TEST"):
        value = rpn.get(key)
        _check(value > 0, f"MODEL.RPN.{key}", value, "must be a positive integer")
    _check(0.0 <= rpn.NMS_THRESH <= 1.0, "MODEL.RPN.NMS_THRESH", rpn.NMS_THRESH, "must be in [0, 1]")
    _check_box_weights("MODEL.RPN.BBOX_REG_WEIGHTS", rpn.BBOX_REG_WEIGHTS)
    # loss weights and the smooth-L1 transition: a negative one would reverse the loss
    for key in ("LOSS_WEIGHT", "BBOX_REG_LOSS_WEIGHT", "SMOOTH_L1_BETA"):
        value = rpn.get(key)
        _check(isinstance(value, Real) and math.isfinite(value) and value >= 0, f"MODEL.RPN.{key}", value,
               "must be a number >= 0")
    low_high = list(cfg.MODEL.FPN_RPN.CENTERNESS_IOU_THRESHOLDS)
    _check(len(low_high) == 2 and all(isinstance(t, Real) for t in low_high) and 0 < low_high[0] <= low_high[1] <= 1,
           "MODEL.FPN_RPN.CENTERNESS_IOU_THRESHOLDS", low_high,
           "must be [negative below, positive from] with 0 < first <= second <= 1, e.g. [0.1, 0.3]")
    _check(len(rpn.CONV_DIMS) > 0, "MODEL.RPN.CONV_DIMS", list(rpn.CONV_DIMS),
           "give at least one conv width (-1 = input width)")
    _check_choices(cfg)
    _check(cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE >= 0, "MODEL.PROPOSAL_GENERATOR.MIN_SIZE",
           cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE, "must be >= 0 (pixels)")
    # Cascade RPN's head and generator go together
    cascade_head = rpn.HEAD_NAME == "CascadeRPNHead"
    cascade_generator = cfg.MODEL.PROPOSAL_GENERATOR.NAME == "CascadeRPN"
    _check(cascade_head == cascade_generator, "MODEL.RPN.HEAD_NAME", rpn.HEAD_NAME,
           f"MODEL.PROPOSAL_GENERATOR.NAME {cfg.MODEL.PROPOSAL_GENERATOR.NAME!r} needs "
           + ("'CascadeRPNHead'" if cascade_generator else "a single-stage head; 'CascadeRPNHead' goes with 'CascadeRPN'"))


def _check_choices(cfg):
    """The keys with a fixed set of values, each named with the values of the module that owns them."""
    # imported here: those modules import this one
    from .proposal_generator import BOX_REG_LOSS_TYPES, LOSS_NORMALIZERS, NMS_MODES
    from .rpn_head import OBJECTNESS_MODES

    fpn_rpn = cfg.MODEL.FPN_RPN
    for key, value, choices in (
        ("MODEL.FPN_RPN.OBJECTNESS", fpn_rpn.OBJECTNESS, OBJECTNESS_MODES),
        ("MODEL.FPN_RPN.NMS_MODE", fpn_rpn.NMS_MODE, NMS_MODES),
        ("MODEL.FPN_RPN.CLS_LOSS_NORMALIZER", fpn_rpn.CLS_LOSS_NORMALIZER, LOSS_NORMALIZERS),
        ("MODEL.FPN_RPN.LOC_LOSS_NORMALIZER", fpn_rpn.LOC_LOSS_NORMALIZER, LOSS_NORMALIZERS),
        ("MODEL.RPN.BBOX_REG_LOSS_TYPE", cfg.MODEL.RPN.BBOX_REG_LOSS_TYPE, BOX_REG_LOSS_TYPES),
    ):
        _check(value in choices, key, value, f"must be one of {choices}")
    _check(isinstance(fpn_rpn.SCORE_THRESH_TEST, Real) and 0.0 <= fpn_rpn.SCORE_THRESH_TEST < 1.0,
           "MODEL.FPN_RPN.SCORE_THRESH_TEST", fpn_rpn.SCORE_THRESH_TEST, "must be in [0, 1)")


def check_cascade_config(cfg):
    """Raise ConfigError naming the first ``MODEL.FPN_RPN.CASCADE.*`` key with an invalid value."""
    cascade = cfg.MODEL.FPN_RPN.CASCADE
    _check_box_weights("MODEL.FPN_RPN.CASCADE.STAGE1_BBOX_REG_WEIGHTS", cascade.STAGE1_BBOX_REG_WEIGHTS)
    _check(cascade.STAGE1_LOSS_WEIGHT >= 0, "MODEL.FPN_RPN.CASCADE.STAGE1_LOSS_WEIGHT", cascade.STAGE1_LOSS_WEIGHT,
           "must be >= 0")
    _check(0 < cascade.CENTER_RATIO <= 1, "MODEL.FPN_RPN.CASCADE.CENTER_RATIO", cascade.CENTER_RATIO,
           "must be in (0, 1]")
    _check(cascade.CENTER_RATIO <= cascade.IGNORE_RATIO <= 1, "MODEL.FPN_RPN.CASCADE.IGNORE_RATIO",
           cascade.IGNORE_RATIO, f"must be in [CENTER_RATIO ({cascade.CENTER_RATIO}), 1]")
    _check(isinstance(cascade.DILATION, int) and cascade.DILATION >= 1, "MODEL.FPN_RPN.CASCADE.DILATION",
           cascade.DILATION, "must be an integer >= 1")
    _check(0 <= cascade.MIN_POS_IOU <= 1, "MODEL.FPN_RPN.CASCADE.MIN_POS_IOU", cascade.MIN_POS_IOU, "must be in [0, 1]")
    _check(cascade.ADAPTIVE_CONV_IMPL in ADAPTIVE_CONV_IMPLS, "MODEL.FPN_RPN.CASCADE.ADAPTIVE_CONV_IMPL",
           cascade.ADAPTIVE_CONV_IMPL, f"must be one of {ADAPTIVE_CONV_IMPLS}")
    _check(cfg.MODEL.RPN.BBOX_REG_LOSS_TYPE in DECODED_BOX_LOSS_TYPES, "MODEL.RPN.BBOX_REG_LOSS_TYPE",
           cfg.MODEL.RPN.BBOX_REG_LOSS_TYPE, f"Cascade RPN regresses decoded boxes: one of {DECODED_BOX_LOSS_TYPES}")
