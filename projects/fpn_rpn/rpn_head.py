from typing import List

import torch
from torch import nn
from detectron2.config import configurable
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY, StandardRPNHead

__all__ = ["FPNRPNHead", "OBJECTNESS_MODES"]

OBJECTNESS_MODES = ("sigmoid", "softmax")


@RPN_HEAD_REGISTRY.register()
class FPNRPNHead(StandardRPNHead):
    """
    RPN head shared across FPN levels: 3x3 conv(s) + ReLU, then sibling 1x1 convs for
    objectness and box deltas. Parameter names are StandardRPNHead's (``conv``,
    ``objectness_logits``, ``anchor_deltas``), so a Detectron2 RPN checkpoint loads
    unchanged in "sigmoid" mode.

    In "softmax" mode the objectness conv predicts two scores per anchor, channels
    ``[background x A, object x A]`` as in the original Faster R-CNN. The head then
    returns their difference ``object - background``: a logit whose sigmoid is the
    softmax object probability, and whose binary cross-entropy equals the two-class
    softmax cross-entropy. The proposal generator thus treats both modes alike.
    """

    @configurable
    def __init__(self, *, in_channels: int, num_anchors: int, box_dim: int = 4,
                 conv_dims: List[int] = (-1,), objectness: str = "sigmoid"):
        """
        Args:
            objectness (str): "sigmoid" (one logit per anchor) or "softmax" (two scores
                per anchor). Others: see :class:`StandardRPNHead`.
        """
        if objectness not in OBJECTNESS_MODES:
            raise ValueError(
                f"MODEL.FPN_RPN.OBJECTNESS must be one of {OBJECTNESS_MODES}, got {objectness!r}"
            )
        if len(conv_dims) == 0:
            raise ValueError("MODEL.RPN.CONV_DIMS is empty: give at least one conv width (-1 = input width)")
        super().__init__(in_channels=in_channels, num_anchors=num_anchors, box_dim=box_dim,
                         conv_dims=conv_dims)
        self.objectness = objectness
        if objectness == "softmax":
            hidden = self.objectness_logits.in_channels
            self.objectness_logits = nn.Conv2d(hidden, 2 * num_anchors, kernel_size=1)
            nn.init.normal_(self.objectness_logits.weight, std=0.01)
            nn.init.constant_(self.objectness_logits.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["objectness"] = cfg.MODEL.FPN_RPN.OBJECTNESS
        return ret

    def forward(self, features: List[torch.Tensor]):
        """
        Returns:
            list[Tensor]: L tensors (N, A, Hi, Wi), objectness logits.
            list[Tensor]: L tensors (N, A*box_dim, Hi, Wi), anchor deltas.
        """
        if self.objectness == "sigmoid":
            return super().forward(features)
        pred_objectness_logits, pred_anchor_deltas = [], []
        for x in features:
            t = self.conv(x)
            # (N, 2A, Hi, Wi) -> background, object: each (N, A, Hi, Wi)
            background, obj = self.objectness_logits(t).chunk(2, dim=1)
            pred_objectness_logits.append(obj - background)
            pred_anchor_deltas.append(self.anchor_deltas(t))
        return pred_objectness_logits, pred_anchor_deltas
