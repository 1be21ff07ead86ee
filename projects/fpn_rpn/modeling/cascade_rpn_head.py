from typing import List, Tuple

import torch
from torch import nn
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY

from ..errors import ConfigError
from .adaptive_conv import AdaptiveConv, box_aligned_offsets

__all__ = ["CascadeRPNHead"]


@RPN_HEAD_REGISTRY.register()
class CascadeRPNHead(nn.Module):
    """
    The two stages of Cascade RPN (Vu et al., NeurIPS 2019), shared across FPN levels, as
    MMDetection's ``crpn_r50_caffe_fpn_1x_coco`` builds them:

    - stage 1: a 3x3 convolution dilated by 3 (the anchor is the same square at every
      location) + ReLU, then a 1x1 convolution to 4 box deltas. No objectness. Its
      ReLU output is the input of stage 2 (MMDetection's ``bridged_feature``);
    - stage 2: an adaptive 3x3 convolution whose taps lie on each location's stage-1 box
      (:class:`AdaptiveConv` "offset" mode) + ReLU, then sibling 1x1 convolutions to one
      objectness logit and 4 box deltas.

    One anchor per location. The proposal generator (:class:`CascadeRPN`) decodes the
    stage-1 boxes between :meth:`stage1` and :meth:`stage2`.
    """

    @configurable
    def __init__(self, *, in_channels: int, strides: List[int], anchor_offset: float = 0.0,
                 dilation: int = 3, adaptive_conv_impl: str = "grid_sample"):
        """
        Args:
            in_channels (int): channels of every input level.
            strides (list[int]): stride of each level, to place stage 2's taps.
            anchor_offset (float): MODEL.ANCHOR_GENERATOR.OFFSET: location j is the input
                point (j + offset) * stride.
            dilation (int): stage 1's dilation.
            adaptive_conv_impl (str): see :class:`AdaptiveConv`.
        """
        super().__init__()
        self.strides = list(strides)
        self.anchor_offset = anchor_offset
        self.stage1_conv = AdaptiveConv(in_channels, in_channels, mode="dilation", dilation=dilation)
        self.stage1_deltas = nn.Conv2d(in_channels, 4, kernel_size=1)
        self.stage2_conv = AdaptiveConv(in_channels, in_channels, mode="offset", impl=adaptive_conv_impl)
        self.objectness_logits = nn.Conv2d(in_channels, 1, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(in_channels, 4, kernel_size=1)
        for layer in (self.stage1_deltas, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ConfigError(f"CascadeRPNHead needs the same channels on every level, got {sorted(channels)}")
        anchor_generator = build_anchor_generator(cfg, input_shape)
        if set(anchor_generator.num_anchors) != {1}:
            raise ConfigError(
                "MODEL.RPN.HEAD_NAME 'CascadeRPNHead' needs one anchor per location: give one size per level "
                f"in MODEL.ANCHOR_GENERATOR.SIZES and ASPECT_RATIOS [[1.0]] (got {anchor_generator.num_anchors} "
                "anchors per location)"
            )
        return {
            "in_channels": channels.pop(),
            "strides": [s.stride for s in input_shape],
            "anchor_offset": cfg.MODEL.ANCHOR_GENERATOR.OFFSET,
            "dilation": cfg.MODEL.FPN_RPN.CASCADE.DILATION,
            "adaptive_conv_impl": cfg.MODEL.FPN_RPN.CASCADE.ADAPTIVE_CONV_IMPL,
        }

    def stage1(self, features: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """
        Returns:
            list[Tensor]: L tensors (N, 4, Hi, Wi), stage-1 deltas of the anchors.
            list[Tensor]: L tensors (N, C, Hi, Wi), the features stage 2 takes.
        """
        bridged = [self.stage1_conv(x).relu_() for x in features]
        return [self.stage1_deltas(x) for x in bridged], bridged

    def stage2(self, features: List[torch.Tensor], boxes: List[torch.Tensor]):
        """
        Args:
            features: stage 1's features; boxes: L tensors (N, Hi*Wi, 4), the stage-1 boxes.

        Returns:
            list[Tensor]: L tensors (N, 1, Hi, Wi), objectness logits.
            list[Tensor]: L tensors (N, 4, Hi, Wi), deltas of the stage-1 boxes.
        """
        logits, deltas = [], []
        for x, boxes_i, stride in zip(features, boxes, self.strides):
            offsets = box_aligned_offsets(boxes_i, stride, x.shape[2], x.shape[3], self.anchor_offset)
            t = self.stage2_conv(x, offsets).relu_()
            logits.append(self.objectness_logits(t))
            deltas.append(self.anchor_deltas(t))
        return logits, deltas

    def forward(self, features: List[torch.Tensor]):
        raise TypeError("CascadeRPNHead runs in two stages (stage1, stage2): build it with PROPOSAL_GENERATOR "
                        "'CascadeRPN', not 'RPN' or 'FPNRPN'")
