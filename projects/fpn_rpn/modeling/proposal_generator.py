from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.proposal_generator.build import PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage
from fvcore.nn import smooth_l1_loss

from .box_losses import box_regression_loss
from ..choices import BOX_REG_LOSS_TYPES, LOSS_NORMALIZERS, NMS_MODES
from ..config_checks import check_rpn_config
from ..errors import require
from .localization_quality import OBJECTNESS_TARGETS, centerness_labels, centerness_loss
from .proposal_selection import select_proposals, top_k_proposals_per_level

__all__ = ["FPNRPN"]


def _anchor_tensors(anchors: List[Boxes]) -> List[torch.Tensor]:
    if torch.jit.is_scripting():
        return [a.tensor for a in anchors]
    return _boxes_or_tensors(anchors)


@torch.jit.unused
def _boxes_or_tensors(anchors) -> List[torch.Tensor]:
    """Boxes' tensors, and tensors (Cascade RPN's per-image boxes) as they are."""
    return [a.tensor if isinstance(a, Boxes) else a for a in anchors]


@PROPOSAL_GENERATOR_REGISTRY.register()
class FPNRPN(RPN):
    """
    Multi-level RPN for FPN. Training is Detectron2's RPN (IoU matching with the
    best anchor per ground truth kept, balanced sampling, objectness + box losses)
    with configurable loss normalisation. At inference, the per-level top-K
    proposals go through NMS inside each level ("per_level", the default: Detectron2's
    RPN exactly) or one class-agnostic NMS per image ("cross_level"), so that a box
    predicted on two levels is kept once. The post-processing runs batched over images,
    and work whose result is unused is skipped: only the top-K anchors of each level are
    decoded, and box targets are computed for sampled positives only. Anchor labelling
    and sampling are Detectron2's own (a batched version was removed, as its gain on a
    whole training iteration was within noise: docs/performance.md).
    """

    @configurable
    def __init__(
        self,
        *,
        nms_mode: str = "per_level",
        score_thresh: float = 0.0,
        cls_loss_normalizer: str = "batch_size",
        loc_loss_normalizer: str = "batch_size",
        objectness_target: str = "class",
        centerness_iou_thresholds: Tuple[float, float] = (0.1, 0.3),
        **kwargs,
    ):
        """
        Args:
            nms_mode (str): "per_level" (NMS inside each level, as Detectron2; the
                default, which the paired study on real photographs supports) or
                "cross_level" (one NMS over all levels of an image).
            score_thresh (float): in [0, 1); proposals whose objectness probability is
                below it are dropped before NMS at inference.
            cls_loss_normalizer, loc_loss_normalizer (str): divisor of the summed
                objectness / box losses, one of :data:`LOSS_NORMALIZERS`.
            objectness_target (str): what the objectness logit learns: "class" (object vs
                background, binary cross-entropy: Detectron2) or "centerness" (OLN's
                localization quality: :mod:`.localization_quality`).
            centerness_iou_thresholds (float, float): with "centerness", anchors below the
                first IoU are negatives, from the second positives; ``batch_size_per_image``
                of them are sampled per image, positives first.
            box_reg_loss_type (str): "smooth_l1" (with ``smooth_l1_beta``), "l1", or a loss of the
                decoded boxes: "iou" (1 - IoU) or "giou".
            Others: see :class:`RPN`.
        """
        # the arguments, named as arguments (a LazyConfig user passes them); check_rpn_config
        # names the config keys before a config gets here
        require(nms_mode in NMS_MODES, "nms_mode", nms_mode, f"must be one of {NMS_MODES}")
        require(0.0 <= score_thresh < 1.0, "score_thresh", score_thresh, "must be in [0, 1)")
        for name, value in (("cls_loss_normalizer", cls_loss_normalizer), ("loc_loss_normalizer", loc_loss_normalizer)):
            require(value in LOSS_NORMALIZERS, name, value, f"must be one of {LOSS_NORMALIZERS}")
        require(objectness_target in OBJECTNESS_TARGETS, "objectness_target", objectness_target,
                f"must be one of {OBJECTNESS_TARGETS}")
        low, high = centerness_iou_thresholds
        require(0.0 < low <= high <= 1.0, "centerness_iou_thresholds", centerness_iou_thresholds,
                "must be (low, high) with 0 < low <= high <= 1")
        box_reg_loss_type = kwargs.get("box_reg_loss_type", "smooth_l1")
        require(box_reg_loss_type in BOX_REG_LOSS_TYPES, "box_reg_loss_type", box_reg_loss_type,
                f"must be one of {BOX_REG_LOSS_TYPES}")
        if box_reg_loss_type == "l1":
            # Detectron2's smooth L1 is exactly L1 at beta 0
            kwargs.update(box_reg_loss_type="smooth_l1", smooth_l1_beta=0.0)
        super().__init__(**kwargs)
        self.nms_mode = nms_mode
        self.score_thresh = score_thresh
        self.cls_loss_normalizer = cls_loss_normalizer
        self.loc_loss_normalizer = loc_loss_normalizer
        self.objectness_target = objectness_target
        self.centerness_iou_thresholds = tuple(centerness_iou_thresholds)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        check_rpn_config(cfg, input_shape)  # clear errors before Detectron2's asserts
        ret = super().from_config(cfg, input_shape)
        ret.update(
            nms_mode=cfg.MODEL.FPN_RPN.NMS_MODE,
            score_thresh=cfg.MODEL.FPN_RPN.SCORE_THRESH_TEST,
            cls_loss_normalizer=cfg.MODEL.FPN_RPN.CLS_LOSS_NORMALIZER,
            loc_loss_normalizer=cfg.MODEL.FPN_RPN.LOC_LOSS_NORMALIZER,
            # the head predicts one logit per anchor in both "sigmoid" and "centerness" modes
            objectness_target="centerness" if cfg.MODEL.FPN_RPN.OBJECTNESS == "centerness" else "class",
            centerness_iou_thresholds=tuple(cfg.MODEL.FPN_RPN.CENTERNESS_IOU_THRESHOLDS),
        )
        return ret

    def _normalizer(self, kind: str, gt_labels: torch.Tensor, anchors: List[Boxes]) -> float:
        """The divisor named ``kind`` for labels (N, R) of a batch."""
        num_images = gt_labels.shape[0]
        if kind == "batch_size":
            return float(self.batch_size_per_image * num_images)
        if kind == "anchor_locations":
            # (Hi*Wi*A) / A summed over levels: locations per image
            num_cell_anchors = self.anchor_generator.num_anchors[0]
            return float(sum(len(a) for a in anchors) // num_cell_anchors * num_images)
        counted = gt_labels == 1 if kind == "num_positive" else gt_labels >= 0
        return counted.sum().clamp(min=1).to(torch.float32)

    def _box_regression_loss(
        self,
        anchors: torch.Tensor,
        pred_anchor_deltas: List[torch.Tensor],
        gt_boxes: List[torch.Tensor],
        pos_mask: torch.Tensor,
    ) -> torch.Tensor:
        """
        Detectron2's ``_dense_box_regression_loss``, evaluated on positive anchors only:
        the same terms summed in the same order, so the same value, without box targets
        for the other anchors of the batch.

        Args:
            anchors: (R, 4); pred_anchor_deltas: L tensors (N, Hi*Wi*A, 4);
            gt_boxes: N tensors (R, 4); pos_mask: (N, R).
        """
        image_idx, anchor_idx = pos_mask.nonzero(as_tuple=True)  # row-major, as [pos_mask]; one sync
        # (N, R, 4) indexed at the positives without concatenating the levels (a copy of
        # every anchor's deltas) and without a host-device sync per level or image: each
        # level is gathered at every positive, its index clamped into the level, and
        # torch.where keeps the rows that are in it (its backward gives the others zeros)
        pred = target = None
        start = 0
        for deltas_i in pred_anchor_deltas:
            end = start + deltas_i.shape[1]
            if end > start:  # an empty level has no row to gather
                rows = deltas_i[image_idx, (anchor_idx - start).clamp(0, end - start - 1)]
                in_level = ((anchor_idx >= start) & (anchor_idx < end))[:, None]
                pred = rows if pred is None else torch.where(in_level, rows, pred)
            start = end
        for i, gt_i in enumerate(gt_boxes):
            rows = gt_i[anchor_idx]
            target = rows if target is None else torch.where((image_idx == i)[:, None], rows, target)
        positive_anchors = anchors[anchor_idx]
        if self.box_reg_loss_type == "smooth_l1":
            target_deltas = self.box2box_transform.get_deltas(positive_anchors, target)
            return smooth_l1_loss(pred, target_deltas, self.smooth_l1_beta, reduction="sum")
        pred_boxes = self.box2box_transform.apply_deltas(pred, positive_anchors)
        return box_regression_loss(pred_boxes, target, self.box_reg_loss_type)

    @torch.jit.unused
    def losses(
        self,
        anchors: List[Boxes],
        pred_objectness_logits: List[torch.Tensor],
        gt_labels: List[torch.Tensor],
        pred_anchor_deltas: List[torch.Tensor],
        gt_boxes: List[torch.Tensor],
    ) -> Dict[str, torch.Tensor]:
        """
        Objectness loss over sampled anchors and box loss over positive ones, each
        divided by its normaliser and scaled by its weight. Args: see :meth:`RPN.losses`.
        """
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        pos_mask = gt_labels == 1
        storage = get_event_storage()
        storage.put_scalar("rpn/num_pos_anchors", pos_mask.sum().item() / num_images)
        storage.put_scalar("rpn/num_neg_anchors", (gt_labels == 0).sum().item() / num_images)

        anchor_boxes = Boxes.cat(anchors).tensor
        localization_loss = self._box_regression_loss(anchor_boxes, pred_anchor_deltas, gt_boxes, pos_mask)
        objectness_loss, objectness_labels = self._objectness_loss(
            cat(pred_objectness_logits, dim=1), gt_labels, anchor_boxes, gt_boxes
        )
        losses = {
            "loss_rpn_cls": objectness_loss / self._normalizer(self.cls_loss_normalizer, objectness_labels, anchors),
            "loss_rpn_loc": localization_loss / self._normalizer(self.loc_loss_normalizer, gt_labels, anchors),
        }
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def _objectness_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, matched_gt_boxes
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        The summed objectness loss, and the labels (N, R) of the anchors it covers (for
        its normaliser).

        Args:
            logits: (N, R); labels: (N, R) of the box matching, in {-1, 0, 1};
            boxes: (R, 4) anchors, or (N, R, 4) boxes per image (Cascade RPN's stage 2);
            matched_gt_boxes: N tensors (R, 4), each box's best-IoU ground truth.
        """
        if self.objectness_target == "centerness":
            labels, targets = centerness_labels(
                boxes, matched_gt_boxes, self.centerness_iou_thresholds, self.batch_size_per_image
            )
            return centerness_loss(logits, labels, targets), labels
        valid = labels >= 0
        loss = F.binary_cross_entropy_with_logits(logits[valid], labels[valid].to(torch.float32), reduction="sum")
        return loss, labels

    def predict_proposals(
        self,
        anchors: List[Boxes],
        pred_objectness_logits: List[torch.Tensor],
        pred_anchor_deltas: List[torch.Tensor],
        image_sizes: List[Tuple[int, int]],
    ):
        """
        ``anchors``: L Boxes (Hi*Wi*A, 4), or L tensors (N, Hi*Wi*A, 4) of boxes per image
        (Cascade RPN's stage-1 boxes), which the deltas refine.

        Returns:
            list[Instances]: N Instances with at most ``post_nms_topk`` proposals
                (``proposal_boxes``, ``objectness_logits``), sorted by score.
        """
        # Proposals are fixed inputs of the ROI heads: no gradient through the boxes.
        with torch.no_grad():
            boxes, scores, levels = top_k_proposals_per_level(
                _anchor_tensors(anchors),
                pred_anchor_deltas,
                pred_objectness_logits,
                self.pre_nms_topk[self.training],
                self.box2box_transform,
            )
            return select_proposals(
                boxes,
                scores,
                levels,
                image_sizes,
                self.nms_thresh,
                self.post_nms_topk[self.training],
                self.min_box_size,
                self.training,
                per_level_nms=self.nms_mode == "per_level",
                # SCORE_THRESH_TEST: training proposals stay unfiltered, as in Detectron2
                score_thresh=0.0 if self.training else self.score_thresh,
                num_levels=len(anchors),
            )
