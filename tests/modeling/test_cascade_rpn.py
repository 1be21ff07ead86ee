"""CascadeRPN and CascadeRPNHead: building from a config and from arguments, the stage-2
labelling, stage 1's loss where it can be derived, a tiny overfit, and the inference path."""
import fpn_rpn  # noqa: F401  # before detectron2

import inspect
import math
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.structures import Boxes
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import EventStorage

from fpn_rpn import CascadeRPN, CascadeRPNHead, FPNAnchorGenerator, add_fpn_rpn_config
from fpn_rpn.errors import ConfigError
from fpn_rpn.modeling.region_assignment import assign_by_region

from conftest import rpn_inputs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
C = 8
LEVELS = ["p2", "p3", "p4", "p5", "p6"]
SHAPES = {f: ShapeSpec(channels=C, stride=2 ** (i + 2)) for i, f in enumerate(LEVELS)}
LOSSES = {"loss_rpn_stage1_loc", "loss_rpn_cls", "loss_rpn_loc"}


def _cfg(config="cascade_rpn_R_50_FPN_1x.yaml", opts=()):
    cfg = get_cfg()
    add_fpn_rpn_config(cfg)
    cfg.merge_from_file(str(CONFIGS / config))
    cfg.merge_from_list(list(opts))
    return cfg


def _inputs(seed=0):
    """2 images of 128 x 128 and 100 x 120 padded to 128 x 128, P2-P6 features, ground truth."""
    return rpn_inputs(SHAPES, [(128, 128), (100, 120)],
                      [[[10, 20, 60, 90], [50, 60, 70, 90], [0, 0, 110, 120]], [[30, 30, 100, 80]]], seed)


def _from_kwargs(**overrides):
    """The cascade of configs/cascade_rpn_R_50_FPN_1x.yaml, built from arguments."""
    kwargs = dict(
        in_features=LEVELS,
        head=CascadeRPNHead(in_channels=C, strides=[4, 8, 16, 32, 64]),
        anchor_generator=FPNAnchorGenerator(sizes=[[32], [64], [128], [256], [512]], aspect_ratios=[[1.0]],
                                            strides=[4, 8, 16, 32, 64]),
        anchor_matcher=Matcher([0.7], [0, 1], allow_low_quality_matches=True),
        box2box_transform=Box2BoxTransform(weights=(20.0, 20.0, 10.0, 10.0)),
        stage1_box2box_transform=Box2BoxTransform(weights=(10.0, 10.0, 2.0, 2.0)),
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_topk=(2000, 2000),
        post_nms_topk=(1000, 2000),
        nms_thresh=0.8,
        box_reg_loss_type="iou",
        loss_weight={"loss_rpn_cls": 1.0, "loss_rpn_loc": 10.0},
        cls_loss_normalizer="num_sampled",
        loc_loss_normalizer="num_sampled",
    )
    kwargs.update(overrides)
    return CascadeRPN(**kwargs)


def test_config_and_kwargs_build_the_same_generator():
    torch.manual_seed(0)
    from_cfg = build_proposal_generator(_cfg(), SHAPES)
    torch.manual_seed(0)
    from_kwargs = _from_kwargs()
    assert type(from_cfg) is CascadeRPN and type(from_cfg.rpn_head) is CascadeRPNHead
    assert repr(from_cfg) == repr(from_kwargs)
    assert from_cfg.anchor_generator.num_anchors == [1] * 5
    for key in ("nms_thresh", "pre_nms_topk", "post_nms_topk", "box_reg_loss_type", "loss_weight",
                "center_ratio", "ignore_ratio", "min_pos_iou", "stage1_loss_weight", "nms_mode",
                "cls_loss_normalizer", "loc_loss_normalizer", "batch_size_per_image"):
        assert getattr(from_cfg, key) == getattr(from_kwargs, key), key
    assert from_cfg.box2box_transform.weights == (20.0, 20.0, 10.0, 10.0)
    assert from_cfg.stage1_box2box_transform.weights == (10.0, 10.0, 2.0, 2.0)
    from_kwargs.load_state_dict(from_cfg.state_dict())
    images, features, _ = _inputs()
    with torch.no_grad():
        a, _ = from_cfg.eval()(images, features)
        b, _ = from_kwargs.eval()(images, features)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.proposal_boxes.tensor, y.proposal_boxes.tensor, rtol=0, atol=0)


