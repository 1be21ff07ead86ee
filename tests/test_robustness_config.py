"""Bad configs stop with one ConfigError line naming the key: the RPN keys when the model is
built (tests/test_configs.py and modeling/test_anchor_generator.py check the same messages on the
components alone), the others, and unknown keys, files and override lists, in setup_cfg before
any work. Every tool ends with that line and exit status 1, and on a misused argument with one
line and exit status 2."""
import fpn_rpn  # noqa: F401  # before detectron2

import os
import re
import subprocess
import sys

import pytest
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from conftest import REPO, cli, load_tool
from fpn_rpn import add_fpn_rpn_config, setup_cfg
from fpn_rpn.errors import ConfigError

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
    # box-transform weights: Detectron2 unpacks four (wx, wy, ww, wh) and divides by them
    ("MODEL.RPN.BBOX_REG_WEIGHTS", (1.0, 1.0, 1.0),
     r"^MODEL.RPN.BBOX_REG_WEIGHTS = \[1.0, 1.0, 1.0\] is invalid: must be 4 positive numbers \(wx, wy, ww, wh\)$"),
    ("MODEL.RPN.BBOX_REG_WEIGHTS", (1.0, 1.0, 0.0, 1.0), r"^MODEL.RPN.BBOX_REG_WEIGHTS = \[1.0, 1.0, 0.0, 1.0\] is inv"),
    ("MODEL.RPN.BBOX_REG_LOSS_WEIGHT", -1.0, r"^MODEL.RPN.BBOX_REG_LOSS_WEIGHT = -1.0 is invalid: must be a number >= 0$"),
    ("MODEL.RPN.LOSS_WEIGHT", float("nan"), r"^MODEL.RPN.LOSS_WEIGHT = nan is invalid: must be a number >= 0$"),
    ("MODEL.RPN.SMOOTH_L1_BETA", -0.1, r"^MODEL.RPN.SMOOTH_L1_BETA = -0.1 is invalid: must be a number >= 0$"),
    # component names and modes
    ("MODEL.RPN.HEAD_NAME", "FPNHead",
     r"^MODEL.RPN.HEAD_NAME = 'FPNHead' is not registered; registered: \['CascadeRPNHead', 'FPNRPNHead', 'StandardRPNHead'\]$"),
    ("MODEL.ANCHOR_GENERATOR.NAME", "FPNAnchors",
     r"^MODEL.ANCHOR_GENERATOR.NAME = 'FPNAnchors' is not registered; registered: \[.*'FPNAnchorGenerator'.*\]$"),
    ("MODEL.FPN_RPN.OBJECTNESS", "tanh",
     r"^MODEL.FPN_RPN.OBJECTNESS = 'tanh' is invalid: must be one of \('sigmoid', 'softmax', 'centerness'\)$"),
    ("MODEL.FPN_RPN.NMS_MODE", "global",
     r"^MODEL.FPN_RPN.NMS_MODE = 'global' is invalid: must be one of \('cross_level', 'per_level'\)$"),
    ("MODEL.FPN_RPN.LOC_LOSS_NORMALIZER", "mean", r"^MODEL.FPN_RPN.LOC_LOSS_NORMALIZER = 'mean' is invalid: must be one of \('batch_size'"),
    ("MODEL.RPN.CONV_DIMS", [], r"^MODEL.RPN.CONV_DIMS = \[\] is invalid: give at least one conv width"),
    ("MODEL.FPN_RPN.CENTERNESS_IOU_THRESHOLDS", [0.3, 0.1],
     r"^MODEL.FPN_RPN.CENTERNESS_IOU_THRESHOLDS = \[0.3, 0.1\] is invalid: must be \[negative below, positive from\]"),
    ("MODEL.RPN.BBOX_REG_LOSS_TYPE", "l2",
     r"^MODEL.RPN.BBOX_REG_LOSS_TYPE = 'l2' is invalid: must be one of \('smooth_l1', 'l1', 'iou', 'giou'\)$"),
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


# ---- setup_cfg: what every tool loads a config with ------------------------------------

