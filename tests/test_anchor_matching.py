"""Batched anchor matching and sampling against Detectron2's per-image path: each must give
Detectron2's result."""
import fpn_rpn  # noqa: F401  # before detectron2

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from fpn_rpn import FPNAnchorGenerator, add_fpn_rpn_config
from fpn_rpn.modeling import anchor_matching
from fpn_rpn.modeling.anchor_matching import label_anchors, match_and_sample

MATCHER = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)  # RPN's defaults


def _d2_match(anchors, gt_boxes, matcher=MATCHER):
    """Detectron2's per-image matching: (matched gt index, labels) for each image."""
    return [matcher(pairwise_iou(Boxes(gt), Boxes(anchors))) if len(gt) else
            (torch.zeros(len(anchors), dtype=torch.int64), torch.zeros(len(anchors), dtype=torch.int8))
            for gt in gt_boxes]


def _match_all(anchors, gt_boxes, matcher=MATCHER):
    """match_and_sample with every anchor sampled, so labels and matches are the matcher's."""
    return match_and_sample(anchors, gt_boxes, matcher, batch_size_per_image=len(anchors) + 1, positive_fraction=1.0)


# ---------------------------------------------------------------- matching

HAND_ANCHORS = torch.tensor([
    [0.0, 0, 10, 10],  # 0
    [0.0, 0, 10, 7],  # 1
    [0.0, 0, 10, 5],  # 2
    [0.0, 0, 10, 3],  # 3
    [0.0, 0, 10, 2],  # 4
    [50.0, 50, 60, 60],  # 5
    [100.0, 100, 120, 110],  # 6
    [100.0, 100, 120, 105],  # 7
    [100.0, 110, 120, 120],  # 8
    [100.0, 100, 120, 108],  # 9
])
HAND_GT = [
    # A = (0, 0, 10, 10): anchors 0-4 have IoU 1, 0.7, 0.5, 0.3, 0.2.
    # B = (100, 100, 120, 120): anchors 6, 7, 8, 9 have IoU 0.5, 0.25, 0.5, 0.4; 6 and 8 are its best.
    torch.tensor([[0.0, 0, 10, 10], [100.0, 100, 120, 120]]),
    # Two gts of area 140 that anchor 0 overlaps equally (100 / 140 == 0.714): it matches the first.
    torch.tensor([[0.0, 0, 10, 14], [0.0, -4, 10, 10]]),
    # A gt that overlaps no anchor: its best IoU is 0, so every anchor is positive (Detectron2's quirk).
    torch.tensor([[300.0, 300, 310, 310]]),
    torch.zeros((0, 4)),  # no gt: all negative
]
HAND_LABELS = [
    [1, 1, -1, -1, 0, 0, 1, 0, 1, -1],  # 0.7 is positive, [0.3, 0.7) ignored, B's tied best both positive
    # anchor 0: 0.714; 1: 70/140 = 0.5; 2: 50/140 = 0.357 (ignored); 3: 30/140 = 0.214 -> 0 but
    # gt 1's best is anchor 0 only (IoU 100/140; anchor 1: 70/140); anchor 4: 20/140 -> 0
    [1, -1, -1, 0, 0, 0, 0, 0, 0, 0],
    [1] * 10,
    [0] * 10,
]


def test_hand_built_labels_and_matches():
    labels, matched = _match_all(HAND_ANCHORS, HAND_GT)
    torch.testing.assert_close(labels, torch.tensor(HAND_LABELS, dtype=torch.int8), rtol=0, atol=0)
    a, b = HAND_GT[0]
    torch.testing.assert_close(matched[0, [0, 1, 6, 8]], torch.stack([a, a, b, b]), rtol=0, atol=0)
    torch.testing.assert_close(matched[1, 0], HAND_GT[1][0], rtol=0, atol=0)  # first of the tied gts
    torch.testing.assert_close(matched[2], HAND_GT[2].expand(10, 4), rtol=0, atol=0)
    torch.testing.assert_close(matched[3], torch.zeros(10, 4), rtol=0, atol=0)
    for i, (matches, d2_labels) in enumerate(_d2_match(HAND_ANCHORS, HAND_GT)):
        torch.testing.assert_close(labels[i], d2_labels, rtol=0, atol=0)
        positive = d2_labels == 1
        if len(HAND_GT[i]):
            torch.testing.assert_close(matched[i, positive], HAND_GT[i][matches[positive]], rtol=0, atol=0)


