"""The NMS study: its grid, and the tool end to end on two photographs."""
import csv

import pytest
import torch

import fpn_rpn  # noqa: F401  (before detectron2)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from fpn_rpn import setup_cfg
from fpn_rpn.analysis.nms_study import Variant, paired_cells, variant_grid

from conftest import REPO, load_tool

DEMO_CONFIG = str(REPO / "configs" / "demo" / "fpn_rpn_R_18_GN_synthetic.yaml")
SMALL_INPUT = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192"]


def test_grid_sweeps_each_setting_at_the_others_default():
    grid = variant_grid([0.6, 0.7], [500, 1000], nms_thresh=0.7, pre_nms_topk=1000)
    assert grid == [
        Variant("cross_level", 0.6, 1000), Variant("cross_level", 0.7, 1000),
        Variant("per_level", 0.6, 1000), Variant("per_level", 0.7, 1000),
        Variant("cross_level", 0.7, 500), Variant("per_level", 0.7, 500),
    ]
    assert Variant("per_level", 0.6, 500).opts == [
        "MODEL.FPN_RPN.NMS_MODE", "per_level", "MODEL.RPN.NMS_THRESH", 0.6, "MODEL.RPN.PRE_NMS_TOPK_TEST", 500]


def test_paired_cells_show_difference_and_interval():
    row = paired_cells({"budget": 10, "difference": 0.0125, "ci_low": -0.002, "ci_high": 0.03})
    assert row == {"budget": 10, "difference [95% interval]": "+0.0125 [-0.0020, +0.0300]"}


def test_tool_on_two_photographs(coco_mini, tmp_path):
    pytest.importorskip("cv2.ximgproc", reason="needs opencv-contrib-python")
    if not (coco_mini / "annotations" / "instances_val2017.json").is_file():
        pytest.skip("coco_mini not found")
    torch.manual_seed(0)
    model = build_model(setup_cfg(DEMO_CONFIG, SMALL_INPUT))
    with torch.no_grad():  # boxes leave their anchors, so levels overlap
        model.proposal_generator.rpn_head.anchor_deltas.weight.mul_(30.0)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("w")
    weights = str(tmp_path / "w.pth")
    load_tool("nms_study").main([
        "--config", DEMO_CONFIG, "--checkpoints", f"a={weights}", f"b={weights}", "--datasets", "coco_mini_val",
        "--max-images", "2", "--output-dir", str(tmp_path / "out"), "--nms-threshs", "0.6", "0.7",
        "--pre-nms-topks", "1000", "--ss-max-side", "192", "--opts", *SMALL_INPUT,
    ])
    with open(tmp_path / "out" / "study.csv") as f:
        rows = list(csv.DictReader(f))
    sources = {r["source"] for r in rows if r["kind"] == "sources"}
    assert {"Selective Search (fast)", "anchors (random order)", "R-18 GN FPN (random init)"} <= sources
    assert "per_level NMS 0.6 top-K 1000" in sources
    paired = [r for r in rows if r["kind"] == "paired" and r["definition"] == "coco"]
    # both checkpoints at every budget, then the sweep (2 thresholds x 3 budgets)
    assert [r["checkpoint"] for r in paired[:12]] == ["a"] * 6 + ["b"] * 6
    assert all(float(r["ci_low"]) <= float(r["difference"]) <= float(r["ci_high"]) for r in paired)
    assert float(paired[0]["per-level dup/img"]) > 0
    assert (tmp_path / "out" / "ar_vs_proposals_coco_mini_val.png").stat().st_size > 0
    assert "Cross-level minus per-level" in (tmp_path / "out" / "study.md").read_text()
    # without the untrained row (the demo's shorter study), from the proposals cached above: Selective
    # Search at the config's MAX_SIZE_TEST (192) is the one cached at --ss-max-side 192, so nothing is added
    cached = sorted(p.name for p in (tmp_path / "out" / "cache").rglob("*"))
    load_tool("nms_study").main([
        "--config", DEMO_CONFIG, "--checkpoints", f"b={weights}", "--datasets", "coco_mini_val", "--max-images", "2",
        "--output-dir", str(tmp_path / "out2"), "--cache-dir", str(tmp_path / "out" / "cache"),
        "--nms-threshs", "0.7", "--pre-nms-topks", "1000", "--ss-max-side", "test", "--random-init-config", "none",
        "--opts", *SMALL_INPUT,
    ])
    with open(tmp_path / "out2" / "study.csv") as f:
        sources = {r["source"] for r in csv.DictReader(f) if r["kind"] == "sources"}
    assert "Selective Search (fast)" in sources and not any("random init" in s for s in sources)
    assert sorted(p.name for p in (tmp_path / "out" / "cache").rglob("*")) == cached