def test_constructor_defaults_equal_config_defaults():
    cascade = add_fpn_rpn_config(get_cfg()).MODEL.FPN_RPN.CASCADE
    rpn = inspect.signature(CascadeRPN.__init__).parameters
    assert rpn["stage1_loss_weight"].default == cascade.STAGE1_LOSS_WEIGHT
    assert rpn["center_ratio"].default == cascade.CENTER_RATIO and rpn["ignore_ratio"].default == cascade.IGNORE_RATIO
    assert rpn["min_pos_iou"].default == cascade.MIN_POS_IOU
    head = inspect.signature(CascadeRPNHead.__init__).parameters
    assert head["dilation"].default == cascade.DILATION
    assert head["adaptive_conv_impl"].default == cascade.ADAPTIVE_CONV_IMPL


def test_cpu_config_repeats_the_base_cascade_keys():
    # _BASE_ takes one parent: the Lite0 cascade config repeats Base-CascadeRPN.yaml's model keys
    base, lite = _cfg("Base-CascadeRPN.yaml"), _cfg("cascade_rpn_EffLite0_FPN_coco_cpu_long.yaml")
    for node in ("PROPOSAL_GENERATOR.NAME", "ANCHOR_GENERATOR.ASPECT_RATIOS", "RPN.HEAD_NAME", "RPN.IOU_THRESHOLDS",
                 "RPN.IOU_LABELS", "RPN.BBOX_REG_WEIGHTS", "RPN.BBOX_REG_LOSS_TYPE", "RPN.BBOX_REG_LOSS_WEIGHT",
                 "RPN.NMS_THRESH", "RPN.PRE_NMS_TOPK_TEST", "RPN.POST_NMS_TOPK_TEST", "FPN_RPN"):
        get = lambda cfg: eval(f"cfg.MODEL.{node}")  # noqa: E731
        assert get(lite) == get(base), node
    assert lite.SOLVER.CLIP_GRADIENTS == base.SOLVER.CLIP_GRADIENTS


@pytest.mark.parametrize("opts, match", [
    (["MODEL.RPN.HEAD_NAME", "FPNRPNHead"], "MODEL.RPN.HEAD_NAME = 'FPNRPNHead' is invalid.*needs 'CascadeRPNHead'"),
    (["MODEL.PROPOSAL_GENERATOR.NAME", "FPNRPN"], "'CascadeRPNHead' goes with 'CascadeRPN'"),
    (["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[0.5, 1.0, 2.0]]], "one anchor per location.*ASPECT_RATIOS"),
    (["MODEL.FPN_RPN.CASCADE.IGNORE_RATIO", 0.1], "MODEL.FPN_RPN.CASCADE.IGNORE_RATIO = 0.1 is invalid"),
    (["MODEL.FPN_RPN.CASCADE.ADAPTIVE_CONV_IMPL", "mmcv"], "MODEL.FPN_RPN.CASCADE.ADAPTIVE_CONV_IMPL"),
    (["MODEL.FPN_RPN.CASCADE.STAGE1_BBOX_REG_WEIGHTS", (1.0, 1.0, 1.0)], "STAGE1_BBOX_REG_WEIGHTS"),
    (["MODEL.RPN.BBOX_REG_LOSS_TYPE", "smooth_l1"], "MODEL.RPN.BBOX_REG_LOSS_TYPE = 'smooth_l1' is invalid"),
])
def test_bad_cascade_key_is_named(opts, match):
    with pytest.raises(ConfigError, match=match):
        build_proposal_generator(_cfg(opts=opts), SHAPES)


def test_stage2_labels_follow_iou_with_min_pos_iou_for_low_quality_matches():
    rpn = _from_kwargs(batch_size_per_image=1000)  # keep every label: no sampling
    gt = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])]
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 9.0],   # IoU 0.9 with gt 0: positive
                           [0.0, 0.0, 10.0, 6.0],   # IoU 0.6: negative (below 0.7, not gt 0's best)
                           [100.0, 100.0, 120.0, 120.0],  # IoU 0.25, gt 1's best: below MIN_POS_IOU 0.3
                           [50.0, 50.0, 60.0, 60.0]]])    # no overlap: negative
    labels, matched = rpn.label_and_sample_boxes(boxes, gt)
    assert labels.tolist() == [[1, 0, 0, 0]]
    torch.testing.assert_close(matched[0, 0], gt[0][0])
    rpn.min_pos_iou = 0.2
    assert rpn.label_and_sample_boxes(boxes, gt)[0].tolist() == [[1, 0, 1, 0]]


