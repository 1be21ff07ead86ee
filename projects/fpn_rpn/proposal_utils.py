"""Selecting the final proposals of a batch: per-level top-K, filtering, NMS, top-K.

Unlike Detectron2's ``find_top_rpn_proposals``, which loops over images, every
step here runs once for the whole batch; NMS groups keep images (and, in per-level
mode, levels) apart, so the kept boxes are the same as image by image.
"""
import math
from typing import List, Tuple

import torch
from detectron2.layers import batched_nms, cat
from detectron2.structures import Boxes, Instances

__all__ = ["find_top_proposals", "select_top_k_per_level"]


def select_top_k_per_level(
    proposals: List[torch.Tensor], pred_objectness_logits: List[torch.Tensor], pre_nms_topk: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Keep the ``pre_nms_topk`` highest-scoring proposals of each level and image.

    Args:
        proposals: L tensors (N, Hi*Wi*A, 4).
        pred_objectness_logits: L tensors (N, Hi*Wi*A).

    Returns:
        boxes (N, K, 4), scores (N, K) and level ids (K,), with K = sum_i min(Hi*Wi*A, topk).
    """
    device = proposals[0].device
    batch_idx = torch.arange(proposals[0].shape[0], device=device)[:, None]
    boxes, scores, levels = [], [], []
    for level_id, (proposals_i, logits_i) in enumerate(zip(proposals, pred_objectness_logits)):
        k = min(logits_i.shape[1], pre_nms_topk)
        # sort, not topk, so that ties are broken exactly as in Detectron2
        logits_i, idx = logits_i.sort(descending=True, dim=1)
        scores.append(logits_i[:, :k])
        boxes.append(proposals_i[batch_idx, idx[:, :k]])  # (N, k, 4)
        levels.append(torch.full((k,), level_id, dtype=torch.int64, device=device))
    return cat(boxes, dim=1), cat(scores, dim=1), cat(levels, dim=0)


def _clip(boxes: torch.Tensor, image_hw: torch.Tensor) -> torch.Tensor:
    """boxes (R, 4) clipped to their image's (R, 2) height and width, as Boxes.clip does."""
    h, w = image_hw[:, 0], image_hw[:, 1]
    x1 = torch.minimum(boxes[:, 0].clamp(min=0), w)
    y1 = torch.minimum(boxes[:, 1].clamp(min=0), h)
    x2 = torch.minimum(boxes[:, 2].clamp(min=0), w)
    y2 = torch.minimum(boxes[:, 3].clamp(min=0), h)
    return torch.stack((x1, y1, x2, y2), dim=-1)


def _first_k_per_image(image_ids: torch.Tensor, num_images: int, k: int) -> torch.Tensor:
    """
    Args:
        image_ids (R,): image of each kept box, boxes sorted by score descending.

    Returns:
        indices into ``image_ids``, grouped by image, at most ``k`` per image, each
        group still in descending score order.
    """
    order = torch.sort(image_ids, stable=True).indices
    counts = torch.bincount(image_ids, minlength=num_images)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=order.device) - starts[image_ids[order]]
    return order[rank < k]


def find_top_proposals(
    proposals: List[torch.Tensor],
    pred_objectness_logits: List[torch.Tensor],
    image_sizes: List[Tuple[int, int]],
    nms_thresh: float,
    pre_nms_topk: int,
    post_nms_topk: int,
    min_box_size: float,
    training: bool,
    per_level_nms: bool = False,
    score_thresh: float = 0.0,
) -> List[Instances]:
    """
    Args:
        proposals: L tensors (N, Hi*Wi*A, 4), decoded boxes.
        pred_objectness_logits: L tensors (N, Hi*Wi*A).
        image_sizes: (h, w) of each image.
        nms_thresh: IoU above which the lower-scoring box is suppressed.
        pre_nms_topk: proposals kept per level and image before NMS.
        post_nms_topk: proposals kept per image after NMS.
        min_box_size: boxes with a side <= this (input pixels) are dropped.
        training: in training, non-finite boxes or scores raise FloatingPointError
            (training has diverged); at inference they are dropped.
        per_level_nms: NMS within each level (Detectron2) instead of across levels.
        score_thresh: in [0, 1); boxes with objectness probability below it are dropped.

    Returns:
        N Instances with ``proposal_boxes`` and ``objectness_logits``, sorted by score.
    """
    num_images = len(image_sizes)
    boxes, scores, levels = select_top_k_per_level(proposals, pred_objectness_logits, pre_nms_topk)
    device = boxes.device
    num_levels, k = len(proposals), scores.shape[1]

    # (N, K, ...) -> (N*K, ...), with each box's image and level
    boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1)
    image_ids = torch.arange(num_images, device=device).repeat_interleave(k)
    levels = levels.repeat(num_images)

    keep = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
    if training and not bool(keep.all()):
        raise FloatingPointError(
            "RPN predicted boxes or objectness logits contain Inf/NaN: training has diverged "
            "(lower SOLVER.BASE_LR, or use MODEL.RESNETS.NORM/MODEL.FPN.NORM 'GN' from random init)"
        )
    if score_thresh > 0:
        # sigmoid(s) >= p  <=>  s >= logit(p), which spares a sigmoid over all scores
        keep &= scores >= math.log(score_thresh) - math.log1p(-score_thresh)
    image_hw = torch.tensor(image_sizes, dtype=boxes.dtype, device=device).reshape(-1, 2)
    boxes, scores = boxes[keep], scores[keep]
    image_ids, levels = image_ids[keep], levels[keep]
    boxes = _clip(boxes, image_hw[image_ids])
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (widths > min_box_size) & (heights > min_box_size)
    boxes, scores, image_ids, levels = boxes[keep], scores[keep], image_ids[keep], levels[keep]

    groups = image_ids * num_levels + levels if per_level_nms else image_ids
    keep = batched_nms(boxes, scores, groups, nms_thresh).sort().values
    # Descending score, equal scores in index order (image, level, rank), as Detectron2's
    # stable per-image sort leaves them, so that ties come out in its order.
    keep = keep[scores[keep].sort(descending=True, stable=True).indices]
    keep = keep[_first_k_per_image(image_ids[keep], num_images, post_nms_topk)]

    counts = torch.bincount(image_ids[keep], minlength=num_images).tolist()
    results = []
    for image_size, boxes_i, scores_i in zip(
        image_sizes, boxes[keep].split(counts), scores[keep].split(counts)
    ):
        res = Instances(image_size)
        res.proposal_boxes = Boxes(boxes_i)
        res.objectness_logits = scores_i
        results.append(res)
    return results
