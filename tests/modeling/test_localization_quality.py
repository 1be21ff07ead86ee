import fpn_rpn  # noqa: F401  # before detectron2

import math
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from fpn_rpn import add_fpn_rpn_config
from fpn_rpn.modeling.localization_quality import centerness, centerness_labels, centerness_loss
from fpn_rpn.modeling.proposal_generator import FPNRPN

from conftest import rpn_inputs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHAPES = {f: ShapeSpec(channels=8, stride=2 ** (i + 2)) for i, f in enumerate(["p2", "p3", "p4", "p5", "p6"])}
GT = torch.tensor([[0.0, 0.0, 40.0, 20.0]])  # centre (20, 10)


def _cfg(config="fpn_rpn_R_50_FPN_1x.yaml", **fpn_rpn_keys):
    cfg = get_cfg()
    add_fpn_rpn_config(cfg)
    cfg.merge_from_file(str(CONFIGS / config))
    for key, value in fpn_rpn_keys.items():
        setattr(cfg.MODEL.FPN_RPN, key, value)
    return cfg


# ---------------------------------------------------------------- the target

def test_centerness_by_hand():
    boxes = torch.tensor([
        [10.0, 5.0, 30.0, 15.0],  # centre (20, 10): the middle, 1
        [0.0, 0.0, 20.0, 20.0],  # centre (10, 10): l, r = 10, 30; t, b = 10, 10 -> sqrt(1/3)
        [0.0, 0.0, 10.0, 10.0],  # centre (5, 5): l, r = 5, 35; t, b = 5, 15 -> sqrt(1/7 * 1/3)
        [30.0, 0.0, 50.0, 20.0],  # centre (40, 10): on the right side, 0
        [50.0, 0.0, 70.0, 20.0],  # centre (60, 10): outside, 0
    ])
    expected = torch.tensor([1.0, math.sqrt(1 / 3), math.sqrt(1 / 21), 0.0, 0.0])
    torch.testing.assert_close(centerness(boxes, GT.expand(5, 4)), expected)


def test_labels_thresholds_sampling_and_targets():
    anchors = torch.tensor([
        [0.0, 0.0, 40.0, 20.0],  # IoU 1: positive, centerness 1
        [0.0, 0.0, 40.0, 8.0],  # IoU 0.4: positive, centre (20, 4): t, b = 4, 16 -> sqrt(1/4)
        [0.0, 0.0, 40.0, 4.0],  # IoU 0.2: ignored (0.1 <= IoU < 0.3)
        [0.0, 0.0, 40.0, 1.0],  # IoU 0.05: negative
        [100.0, 100.0, 140.0, 120.0],  # IoU 0: negative
    ])
    matched = [GT.expand(5, 4)]
    labels, targets = centerness_labels(anchors, matched, (0.1, 0.3), num_samples=8)
    assert labels.tolist() == [[1, 1, -1, 0, 0]]
    torch.testing.assert_close(targets, torch.tensor([[1.0, 0.5, 0.0, 0.0, 0.0]]))

    # positives first: with 3 samples both positives and one of the two negatives
    labels, _ = centerness_labels(anchors, matched, (0.1, 0.3), num_samples=3)
    assert labels[0, :2].tolist() == [1, 1] and labels[0, 2] == -1 and (labels[0, 3:] == 0).sum() == 1
    # and with 1 sample, one positive and no negative
    labels, _ = centerness_labels(anchors, matched, (0.1, 0.3), num_samples=1)
    assert (labels == 1).sum() == 1 and (labels == 0).sum() == 0


def test_labels_per_image_boxes_and_image_without_ground_truth():
    boxes = torch.tensor([[[0.0, 0.0, 40.0, 20.0], [0.0, 0.0, 40.0, 8.0]],
                          [[0.0, 0.0, 40.0, 8.0], [0.0, 0.0, 40.0, 20.0]]])  # (N=2, R=2, 4)
    matched = [GT.expand(2, 4), torch.zeros(2, 4)]  # image 2 has no ground truth
    labels, targets = centerness_labels(boxes, matched, (0.1, 0.3), num_samples=4)
    assert labels.tolist() == [[1, 1], [0, 0]]
    torch.testing.assert_close(targets, torch.tensor([[1.0, 0.5], [0.0, 0.0]]))


def test_loss_is_l1_of_the_sigmoid_over_sampled_anchors():
    logits = torch.tensor([[0.0, 2.0, 5.0, -1.0]])
    labels = torch.tensor([[1, 0, -1, 1]])
    targets = torch.tensor([[0.25, 0.0, 0.9, 1.0]])
    expected = abs(0.5 - 0.25) + torch.sigmoid(torch.tensor(2.0)).item() + (1 - torch.sigmoid(torch.tensor(-1.0)).item())
    torch.testing.assert_close(centerness_loss(logits, labels, targets), torch.tensor(expected))


