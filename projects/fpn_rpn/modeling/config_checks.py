"""Checks of the RPN-related config keys, so that a bad value fails when the model is
built, with the key and the allowed values named, instead of deep inside Detectron2."""
from typing import Dict

from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import ANCHOR_GENERATOR_REGISTRY
from detectron2.modeling.backbone.build import BACKBONE_REGISTRY
from detectron2.modeling.meta_arch.build import META_ARCH_REGISTRY
from detectron2.modeling.proposal_generator.build import PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY

from ..errors import ConfigError, require as _check

__all__ = ["check_component_names", "check_rpn_config"]


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
    _check(cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE >= 0, "MODEL.PROPOSAL_GENERATOR.MIN_SIZE",
           cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE, "must be >= 0 (pixels)")
