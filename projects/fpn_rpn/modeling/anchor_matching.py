"""Labelling and sampling the anchors of a whole batch, equal to Detectron2's RPN path.

Detectron2's ``RPN.label_and_sample_anchors`` handles one image at a time: the IoU of
its gt boxes with every anchor, :class:`~detectron2.modeling.matcher.Matcher` (with
low-quality matches) over all anchors, ``subsample_labels``, then a gather of a gt box
for every anchor. Here the IoU and the labels of all images are computed in one pass,
and the matched gt box is looked up only for the sampled positives, the only anchors
whose box Detectron2's losses read. The random sampling alone runs image by image: it
calls ``torch.randperm`` with the same sizes in the same order as ``subsample_labels``,
so that for a given ``torch.manual_seed`` the sampled anchors are Detectron2's.
"""
from typing import List, Sequence, Tuple

import torch
from detectron2.modeling.matcher import Matcher

__all__ = ["pairwise_iou_rows", "label_anchors", "sample_labels", "match_and_sample"]

# Most IoUs (gt boxes x anchors) computed by one set of ops: bounds the temporaries of
# pairwise_iou_rows to a few tensors of this many floats (128 MiB each), however many
# gt boxes a batch has.
_IOU_CHUNK_ELEMENTS = 1 << 25