def test_stage1_loss_at_zero_deltas_is_the_iou_loss_of_the_positive_anchors():
    rpn = _from_kwargs()
    torch.nn.init.zeros_(rpn.rpn_head.stage1_deltas.weight)  # stage-1 boxes = anchors
    images, features, gt = _inputs()
    with EventStorage():
        losses = rpn.train()(images, features, gt)[1]
    anchors = [b.tensor for b in rpn.anchor_generator([features[f] for f in LEVELS])]
    total, num_anchors = 0.0, sum(len(a) for a in anchors)
    for inst in gt:
        labels, idx = assign_by_region(anchors, inst.gt_boxes.tensor, [4, 8, 16, 32, 64], 32.0)
        pos = labels == 1
        assert pos.any()
        iou = matched_pairwise_iou(Boxes(torch.cat(anchors)[pos]), Boxes(inst.gt_boxes.tensor[idx[pos]]))
        total += float((1 - iou).sum())
    # weight 10, divided by the anchors of the batch / 200 (MMDetection)
    expected = 10.0 * total / (2 * num_anchors / 200.0)
    assert losses["loss_rpn_stage1_loc"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("frozen_stage1", [False, True], ids=["all", "stage1_frozen"])
def test_losses_finite_and_decreasing_on_a_tiny_overfit(frozen_stage1):
    # Stage 2's box loss is a sum over its positives, whose number grows as stage 1 improves:
    # it is checked with stage 1 frozen (fixed positives), stage 1's loss with everything trained.
    torch.manual_seed(0)
    rpn = _from_kwargs()
    if frozen_stage1:
        for p in (*rpn.rpn_head.stage1_conv.parameters(), *rpn.rpn_head.stage1_deltas.parameters()):
            p.requires_grad_(False)
    decreasing = {"loss_rpn_cls", "loss_rpn_loc"} if frozen_stage1 else {"loss_rpn_cls", "loss_rpn_stage1_loc"}
    images, features, gt = _inputs()
    # stage 2 refines boxes from 8 random channels: it needs the larger step to move within 40
    optimizer = torch.optim.Adam([p for p in rpn.parameters() if p.requires_grad], lr=3e-2 if frozen_stage1 else 3e-3)
    history = []
    with EventStorage():
        for _ in range(40):
            torch.manual_seed(1)  # the same stage-2 sampling each step
            losses = rpn.train()(images, features, gt)[1]
            assert set(losses) == LOSSES and all(math.isfinite(v.item()) for v in losses.values())
            history.append({k: v.item() for k, v in losses.items()})
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    for key in decreasing:
        first, last = history[0][key], history[-1][key]
        assert last < 0.8 * first, (key, first, last)


@pytest.mark.parametrize("nms_mode", ["per_level", "cross_level"])
def test_proposals_are_sorted_inside_the_image_and_at_most_post_nms_topk(nms_mode):
    torch.manual_seed(0)
    rpn = _from_kwargs(nms_mode=nms_mode, post_nms_topk=(1000, 50)).eval()
    images, features, _ = _inputs()
    with torch.no_grad():
        proposals, losses = rpn(images, features)
    assert losses == {}
    for inst, (h, w) in zip(proposals, images.image_sizes):
        boxes, scores = inst.proposal_boxes.tensor, inst.objectness_logits
        assert 0 < len(inst) <= 50
        assert (scores[:-1] >= scores[1:]).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()


def test_single_stage_head_refuses_the_cascade():
    head = CascadeRPNHead(in_channels=C, strides=[4])
    with pytest.raises(TypeError, match="two stages"):
        head([torch.zeros(1, C, 4, 4)])


@pytest.mark.parametrize("argument, value, match", [
    ("center_ratio", 0.0, r"^center_ratio = 0.0 is invalid: must be in \(0, 1\]"),
    ("ignore_ratio", 0.1, r"^ignore_ratio = 0.1 is invalid: must be in \[center_ratio \(0.2\), 1\]"),
    ("min_pos_iou", 1.5, r"^min_pos_iou = 1.5 is invalid: must be in \[0, 1\]"),
    ("stage1_loss_weight", -1.0, r"^stage1_loss_weight = -1.0 is invalid: must be >= 0"),
    ("box_reg_loss_type", "smooth_l1", r"^box_reg_loss_type = 'smooth_l1' is invalid: CascadeRPN regresses decoded"),
])
def test_constructor_names_its_bad_argument(argument, value, match):
    # a LazyConfig user passes arguments, not keys: the message names the argument
    kwargs = CascadeRPN.from_config(_cfg(), SHAPES)
    with pytest.raises(ConfigError, match=match):
        CascadeRPN(**{**kwargs, argument: value})
