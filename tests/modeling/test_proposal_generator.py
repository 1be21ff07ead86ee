import fpn_rpn  # noqa: F401  # before detectron2

import copy
import math
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, pairwise_iou
from detectron2.utils.events import EventStorage

from fpn_rpn import FPNRPN, add_fpn_rpn_config

from conftest import gt_instances, rpn_inputs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
C = 16  # feature channels
LEVELS = ["p2", "p3", "p4", "p5", "p6"]
SHAPES = {f: ShapeSpec(channels=C, stride=2 ** (i + 2)) for i, f in enumerate(LEVELS)}
LN2 = math.log(2.0)


def _cfg(config="fpn_rpn_R_50_FPN_1x.yaml", **rpn_keys):
    """A config from configs/, with MODEL.FPN_RPN.* or else MODEL.RPN.* keys set by their last name."""
    cfg = get_cfg()
    add_fpn_rpn_config(cfg)
    cfg.merge_from_file(str(CONFIGS / config))
    for key, value in rpn_keys.items():
        node = cfg.MODEL.FPN_RPN if key in cfg.MODEL.FPN_RPN else cfg.MODEL.RPN
        setattr(node, key, value)
    return cfg


def _one_level_rpn(**rpn_keys):
    cfg = _cfg(**rpn_keys)
    cfg.MODEL.RPN.IN_FEATURES = ["p2"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32]]
    return build_proposal_generator(cfg, {"p2": SHAPES["p2"]})


_gt = gt_instances


def _inputs(seed=0):
    """2 images of different sizes padded to 128 x 128, random P2-P6 features, ground truth."""
    return rpn_inputs(SHAPES, [(128, 96), (100, 120)],
                      [[[10, 20, 60, 90], [50, 60, 70, 90], [0, 0, 90, 120]], [[30, 30, 100, 80]]], seed)


def _on(device, images, features, gt):
    """_inputs() moved to ``device``."""
    return images.to(device), {k: v.to(device) for k, v in features.items()}, [g.to(device) for g in gt]


def _randomize_head(rpn, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rpn.rpn_head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


# ---------------------------------------------------------------- matching and sampling

def test_ignore_band_and_best_anchor_rule():
    rpn = _one_level_rpn()  # IOU_THRESHOLDS [0.3, 0.7], IOU_LABELS [0, -1, 1]
    anchors = Boxes(torch.tensor([
        # with GT A = (0, 0, 10, 10), area 100
        [0.0, 0.0, 10, 10],  # IoU 1.0: positive
        [0.0, 0.0, 10, 7],  # IoU 70 / 100 == 0.7: positive
        [0.0, 0.0, 10, 5],  # IoU 0.5: ignored
        [0.0, 0.0, 10, 3],  # IoU 0.3: ignored (0.3 <= IoU < 0.7)
        [0.0, 0.0, 10, 2],  # IoU 0.2: negative
        [50.0, 50, 60, 60],  # IoU 0: negative
        # with GT B = (100, 100, 120, 120), area 400, whose best IoU is 0.5
        [100.0, 100, 120, 110],  # IoU 200 / 400 == 0.5, B's best: positive
        [100.0, 100, 120, 105],  # IoU 100 / 400 == 0.25: negative
        [100.0, 110, 120, 120],  # IoU 0.5, tied best: positive too
        [100.0, 100, 120, 108],  # IoU 160 / 400 == 0.4, not the best: ignored
    ]))
    gt = _gt((200, 200), [[0, 0, 10, 10], [100, 100, 120, 120]])
    (labels,), (matched,) = rpn.label_and_sample_anchors([anchors], [gt])  # < 256 anchors: all sampled
    torch.testing.assert_close(labels, torch.tensor([1, 1, -1, -1, 0, 0, 1, 0, 1, -1], dtype=torch.int8),
                               rtol=0, atol=0)
    positive = labels == 1
    torch.testing.assert_close(matched[positive], gt.gt_boxes.tensor[[0, 0, 1, 1]], rtol=0, atol=0)


def test_image_without_gt_has_only_negatives():
    rpn = _one_level_rpn()
    few = Boxes(torch.tensor([[0.0, 0, 10, 10], [5, 5, 50, 50], [0, 0, 100, 100]]))
    (labels,), (matched,) = rpn.label_and_sample_anchors([few], [_gt((100, 100), [])])
    torch.testing.assert_close(labels, torch.zeros(3, dtype=torch.int8), rtol=0, atol=0)
    assert matched.shape == (3, 4)
    many = Boxes(torch.tensor([[0.0, 0, 10, 10]]).repeat(1000, 1))
    (labels,), _ = rpn.label_and_sample_anchors([many], [_gt((100, 100), [])])
    assert int((labels == 0).sum()) == 256 and int((labels == 1).sum()) == 0  # the rest are -1
    assert int((labels == -1).sum()) == 1000 - 256


@pytest.mark.parametrize(
    "num_pos, num_neg, fraction, expected_pos, expected_neg",
    [
        (300, 700, 0.5, 128, 128),  # both capped: 256 * 0.5 positives, negatives fill to 256
        (10, 990, 0.5, 10, 246),  # few positives: negatives fill the rest, 246 == 256 - 10
        (300, 100, 0.5, 128, 100),  # few negatives: fewer than 256 in all
        (300, 700, 0.25, 64, 192),  # POSITIVE_FRACTION 0.25: 64 == 256 * 0.25
    ],
)
def test_sample_sizes(num_pos, num_neg, fraction, expected_pos, expected_neg):
    rpn = _one_level_rpn(POSITIVE_FRACTION=fraction)
    gt_box = [20.0, 20, 60, 60]
    anchors = Boxes(torch.tensor([gt_box] * num_pos + [[200.0, 200, 240, 240]] * num_neg))
    torch.manual_seed(0)
    (labels,), _ = rpn.label_and_sample_anchors([anchors], [_gt((300, 300), [gt_box])])
    assert int((labels == 1).sum()) == expected_pos
    assert int((labels == 0).sum()) == expected_neg
    assert bool((labels[:num_pos] != 0).all()) and bool((labels[num_pos:] != 1).all())


# ---------------------------------------------------------------- losses

# Two levels of 6 and 3 anchors (2 and 1 locations x A = 3), two images: R = 9.
LOSS_ANCHORS = [
    Boxes(torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [10, 0, 20, 10],
                        [0, 0, 20, 20], [0, 0, 4, 4], [5, 5, 15, 15]])),
    Boxes(torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40], [0, 0, 8, 8]])),
]
LOSS_LABELS = [torch.tensor([1, 0, -1, 1, 0, -1, 0, -1, 0]),  # 2 positive, 6 sampled
               torch.tensor([0, 1, 0, -1, -1, 0, 1, 0, -1])]  # 2 positive, 6 sampled
