"""Losses of decoded boxes against their matched ground truth, summed over the pairs."""
import torch
from detectron2.structures import Boxes
from detectron2.structures.boxes import matched_pairwise_iou
from fvcore.nn import giou_loss

from ..choices import DECODED_BOX_LOSS_TYPES

__all__ = ["box_regression_loss", "iou_loss"]


def iou_loss(pred_boxes: torch.Tensor, target_boxes: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Sum of ``1 - IoU`` of the (P, 4) matched pairs, IoU clamped at ``eps`` (MMDetection's linear
    ``IoULoss``, which Cascade RPN trains with)."""
    return (1 - matched_pairwise_iou(Boxes(pred_boxes), Boxes(target_boxes)).clamp(min=eps)).sum()


def box_regression_loss(pred_boxes: torch.Tensor, target_boxes: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The summed "iou" or "giou" loss of (P, 4) predicted boxes against their (P, 4) targets."""
    if loss_type == "iou":
        return iou_loss(pred_boxes, target_boxes)
    if loss_type == "giou":
        return giou_loss(pred_boxes, target_boxes, reduction="sum")
    raise ValueError(f"loss_type must be one of {DECODED_BOX_LOSS_TYPES}, got {loss_type!r}")