# ---------------------------------------------------------------- in the RPN

def test_config_builds_centerness_generator_and_default_is_unchanged():
    assert build_proposal_generator(_cfg(), SHAPES).objectness_target == "class"
    rpn = build_proposal_generator(_cfg(OBJECTNESS="centerness", CENTERNESS_IOU_THRESHOLDS=[0.2, 0.4]), SHAPES)
    assert rpn.objectness_target == "centerness" and rpn.centerness_iou_thresholds == (0.2, 0.4)
    assert rpn.rpn_head.objectness_logits.out_channels == rpn.anchor_generator.num_anchors[0]  # one logit each


@pytest.mark.parametrize("value", [[0.0, 0.3], [0.4, 0.3], [0.1], [0.1, 1.5]])
def test_bad_thresholds_name_the_key(value):
    with pytest.raises(ValueError, match=r"^MODEL.FPN_RPN.CENTERNESS_IOU_THRESHOLDS = .* is invalid"):
        build_proposal_generator(_cfg(OBJECTNESS="centerness", CENTERNESS_IOU_THRESHOLDS=value), SHAPES)


def test_constructor_names_its_argument():
    with pytest.raises(ValueError, match="^objectness_target = 'iou' is invalid: must be one of"):
        FPNRPN(**{**FPNRPN.from_config(_cfg(), SHAPES), "objectness_target": "iou"})


def _losses(rpn, seed=0):
    images, features, gt = rpn_inputs(SHAPES, [(128, 96), (100, 120)],
                                      [[[10, 20, 60, 90], [50, 60, 70, 90]], [[30, 30, 100, 80]]], seed)
    rpn.train()
    with EventStorage():
        return rpn(images, features, gt)[1]


def test_zeroed_head_loss_by_hand():
    """
    Zero logits predict 0.5 everywhere. With fewer positives than samples, every positive
    is sampled and the negatives fill the rest, each costing 0.5: the loss is known
    whichever negatives are drawn.
    """
    rpn = build_proposal_generator(_cfg(OBJECTNESS="centerness"), SHAPES)
    for p in rpn.rpn_head.parameters():
        torch.nn.init.zeros_(p)
    images, features, gt = rpn_inputs(SHAPES, [(128, 96)], [[[10, 20, 60, 90]]], 0)
    anchors = rpn.anchor_generator([features[f] for f in rpn.in_features])
    _, matched = rpn.label_and_sample_anchors(anchors, gt)
    labels, targets = centerness_labels(Boxes.cat(anchors).tensor, matched, rpn.centerness_iou_thresholds, 10 ** 6)
    num_pos, batch = int((labels == 1).sum()), rpn.batch_size_per_image
    assert 0 < num_pos < batch
    expected = ((0.5 - targets[labels == 1]).abs().sum() + 0.5 * (batch - num_pos)) / batch
    torch.testing.assert_close(_losses_of(rpn, images, features, gt)["loss_rpn_cls"], expected)


def _losses_of(rpn, images, features, gt):
    rpn.train()
    with EventStorage():
        return rpn(images, features, gt)[1]


def test_training_moves_scores_towards_centerness():
    """SGD on one image: the loss falls, and the positives' scores follow their centerness."""
    torch.manual_seed(0)
    rpn = build_proposal_generator(_cfg(OBJECTNESS="centerness"), SHAPES)
    images, features, gt = rpn_inputs(SHAPES, [(128, 96)], [[[10, 20, 60, 90]]], 0)
    opt = torch.optim.SGD(rpn.parameters(), lr=1.0)
    history = []
    for _ in range(40):
        loss = _losses_of(rpn, images, features, gt)["loss_rpn_cls"]
        history.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert history[-1] < 0.65 * history[0]
    levels = [features[f] for f in rpn.in_features]
    anchors = rpn.anchor_generator(levels)
    _, matched = rpn.label_and_sample_anchors(anchors, gt)
    labels, targets = centerness_labels(Boxes.cat(anchors).tensor, matched, rpn.centerness_iou_thresholds, 10 ** 6)
    with torch.no_grad():
        logits = torch.cat([x.permute(0, 2, 3, 1).flatten(1) for x in rpn.rpn_head(levels)[0]], dim=1)
    pos = labels == 1
    correlation = torch.corrcoef(torch.stack([logits.sigmoid()[pos], targets[pos]]))[0, 1]
    assert correlation > 0.3


def test_cascade_rpn_trains_with_centerness():
    cfg = _cfg("cascade_rpn_R_50_FPN_1x.yaml", OBJECTNESS="centerness")
    rpn = build_proposal_generator(cfg, SHAPES)
    assert rpn.objectness_target == "centerness"
    losses = _losses(rpn)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_rpn_cls"] > 0
    sum(losses.values()).backward()
