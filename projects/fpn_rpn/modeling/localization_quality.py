"""
Localization-quality objectness (OLN: Kim et al., "Learning Open-World Object Proposals
without Learning to Classify", RA-L 2022).

The RPN's objectness logit is trained to predict, through its sigmoid, how well centred an
anchor is in the object it overlaps (its *centerness*), instead of whether it is an object
of a labelled class. A classifier learns that unlabelled objects are background; a
localization-quality score has no background class to learn, which is why it generalizes
to categories never seen in training.

Training follows OLN-RPN's objectness branch: an anchor whose IoU with its best-matching
ground truth is at least the upper threshold (0.3) is positive and regresses that box's
centerness; below the lower one (0.1) it is negative and regresses 0; in between it is
ignored. Up to ``num_samples`` anchors per image are sampled, positives first (OLN's
``pos_fraction=1.0``), and the loss is the L1 distance between the sigmoid of the logit
and the target. The box branch and inference are unchanged.
"""
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.sampling import subsample_labels
from detectron2.structures import Boxes
from detectron2.structures.boxes import matched_pairwise_iou

__all__ = ["OBJECTNESS_TARGETS", "centerness", "centerness_labels", "centerness_loss"]

# What the objectness logit is trained on: "class" (object vs background, binary
# cross-entropy: Detectron2's RPN) or "centerness" (this module).
OBJECTNESS_TARGETS = ("class", "centerness")


def centerness(boxes: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """
    FCOS/OLN centerness of each box's centre in its ground truth:
    ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))``, where l, r, t, b are the
    distances from the centre to the ground truth's sides; 0 where the centre is not
    strictly inside.

    Args:
        boxes, gt_boxes: (R, 4) XYXY, paired row by row.
    Returns:
        (R,) in [0, 1].
    """
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    left_right = torch.stack((cx - gt_boxes[:, 0], gt_boxes[:, 2] - cx), dim=1)
    top_bottom = torch.stack((cy - gt_boxes[:, 1], gt_boxes[:, 3] - cy), dim=1)
    (lr_min, lr_max), (tb_min, tb_max) = left_right.aminmax(dim=1), top_bottom.aminmax(dim=1)
    inside = (lr_min > 0) & (tb_min > 0)
    ratio = lr_min / lr_max.clamp(min=1e-12) * (tb_min / tb_max.clamp(min=1e-12))
    return torch.where(inside, ratio.clamp(min=0).sqrt(), torch.zeros_like(ratio))


@torch.no_grad()
def centerness_labels(
    boxes: torch.Tensor,
    matched_gt_boxes: Sequence[torch.Tensor],
    iou_thresholds: Sequence[float],
    num_samples: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Sampled anchors and their centerness targets, image by image.

    Args:
        boxes: (R, 4) anchors shared by the images, or (N, R, 4) boxes per image.
        matched_gt_boxes: N tensors (R, 4): each anchor's best-IoU ground truth (zeros in
            an image without one), as Detectron2's ``label_and_sample_anchors`` returns.
        iou_thresholds: (negative below, positive from), e.g. (0.1, 0.3).
        num_samples: anchors sampled per image, positives first.

    Returns:
        labels (N, R): 1 sampled positive, 0 sampled negative, -1 not sampled;
        targets (N, R): centerness at the sampled positives, 0 elsewhere.
    """
    matcher = Matcher(list(iou_thresholds), [0, -1, 1], allow_low_quality_matches=False)
    labels, targets = [], []
    for i, gt in enumerate(matched_gt_boxes):
        boxes_i = boxes if boxes.dim() == 2 else boxes[i]
        iou = matched_pairwise_iou(Boxes(boxes_i), Boxes(gt))  # (R,)
        _, labels_i = matcher(iou[None])  # thresholds of Detectron2's Matcher on the one match
        pos_idx, neg_idx = subsample_labels(labels_i, num_samples, 1.0, 0)
        sampled = torch.full_like(labels_i, -1)
        sampled[neg_idx] = 0
        sampled[pos_idx] = 1
        target = torch.zeros_like(iou)
        target[pos_idx] = centerness(boxes_i[pos_idx], gt[pos_idx])
        labels.append(sampled)
        targets.append(target)
    return torch.stack(labels), torch.stack(targets)


def centerness_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed L1 distance between sigmoid(logits) and targets over the sampled anchors (labels >= 0)."""
    sampled = labels >= 0
    return F.l1_loss(logits[sampled].sigmoid(), targets[sampled], reduction="sum")
