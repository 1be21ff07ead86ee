"""Bad configs stop when the model is built, with one ValueError line naming the key and the
allowed values (tests/test_configs.py and test_anchor_generator.py check the same messages on
the components alone); tools/train_net.py reports them as ConfigError."""
import fpn_rpn  # noqa: F401  # before detectron2


import pytest
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from conftest import REPO, load_tool
from fpn_rpn import add_fpn_rpn_config

CONFIG = REPO / "configs" / "demo" / "fpn_rpn_R_18_GN_synthetic.yaml"
TRAIN_NET = REPO / "tools" / "train_net.py"


def _cfg(key=None, value=None):
    cfg = get_cfg()
    add_fpn_rpn_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.FPN.OUT_CHANNELS = 32  # builds faster; the checks do not depend on it
    if key is not None:
        node = cfg
        *parents, leaf = key.split(".")
        for name in parents:
            node = getattr(node, name)
        setattr(node, leaf, value)
    return cfg


BAD = [
    # levels and anchor sizes / ratios
    ("MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64]],
     r"^MODEL.ANCHOR_GENERATOR.SIZES has 2 lists but there are 5 feature levels \(MODEL.RPN.IN_FEATURES\): "
     r"give one list per level, or one list for all levels$"),
    ("MODEL.RPN.IN_FEATURES", ["p2", "p3", "p4", "p5"],
     "^MODEL.ANCHOR_GENERATOR.SIZES has 5 lists but there are 4 feature levels"),
    ("MODEL.ANCHOR_GENERATOR.SIZES", [], r"^MODEL.ANCHOR_GENERATOR.SIZES must be a non-empty list, got \[\]$"),
    ("MODEL.ANCHOR_GENERATOR.SIZES", [[32], [], [128], [256], [512]],
     r"^MODEL.ANCHOR_GENERATOR.SIZES\[1\] is empty: each level needs at least one value$"),
    ("MODEL.ANCHOR_GENERATOR.SIZES", [[32], [0], [128], [256], [512]],
     r"^MODEL.ANCHOR_GENERATOR.SIZES\[1\] = \[0\]: values must be positive numbers, got \[0\]$"),
    ("MODEL.ANCHOR_GENERATOR.SIZES", [[-32]],
     r"^MODEL.ANCHOR_GENERATOR.SIZES\[0\] = \[-32\]: values must be positive numbers, got \[-32\]$"),
    ("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [], r"^MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS must be a non-empty list, got \[\]$"),
    ("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[]], r"^MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS\[0\] is empty"),
    ("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[1.0, 0.0]],
     r"^MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS\[0\] = \[1.0, 0.0\]: values must be positive numbers, got \[0.0\]$"),
    ("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[1.0, -2.0]], r"^MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS\[0\] = .*got \[-2.0\]$"),
    # IoU thresholds, sampling, top-K
    ("MODEL.RPN.IOU_THRESHOLDS", [0.7, 0.3],
     r"^MODEL.RPN.IOU_THRESHOLDS = \[0.7, 0.3\] is invalid: must be increasing values in \[0, 1\], e.g. \[0.3, 0.7\]$"),
    ("MODEL.RPN.IOU_THRESHOLDS", [-0.1, 0.7], r"^MODEL.RPN.IOU_THRESHOLDS = \[-0.1, 0.7\] is invalid: must be incr"),
    ("MODEL.RPN.IOU_THRESHOLDS", [0.3, 1.2], r"^MODEL.RPN.IOU_THRESHOLDS = \[0.3, 1.2\] is invalid: must be incr"),
    ("MODEL.RPN.POSITIVE_FRACTION", -0.1, r"^MODEL.RPN.POSITIVE_FRACTION = -0.1 is invalid: must be in \[0, 1\]$"),
    ("MODEL.RPN.POSITIVE_FRACTION", 1.5, r"^MODEL.RPN.POSITIVE_FRACTION = 1.5 is invalid: must be in \[0, 1\]$"),
    ("MODEL.RPN.PRE_NMS_TOPK_TRAIN", 0, "^MODEL.RPN.PRE_NMS_TOPK_TRAIN = 0 is invalid: must be a positive integer$"),
    ("MODEL.RPN.PRE_NMS_TOPK_TEST", -1, "^MODEL.RPN.PRE_NMS_TOPK_TEST = -1 is invalid: must be a positive integer$"),
    ("MODEL.RPN.POST_NMS_TOPK_TRAIN", 0, "^MODEL.RPN.POST_NMS_TOPK_TRAIN = 0 is invalid: must be a positive integer$"),
    ("MODEL.RPN.POST_NMS_TOPK_TEST", -5, "^MODEL.RPN.POST_NMS_TOPK_TEST = -5 is invalid: must be a positive integer$"),
    # component names and modes
    ("MODEL.RPN.HEAD_NAME", "FPNHead",
     r"^MODEL.RPN.HEAD_NAME = 'FPNHead' is not registered; registered: \['FPNRPNHead', 'StandardRPNHead'\]$"),
    ("MODEL.ANCHOR_GENERATOR.NAME", "FPNAnchors",
     r"^MODEL.ANCHOR_GENERATOR.NAME = 'FPNAnchors' is not registered; registered: \[.*'FPNAnchorGenerator'.*\]$"),
    ("MODEL.FPN_RPN.OBJECTNESS", "tanh",
     r"^MODEL.FPN_RPN.OBJECTNESS must be one of \('sigmoid', 'softmax'\), got 'tanh'$"),
    ("MODEL.FPN_RPN.NMS_MODE", "global",
     r"^MODEL.FPN_RPN.NMS_MODE must be one of \('cross_level', 'per_level'\), got 'global'$"),
    ("MODEL.FPN_RPN.LOC_LOSS_NORMALIZER", "mean", r"^MODEL.FPN_RPN.LOC_LOSS_NORMALIZER must be one of \('batch_size'"),
    ("MODEL.RPN.BBOX_REG_LOSS_TYPE", "l2",
     r"^MODEL.RPN.BBOX_REG_LOSS_TYPE must be one of \('smooth_l1', 'l1', 'giou'\), got 'l2'$"),
]  # fmt: skip


@pytest.mark.parametrize("key, value, match", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_bad_value_stops_build_model_naming_key_and_allowed_values(key, value, match):
    with pytest.raises(ValueError, match=match):
        build_model(_cfg(key, value))


def test_good_config_builds():
    model = build_model(_cfg())
    assert type(model.proposal_generator).__name__ == "FPNRPN"


@pytest.fixture(scope="module")
def train_net():
    return load_tool("train_net")


def test_train_net_reports_bad_values_as_config_error(train_net):
    with pytest.raises(train_net.ConfigError, match=r"^MODEL.RPN.POSITIVE_FRACTION = 1.5 is invalid") as info:
        train_net.Trainer.build_model(_cfg("MODEL.RPN.POSITIVE_FRACTION", 1.5))
    assert train_net.error_line(info.value) == "MODEL.RPN.POSITIVE_FRACTION = 1.5 is invalid: must be in [0, 1]"


def test_train_net_names_an_unknown_proposal_generator(train_net, tmp_path):
    # build_model would fail in Detectron2's registry lookup before any fpn_rpn code runs
    # ("No object named 'FPNRPNX' found in 'PROPOSAL_GENERATOR' registry!"): setup checks the names first
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", str(CONFIG), "MODEL.PROPOSAL_GENERATOR.NAME", "FPNRPNX", "OUTPUT_DIR", str(tmp_path)]
    )
    with pytest.raises(train_net.ConfigError,
                       match=r"^MODEL.PROPOSAL_GENERATOR.NAME = 'FPNRPNX' is not registered; registered: \[.*'FPNRPN'"):
        train_net.setup(args)