# (image, anchor) -> matched gt box for the four positives; box deltas with weights (1, 1, 1, 1):
LOSS_POSITIVES = {
    (0, 0): [5.0, 0, 15, 10],  # from (0, 0, 10, 10): dx = (10 - 5) / 10 = 0.5
    (0, 3): [0.0, 0, 40, 40],  # from (0, 0, 20, 20): dx = dy = (20 - 10) / 20 = 0.5, dw = dh = ln 2
    (1, 1): [0.0, 0, 10, 10],  # from (0, 0, 10, 10): all 0
    (1, 6): [20.0, 0, 30, 10],  # from (0, 0, 10, 10): dx = (25 - 5) / 10 = 2
}
# Objectness logits: large values on ignored anchors would show up if they were counted.
LOSS_LOGITS = [[2.0, -1.0, 50.0, 0.0, 0.5, -50.0, -3.0, 50.0, 1.0],
               [-0.5, 1.5, 0.25, 50.0, -50.0, -2.0, 3.0, 0.0, 50.0]]


def _loss_inputs():
    all_anchors = Boxes.cat(LOSS_ANCHORS).tensor
    gt_boxes = [all_anchors.clone(), all_anchors.clone()]  # unused where not positive
    for (i, r), box in LOSS_POSITIVES.items():
        gt_boxes[i][r] = torch.tensor(box)
    logits = torch.tensor(LOSS_LOGITS)
    # zero deltas on positives (proposal == anchor), 5.0 elsewhere (would be caught if counted)
    deltas = torch.full((2, 9, 4), 5.0)
    for i, r in LOSS_POSITIVES:
        deltas[i, r] = 0.0
    return [logits[:, :6], logits[:, 6:]], [deltas[:, :6], deltas[:, 6:]], gt_boxes


def _losses(rpn):
    logits, deltas, gt_boxes = _loss_inputs()
    with EventStorage():
        return rpn.losses(LOSS_ANCHORS, logits, LOSS_LABELS, deltas, gt_boxes)


def _two_level_rpn(**rpn_keys):
    cfg = _cfg(**rpn_keys)
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64]]  # x 3 default ratios: A = 3
    return build_proposal_generator(cfg, SHAPES)


def _softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