def _random_case(seed, num_images=4):
    """FPN anchors on 3 small levels and gts of all kinds: small, large, off-image, degenerate, none."""
    g = torch.Generator().manual_seed(seed)
    gen = FPNAnchorGenerator(sizes=[[16, 24], [32, 48], [64, 96]], aspect_ratios=[[0.5, 1.0, 2.0]], strides=[4, 8, 16])
    anchors = Boxes.cat(gen([torch.zeros(1, 1, 24, 20), torch.zeros(1, 1, 12, 10), torch.zeros(1, 1, 6, 5)]))
    gt_boxes = []
    for i in range(num_images):
        m = [0, 1, 7, 25][i % 4]
        xy = torch.rand(m, 2, generator=g) * 100 - 10
        wh = torch.rand(m, 2, generator=g) ** 2 * 90 + 0.5
        boxes = torch.cat((xy, xy + wh), dim=1)
        if m == 7:
            boxes[1] = torch.tensor([500.0, 500, 520, 530])  # overlaps no anchor
        if m > 5:
            boxes[0] = torch.tensor([30.0, 30, 20, 40])  # x2 < x1
            boxes[2] = boxes[3]  # duplicate gt: ties between gts
        gt_boxes.append(boxes)
    return anchors.tensor, gt_boxes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_labels_ious_and_matches_equal_detectron2(seed):
    anchors, gt_boxes = _random_case(seed)
    labels, ious = label_anchors(anchors, gt_boxes, MATCHER)
    _, matched = _match_all(anchors, gt_boxes)
    for i, (matches, d2_labels) in enumerate(_d2_match(anchors, gt_boxes)):
        if len(gt_boxes[i]):
            torch.testing.assert_close(ious[i], pairwise_iou(Boxes(gt_boxes[i]), Boxes(anchors)), rtol=0, atol=0)
        torch.testing.assert_close(labels[i], d2_labels, rtol=0, atol=0)
        positive = d2_labels == 1
        assert positive.any() == (len(gt_boxes[i]) > 0)
        if len(gt_boxes[i]):
            torch.testing.assert_close(matched[i, positive], gt_boxes[i][matches[positive]], rtol=0, atol=0)


def test_iou_in_chunks_gives_the_same_labels(monkeypatch):
    anchors, gt_boxes = _random_case(6)
    labels, ious = label_anchors(anchors, gt_boxes, MATCHER)
    monkeypatch.setattr(anchor_matching, "_IOU_CHUNK_ELEMENTS", 3 * len(anchors))  # 3 gt rows at a time
    chunked_labels, chunked_ious = label_anchors(anchors, gt_boxes, MATCHER)
    torch.testing.assert_close(chunked_labels, labels, rtol=0, atol=0)
    for chunked, iou in zip(chunked_ious, ious):
        torch.testing.assert_close(chunked, iou, rtol=0, atol=0)


def test_other_thresholds_and_no_low_quality_matches():
    anchors, gt_boxes = _random_case(3)
    for matcher in (Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=False),
                    Matcher([0.2, 0.5, 0.6], [0, -1, 0, 1], allow_low_quality_matches=True),
                    Matcher([0.5, 0.5], [0, -1, 1], allow_low_quality_matches=False)):
        labels, _ = label_anchors(anchors, gt_boxes, matcher)
        for i, (_, d2_labels) in enumerate(_d2_match(anchors, gt_boxes, matcher)):
            torch.testing.assert_close(labels[i], d2_labels, rtol=0, atol=0)


# ---------------------------------------------------------------- sampling and losses, in the model

