"""Adaptive convolution of Cascade RPN (Vu et al., NeurIPS 2019, Sec. 3.2).

A 3x3 convolution whose sampling locations follow a box given at each output location:

- "dilation" mode (stage 1, where every location has the same square anchor of 8 x its
  stride): a plain 3x3 convolution with dilation 3, as MMDetection's ``AdaptiveConv``;
- "offset" mode (stage 2, where each location has its own stage-1 box): the 9 taps of
  location (i, j) lie on a 3x3 grid spanning the box, corners on its corners
  (:func:`box_aligned_offsets`), sampled bilinearly with zeros outside the map.

Why bilinear sampling with ``grid_sample`` plus one matmul for "offset" mode, and not
``torchvision.ops.deform_conv2d``: the two give the same output (tested), and forward plus
backward at P2's size on CPU the grid_sample route took a quarter of deform_conv2d's time
(``benchmarks/adaptive_conv.py``; figures in docs/cascade_rpn.md). Gathering the taps of
channels-last rows and one matmul was slower still. Both are single PyTorch kernels on
CUDA as well; ``make gpu-check`` times the two there. ``impl="deform_conv2d"`` stays
selectable (``MODEL.FPN_RPN.CASCADE.ADAPTIVE_CONV_IMPL``) for that measurement and as
the test's second reference. The price of grid_sample is memory: the sampled taps, 9x
the input, are kept for the backward.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

from ..errors import ConfigError
from ..choices import ADAPTIVE_CONV_IMPLS

__all__ = ["AdaptiveConv", "ADAPT_MODES", "box_aligned_offsets", "sampling_locations"]

ADAPT_MODES = ("dilation", "offset")
# (ky, kx) of the 3x3 taps relative to the centre tap, in a conv weight's (3, 3) order
_TAP_Y = torch.tensor([-1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
_TAP_X = torch.tensor([-1.0, 0.0, 1.0, -1.0, 0.0, 1.0, -1.0, 0.0, 1.0])


def box_aligned_offsets(boxes: torch.Tensor, stride: int, height: int, width: int,
                        anchor_offset: float = 0.0) -> torch.Tensor:
    """
    Offsets of a 3x3 deformable convolution (padding 1, dilation 1) that put the taps of
    location (i, j) on the 3x3 grid spanning ``boxes[:, i * width + j]``: tap (ky, kx)
    samples the feature map at ``(cy + ky * h / 2, cx + kx * w / 2) / stride - anchor_offset``,
    with (cx, cy, w, h) the box's centre and size in input pixels and ky, kx in {-1, 0, 1}.
    ``anchor_offset`` is the anchor generator's OFFSET: location j is the input point
    ``(j + anchor_offset) * stride``.

    Args:
        boxes: (N, H*W, 4) XYXY boxes in input pixels, one per location, row-major.

    Returns:
        (N, 18, H, W) offsets, (dy, dx) per tap in the weight's tap order, as
        ``torchvision.ops.deform_conv2d`` takes them.
    """
    n = boxes.shape[0]
    boxes = boxes.view(n, height, width, 4) / stride
    cx = (boxes[..., 0] + boxes[..., 2]) * 0.5 - anchor_offset  # (N, H, W), feature-map units
    cy = (boxes[..., 1] + boxes[..., 3]) * 0.5 - anchor_offset
    half_w = (boxes[..., 2] - boxes[..., 0]) * 0.5
    half_h = (boxes[..., 3] - boxes[..., 1]) * 0.5
    ys = torch.arange(height, dtype=boxes.dtype, device=boxes.device)[:, None]
    xs = torch.arange(width, dtype=boxes.dtype, device=boxes.device)[None, :]
    tap_y = _TAP_Y.to(boxes)[None, :, None, None]
    tap_x = _TAP_X.to(boxes)[None, :, None, None]
    # a plain 3x3 conv samples (i + ky, j + kx): the offset is the difference to the box grid
    dy = (cy - ys)[:, None] + tap_y * (half_h[:, None] - 1)  # (N, 9, H, W)
    dx = (cx - xs)[:, None] + tap_x * (half_w[:, None] - 1)
    return torch.stack((dy, dx), dim=2).view(n, 18, height, width)


def sampling_locations(offsets: torch.Tensor) -> torch.Tensor:
    """
    The (y, x) feature-map points a 3x3 deformable convolution (padding 1, dilation 1)
    samples with ``offsets`` (N, 18, H, W): (N, 9, H, W, 2).
    """
    n, _, height, width = offsets.shape
    offsets = offsets.view(n, 9, 2, height, width)
    ys = torch.arange(height, dtype=offsets.dtype, device=offsets.device)[:, None]
    xs = torch.arange(width, dtype=offsets.dtype, device=offsets.device)[None, :]
    y = ys + _TAP_Y.to(offsets)[:, None, None] + offsets[:, :, 0]
    x = xs + _TAP_X.to(offsets)[:, None, None] + offsets[:, :, 1]
    return torch.stack((y, x), dim=-1)


def _deform_conv_by_sampling(x: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor]) -> torch.Tensor:
    """deform_conv2d's result by bilinear sampling of the 9 taps (grid_sample) and one matmul."""
    n, c, height, width = x.shape
    points = sampling_locations(offsets)  # (N, 9, H, W, 2) as (y, x)
    # grid_sample's (x, y) in [-1, 1] with align_corners=False: pixel i is at (2i + 1) / size - 1
    grid = torch.stack(((2 * points[..., 1] + 1) / width - 1, (2 * points[..., 0] + 1) / height - 1), dim=-1)
    sampled = F.grid_sample(x, grid.view(n, 9 * height, width, 2), mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # (N, C, 9*H, W)
    out = weight.flatten(1) @ sampled.view(n, c * 9, height * width)  # (N, O, H*W), taps c-major
    if bias is not None:
        out = out + bias[:, None]
    return out.view(n, -1, height, width)


class AdaptiveConv(nn.Module):
    """
    Cascade RPN's adaptive convolution: a 3x3 convolution, dilated ("dilation") or with
    its taps on a box given per location ("offset"). Weights are initialised N(0, 0.01)
    with zero bias, as MMDetection's ``StageCascadeRPNHead``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, mode: str = "offset", dilation: int = 3,
                 impl: str = "grid_sample"):
        """
        Args:
            mode (str): "dilation" or "offset" (see the module docstring).
            dilation (int): the dilation of "dilation" mode.
            impl (str): how "offset" mode samples: "deform_conv2d" or "grid_sample".
        """
        super().__init__()
        if mode not in ADAPT_MODES:
            raise ConfigError(f"AdaptiveConv mode must be one of {ADAPT_MODES}, got {mode!r}")
        if impl not in ADAPTIVE_CONV_IMPLS:
            raise ConfigError(f"AdaptiveConv impl must be one of {ADAPTIVE_CONV_IMPLS}, got {impl!r}")
        if not (isinstance(dilation, int) and dilation >= 1):
            raise ConfigError(f"AdaptiveConv dilation must be an integer >= 1, got {dilation!r}")
        self.mode = mode
        self.impl = impl
        self.dilation = dilation if mode == "dilation" else 1
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: torch.Tensor, offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: (N, C, H, W); offsets: (N, 18, H, W) in "offset" mode (from
                :func:`box_aligned_offsets`), None in "dilation" mode.
        """
        if self.mode == "dilation":
            return F.conv2d(x, self.weight, self.bias, padding=self.dilation, dilation=self.dilation)
        if offsets is None:
            raise ValueError("AdaptiveConv in 'offset' mode needs offsets")
        if self.impl == "grid_sample":
            return _deform_conv_by_sampling(x, offsets, self.weight, self.bias)
        return deform_conv2d(x, offsets.to(x.dtype), self.weight, self.bias, padding=(1, 1))

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, mode={self.mode!r}, "
                f"dilation={self.dilation}, impl={self.impl!r}")
