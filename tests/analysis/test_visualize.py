import contextlib
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import fpn_rpn  # noqa: F401  (before detectron2)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from PIL import Image

from fpn_rpn import setup_cfg
from fpn_rpn.analysis.plots import plot_ar_vs_proposals, plot_recall_vs_iou
from fpn_rpn.analysis.proposal_drawing import GT_COLOUR, LEVEL_COLOURS, anchor_size_levels, draw_proposals, fpn_levels
from fpn_rpn.analysis.proposal_sources import get_dataset_dicts
from conftest import REPO, load_tool

DEMO_CONFIG = str(REPO / "configs" / "demo" / "fpn_rpn_R_18_GN_synthetic.yaml")


def _square(side):
    return [0, 0, side, side]


def _colours(path) -> int:
    with Image.open(path) as image:
        return len(image.convert("RGB").getcolors(maxcolors=1 << 24))


def test_fpn_levels():
    # k = floor(4 + log2(side / 224)), clamped to 2..6; index 0 is P2
    boxes = np.array([_square(s) for s in (224, 112, 111, 448, 895, 10000, 1)], dtype=np.float32)
    levels, names = fpn_levels(boxes)
    np.testing.assert_array_equal(levels, [2, 1, 0, 3, 3, 4, 0])  # P4, P3, P2 (2.99), P5, P5 (5.998), P6, P2
    assert names == ["P2", "P3", "P4", "P5", "P6"]
    # sides doubled (the network's input is twice the image): 112 -> 224 -> P4
    np.testing.assert_array_equal(fpn_levels(boxes[1:2], scale=2.0)[0], [2])


def test_anchor_size_levels():
    # nearest anchor size in log scale: 45 is nearer 32 (log ratio 0.341) than 64 (0.352)
    boxes = np.array([_square(s) for s in (32, 45, 46, 64, 700)], dtype=np.float32)
    levels, names = anchor_size_levels(boxes, [[32], [64], [128], [256], [512]], ["p2", "p3", "p4", "p5", "p6"])
    np.testing.assert_array_equal(levels, [0, 0, 1, 1, 4])
    assert names == ["P2", "P3", "P4", "P5", "P6"]
    # two sizes per level: their geometric mean (32 * sqrt(2) ~ 45.3) is the level's centre
    np.testing.assert_array_equal(anchor_size_levels(boxes[1:3], [[32, 64], [128, 256]], ["a", "b"])[0], [0, 0])


def test_draw_proposals_colours():
    image = np.zeros((300, 400, 3), dtype=np.uint8)
    boxes = np.array([[200, 150, 300, 250], [210, 160, 290, 240], [100, 200, 150, 280]], dtype=np.float32)
    scores = np.array([0.9, 0.1, 0.5], dtype=np.float32)
    canvas = draw_proposals(image, boxes, scores, np.array([1, 3, 4]), ["P2", "P3", "P4", "P5", "P6"],
                            gt_boxes=np.array([[320, 40, 380, 100]]), top=2)
    assert canvas.size == (400, 300)
    pixels = np.asarray(canvas)
    assert tuple(pixels[200, 300]) == LEVEL_COLOURS[1]  # right edge of the best box (P3)
    assert tuple(pixels[260, 150]) == LEVEL_COLOURS[4]  # the second best (P6)
    assert tuple(pixels[200, 290]) == (0, 0, 0)  # the third is not drawn (top=2)
    assert tuple(pixels[70, 380]) == GT_COLOUR


def test_plots_are_written(tmp_path):
    thresholds = np.linspace(0.5, 1.0, 11)
    iou_png, ar_png = tmp_path / "iou.png", tmp_path / "ar.png"
    plot_recall_vs_iou(thresholds, {"a": 1 - thresholds, "b": (1 - thresholds) / 2}, str(iou_png), "t")
    plot_ar_vs_proposals({"a": ([1, 10, 100], np.array([0.1, 0.2, 0.4]))}, str(ar_png), "t")
    for path in (iou_png, ar_png):
        assert path.stat().st_size > 0 and _colours(path) > 1


@pytest.fixture(scope="module")
def val_dicts(coco_mini):
    if not (coco_mini / "annotations" / "instances_val2017.json").is_file():
        pytest.skip("coco_mini not found")
    return get_dataset_dicts("coco_mini_val", 2)


def test_tool_from_proposal_file(val_dicts, tmp_path):
    # each image's gts, shifted, as proposals
    ids, boxes, logits = [], [], []
    for record in val_dicts:
        gt = np.array([BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)
                       for a in record["annotations"]], dtype=np.float32) + 3
        ids.append(record["image_id"])
        boxes.append(gt)
        logits.append(np.linspace(1, 0, len(gt), dtype=np.float32))
    path = tmp_path / "p.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ids": ids, "boxes": boxes, "objectness_logits": logits, "bbox_mode": 0}, f)
    with contextlib.redirect_stdout(io.StringIO()):
        load_tool("visualize_proposals").main(
            ["--dataset", "coco_mini_val", "--num-images", "2", "--proposals", str(path),
             "--output-dir", str(tmp_path / "vis"), "--top", "5", "--config", DEMO_CONFIG, "--level-rule", "anchor"]
        )
    written = sorted((tmp_path / "vis").glob("*.png"))
    assert [p.stem for p in written] == sorted(Path(r["file_name"]).stem for r in val_dicts)
    for p, record in zip(written, sorted(val_dicts, key=lambda r: Path(r["file_name"]).stem)):
        with Image.open(p) as image:
            assert image.size == (record["width"], record["height"])
        assert _colours(p) > 1


def test_tool_from_model(val_dicts, tmp_path):
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(setup_cfg(DEMO_CONFIG)), save_dir=str(tmp_path)).save("model")
    with contextlib.redirect_stdout(io.StringIO()):
        load_tool("visualize_proposals").main(
            ["--dataset", "coco_mini_val", "--num-images", "1", "--model", f"{DEMO_CONFIG}:{tmp_path / 'model.pth'}",
             "--output-dir", str(tmp_path), "--opts", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192"]
        )
    (png,) = tmp_path.glob("*.png")
    assert png.stem == Path(val_dicts[0]["file_name"]).stem and _colours(png) > 1