# BCE sum over the 12 sampled anchors: -log sigmoid(x) == softplus(-x) if positive, softplus(x) if negative
CLS_SUM = sum(
    _softplus(-x) if y == 1 else _softplus(x)
    for row, labels in zip(LOSS_LOGITS, LOSS_LABELS) for x, y in zip(row, labels.tolist()) if y >= 0
)
# Smooth L1 with beta 1 (0.5 d^2 if |d| < 1, else |d| - 0.5) on the gt deltas above:
# (0, 0): 0.125; (0, 3): 0.125 + 0.125 + 2 * 0.5 * ln2^2; (1, 1): 0; (1, 6): 2 - 0.5
SMOOTH_L1_BETA1_SUM = 0.125 + (0.25 + LN2 ** 2) + 0.0 + 1.5
# L1: 0.5 + (0.5 + 0.5 + 2 ln2) + 0 + 2
L1_SUM = 3.5 + 2 * LN2
# GIoU loss 1 - (IoU - (hull - union) / hull) of each anchor with its gt:
# (0, 0): IoU 50/150, hull 150 = union -> 2/3; (0, 3): IoU 400/1600, hull = gt -> 0.75;
# (1, 1): 0; (1, 6): IoU 0, hull 300, union 200 -> 1 + 100/300 = 4/3
GIOU_SUM = 2 / 3 + 0.75 + 0.0 + 4 / 3


@pytest.mark.parametrize(
    "loss_type, beta, loc_sum",
    [("smooth_l1", 1.0, SMOOTH_L1_BETA1_SUM), ("smooth_l1", 0.0, L1_SUM), ("l1", 1.0, L1_SUM),
     ("giou", 0.0, GIOU_SUM)],
)
def test_box_loss_types(loss_type, beta, loc_sum):
    # "l1" ignores SMOOTH_L1_BETA
    rpn = _two_level_rpn(BBOX_REG_LOSS_TYPE=loss_type, SMOOTH_L1_BETA=beta)
    losses = _losses(rpn)
    torch.testing.assert_close(losses["loss_rpn_loc"], torch.tensor(loc_sum / (256 * 2)))
    torch.testing.assert_close(losses["loss_rpn_cls"], torch.tensor(CLS_SUM / (256 * 2)))


@pytest.mark.parametrize(
    "cls_normalizer, loc_normalizer, cls_divisor, loc_divisor",
    [
        ("batch_size", "batch_size", 256 * 2, 256 * 2),  # BATCH_SIZE_PER_IMAGE x N
        ("num_sampled", "num_sampled", 12, 12),  # 6 + 6 labels >= 0
        ("num_positive", "num_positive", 4, 4),  # 2 + 2 labels == 1
        ("anchor_locations", "anchor_locations", 6, 6),  # (2 + 1) locations x N
        ("num_positive", "anchor_locations", 4, 6),  # each key reaches its own loss
    ],
)
def test_loss_normalizers(cls_normalizer, loc_normalizer, cls_divisor, loc_divisor):
    rpn = _two_level_rpn(SMOOTH_L1_BETA=1.0, CLS_LOSS_NORMALIZER=cls_normalizer,
                         LOC_LOSS_NORMALIZER=loc_normalizer)
    losses = _losses(rpn)
    torch.testing.assert_close(losses["loss_rpn_cls"], torch.tensor(CLS_SUM / cls_divisor))
    torch.testing.assert_close(losses["loss_rpn_loc"], torch.tensor(SMOOTH_L1_BETA1_SUM / loc_divisor))


@pytest.mark.parametrize("loss_weight, bbox_weight", [(1.0, 10.0), (0.5, 2.0)])
def test_loss_weights(loss_weight, bbox_weight):
    # Detectron2's convention: loss_rpn_loc is scaled by BBOX_REG_LOSS_WEIGHT x LOSS_WEIGHT
    rpn = _two_level_rpn(SMOOTH_L1_BETA=1.0, LOSS_WEIGHT=loss_weight, BBOX_REG_LOSS_WEIGHT=bbox_weight,
                         LOC_LOSS_NORMALIZER="anchor_locations")
    losses = _losses(rpn)
    torch.testing.assert_close(losses["loss_rpn_cls"], torch.tensor(loss_weight * CLS_SUM / 512))
    torch.testing.assert_close(losses["loss_rpn_loc"],
                               torch.tensor(loss_weight * bbox_weight * SMOOTH_L1_BETA1_SUM / 6))


