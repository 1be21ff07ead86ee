"""Selecting the final proposals of a batch: per-level top-K, filtering, NMS, top-K.

Unlike Detectron2's ``find_top_rpn_proposals``, which loops over images, every step
here runs once for the whole batch; NMS groups keep images (and, in per-level mode,
levels) apart, so the kept boxes are the same as image by image. It is cheaper than
Detectron2's path without changing its result:

- the per-level top-K is a ``topk`` rather than a sort of every score, where the two
  select the same anchors;
- :func:`top_k_proposals_per_level` decodes only the selected anchors, not all of them;
- on CPU the NMS groups (images, or image levels) run on torch's threads side by side.

Equal scores are ordered by index (level, then anchor), as a stable sort leaves them,
so the result does not depend on how a sort or NMS kernel breaks ties.
"""
import math
from concurrent.futures import ThreadPoolExecutor
from typing import List, Tuple

import torch
from detectron2.layers import batched_nms, cat
from detectron2.structures import Boxes, Instances
from torchvision.ops import nms

from .speedups import SPEEDUPS

# Fewer boxes than this are not worth starting threads for.
_THREADED_NMS_MIN_BOXES = 2000

__all__ = [
    "clip_boxes",
    "select_proposals",
    "top_k_proposals_per_level",
    "top_k_scores",
]


