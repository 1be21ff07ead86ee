import fpn_rpn  # noqa: F401  # before detectron2

import inspect
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.proposal_generator.rpn import RPN, StandardRPNHead

from fpn_rpn import CascadeRPN, CascadeRPNHead, FPNRPN, FPNAnchorGenerator, FPNRPNHead, add_fpn_rpn_config
from fpn_rpn.config_checks import check_rpn_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
BASE = Path(__file__).resolve().parents[1] / "configs" / "Base-FPN-RPN.yaml"
EXPECTED_COMPONENTS = {
    "Base-FPN-RPN.yaml": (FPNRPN, FPNRPNHead, FPNAnchorGenerator),
    "fpn_rpn_R_50_FPN_1x.yaml": (FPNRPN, FPNRPNHead, FPNAnchorGenerator),
    "fpn_rpn_EffLite0_FPN_coco_cpu.yaml": (FPNRPN, FPNRPNHead, FPNAnchorGenerator),
    "fpn_rpn_EffLite0_FPN_coco_cpu_long.yaml": (FPNRPN, FPNRPNHead, FPNAnchorGenerator),
    "fpn_rpn_EffLite0_FPN_coco_voc_cpu_long.yaml": (FPNRPN, FPNRPNHead, FPNAnchorGenerator),
    "oln_rpn_EffLite0_FPN_coco_voc_cpu_long.yaml": (FPNRPN, FPNRPNHead, FPNAnchorGenerator),
    "stock_rpn_R_50_FPN_1x.yaml": (RPN, StandardRPNHead, DefaultAnchorGenerator),
    "Base-CascadeRPN.yaml": (CascadeRPN, CascadeRPNHead, FPNAnchorGenerator),
    "cascade_rpn_R_50_FPN_1x.yaml": (CascadeRPN, CascadeRPNHead, FPNAnchorGenerator),
    "cascade_rpn_EffLite0_FPN_coco_cpu_long.yaml": (CascadeRPN, CascadeRPNHead, FPNAnchorGenerator),
}
# height / width of the anchors at each location: Cascade RPN has one square anchor
ASPECT_RATIOS = {name: [[1.0]] if components[0] is CascadeRPN else [[0.5, 1, 2]]
                 for name, components in EXPECTED_COMPONENTS.items()}