BAD_RUN_VALUES = [
    (["INPUT.MIN_SIZE_TEST", "-5"], r"^INPUT.MIN_SIZE_TEST = -5 is invalid: must be an integer >= 0"),
    (["INPUT.MIN_SIZE_TRAIN", "(0, 320)"], r"^INPUT.MIN_SIZE_TRAIN = \[0, 320\] is invalid: must be positive integers"),
    (["INPUT.MIN_SIZE_TRAIN", "800"], r"^INPUT.MIN_SIZE_TRAIN = 800 is a int where a tuple is expected"),
    (["INPUT.MAX_SIZE_TRAIN", "0"], r"^INPUT.MAX_SIZE_TRAIN = 0 is invalid: must be a positive integer"),
    (["INPUT.MAX_SIZE_TEST", "-1"], r"^INPUT.MAX_SIZE_TEST = -1 is invalid: must be a positive integer"),
    (["MODEL.PIXEL_STD", "[1.0, 1.0]"],
     r"^MODEL.PIXEL_STD = \[1.0, 1.0\] is invalid: must be 3 positive numbers, one per channel of INPUT.FORMAT 'BGR'$"),
    (["MODEL.PIXEL_STD", "[1.0, 0.0, 1.0]"], r"^MODEL.PIXEL_STD = \[1.0, 0.0, 1.0\] is invalid: must be 3 positive"),
    (["MODEL.PIXEL_MEAN", "[100.0, 110.0, 120.0, 0.0]"], r"^MODEL.PIXEL_MEAN = \[100.0, 110.0, 120.0, 0.0\] is inv"),
    (["SOLVER.IMS_PER_BATCH", "0"], r"^SOLVER.IMS_PER_BATCH = 0 is invalid: must be a positive integer$"),
    (["SOLVER.BASE_LR", "-0.1"], r"^SOLVER.BASE_LR = -0.1 is invalid: must be a positive number$"),
    (["SOLVER.BASE_LR", "0"], r"^SOLVER.BASE_LR = 0 is a int where a float is expected"),
    (["SOLVER.MAX_ITER", "0"], r"^SOLVER.MAX_ITER = 0 is invalid: must be a positive integer$"),
    (["SOLVER.CHECKPOINT_PERIOD", "0"], r"^SOLVER.CHECKPOINT_PERIOD = 0 is invalid"),
    (["SOLVER.STEPS", "(100, 50)"], r"^SOLVER.STEPS = \[100, 50\] is invalid: must be increasing"),
    (["SOLVER.MOMENTUM", "1.5"], r"^SOLVER.MOMENTUM = 1.5 is invalid: must be in \[0, 1\)$"),
    (["SOLVER.WARMUP_ITERS", "-1"], r"^SOLVER.WARMUP_ITERS = -1 is invalid"),
    (["TEST.RECALL_BUDGETS", "[100, 0]"], r"^TEST.RECALL_BUDGETS = \[100, 0\] is invalid: must be positive integers"),
    (["TEST.EVAL_PERIOD", "-1"], r"^TEST.EVAL_PERIOD = -1 is invalid"),
    (["DATALOADER.NUM_WORKERS", "-2"], r"^DATALOADER.NUM_WORKERS = -2 is invalid"),
    (["MODEL.FPN_RPN.NMS_MOD", "per_level"],
     r"^MODEL.FPN_RPN.NMS_MOD is not a config key; did you mean MODEL.FPN_RPN.NMS_MODE\?$"),
    (["SOLVER.BASE_LR", "0.01", "--resume"],
     r"^--resume is among the KEY VALUE overrides: options go before the first KEY VALUE pair$"),
    (["SOLVER.BASE_LR"], r"^the KEY VALUE overrides have an odd number of items \(1: SOLVER.BASE_LR\)"),
]  # fmt: skip


@pytest.mark.parametrize("opts, match", BAD_RUN_VALUES, ids=[" ".join(o) for o, _ in BAD_RUN_VALUES])
def test_setup_cfg_names_the_bad_key_in_one_line(opts, match):
    with pytest.raises(ConfigError, match=match) as info:
        setup_cfg(str(CONFIG), opts)
    assert "\n" not in str(info.value)