def top_k_scores(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The ``k`` highest scores of each row and their indices, in descending order, equal
    scores in index order: the first ``k`` of a stable descending sort.

    Args:
        scores: (N, R).
    """
    k = min(k, scores.shape[1])
    if scores.device.type == "cpu" and 0 < k < scores.shape[1]:
        # topk is an order of magnitude faster than a full sort on CPU. It may pick any of
        # several scores tied at the k-th place; such rows (rare) take the sort below.
        values, indices = scores.topk(k, dim=1)
        if bool(((scores >= values[:, -1:]).sum(dim=1) == k).all()):
            indices, order = indices.sort(dim=1)
            values, order = values.gather(1, order).sort(dim=1, descending=True, stable=True)
            return values, indices.gather(1, order)
    # On GPUs the segmented sort is fast and this path needs no host-device sync.
    values, indices = scores.sort(dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def top_k_proposals_per_level(
    anchors: List[torch.Tensor],
    pred_anchor_deltas: List[torch.Tensor],
    pred_objectness_logits: List[torch.Tensor],
    pre_nms_topk: int,
    box2box_transform,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The ``pre_nms_topk`` highest-scoring proposals of each level and image, decoding only
    the anchors kept: the boxes are those of decoding every anchor and then selecting, as
    decoding works box by box.

    Args:
        anchors: L tensors (Hi*Wi*A, 4), or (N, Hi*Wi*A, 4) where each image has its own
            (Cascade RPN's stage-1 boxes).
        pred_anchor_deltas: L tensors (N, Hi*Wi*A, 4).
        pred_objectness_logits: L tensors (N, Hi*Wi*A).
        box2box_transform: a ``Box2BoxTransform``.

    Returns:
        boxes (N, K, 4), scores (N, K) and level ids (K,), with K = sum_i min(Hi*Wi*A, pre_nms_topk).
    """
    num_images = pred_anchor_deltas[0].shape[0]
    batch_idx = torch.arange(num_images, device=pred_anchor_deltas[0].device)[:, None]
    deltas, kept_anchors, scores, levels = [], [], [], []
    for level_id, (anchors_i, deltas_i, logits_i) in enumerate(
        zip(anchors, pred_anchor_deltas, pred_objectness_logits)
    ):
        scores_i, idx = top_k_scores(logits_i, pre_nms_topk)
        scores.append(scores_i)
        deltas.append(deltas_i[batch_idx, idx])  # (N, k, 4)
        kept_anchors.append(anchors_i[idx] if anchors_i.dim() == 2 else anchors_i[batch_idx, idx])  # (N, k, 4)
        levels.append(torch.full((idx.shape[1],), level_id, dtype=torch.int64, device=idx.device))
    deltas, kept_anchors = cat(deltas, dim=1), cat(kept_anchors, dim=1)
    boxes = box2box_transform.apply_deltas(deltas.reshape(-1, 4), kept_anchors.reshape(-1, 4))
    return boxes.view(deltas.shape), cat(scores, dim=1), cat(levels, dim=0)


def clip_boxes(boxes: torch.Tensor, image_hw: torch.Tensor) -> torch.Tensor:
    """boxes (R, 4) clipped to their image's (R, 2) height and width, as Boxes.clip does."""
    h, w = image_hw[:, 0], image_hw[:, 1]
    x1 = torch.minimum(boxes[:, 0].clamp(min=0), w)
    y1 = torch.minimum(boxes[:, 1].clamp(min=0), h)
    x2 = torch.minimum(boxes[:, 2].clamp(min=0), w)
    y2 = torch.minimum(boxes[:, 3].clamp(min=0), h)
    return torch.stack((x1, y1, x2, y2), dim=-1)


def _nms_in_order(boxes: torch.Tensor, groups: torch.Tensor, nms_thresh: float) -> torch.Tensor:
    """
    Greedy NMS within each group, boxes taken in index order (``boxes`` are sorted by
    priority). Returns the kept indices, ascending.
    """
    # The NMS kernels order boxes by score with unstable sorts: strictly decreasing keys
    # make them follow the index order, whatever their tie-breaking.
    keys = -torch.arange(len(boxes), dtype=boxes.dtype, device=boxes.device)
    if boxes.device.type != "cpu":
        return batched_nms(boxes, keys, groups, nms_thresh).sort().values
    # On CPU, torchvision's batched_nms offsets each group's coordinates when there are
    # few boxes, which rounds them differently from an image on its own: one NMS per group
    # on the boxes as they are (Detectron2 runs one per image) gives the same IoUs.
    by_group = groups.sort(stable=True).indices
    group_idx = [idx for idx in by_group.split(torch.bincount(groups).tolist()) if len(idx)]

    def nms_group(idx):
        return idx[nms(boxes[idx], keys[idx], nms_thresh)]

    # torchvision's CPU NMS is single-threaded and releases the GIL: groups run side by side.
    workers = min(torch.get_num_threads(), len(group_idx))
    if SPEEDUPS.threaded_cpu_nms and workers > 1 and len(boxes) >= _THREADED_NMS_MIN_BOXES:
        with ThreadPoolExecutor(workers) as pool:
            kept = list(pool.map(nms_group, group_idx))
    else:
        kept = [nms_group(idx) for idx in group_idx]
    return cat(kept).sort().values if kept else groups.new_zeros((0,))


def rank_among(image_ids: torch.Tensor, num_images: int) -> torch.Tensor:
    """Position of each element among those of its image, for ``image_ids`` sorted ascending."""
    counts = torch.bincount(image_ids, minlength=num_images)
    return torch.arange(len(image_ids), device=image_ids.device) - (torch.cumsum(counts, 0) - counts)[image_ids]


def select_proposals(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    levels: torch.Tensor,
    image_sizes: List[Tuple[int, int]],
    nms_thresh: float,
    post_nms_topk: int,
    min_box_size: float,
    training: bool,
    per_level_nms: bool = False,
    score_thresh: float = 0.0,
) -> List[Instances]:
    """
    Filter, clip, NMS and keep the ``post_nms_topk`` best proposals of each image.

    Args:
        boxes (N, K, 4), scores (N, K), levels (K,): per-level top-K proposals, as
            :func:`top_k_proposals_per_level` returns them.
        image_sizes: (h, w) of each image.
        nms_thresh: IoU above which the lower-scoring box is suppressed.
        post_nms_topk: proposals kept per image after NMS.
        min_box_size: boxes with a side <= this (input pixels) are dropped.
        training: in training, non-finite boxes or scores raise FloatingPointError
            (training has diverged); at inference they are dropped.
        per_level_nms: NMS within each level (Detectron2) instead of across levels.
        score_thresh: in [0, 1); boxes with objectness probability below it are dropped.

    Returns:
        N Instances with ``proposal_boxes`` and ``objectness_logits``, sorted by score.
    """
    num_images, k = scores.shape
    device = boxes.device
    num_levels = int(levels.max()) + 1 if len(levels) else 1

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
    boxes = clip_boxes(boxes, image_hw[image_ids])
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (widths > min_box_size) & (heights > min_box_size)
    boxes, scores, image_ids, levels = boxes[keep], scores[keep], image_ids[keep], levels[keep]

    # Each image's boxes by descending score, equal scores in index order (level, rank)
    order = scores.sort(descending=True, stable=True).indices
    order = order[image_ids[order].sort(stable=True).indices]
    boxes, scores, image_ids, levels = boxes[order], scores[order], image_ids[order], levels[order]
    groups = image_ids * num_levels + levels if per_level_nms else image_ids
    keep = _nms_in_order(boxes, groups, nms_thresh)
    keep = keep[rank_among(image_ids[keep], num_images) < post_nms_topk]

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