def _load(path):
    cfg = get_cfg()
    add_fpn_rpn_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_every_config_is_listed():
    assert sorted(p.name for p in CONFIGS) == sorted(EXPECTED_COMPONENTS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_builds_a_model_on_cpu(path):
    cfg = _load(path)
    torch.manual_seed(0)
    model = build_model(cfg)  # no weights loaded
    generator, head, anchors = EXPECTED_COMPONENTS[path.name]
    rpn = model.proposal_generator
    assert type(rpn) is generator and type(rpn.rpn_head) is head and type(rpn.anchor_generator) is anchors
    assert rpn.in_features == ["p2", "p3", "p4", "p5", "p6"]
    ratios = ASPECT_RATIOS[path.name]
    assert rpn.anchor_generator.num_anchors == [len(ratios[0])] * 5  # one size per level x the ratios
    assert [a.tolist() for a in rpn.anchor_generator.cell_anchors] == [
        a.tolist() for a in DefaultAnchorGenerator(sizes=[[32], [64], [128], [256], [512]],
                                                   aspect_ratios=ratios, strides=[4, 8, 16, 32, 64],
                                                   offset=0.0).cell_anchors
    ]
    assert next(model.parameters()).device.type == "cpu"


def test_leaf_config_values():
    cfg = _load(Path(CONFIGS[0]).parent / "fpn_rpn_R_50_FPN_1x.yaml")
    assert cfg.MODEL.RESNETS.DEPTH == 50
    assert cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN == 2000 and cfg.MODEL.RPN.PRE_NMS_TOPK_TEST == 1000
    assert cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN == 1000 and cfg.MODEL.RPN.POST_NMS_TOPK_TEST == 2000
    assert cfg.MODEL.FPN_RPN.NMS_MODE == "per_level" and cfg.MODEL.FPN_RPN.OBJECTNESS == "sigmoid"


def test_constructor_defaults_equal_config_defaults():
    cfg = get_cfg()
    add_fpn_rpn_config(cfg)
    rpn = inspect.signature(FPNRPN.__init__).parameters
    assert rpn["nms_mode"].default == cfg.MODEL.FPN_RPN.NMS_MODE
    assert rpn["score_thresh"].default == cfg.MODEL.FPN_RPN.SCORE_THRESH_TEST
    assert rpn["cls_loss_normalizer"].default == cfg.MODEL.FPN_RPN.CLS_LOSS_NORMALIZER
    assert rpn["loc_loss_normalizer"].default == cfg.MODEL.FPN_RPN.LOC_LOSS_NORMALIZER
    assert inspect.signature(FPNRPNHead.__init__).parameters["objectness"].default == cfg.MODEL.FPN_RPN.OBJECTNESS
    offset = inspect.signature(FPNAnchorGenerator.__init__).parameters["offset"].default
    assert offset == cfg.MODEL.ANCHOR_GENERATOR.OFFSET


SHAPES = {f"p{i}": ShapeSpec(channels=8, stride=2 ** i) for i in range(2, 7)}


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("MODEL.PROPOSAL_GENERATOR.NAME", "FPNRPN2", r"MODEL.PROPOSAL_GENERATOR.NAME = 'FPNRPN2' is not registered"),
        ("MODEL.RPN.HEAD_NAME", "FPNHead", r"MODEL.RPN.HEAD_NAME = 'FPNHead' is not registered.*FPNRPNHead"),
        ("MODEL.ANCHOR_GENERATOR.NAME", "FPNAnchors", "MODEL.ANCHOR_GENERATOR.NAME = 'FPNAnchors' is not registered"),
        ("MODEL.RPN.IN_FEATURES", ["p2", "p7"], "MODEL.RPN.IN_FEATURES"),
        ("MODEL.RPN.IN_FEATURES", [], "MODEL.RPN.IN_FEATURES"),
        ("MODEL.RPN.IOU_THRESHOLDS", [0.7, 0.3], "MODEL.RPN.IOU_THRESHOLDS"),
        ("MODEL.RPN.IOU_LABELS", [0, 1], "MODEL.RPN.IOU_LABELS"),
        ("MODEL.RPN.POSITIVE_FRACTION", 1.5, "MODEL.RPN.POSITIVE_FRACTION"),
        ("MODEL.RPN.BATCH_SIZE_PER_IMAGE", 0, "MODEL.RPN.BATCH_SIZE_PER_IMAGE"),
        ("MODEL.RPN.POST_NMS_TOPK_TEST", 0, "MODEL.RPN.POST_NMS_TOPK_TEST"),
        ("MODEL.RPN.NMS_THRESH", 1.2, "MODEL.RPN.NMS_THRESH"),
        ("MODEL.PROPOSAL_GENERATOR.MIN_SIZE", -1, "MODEL.PROPOSAL_GENERATOR.MIN_SIZE"),
    ],
)
def test_bad_rpn_key_is_named(key, value, match):
    cfg = _load(BASE)
    node = cfg
    *parents, leaf = key.split(".")
    for name in parents:
        node = getattr(node, name)
    setattr(node, leaf, value)
    with pytest.raises(ValueError, match=match):
        check_rpn_config(cfg, SHAPES)


def test_good_config_passes_the_checks():
    check_rpn_config(_load(BASE), SHAPES)


def test_novel_class_configs_differ_only_in_the_objectness_target():
    configs = Path(__file__).resolve().parents[1] / "configs"
    sigmoid = _load(configs / "fpn_rpn_EffLite0_FPN_coco_voc_cpu_long.yaml")
    oln = _load(configs / "oln_rpn_EffLite0_FPN_coco_voc_cpu_long.yaml")
    assert list(sigmoid.DATASETS.TRAIN_CATEGORIES) == ["voc"]
    assert [list(g) for g in sigmoid.TEST.RECALL_CATEGORY_GROUPS] == [["seen", "voc"], ["novel", "nonvoc"]]
    assert (sigmoid.MODEL.FPN_RPN.OBJECTNESS, oln.MODEL.FPN_RPN.OBJECTNESS) == ("sigmoid", "centerness")
    oln.MODEL.FPN_RPN.OBJECTNESS, oln.OUTPUT_DIR = sigmoid.MODEL.FPN_RPN.OBJECTNESS, sigmoid.OUTPUT_DIR
    assert oln.dump() == sigmoid.dump()