def test_setup_cfg_names_a_missing_or_misspelled_config_file(tmp_path):
    with pytest.raises(ConfigError, match=f"^config file {re.escape(str(tmp_path / 'no.yaml'))} does not exist$"):
        setup_cfg(str(tmp_path / "no.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{CONFIG}"\nMODEL:\n  RPN:\n    NMS_TRESH: 0.5\n')
    with pytest.raises(ConfigError, match=r"^MODEL.RPN.NMS_TRESH is not a config key \(in .*bad.yaml or its _BASE_\); "
                                          r"did you mean MODEL.RPN.NMS_THRESH\?$"):
        setup_cfg(str(bad))


def _train_net_run(tmp_path, *opts):
    cmd = [sys.executable, str(TRAIN_NET), "--config-file", str(CONFIG), "OUTPUT_DIR", str(tmp_path), *opts]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)


@pytest.mark.parametrize("opts, words", [
    (["INPUT.MIN_SIZE_TEST", "-5"], "train_net.py: error: INPUT.MIN_SIZE_TEST = -5 is invalid"),
    (["--resume"], "train_net.py: error: --resume is among the KEY VALUE overrides"),
])  # fmt: skip
def test_train_net_stops_before_training_with_one_line(tmp_path, opts, words):
    run = _train_net_run(tmp_path, *opts)
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].startswith(words), run.stderr[-2000:]
    assert "Traceback" not in run.stderr and not (tmp_path / "model_final.pth").exists()


# ---- every tool's arguments: argparse, exit status 2 and one line -----------------------

def _source_args():
    return ["--dataset", "coco_mini_val", "--output-dir", "unused"]


BAD_ARGUMENTS = [
    ("analyze_anchors", ["--config", str(CONFIG), "--max-images", "0"], "argument --max-images: '0' is not a positive"),
    ("analyze_anchors", ["--config", str(CONFIG), "--sizes-per-level", "-1"], "argument --sizes-per-level: '-1' is not"),
    ("visualize_proposals", ["--model", str(CONFIG), "--top", "-3"], "argument --top: '-3' is not a positive integer"),
    ("visualize_proposals", ["--model", str(CONFIG), "--num-images", "0"], "argument --num-images: '0' is not"),
    ("visualize_proposals", ["--model", "model.pth"], "argument --model: expected CONFIG.yaml[:WEIGHTS]"),
    ("visualize_proposals", ["--proposals", "p.pkl", "--level-rule", "anchor"], "--level-rule anchor needs"),
    ("compare_recall", ["--selective-search", "--max-images", "-1"], "argument --max-images: '-1' is not a positive"),
    ("compare_recall", ["--selective-search", "--budgets", "100", "0"], "argument --budgets: '0' is not a positive"),
    ("compare_recall", ["--model", str(CONFIG)], "argument --model: expected NAME=CONFIG..."),
    ("compare_recall", ["--random-init", f"r={CONFIG}:w.pth"], "argument --random-init: a random-init model takes no"),
    ("compare_recall", ["--selective-search", "a", "--selective-search", "a"], "source names must differ"),
    ("compare_recall", [], "give at least one source"),
]  # fmt: skip


@pytest.mark.parametrize("tool, argv, words", BAD_ARGUMENTS, ids=[f"{t} {' '.join(a)}" for t, a, _ in BAD_ARGUMENTS])
def test_tool_misuse_exits_2_with_one_line(capsys, tool, argv, words):
    code, err = cli(capsys, tool, argv + _source_args())
    assert code == 2 and len(err) == 1 and err[0].startswith(f"{tool}.py: error: ") and words in err[0], err


@pytest.mark.parametrize("tool, source", [
    ("analyze_anchors", ["--config"]), ("visualize_proposals", ["--model"]), ("compare_recall", ["--anchors"]),
])  # fmt: skip
@pytest.mark.parametrize("case, words", [
    ("missing", "does not exist"), ("odd opts", "the KEY VALUE overrides have an odd number of items"),
    ("misspelled", "MODEL.RPN.NMS_TRESH is not a config key; did you mean MODEL.RPN.NMS_THRESH?"),
])  # fmt: skip
def test_tool_config_faults_exit_1_with_one_line(capsys, tmp_path, tool, source, case, words):
    config = str(tmp_path / "none.yaml") if case == "missing" else str(CONFIG)
    opts = {"missing": [], "odd opts": ["SOLVER.BASE_LR"], "misspelled": ["MODEL.RPN.NMS_TRESH", "0.5"]}[case]
    code, err = cli(capsys, tool, source + [config] + _source_args() + ["--opts", *opts])
    assert code == 1 and len(err) == 1 and err[0].startswith(f"{tool}.py: error: ") and words in err[0], err
