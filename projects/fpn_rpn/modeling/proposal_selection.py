"""Selecting the final proposals of a batch: per-level top-K, filtering, NMS, top-K.

Unlike Detectron2's ``find_top_rpn_proposals``, which loops over images, every step
here runs once for the whole batch; NMS groups keep images (and, in per-level mode,
levels) apart, so the kept boxes are the same as image by image. It is cheaper than
Detectron2's path without changing its result:

- the per-level top-K is a ``topk`` rather than a sort of every score, where the two
  select the same anchors;
- :func:`top_k_proposals_per_level` decodes only the selected anchors, not all of them.

Under ``torch.jit.trace`` and ``torch.jit.script`` (export: ``fpn_rpn.export``) the same
steps take plain paths the exported graph can hold: no ``.tolist()``, sizes as
traced tensors, one NMS per group found with a mask; the selected proposals are the same.

Equal scores are ordered by index (level, then anchor), as a stable sort leaves them,
so the result does not depend on how a sort or NMS kernel breaks ties.

Per-level mode computes Detectron2's NMS arithmetic, not only its rule. NMS keeps a box by
comparing IoUs with the threshold, and the IoUs depend on the coordinates NMS is given:
torchvision's ``batched_nms`` either runs one ``nms`` per group on the boxes as they are,
or (fewer boxes: <= 1000 on CPU, <= 25000 on CUDA) shifts each group's boxes by group id x
(largest coordinate + 1) and runs one ``nms``; shifted coordinates are rounded to float32,
so a box whose IoU sits at the threshold can be kept by one and suppressed by the other.
Detectron2's ``find_top_rpn_proposals`` calls ``batched_nms`` once per image with the
level ids. So, by device:

- on CUDA, per-level mode makes that same call, image by image: the same boxes (in the
  same order, by the keys below), the same level ids, the same count of boxes (which picks
  torchvision's path), and so the same shifted coordinates, IoUs and kept boxes. One
  ``batched_nms`` over every image x level would shift by up to (N*L - 1) x (largest
  coordinate of the batch + 1): about 12k px for two 800 x 1333 images where an image
  alone spans about 5.3k, and the float32 roundings would differ;
- on CPU, each (image, level) runs ``nms`` on the boxes as they are: what torchvision's
  CPU ``batched_nms`` computes for an image of more than 1000
  boxes (one ``nms`` per level, no shift), which the shipped configs' images have (P2 alone
  gives PRE_NMS_TOPK boxes). For an image of at most 1000 boxes Detectron2's call shifts
  the levels, and a box at the threshold could go the other way (tested inputs do not
  have one).

Cross-level mode has no Detectron2 counterpart; there the groups are the images.
"""
import math
from typing import List, Optional, Tuple

import torch
from detectron2.layers import batched_nms, cat
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances
from torchvision.ops import nms

__all__ = [
    "clip_boxes",
    "image_sizes_tensor",
    "select_proposals",
    "top_k_proposals_per_level",
    "top_k_scores",
]


@torch.jit.unused
def _in_onnx_export() -> bool:
    return torch.onnx.is_in_onnx_export()


def _stable_sort(x: torch.Tensor, dim: int = -1, descending: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x.sort(..., stable=True)``, also in an ONNX export, where the stable overload has no
    ONNX form: there the plain one is used, which becomes ONNX's TopK, itself stable (equal
    values in index order, by its specification)."""
    if not torch.jit.is_scripting() and _in_onnx_export():
        return x.sort(dim=dim, descending=descending)
    return x.sort(dim=dim, descending=descending, stable=True)


def top_k_scores(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The ``k`` highest scores of each row and their indices, in descending order, equal
    scores in index order: the first ``k`` of a stable descending sort.

    Args:
        scores: (N, R).
    """
    if torch.jit.is_tracing():
        # R is a traced size here: the first min(R, k) of the sort, taken by index so that
        # the graph follows the input's size (topk's k and slicing would freeze it)
        values, indices = _stable_sort(scores, dim=1, descending=True)
        first = torch.arange(torch.clamp(_traced_size(scores, 1), max=k), device=scores.device)
        return values[:, first], indices[:, first]
    k = min(k, scores.shape[1])
    if scores.device.type == "cpu" and 0 < k < scores.shape[1] and not torch.jit.is_scripting():
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
    box2box_transform: Box2BoxTransform,
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
    deltas: List[torch.Tensor] = []
    kept_anchors: List[torch.Tensor] = []
    scores: List[torch.Tensor] = []
    levels: List[torch.Tensor] = []
    for level_id, (anchors_i, deltas_i, logits_i) in enumerate(
        zip(anchors, pred_anchor_deltas, pred_objectness_logits)
    ):
        scores_i, idx = top_k_scores(logits_i, pre_nms_topk)
        scores.append(scores_i)
        deltas.append(deltas_i[batch_idx, idx])  # (N, k, 4)
        kept_anchors.append(anchors_i[idx] if anchors_i.dim() == 2 else anchors_i[batch_idx, idx])  # (N, k, 4)
        # (k,), its length taken from idx so that a traced graph follows it
        levels.append(torch.full_like(idx[0], level_id))
    deltas, kept_anchors = cat(deltas, dim=1), cat(kept_anchors, dim=1)
    boxes = box2box_transform.apply_deltas(deltas.reshape(-1, 4), kept_anchors.reshape(-1, 4))
    return boxes.view(deltas.shape), cat(scores, dim=1), cat(levels, dim=0)