def pairwise_iou_rows(gt_boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """
    IoU of gt boxes (G, 4) with anchors (R, 4) -> (G, R), value for value equal to
    :func:`detectron2.structures.pairwise_iou` (same operations in the same order), but
    on one coordinate at a time instead of (G, R, 2) pairs.
    """
    area_gt = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    area_anchor = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    gx1, gy1, gx2, gy2 = (gt_boxes[:, i, None] for i in range(4))
    ax1, ay1, ax2, ay2 = anchors.unbind(dim=1)
    inter = torch.minimum(gx2, ax2).sub_(torch.maximum(gx1, ax1)).clamp_(min=0)
    inter.mul_(torch.minimum(gy2, ay2).sub_(torch.maximum(gy1, ay1)).clamp_(min=0))
    union = (area_gt[:, None] + area_anchor).sub_(inter)
    # 0 where boxes do not overlap, also for degenerate gt boxes whose union is not positive
    return torch.where(inter > 0, inter / union, torch.zeros((), dtype=inter.dtype, device=inter.device))


def _threshold_labels(matched_vals: torch.Tensor, matcher: Matcher) -> torch.Tensor:
    """Matcher's label for each IoU: ``labels[k]`` where ``thresholds[k] <= v < thresholds[k + 1]``."""
    # IoUs are never NaN (pairwise_iou_rows gives 0 for non-finite boxes), so counting the
    # inner thresholds reached picks the same interval as Matcher's (low <= v < high) tests.
    bucket = torch.zeros(matched_vals.shape, dtype=torch.int64, device=matched_vals.device)
    for low in matcher.thresholds[1:-1]:
        bucket += matched_vals >= low
    table = torch.tensor(matcher.labels, dtype=torch.int8, device=matched_vals.device)
    return table[bucket]


def label_anchors(
    anchors: torch.Tensor, gt_boxes: Sequence[torch.Tensor], matcher: Matcher
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """
    Label every anchor of every image as Matcher does, before sampling.

    Args:
        anchors: (R, 4) anchors of all levels.
        gt_boxes: N tensors (Mi, 4), the gt boxes of each image.
        matcher: its thresholds, labels and ``allow_low_quality_matches`` are used.

    Returns:
        labels: (N, R) int8 in {-1, 0, 1}, Matcher's labels for each image.
        iou: N tensors (Mi, R), each image's IoU matrix, for looking up matched gt boxes.
    """
    num_images, num_anchors = len(gt_boxes), anchors.shape[0]
    counts = [len(b) for b in gt_boxes]
    all_gt = torch.cat([anchors.new_zeros((0, 4))] + [b.to(anchors.dtype) for b in gt_boxes])
    chunks = [pairwise_iou_rows(rows, anchors)
              for rows in all_gt.split(max(1, _IOU_CHUNK_ELEMENTS // max(num_anchors, 1)))]
    iou_all = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    iou = list(iou_all.split(counts))

    # Images without gt have IoU 0 with every anchor, which Matcher labels labels[0].
    matched_vals = anchors.new_zeros((num_images, num_anchors))
    for i, iou_i in enumerate(iou):
        if len(iou_i):
            torch.amax(iou_i, dim=0, out=matched_vals[i])
    labels = _threshold_labels(matched_vals, matcher)
    if matcher.allow_low_quality_matches and len(iou_all):
        # Each gt's best anchors (ties included) are positive, even at IoU 0: a gt that
        # overlaps no anchor then makes every anchor it does not overlap positive, as in
        # Detectron2's set_low_quality_matches_.
        is_best = iou_all == iou_all.amax(dim=1, keepdim=True)
        for i, is_best_i in enumerate(is_best.split(counts)):
            if len(is_best_i):
                labels[i].masked_fill_(is_best_i.any(dim=0), 1)
    return labels, iou


def sample_labels(
    labels: torch.Tensor, batch_size_per_image: int, positive_fraction: float
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """
    Keep ``batch_size_per_image`` anchors per image (at most ``positive_fraction`` of them
    positive) and mark the rest -1, drawing from torch's RNG exactly as
    ``detectron2.modeling.sampling.subsample_labels`` called once per image.

    Args:
        labels: (N, R) int8 in {-1, 0, 1}.

    Returns:
        sampled labels (N, R) int8, and N tensors of the sampled positive anchor indices.
    """
    device = labels.device
    sampled = torch.full_like(labels, -1)
    positives = []
    for labels_i, sampled_i in zip(labels, sampled):
        positive = (labels_i == 1).nonzero().squeeze(1)
        negative = (labels_i == 0).nonzero().squeeze(1)
        num_pos = min(positive.numel(), int(batch_size_per_image * positive_fraction))
        num_neg = min(negative.numel(), batch_size_per_image - num_pos)
        pos_idx = positive[torch.randperm(positive.numel(), device=device)[:num_pos]]
        neg_idx = negative[torch.randperm(negative.numel(), device=device)[:num_neg]]
        sampled_i[pos_idx] = 1
        sampled_i[neg_idx] = 0
        positives.append(pos_idx)
    return sampled, positives


def match_and_sample(
    anchors: torch.Tensor,
    gt_boxes: Sequence[torch.Tensor],
    matcher: Matcher,
    batch_size_per_image: int,
    positive_fraction: float,
    ignore: torch.Tensor = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Args:
        anchors: (R, 4) anchors of all levels.
        gt_boxes: N tensors (Mi, 4).
        ignore: optional (N, R) bool, anchors to label -1 before sampling.

    Returns:
        labels: (N, R) int8 sampled labels in {-1, 0, 1}.
        matched_gt_boxes: (N, R, 4), for each positive anchor the gt box with which it
            has the highest IoU (the first on ties, as ``Matcher``); 0 elsewhere.
    """
    labels, iou = label_anchors(anchors, gt_boxes, matcher)
    if ignore is not None:
        labels.masked_fill_(ignore, -1)
    labels, positives = sample_labels(labels, batch_size_per_image, positive_fraction)
    matched_gt_boxes = anchors.new_zeros((len(gt_boxes),) + anchors.shape)
    for i, (iou_i, pos_idx, gt_i) in enumerate(zip(iou, positives, gt_boxes)):
        if len(pos_idx):
            # max over gts returns the first maximum, as Matcher's does over all anchors
            matched_gt_boxes[i, pos_idx] = gt_i.to(anchors.dtype)[iou_i[:, pos_idx].max(dim=0).indices]
    return labels, matched_gt_boxes
