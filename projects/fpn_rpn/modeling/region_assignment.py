"""Cascade RPN's anchor-free assignment of its first stage (Vu et al., NeurIPS 2019, Sec. 3.3;
MMDetection's ``RegionAssigner``).

A ground-truth box of scale s = sqrt(w * h) belongs to level
``l = clamp(floor(log2(s / base_size) + 0.5), 0, L - 1)``, with ``base_size`` the anchor size
of the first level (32 px: 8 x stride 4). On that level an anchor is

- positive for the box when its centre lies in the box's centre region (the middle
  ``center_ratio`` of its width and height),
- ignored when its centre lies in the box's ignore region (the middle ``ignore_ratio``)
  but not in the centre region;

and on the two adjacent levels anchors whose centres lie in the box's ignore region are
ignored. Regions are rounded to feature-map cells as MMDetection does. Boxes are visited
in index order, a later box taking an anchor over an earlier one; the adjacent-level
ignores come last and override positives.
"""
from typing import List, Sequence, Tuple

import torch

__all__ = ["assign_by_region", "target_levels"]


def target_levels(gt_boxes: torch.Tensor, base_size: float, num_levels: int) -> torch.Tensor:
    """The level (0 ... L-1) of each of the (G, 4) boxes, by scale: (G,) int64."""
    scale = ((gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])).clamp(min=1e-12).sqrt()
    levels = torch.floor(torch.log2(scale) - torch.log2(scale.new_tensor(float(base_size))) + 0.5)
    return levels.clamp(min=0, max=num_levels - 1).long()


def _region(gt_boxes: torch.Tensor, ratio: float, stride: int) -> torch.Tensor:
    """The middle ``ratio`` of each (G, 4) box on a map of ``stride``, rounded to cells: (G, 4)."""
    f = gt_boxes / stride
    r = (1 - ratio) / 2  # the margin cut off each side
    x1 = torch.round((1 - r) * f[:, 0] + r * f[:, 2])
    y1 = torch.round((1 - r) * f[:, 1] + r * f[:, 3])
    x2 = torch.round(r * f[:, 0] + (1 - r) * f[:, 2])
    y2 = torch.round(r * f[:, 1] + (1 - r) * f[:, 3])
    return torch.stack((x1, y1, x2, y2), dim=1)


def _centres_inside(centres: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """(R, G): whether each of the (R, 2) centres lies in each of the (G, 4) regions, borders included."""
    x, y = centres[:, None, 0], centres[:, None, 1]
    return (x >= regions[:, 0]) & (x <= regions[:, 2]) & (y >= regions[:, 1]) & (y <= regions[:, 3])


def assign_by_region(
    anchors: List[torch.Tensor],
    gt_boxes: torch.Tensor,
    strides: Sequence[int],
    base_size: float,
    center_ratio: float = 0.2,
    ignore_ratio: float = 0.5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Args:
        anchors: L tensors (Hi*Wi, 4), one anchor per location, XYXY input pixels.
        gt_boxes: (G, 4) ground-truth boxes of one image.
        strides: the stride of each level.
        base_size: the anchor size of the first level (input pixels).

    Returns:
        labels (R,) with R = sum(Hi*Wi): 1 positive, 0 negative, -1 ignored;
        matched (R,): the index of the box a positive anchor regresses to (0 elsewhere).
    """
    num_anchors = sum(len(a) for a in anchors)
    if len(gt_boxes) == 0:
        zeros = torch.zeros(num_anchors, dtype=torch.int64, device=gt_boxes.device)
        return zeros, zeros.clone()
    levels = target_levels(gt_boxes, base_size, len(anchors))
    gt_index = torch.arange(1, len(gt_boxes) + 1, device=gt_boxes.device)  # 1-based: 0 = none
    labels, matched = [], []
    for level, (anchors_l, stride) in enumerate(zip(anchors, strides)):
        centres = ((anchors_l[:, :2] + anchors_l[:, 2:]) * 0.5) / stride  # (R_l, 2), map cells
        in_ignore = _centres_inside(centres, _region(gt_boxes, ignore_ratio, stride))  # (R_l, G)
        in_centre = _centres_inside(centres, _region(gt_boxes, center_ratio, stride))
        # The last box of this level (index order) whose ignore region holds the centre decides;
        # centre regions lie inside ignore regions.
        last = (in_ignore & (levels == level)).mul(gt_index).amax(dim=1)  # (R_l,), 0: no box
        owner = (last - 1).clamp(min=0)
        positive = (last > 0) & in_centre.gather(1, owner[:, None]).squeeze(1)
        labels_l = torch.where(positive, 1, torch.where(last > 0, -1, 0))
        # boxes of the adjacent levels ignore this level's anchors in their ignore region
        near = (in_ignore & ((levels - level).abs() == 1)).any(dim=1)
        labels_l = torch.where(near, -1, labels_l)
        labels.append(labels_l)
        matched.append(torch.where(labels_l == 1, owner, 0))
    return torch.cat(labels), torch.cat(matched)