@pytest.mark.parametrize("objectness", ["sigmoid", "softmax"])
def test_zeroed_head_gives_ln2_per_sampled_anchor(objectness):
    rpn = build_proposal_generator(_cfg(OBJECTNESS=objectness), SHAPES)
    for p in rpn.rpn_head.parameters():
        torch.nn.init.zeros_(p)
    images, features, gt = _inputs()
    rpn.train()
    torch.manual_seed(0)
    with EventStorage() as storage:
        _, losses = rpn(images, features, gt)
        num_sampled = 2 * (storage.latest()["rpn/num_pos_anchors"][0] + storage.latest()["rpn/num_neg_anchors"][0])
    assert num_sampled > 256  # both images sampled negatives, the first also positives
    torch.testing.assert_close(losses["loss_rpn_cls"], torch.tensor(LN2 * num_sampled / (256 * 2)))
    assert losses["loss_rpn_loc"] > 0  # zero deltas do not fit the gt boxes


def test_zeroed_head_proposals_are_clipped_anchors():
    rpn = build_proposal_generator(_cfg(), SHAPES)
    for p in rpn.rpn_head.parameters():
        torch.nn.init.zeros_(p)
    images, features, _ = _inputs()
    rpn.eval()
    proposals, losses = rpn(images, features)
    assert losses == {}
    anchors = Boxes.cat(rpn.anchor_generator([features[f] for f in LEVELS]))
    for result, image_size in zip(proposals, images.image_sizes):
        clipped = anchors.clone()
        clipped.clip(image_size)
        assert len(result) > 0
        # zero deltas decode to the anchor up to float rounding (centre +- half size)
        distance = (result.proposal_boxes.tensor[:, None] - clipped.tensor[None]).abs().amax(dim=2)
        assert distance.min(dim=1).values.max() < 1e-4
        torch.testing.assert_close(result.objectness_logits, torch.zeros(len(result)), rtol=0, atol=0)


def test_score_thresh_applies_at_inference_only():
    rpn = build_proposal_generator(_cfg(SCORE_THRESH_TEST=0.9), SHAPES)
    for p in rpn.rpn_head.parameters():
        torch.nn.init.zeros_(p)  # every objectness probability is 0.5
    images, features, gt = _inputs()
    rpn.eval()
    assert [len(p) for p in rpn(images, features)[0]] == [0, 0]
    rpn.train()
    with EventStorage():
        proposals, _ = rpn(images, features, gt)
    assert all(len(p) > 0 for p in proposals)


# ---------------------------------------------------------------- parity with Detectron2's RPN

def _by_score_then_box(result):
    """(R, 5) rows (-score, x1, y1, x2, y2), sorted lexicographically."""
    rows = torch.cat((-result.objectness_logits[:, None], result.proposal_boxes.tensor), dim=1)
    order = torch.arange(len(rows))
    for column in reversed(range(5)):  # stable sorts from the last key to the first
        order = order[rows[order, column].sort(stable=True).indices]
    return rows[order]


@pytest.fixture(scope="module")
def stock_and_ours():
    stock = build_proposal_generator(_cfg("stock_rpn_R_50_FPN_1x.yaml"), SHAPES)
    ours = build_proposal_generator(_cfg(NMS_MODE="per_level"), SHAPES)
    assert type(stock) is RPN and type(ours) is FPNRPN
    _randomize_head(stock)
    ours.load_state_dict(stock.state_dict(), strict=True)
    return stock, ours


@pytest.mark.parametrize("training", [False, True])
def test_per_level_mode_equals_detectron2_rpn(stock_and_ours, training, device):
    stock, ours = (copy.deepcopy(rpn).to(device) for rpn in stock_and_ours)
    images, features, gt = _on(device, *_inputs())
    outputs = []
    for rpn in (stock, ours):
        rpn.train(training)
        torch.manual_seed(0)  # sampling uses randperm
        with EventStorage():
            proposals, losses = rpn(images, features, gt if training else None)
        assert all(p.proposal_boxes.tensor.device.type == device.type for p in proposals)
        outputs.append(([p.to("cpu") for p in proposals], {k: v.cpu() for k, v in losses.items()}))
    (stock_proposals, stock_losses), (our_proposals, our_losses) = outputs
    assert [len(p) for p in our_proposals] == [len(p) for p in stock_proposals]
    assert all(len(p) > 100 for p in our_proposals)
    for stock_i, ours_i in zip(stock_proposals, our_proposals):
        torch.testing.assert_close(ours_i.objectness_logits, stock_i.objectness_logits, rtol=0, atol=0)
        # Boxes of equal score may come in either order (the order of a non-stable sort); these
        # inputs happen to contain one: a P2 and a P3 logit that are the same float32.
        torch.testing.assert_close(_by_score_then_box(ours_i), _by_score_then_box(stock_i), rtol=0, atol=0)
        scores = stock_i.objectness_logits
        untied = (scores[:, None] == scores[None, :]).sum(dim=1) == 1
        torch.testing.assert_close(ours_i.proposal_boxes.tensor[untied], stock_i.proposal_boxes.tensor[untied],
                                   rtol=0, atol=0)
    assert our_losses.keys() == stock_losses.keys() == ({"loss_rpn_cls", "loss_rpn_loc"} if training else set())
    for key in stock_losses:
        torch.testing.assert_close(our_losses[key], stock_losses[key], rtol=0, atol=0)