def clip_boxes(boxes: torch.Tensor, image_hw: torch.Tensor) -> torch.Tensor:
    """
    boxes (R, 4) clipped to their image's (R, 2) height and width, as Boxes.clip does. Not
    Boxes.clip itself: it takes one (h, w) of Python numbers, and here each row has its own
    image (the whole batch at once), and the sizes are tensors a traced graph computes.
    """
    h, w = image_hw[:, 0], image_hw[:, 1]
    x1 = torch.minimum(boxes[:, 0].clamp(min=0), w)
    y1 = torch.minimum(boxes[:, 1].clamp(min=0), h)
    x2 = torch.minimum(boxes[:, 2].clamp(min=0), w)
    y2 = torch.minimum(boxes[:, 3].clamp(min=0), h)
    return torch.stack((x1, y1, x2, y2), dim=-1)


@torch.jit.unused
def _traced_size(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.shape[dim]`` under ``torch.jit.trace``, where it is a tensor the graph computes."""
    size = x.shape[dim]
    assert isinstance(size, torch.Tensor), "only called under torch.jit.trace"
    return size


def image_sizes_tensor(image_sizes: List[Tuple[int, int]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(N, 2) heights and widths of ``image_sizes``."""
    if torch.jit.is_tracing():
        return _traced_image_sizes(image_sizes).to(dtype=dtype, device=device)
    return torch.tensor([[h, w] for h, w in image_sizes], dtype=dtype, device=device).reshape(-1, 2)


@torch.jit.unused
def _traced_image_sizes(image_sizes: List[Tuple[int, int]]) -> torch.Tensor:
    """image_sizes_tensor under torch.jit.trace, where ImageList's sizes are (2,) tensors
    computed from the input's shape."""
    return torch.stack([torch.stack(list(s)) if isinstance(s, (tuple, list)) else s for s in image_sizes])


def _nms_keys(boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    ``boxes`` at least float32, and strictly decreasing NMS keys in their dtype. The NMS
    kernels order boxes by score with unstable sorts: such keys make them follow the index
    order, whatever their tie-breaking. Keys in fp16 or bf16 would tie (fp16 has 11
    significant bits: -2049 rounds to -2048), so those boxes run in float32, an exact widening.
    """
    dtype = torch.promote_types(boxes.dtype, torch.float32)
    boxes = boxes.to(dtype)
    return boxes, -torch.arange(boxes.shape[0], dtype=dtype, device=boxes.device)


def _nms_in_order(boxes: torch.Tensor, groups: torch.Tensor, nms_thresh: float, num_groups: int) -> torch.Tensor:
    """
    Greedy NMS within each group (ids in [0, num_groups)), boxes taken in index order
    (``boxes`` are sorted by priority). Returns the kept indices, ascending.
    """
    boxes, keys = _nms_keys(boxes)
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        # One NMS per group on the boxes as they are, as below, the groups found by masks
        # in a loop of fixed length that the exported graph holds.
        kept = [torch.zeros(0, dtype=torch.int64, device=boxes.device)]
        for group in range(num_groups):
            idx = (groups == group).nonzero().squeeze(1)
            kept.append(idx[nms(boxes[idx], keys[idx], nms_thresh)])
        return torch.cat(kept).sort().values
    if boxes.device.type != "cpu":
        return batched_nms(boxes, keys, groups, nms_thresh).sort().values
    return _cpu_nms_by_group(boxes, keys, groups, nms_thresh)


@torch.jit.unused
def _cpu_nms_by_group(boxes: torch.Tensor, keys: torch.Tensor, groups: torch.Tensor, nms_thresh: float) -> torch.Tensor:
    """_nms_in_order on CPU, eager: one ``nms`` per group."""
    # torchvision's batched_nms offsets each group's coordinates when there are few boxes,
    # which rounds them differently from an image on its own: one NMS per group on the
    # boxes as they are (Detectron2 runs one per image) gives the same IoUs.
    by_group = groups.sort(stable=True).indices
    group_idx = [idx for idx in by_group.split(torch.bincount(groups).tolist()) if len(idx)]
    kept = [idx[nms(boxes[idx], keys[idx], nms_thresh)] for idx in group_idx]
    return cat(kept).sort().values if kept else groups.new_zeros((0,))


@torch.jit.unused
def _per_level_nms_image_by_image(boxes: torch.Tensor, image_ids: torch.Tensor, levels: torch.Tensor,
                                  nms_thresh: float, num_images: int, post_nms_topk: int) -> List[torch.Tensor]:
    """
    Each image's kept indices (its first ``post_nms_topk``, ascending) from Detectron2's
    ``batched_nms`` on the image's boxes with their level ids: the call
    ``find_top_rpn_proposals`` makes, so the same NMS arithmetic. ``boxes`` are sorted by
    image, then by priority.
    """
    boxes, keys = _nms_keys(boxes)
    kept: List[torch.Tensor] = []
    start = 0
    for count in torch.bincount(image_ids, minlength=num_images).tolist():  # one host-device sync
        end = start + count
        # batched_nms returns by decreasing key, which is ascending index
        keep_i = batched_nms(boxes[start:end], keys[start:end], levels[start:end], nms_thresh)
        kept.append(start + keep_i[:post_nms_topk])
        start = end
    return kept


@torch.jit.unused
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
    per_level_nms: bool = True,
    score_thresh: float = 0.0,
    num_levels: Optional[int] = None,
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
        num_levels: the number of levels (``levels.max() + 1`` when not given, which a
            traced graph would hold as a constant).

    Returns:
        N Instances with ``proposal_boxes`` and ``objectness_logits``, sorted by score.
    """
    num_images = len(image_sizes)  # the batch size, fixed in a traced graph as in Detectron2's
    device = boxes.device
    if num_levels is None:
        num_levels = int(levels.max()) + 1 if levels.numel() else 1

    # (N, K, ...) -> (N*K, ...), with each box's image and level
    image_ids = torch.arange(num_images, device=device)[:, None].expand_as(scores).reshape(-1)
    levels = levels[None].expand_as(scores).reshape(-1)
    boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1)

    keep = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
    if training and not bool(keep.all()):
        raise FloatingPointError(
            "RPN predicted boxes or objectness logits contain Inf/NaN: training has diverged "
            "(lower SOLVER.BASE_LR, or use MODEL.RESNETS.NORM/MODEL.FPN.NORM 'GN' from random init)"
        )
    if score_thresh > 0:
        # sigmoid(s) >= p  <=>  s >= logit(p), which spares a sigmoid over all scores
        keep = keep & (scores >= math.log(score_thresh) - math.log1p(-score_thresh))
    # Clipped before the non-finite boxes are dropped (clipping turns inf into the image's
    # side: ``keep`` was taken before), so that one mask, one host-device sync, filters all
    image_hw = image_sizes_tensor(image_sizes, boxes.dtype, device)
    boxes = clip_boxes(boxes, image_hw[image_ids])
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = keep & ((widths > min_box_size) & (heights > min_box_size))  # not &=: ONNX exports no in-place and
    boxes, scores, image_ids, levels = boxes[keep], scores[keep], image_ids[keep], levels[keep]

    # Each image's boxes by descending score, equal scores in index order (level, rank)
    order = _stable_sort(scores, descending=True)[1]
    order = order[_stable_sort(image_ids[order])[1]]
    boxes, scores, image_ids, levels = boxes[order], scores[order], image_ids[order], levels[order]
    if per_level_nms:
        groups, num_groups = image_ids * num_levels + levels, num_images * num_levels
    else:
        groups, num_groups = image_ids, num_images
    # the condition as TorchScript recognises it, so that scripting compiles this branch only
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        keep = _nms_in_order(boxes, groups, nms_thresh, num_groups)
        # each image's first post_nms_topk, by mask and slice (no host-side counts)
        per_image = [keep[image_ids[keep] == i][:post_nms_topk] for i in range(num_images)]
    else:
        per_image = _kept_per_image(boxes, image_ids, levels, groups, num_groups, nms_thresh, num_images,
                                    post_nms_topk, per_level_nms)
    return _instances(image_sizes, [boxes[k] for k in per_image], [scores[k] for k in per_image])


@torch.jit.unused
def _kept_per_image(boxes, image_ids, levels, groups, num_groups: int, nms_thresh: float, num_images: int,
                    post_nms_topk: int, per_level_nms: bool) -> List[torch.Tensor]:
    """Outside export: each image's kept indices, its first ``post_nms_topk`` in priority order."""
    if per_level_nms and boxes.device.type != "cpu":
        # Detectron2's own NMS call, image by image (see the module's docstring)
        return _per_level_nms_image_by_image(boxes, image_ids, levels, nms_thresh, num_images, post_nms_topk)
    keep = _nms_in_order(boxes, groups, nms_thresh, num_groups)
    keep = keep[rank_among(image_ids[keep], num_images) < post_nms_topk]
    return list(keep.split(torch.bincount(image_ids[keep], minlength=num_images).tolist()))


def _instances(image_sizes: List[Tuple[int, int]], boxes_per_image: List[torch.Tensor],
               scores_per_image: List[torch.Tensor]) -> List[Instances]:
    results: List[Instances] = []
    for image_size, boxes_i, scores_i in zip(image_sizes, boxes_per_image, scores_per_image):
        res = Instances(image_size)
        res.proposal_boxes = Boxes(boxes_i)
        res.objectness_logits = scores_i
        results.append(res)
    return results
