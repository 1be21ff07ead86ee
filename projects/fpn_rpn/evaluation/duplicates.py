"""Near-duplicate proposals: pairs of an image's proposals that overlap above an IoU.

At an RPN's own NMS threshold, cross-level NMS leaves no such pair, and per-level NMS
leaves none inside a level: every pair it leaves joins two FPN levels, i.e. one object
proposed twice, which takes a place in the budget that another object could have used.
"""
from typing import Mapping

import numpy as np
import torch
from detectron2.structures import Boxes, pairwise_iou

__all__ = ["count_duplicates", "duplicates_per_image"]


def count_duplicates(boxes: torch.Tensor, iou_thresh: float) -> int:
    """Pairs of ``boxes`` (R, 4) XYXY with IoU above ``iou_thresh``."""
    if len(boxes) < 2:
        return 0
    iou = pairwise_iou(Boxes(boxes), Boxes(boxes))
    return int((iou > iou_thresh).triu(diagonal=1).sum())


def duplicates_per_image(proposals: Mapping, iou_thresh: float, top_k: int) -> np.ndarray:
    """
    Near-duplicate pairs (IoU above ``iou_thresh``) among the ``top_k`` best-scored
    proposals of each image, in the order of ``proposals`` (image_id -> "boxes", "scores").
    """
    counts = []
    for image in proposals.values():
        order = np.argsort(-np.asarray(image["scores"]), kind="stable")[:top_k]
        counts.append(count_duplicates(torch.as_tensor(np.asarray(image["boxes"])[order]), iou_thresh))
    return np.asarray(counts, dtype=np.int64)