C = 8
SHAPES = {f: ShapeSpec(channels=C, stride=2 ** (i + 2)) for i, f in enumerate(["p2", "p3", "p4"])}


def _rpn(**rpn_keys):
    cfg = get_cfg()
    add_fpn_rpn_config(cfg)
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "FPNRPN"
    cfg.MODEL.ANCHOR_GENERATOR.NAME = "FPNAnchorGenerator"
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16, 24], [32, 48], [64, 96]]
    cfg.MODEL.RPN.HEAD_NAME = "FPNRPNHead"
    cfg.MODEL.RPN.IN_FEATURES = list(SHAPES)
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 64  # fewer than the positives of some images
    for key, value in rpn_keys.items():
        setattr(cfg.MODEL.RPN, key, value)
    return build_proposal_generator(cfg, SHAPES)


def _gt_instances(gt_boxes, image_size=(90, 80)):
    result = []
    for boxes in gt_boxes:
        inst = Instances(image_size)
        inst.gt_boxes = Boxes(boxes)
        result.append(inst)
    return result


@pytest.mark.parametrize("boundary_thresh", [-1, 0])
def test_sampling_draws_the_same_anchors_as_detectron2(boundary_thresh):
    rpn = _rpn(BOUNDARY_THRESH=boundary_thresh)
    anchors, gt_boxes = _random_case(4, num_images=8)
    anchors = [Boxes(anchors)]
    gt = _gt_instances(gt_boxes)
    for seed in (0, 1):
        torch.manual_seed(seed)
        labels, matched = rpn.label_and_sample_anchors(anchors, gt)
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        d2_labels, d2_matched = RPN.label_and_sample_anchors(rpn, anchors, gt)
        assert torch.equal(torch.rand(1), after_ours)  # the RNG was used alike
        for labels_i, matched_i, d2_labels_i, d2_matched_i in zip(labels, matched, d2_labels, d2_matched):
            torch.testing.assert_close(labels_i, d2_labels_i, rtol=0, atol=0)
            positive = d2_labels_i == 1
            torch.testing.assert_close(matched_i[positive], d2_matched_i[positive], rtol=0, atol=0)
        assert sum(int((x == 1).sum()) for x in labels) > 20 and sum(int((x == 0).sum()) for x in labels) > 100


@pytest.mark.parametrize("loss_type, beta", [("smooth_l1", 0.0), ("smooth_l1", 0.2), ("giou", 0.0)])
def test_losses_and_their_gradients_equal_detectron2(loss_type, beta):
    rpn = _rpn(BBOX_REG_LOSS_TYPE=loss_type, SMOOTH_L1_BETA=beta)
    anchors, gt_boxes = _random_case(5)
    gt_boxes = [b[(b[:, 2:] > b[:, :2]).all(dim=1)] for b in gt_boxes]  # a box target needs a valid gt
    level_sizes = [24 * 20 * 6, 12 * 10 * 6, 6 * 5 * 6]
    anchors = list(Boxes(anchors.split(level_sizes)[i]) for i in range(3))
    torch.manual_seed(0)
    labels, matched = rpn.label_and_sample_anchors(anchors, _gt_instances(gt_boxes))
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(4, n, generator=g) for n in level_sizes]
    deltas = [torch.randn(4, n, 4, generator=g) * 0.3 for n in level_sizes]
    results = []
    for losses_fn in (rpn.losses, lambda *args: RPN.losses(rpn, *args)):
        inputs = [x.clone().requires_grad_() for x in logits + deltas]
        with EventStorage():
            losses = losses_fn(anchors, inputs[:3], labels, inputs[3:], matched)
        sum(losses.values()).backward()
        results.append((losses, [x.grad for x in inputs]))
    (ours, our_grads), (d2, d2_grads) = results
    assert ours["loss_rpn_loc"] > 0
    for key in d2:
        torch.testing.assert_close(ours[key], d2[key], rtol=0, atol=0)
    for ours_grad, d2_grad in zip(our_grads, d2_grads):
        torch.testing.assert_close(ours_grad, d2_grad, rtol=0, atol=0)
