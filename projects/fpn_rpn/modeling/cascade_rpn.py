from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.proposal_generator.build import PROPOSAL_GENERATOR_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage

from ..config_checks import check_cascade_config
from ..errors import require
from .box_losses import box_regression_loss
from .cascade_rpn_head import CascadeRPNHead
from ..choices import DECODED_BOX_LOSS_TYPES
from .proposal_generator import FPNRPN
from .proposal_selection import clip_boxes, image_sizes_tensor
from .region_assignment import assign_by_region

__all__ = ["CascadeRPN"]


def _flatten_deltas(deltas: List[torch.Tensor]) -> List[torch.Tensor]:
    # (N, 4, Hi, Wi) -> (N, Hi*Wi, 4): one anchor per location
    return [d.permute(0, 2, 3, 1).flatten(1, 2) for d in deltas]


@PROPOSAL_GENERATOR_REGISTRY.register()
class CascadeRPN(FPNRPN):
    """
    Cascade RPN (Vu et al., "Cascade RPN: Delving into High-Quality Region Proposal
    Network with Adaptive Convolution", NeurIPS 2019) on Detectron2's RPN, after
    MMDetection's ``CascadeRPNHead`` and ``crpn_r50_caffe_fpn_1x_coco`` config:

    - one square anchor per location (8 x stride: 32 ... 512 px on P2-P6);
    - stage 1 regresses every anchor to a box, trained on the anchors that the
      anchor-free region assignment (:func:`assign_by_region`) makes positive, with an
      IoU loss on the decoded boxes and no objectness;
    - stage 2 re-samples the features on the stage-1 boxes (adaptive convolution),
      labels those boxes by IoU with Detectron2's ``Matcher`` (``MODEL.RPN.IOU_THRESHOLDS``,
      positives below ``min_pos_iou`` dropped as MMDetection's ``min_pos_iou``), samples
      ``batch_size_per_image`` of them, and predicts objectness and a second refinement;
    - proposals are the stage-2 boxes, selected exactly as :class:`FPNRPN` selects its own
      (per-level top-K, score threshold, NMS per level or across levels, per-image top-K).

    ``box2box_transform``, ``anchor_matcher``, the sampling, the loss weights
    (``loss_rpn_cls``, ``loss_rpn_loc``) and normalisers of :class:`FPNRPN` are stage 2's;
    stage 1 has its own transform and loss weight (``loss_rpn_stage1_loc``).
    """

    @configurable
    def __init__(
        self,
        *,
        stage1_box2box_transform: Box2BoxTransform,
        stage1_loss_weight: float = 10.0,
        center_ratio: float = 0.2,
        ignore_ratio: float = 0.5,
        min_pos_iou: float = 0.3,
        **kwargs,
    ):
        """
        Args:
            stage1_box2box_transform: stage 1's box coding (MMDetection's stds 0.1, 0.1,
                0.5, 0.5 are weights 10, 10, 2, 2).
            stage1_loss_weight (float): weight of stage 1's box loss.
            center_ratio, ignore_ratio (float): in (0, 1], center_ratio <= ignore_ratio: the
                middle fractions of a box that make anchors positive / ignored in stage 1.
            min_pos_iou (float): in [0, 1]: stage-2 positives kept as the best match of a
                ground truth need at least this IoU.
            Others: see :class:`FPNRPN` (they apply to stage 2).
        """
        super().__init__(**kwargs)
        require(isinstance(self.rpn_head, CascadeRPNHead), "head", type(self.rpn_head).__name__,
                "CascadeRPN needs a CascadeRPNHead")
        require(0.0 < center_ratio <= 1.0, "center_ratio", center_ratio, "must be in (0, 1]")
        require(center_ratio <= ignore_ratio <= 1.0, "ignore_ratio", ignore_ratio,
                f"must be in [center_ratio ({center_ratio}), 1]")
        require(0.0 <= min_pos_iou <= 1.0, "min_pos_iou", min_pos_iou, "must be in [0, 1]")
        require(stage1_loss_weight >= 0, "stage1_loss_weight", stage1_loss_weight, "must be >= 0")
        require(self.box_reg_loss_type in DECODED_BOX_LOSS_TYPES, "box_reg_loss_type", self.box_reg_loss_type,
                f"CascadeRPN regresses decoded boxes: must be one of {DECODED_BOX_LOSS_TYPES}")
        self.stage1_box2box_transform = stage1_box2box_transform
        self.stage1_loss_weight = stage1_loss_weight
        self.center_ratio = center_ratio
        self.ignore_ratio = ignore_ratio
        self.min_pos_iou = min_pos_iou

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        check_cascade_config(cfg)
        ret = super().from_config(cfg, input_shape)
        cascade = cfg.MODEL.FPN_RPN.CASCADE
        ret.update(
            stage1_box2box_transform=Box2BoxTransform(weights=cascade.STAGE1_BBOX_REG_WEIGHTS),
            stage1_loss_weight=cascade.STAGE1_LOSS_WEIGHT,
            center_ratio=cascade.CENTER_RATIO,
            ignore_ratio=cascade.IGNORE_RATIO,
            min_pos_iou=cascade.MIN_POS_IOU,
        )
        return ret

    def _stage1_boxes(self, anchors: List[Boxes], deltas: List[torch.Tensor], image_sizes) -> List[torch.Tensor]:
        """Stage-1 boxes, L tensors (N, Hi*Wi, 4), clipped to their image, without gradient."""
        # (N, 2), in float32 as apply_deltas decodes (bf16 would round sizes such as 1333)
        image_hw = image_sizes_tensor(image_sizes, torch.float32, deltas[0].device)
        boxes = []
        for anchors_i, deltas_i in zip(anchors, deltas):
            n, r = deltas_i.shape[:2]
            decoded = self.stage1_box2box_transform.apply_deltas(
                deltas_i.detach().reshape(-1, 4), anchors_i.tensor.repeat(n, 1)
            )
            boxes.append(clip_boxes(decoded, image_hw.repeat_interleave(r, dim=0)).view(n, r, 4))
        return boxes

    def forward(self, images: ImageList, features: Dict[str, torch.Tensor],
                gt_instances: Optional[List[Instances]] = None):
        """See :meth:`RPN.forward`."""
        features = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(features)
        stage1_deltas, bridged = self.rpn_head.stage1(features)
        stage1_deltas = _flatten_deltas(stage1_deltas)
        stage1_boxes = self._stage1_boxes(anchors, stage1_deltas, images.image_sizes)
        logits, deltas = self.rpn_head.stage2(bridged, stage1_boxes)
        logits = [x.flatten(1) for x in logits]  # (N, 1, Hi, Wi) -> (N, Hi*Wi)
        deltas = _flatten_deltas(deltas)

        losses = {}
        if self.training:
            if gt_instances is None:
                raise ValueError("CascadeRPN needs gt_instances in training")
            gt_boxes = [x.gt_boxes.tensor for x in gt_instances]
            losses = self.stage1_losses(anchors, stage1_deltas, gt_boxes)
            losses.update(self.stage2_losses(cat(stage1_boxes, dim=1), logits, deltas, gt_boxes, anchors))
        proposals = self.predict_proposals(stage1_boxes, logits, deltas, images.image_sizes)
        return proposals, losses

    @torch.no_grad()
    def label_stage1(self, anchors: List[Boxes], gt_boxes: Sequence[torch.Tensor]):
        """Region assignment of every image: labels (N, R) in {-1, 0, 1}, matched boxes (N, R, 4)."""
        first = next(iter(self.anchor_generator.cell_anchors))  # (1, 4): the first level's anchor at (0, 0)
        base_size = float(first[0, 2] - first[0, 0])
        strides = self.anchor_generator.strides
        labels, matched = [], []
        for gt in gt_boxes:
            labels_i, idx = assign_by_region([a.tensor for a in anchors], gt, strides, base_size,
                                             self.center_ratio, self.ignore_ratio)
            labels.append(labels_i)
            matched.append(gt[idx] if len(gt) else torch.zeros(len(idx), 4, device=gt.device))
        return torch.stack(labels), torch.stack(matched)

    @torch.no_grad()
    def label_and_sample_boxes(self, boxes: torch.Tensor, gt_boxes: Sequence[torch.Tensor]):
        """
        Stage 2's labels: IoU matching of each image's (R, 4) stage-1 boxes, then sampling.

        Returns:
            labels (N, R) in {-1, 0, 1} and matched boxes (N, R, 4).
        """
        labels, matched = [], []
        for boxes_i, gt in zip(boxes, gt_boxes):
            iou = pairwise_iou(Boxes(gt), Boxes(boxes_i))  # (G, R)
            idx, labels_i = self.anchor_matcher(iou)
            if len(gt):
                # MMDetection's min_pos_iou: a low-quality (best-for-its-box) match needs this IoU
                labels_i[(labels_i == 1) & (iou.max(dim=0).values < self.min_pos_iou)] = 0
            labels.append(self._subsample_labels(labels_i))
            matched.append(gt[idx] if len(gt) else torch.zeros_like(boxes_i))
        return torch.stack(labels), torch.stack(matched)

    @torch.jit.unused
    def stage1_losses(self, anchors: List[Boxes], deltas: List[torch.Tensor], gt_boxes) -> Dict[str, torch.Tensor]:
        """IoU loss of the decoded stage-1 boxes of the positive anchors."""
        labels, matched = self.label_stage1(anchors, gt_boxes)
        pos = labels == 1
        anchor_idx = pos.nonzero(as_tuple=True)[1]  # row-major, as [pos]
        pred = self.stage1_box2box_transform.apply_deltas(cat(deltas, dim=1)[pos], Boxes.cat(anchors).tensor[anchor_idx])
        loss = box_regression_loss(pred, matched[pos], self.box_reg_loss_type)
        get_event_storage().put_scalar("rpn/stage1_num_pos_anchors", pos.sum().item() / len(gt_boxes))
        # MMDetection divides stage 1's loss by the anchors of the batch / 200 (after Guided Anchoring)
        normalizer = labels.numel() / 200.0
        return {"loss_rpn_stage1_loc": loss / normalizer * self.stage1_loss_weight}

    @torch.jit.unused
    def stage2_losses(self, boxes, logits, deltas, gt_boxes, anchors) -> Dict[str, torch.Tensor]:
        """Objectness loss over the sampled stage-1 boxes and IoU loss of the positive ones."""
        labels, matched = self.label_and_sample_boxes(boxes, gt_boxes)
        pos = labels == 1
        storage = get_event_storage()
        storage.put_scalar("rpn/num_pos_anchors", pos.sum().item() / len(gt_boxes))
        storage.put_scalar("rpn/num_neg_anchors", (labels == 0).sum().item() / len(gt_boxes))
        pred = self.box2box_transform.apply_deltas(cat(deltas, dim=1)[pos], boxes[pos])
        localization_loss = box_regression_loss(pred, matched[pos], self.box_reg_loss_type)
        objectness_loss, objectness_labels = self._objectness_loss(cat(logits, dim=1), labels, boxes, matched)
        losses = {
            "loss_rpn_cls": objectness_loss / self._normalizer(self.cls_loss_normalizer, objectness_labels, anchors),
            "loss_rpn_loc": localization_loss / self._normalizer(self.loc_loss_normalizer, labels, anchors),
        }
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}
