import contextlib
import math
import warnings
from typing import List, Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes
from detectron2.modeling.anchor_generator import (
    ANCHOR_GENERATOR_REGISTRY,
    DefaultAnchorGenerator,
)

from ..errors import ConfigError

__all__ = ["FPNAnchorGenerator", "validate_anchor_params"]


def _per_level(values, num_levels: int, key: str) -> List[List[float]]:
    """Broadcast one list to all levels, as Detectron2 does, or check one list per level."""
    if not isinstance(values, Sequence) or len(values) == 0:
        raise ConfigError(f"{key} must be a non-empty list, got {values!r}")
    if not isinstance(values[0], Sequence):
        values = [values]
    if len(values) == 1:
        values = list(values) * num_levels
    if len(values) != num_levels:
        raise ConfigError(
            f"{key} has {len(values)} lists but there are {num_levels} feature levels "
            f"(MODEL.RPN.IN_FEATURES): give one list per level, or one list for all levels"
        )
    return [list(v) for v in values]


def validate_anchor_params(sizes, ratios, num_levels: int, offset: float,
                           sizes_key: str = "sizes", ratios_key: str = "aspect_ratios", offset_key: str = "offset"):
    """
    Return (sizes, ratios) as one list per level; raise ConfigError (a ValueError) naming the bad
    value by the ``*_key`` given: the constructor's argument names, or the config keys.
    """
    sizes = _per_level(sizes, num_levels, sizes_key)
    ratios = _per_level(ratios, num_levels, ratios_key)
    for key, per_level in ((sizes_key, sizes), (ratios_key, ratios)):
        for level, values in enumerate(per_level):
            if len(values) == 0:
                raise ConfigError(f"{key}[{level}] is empty: each level needs at least one value")
            bad = [v for v in values if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)]
            if bad:
                raise ConfigError(f"{key}[{level}] = {values}: values must be positive numbers, got {bad}")
    if not 0.0 <= offset < 1.0:
        raise ConfigError(f"{offset_key} must be in [0, 1), got {offset}")
    if len(set(len(s) * len(r) for s, r in zip(sizes, ratios))) != 1:
        raise ConfigError(
            f"{sizes_key} x {ratios_key} must give the same number of anchors on every level "
            "(the RPN head is shared across levels)"
        )
    return sizes, ratios


@contextlib.contextmanager
def _quiet_meshgrid():
    """Hide the "torch.meshgrid: ... indexing argument" UserWarning of Detectron2's grid offsets:
    it calls meshgrid without ``indexing``, whose default ("ij") is what it means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)
        yield


@ANCHOR_GENERATOR_REGISTRY.register()
class FPNAnchorGenerator(DefaultAnchorGenerator):
    """
    Anchors for FPN levels P2-P6: by default one size per level (32 ... 512 px) and
    Detectron2's aspect ratios a = height / width, so the anchor of size s and ratio a
    has ``w = s / sqrt(a)`` and ``h = s * sqrt(a)`` (area s^2); equivalently
    ``w = s * sqrt(r)``, ``h = s / sqrt(r)`` for r = width / height = 1 / a.

    Its anchors are exactly those of Detectron2's DefaultAnchorGenerator with the same
    arguments, in the same order, so model-zoo RPN weights keep their meaning; it adds
    checks of the arguments that name them.
    """
    # DefaultAnchorGenerator's constant, declared again: TorchScript reads a module's Final
    # attributes from its own class's annotations only
    box_dim: torch.jit.Final[int] = DefaultAnchorGenerator.box_dim

    @configurable
    def __init__(self, *, sizes, aspect_ratios, strides, offset: float = 0.0):
        """
        Args:
            sizes (list[list[float]] or list[float]): anchor sizes (sqrt of area, input
                pixels) per level, or one list for all levels.
            aspect_ratios (list[list[float]] or list[float]): height / width, per level or
                one list for all levels (Detectron2's convention).
            strides (list[int]): stride of each input feature map.
            offset (float): anchor centres are at ``(i + offset) * stride``; 0.0 is
                Detectron2's config default, 0.5 centres anchors in their cell.
        """
        sizes, aspect_ratios = validate_anchor_params(sizes, aspect_ratios, len(strides), offset)
        super().__init__(sizes=sizes, aspect_ratios=aspect_ratios, strides=strides, offset=offset)

    def forward(self, features: List[torch.Tensor]):
        """L Boxes (Hi*Wi*A, 4), DefaultAnchorGenerator's."""
        grid_sizes = [feature_map.shape[-2:] for feature_map in features]
        if torch.jit.is_scripting():
            anchors = self._grid_anchors(grid_sizes)
        else:
            anchors = self._quiet_grid_anchors(grid_sizes)
        return [Boxes(x) for x in anchors]

    @torch.jit.unused
    def _quiet_grid_anchors(self, grid_sizes: List[List[int]]) -> List[torch.Tensor]:
        with _quiet_meshgrid():
            return self._grid_anchors(grid_sizes)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        num_levels = len(input_shape)
        sizes, aspect_ratios = validate_anchor_params(
            cfg.MODEL.ANCHOR_GENERATOR.SIZES,
            cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS,
            num_levels,
            cfg.MODEL.ANCHOR_GENERATOR.OFFSET,
            sizes_key="MODEL.ANCHOR_GENERATOR.SIZES",
            ratios_key="MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
            offset_key="MODEL.ANCHOR_GENERATOR.OFFSET",
        )
        return {
            "sizes": sizes,
            "aspect_ratios": aspect_ratios,
            "strides": [x.stride for x in input_shape],
            "offset": cfg.MODEL.ANCHOR_GENERATOR.OFFSET,
        }
