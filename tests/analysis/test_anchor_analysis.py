import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch

import fpn_rpn  # noqa: F401  (before detectron2)
from detectron2.config import CfgNode
from detectron2.structures import BoxMode
from PIL import Image

from fpn_rpn.analysis.anchor_analysis import (
    AnchorGrid,
    anchor_config_lines,
    anchor_params,
    best_iou_closed_form,
    coverage_rows,
    match_gts_to_anchors,
    suggest_anchors,
    with_anchor_params,
)
from fpn_rpn import setup_cfg
from fpn_rpn.analysis.proposal_sources import get_dataset_dicts
from conftest import load_tool

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = str(REPO / "configs" / "demo" / "fpn_rpn_R_18_GN_synthetic.yaml")
# 128x128 images resized to 64x64 for the network: scale 0.5; COCO's anchor sizes
HALF = ["INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64,
        "MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64], [128], [256], [512]]]


def _record(boxes, crowd=()):
    return {
        "image_id": 1,
        "height": 128,
        "width": 128,
        "annotations": [
            {"bbox": b, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": int(i in crowd)}
            for i, b in enumerate(boxes)
        ],
    }


def test_hand_checked_best_anchors():
    # Original boxes, halved for the 64x64 input. P2 anchors (size 32, stride 4, offset 0)
    # are centred at 0, 4, 8, ...; P3 (64, stride 8) at 0, 8, 16, ...; ratios w/h 2, 1, 0.5.
    record = _record(
        [
            [0, 0, 64, 64],  # -> [0, 0, 32, 32]: the P2 square anchor at (16, 16), IoU 1
            [4, 0, 68, 64],  # -> [2, 0, 34, 32]: half a stride off; 30*32 / (2*1024 - 960) = 15/17
            [0, 0, 128, 128],  # -> [0, 0, 64, 64]: the P3 square anchor at (32, 32), IoU 1
            [0, 0, 20, 20],  # -> [0, 0, 10, 10]: inside the 32x32 anchor at (4, 4): 100/1024
            [0, 0, 100, 100],  # crowd: not matched
        ],
        crowd=(4,),
    )
    cfg = setup_cfg(DEMO_CONFIG, HALF)
    matches = match_gts_to_anchors(cfg, [record])
    torch.testing.assert_close(matches.best_iou, np.array([1.0, 15 / 17, 1.0, 100 / 1024]), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(matches.best_level[:3], [0, 0, 1])  # p2, p2, p3
    np.testing.assert_array_equal(matches.best_cell[:3], [1, 1, 1])  # the ratio-1 anchor
    np.testing.assert_array_equal(matches.scaled_boxes[1], [2, 0, 34, 32])
    assert list(matches.buckets) == ["medium", "medium", "large", "small"]  # areas 4096, 4096, 16384, 400

    rows = {r["bucket"]: r for r in coverage_rows(matches.best_iou, matches.buckets)}
    assert (rows["small"]["gts"], rows["small"]["IoU>=0.5"]) == (1, 0.0)
    assert (rows["medium"]["IoU>=0.5"], rows["medium"]["IoU>=0.7"]) == (1.0, 1.0)
    assert rows["all"]["gts"] == 4 and rows["all"]["IoU>=0.7"] == 0.75
    assert rows["all"]["mean best IoU"] == pytest.approx((2 + 15 / 17 + 100 / 1024) / 4, abs=1e-6)


def test_closed_form_equals_anchor_generator(coco_mini):
    if not (coco_mini / "annotations" / "instances_val2017.json").is_file():
        pytest.skip("coco_mini not found")
    cfg = setup_cfg(DEMO_CONFIG)
    matches = match_gts_to_anchors(cfg, get_dataset_dicts("coco_mini_val", 4))
    grid = AnchorGrid(cfg)
    per_level = [
        best_iou_closed_form(matches.scaled_boxes, matches.grid_sizes[:, l], grid.strides[l], grid.offset, shapes).max(1)
        for l, shapes in enumerate(grid.cell_shapes())
    ]
    assert len(matches.best_iou) > 10
    torch.testing.assert_close(np.max(per_level, axis=0), matches.best_iou, rtol=0, atol=1e-5)


def test_suggestion_finds_the_missing_ratio():
    # 64x16 boxes (w/h 4) at the test resolution, at P2 grid centres and half a stride
    # off; with only square anchors the best IoU is 512 / 1536 = 1/3 at best
    boxes = [[2 * (x - 32), 2 * (y - 8), 2 * (x + 32), 2 * (y + 8)] for x, y in ((40, 20), (42, 30), (38, 45))]
    cfg = setup_cfg(DEMO_CONFIG, HALF + ["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[1.0]]])
    matches = match_gts_to_anchors(cfg, [_record(boxes)])
    assert matches.best_iou.max() <= 1 / 3 + 1e-6
    grid = AnchorGrid(cfg)
    sizes, ratios = anchor_params(cfg, len(grid.strides))
    assert (sizes, ratios[0]) == ([[32], [64], [128], [256], [512]], [1.0])
    new_sizes, new_ratios = suggest_anchors(matches, grid.strides, grid.offset, sizes, ratios[0])
    after = match_gts_to_anchors(with_anchor_params(cfg, new_sizes, new_ratios), [_record(boxes)])
    assert (after.best_iou >= 0.7).all()
    assert 1 / 8 < new_ratios[0] < 1 / 2  # wide anchors: height / width about 1/4


def test_config_lines_merge_into_a_config():
    lines = anchor_config_lines([[16.5], [32], [64], [128], [256]], [0.333, 1.0, 2.0])
    assert lines == (
        "MODEL:\n"
        "  ANCHOR_GENERATOR:\n"
        "    SIZES: [[16.5], [32], [64], [128], [256]]\n"
        "    ASPECT_RATIOS: [[0.333, 1, 2]]  # height / width"
    )
    # one key for both generators: Detectron2's ASPECT_RATIOS, height / width
    for config in (DEMO_CONFIG, str(REPO / "configs" / "demo" / "stock_rpn_R_18_GN_synthetic.yaml")):
        merged = setup_cfg(config).clone()
        merged.defrost()
        merged.merge_from_other_cfg(CfgNode.load_cfg(lines))
        assert merged.MODEL.ANCHOR_GENERATOR.SIZES == [[16.5], [32], [64], [128], [256]]
        assert anchor_params(merged, 5)[1] == [[0.333, 1, 2]] * 5


def test_tool_writes_report(coco_mini, tmp_path):
    if not (coco_mini / "annotations" / "instances_val2017.json").is_file():
        pytest.skip("coco_mini not found")
    tool = load_tool("analyze_anchors")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        matches, suggested = tool.main(
            ["--config", DEMO_CONFIG, "--dataset", "coco_mini_val", "--max-images", "3", "--output-dir", str(tmp_path)]
        )
    text = out.getvalue()
    assert "IoU>=0.7" in text and "ASPECT_RATIOS" in text
    # the suggestion starts from the config, so coverage never drops on this data
    score = [(m.best_iou >= 0.5).sum() + (m.best_iou >= 0.7).sum() for m in (matches, suggested)]
    assert score[1] >= score[0]
    yaml_text = (tmp_path / "suggested_anchors.yaml").read_text()
    cfg = setup_cfg(DEMO_CONFIG)
    cfg.defrost()
    cfg.merge_from_other_cfg(CfgNode.load_cfg(yaml_text))
    rows = (tmp_path / "anchor_coverage.csv").read_text().splitlines()
    assert len(rows) == 1 + len(matches.best_iou)
    png = tmp_path / "anchor_coverage.png"
    assert png.stat().st_size > 0
    with Image.open(png) as image:
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 24)) > 1