def test_training_loss_backward_reaches_head(stock_and_ours, device):
    ours = copy.deepcopy(stock_and_ours[1]).to(device)
    images, features, gt = _on(device, *_inputs(seed=4))
    ours.train()
    ours.zero_grad()
    with EventStorage():
        _, losses = ours(images, features, gt)
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ours.rpn_head.parameters())


# ---------------------------------------------------------------- cross-level NMS in the model

def _cross_level_pairs(result, levels_of_boxes):
    iou = pairwise_iou(result.proposal_boxes, result.proposal_boxes)
    return int(((iou > 0.7).triu(diagonal=1) & (levels_of_boxes[:, None] != levels_of_boxes[None, :])).sum())


def test_cross_level_mode_removes_duplicates_that_per_level_keeps():
    # P2 and P3 anchors of equal size: every P3 anchor coincides with a P2 anchor (offset 0), so with
    # the near-zero initial deltas the two levels propose near-duplicate boxes.
    results = {}
    for mode in ("per_level", "cross_level"):
        cfg = _cfg(NMS_MODE=mode, PRE_NMS_TOPK_TEST=300, POST_NMS_TOPK_TEST=200)
        cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3"]
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [32]]
        torch.manual_seed(0)
        rpn = build_proposal_generator(cfg, SHAPES).eval()
        images, features, _ = _inputs()
        features = {f: features[f] for f in ("p2", "p3")}
        with torch.no_grad():
            pred_objectness_logits, _ = rpn.rpn_head([features["p2"], features["p3"]])
        # a level can be told from the score, as the logits are distinct floats
        level_of = {float(v): i for i, x in enumerate(pred_objectness_logits) for v in x.flatten()}
        proposals, _ = rpn(images, features)
        results[mode] = [
            (p, torch.tensor([level_of[float(s)] for s in p.objectness_logits])) for p in proposals
        ]
    for (per_level, per_level_ids), (cross_level, cross_level_ids) in zip(results["per_level"],
                                                                          results["cross_level"]):
        assert 0 < len(cross_level) <= 200 and bool((cross_level_ids < 2).all())
        iou = pairwise_iou(cross_level.proposal_boxes, cross_level.proposal_boxes)
        assert iou.triu(diagonal=1).max() <= 0.7
        per_level_count = _cross_level_pairs(per_level, per_level_ids)
        assert per_level_count > 0
        assert _cross_level_pairs(cross_level, cross_level_ids) <= per_level_count


def test_invalid_options_raise_value_error_naming_the_key():
    for key, value, match in [
        ("NMS_MODE", "global", "MODEL.FPN_RPN.NMS_MODE = 'global' is invalid: must be one of"),
        ("SCORE_THRESH_TEST", 1.0, r"MODEL.FPN_RPN.SCORE_THRESH_TEST = 1.0 is invalid: must be in \[0, 1\)"),
        ("CLS_LOSS_NORMALIZER", "images", "MODEL.FPN_RPN.CLS_LOSS_NORMALIZER = 'images' is invalid: must be one of"),
        ("LOC_LOSS_NORMALIZER", "images", "MODEL.FPN_RPN.LOC_LOSS_NORMALIZER = 'images' is invalid: must be one of"),
        ("BBOX_REG_LOSS_TYPE", "diou", "MODEL.RPN.BBOX_REG_LOSS_TYPE = 'diou' is invalid: must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            build_proposal_generator(_cfg(**{key: value}), SHAPES)


def test_invalid_arguments_name_the_argument():
    """A LazyConfig user passes arguments: the constructor names them, not config keys."""
    args = FPNRPN.from_config(_cfg(), SHAPES)
    for name, value in [("nms_mode", "global"), ("score_thresh", 1.0), ("cls_loss_normalizer", "images"),
                        ("loc_loss_normalizer", "images"), ("box_reg_loss_type", "diou")]:
        with pytest.raises(ValueError, match=f"^{name} = .* is invalid: must be"):
            FPNRPN(**{**args, name: value})
