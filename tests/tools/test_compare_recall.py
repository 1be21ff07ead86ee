import contextlib
import csv
import io
import json
import math
import os
import pickle
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

import fpn_rpn  # noqa: F401  (before detectron2)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.build import load_proposals_into_dataset
from detectron2.data.detection_utils import transform_proposals
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from PIL import Image
from pycocotools.coco import COCO

from fpn_rpn import setup_cfg
from fpn_rpn.errors import DataError
from fpn_rpn.data.proposal_files import load_proposal_file
from fpn_rpn.evaluation.proposal_recall import evaluate_recall, gt_from_coco, metric_name
from fpn_rpn.analysis.proposal_sources import (
    anchor_proposals,
    cache_key,
    cached,
    get_dataset_dicts,
    run_model,
    selective_search,
)

from conftest import REPO, load_tool

DEMO_CONFIG = str(REPO / "configs" / "demo" / "fpn_rpn_R_18_GN_synthetic.yaml")
# small test inputs keep R-18 inference near a second per image on CPU
SMALL_INPUT = ["INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 192]


def _colours(path) -> int:
    with Image.open(path) as image:
        return len(image.convert("RGB").getcolors(maxcolors=1 << 24))


@pytest.fixture(scope="module")
def val_json(coco_mini):
    path = coco_mini / "annotations" / "instances_val2017.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def val_dicts(val_json):
    return get_dataset_dicts("coco_mini_val", 6)


def _jittered_proposals(coco, img_ids, seed=0):
    """Boxes around each gt, scores a permutation (no ties), as Detectron2 proposal file arrays."""
    rng = np.random.default_rng(seed)
    out = {}
    for img_id in img_ids:
        gt = np.array([a["bbox"] for a in coco.imgToAnns[img_id]]).reshape(-1, 4)
        xywh = np.repeat(gt, 8, axis=0)
        xywh[:, :2] += rng.normal(0, 0.15, (len(xywh), 2)) * xywh[:, 2:]
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
        out[img_id] = (boxes, rng.permutation(len(boxes)).astype(np.float32))
    return out


def _canonical(boxes, scores):
    """(N, 5) boxes with scores, in one order whatever order ties of scores came in."""
    rows = np.concatenate([boxes, scores[:, None]], axis=1)
    return torch.from_numpy(rows[np.lexsort(rows.T[::-1])])


def _write_proposal_file(path, proposals, bbox_mode=BoxMode.XYXY_ABS):
    with open(path, "wb") as f:
        pickle.dump(
            {
                "ids": list(proposals),
                "boxes": [b for b, _ in proposals.values()],
                "objectness_logits": [s for _, s in proposals.values()],
                "bbox_mode": bbox_mode.value,
            },
            f,
        )


def test_table_equals_evaluate_recall(val_json, val_dicts, tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(val_json))
    img_ids = [d["image_id"] for d in val_dicts]
    proposals = _jittered_proposals(coco, img_ids)
    file_a, file_b = tmp_path / "a.pkl", tmp_path / "b.pkl"
    _write_proposal_file(file_a, proposals)
    _write_proposal_file(file_b, _jittered_proposals(coco, img_ids, seed=1))
    budgets, area_budgets = [1, 5, 20], [5, 20]

    tool = load_tool("compare_recall")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        tool.main([
            "--dataset", "coco_mini_val", "--max-images", "6", "--output-dir", str(tmp_path / "out"),
            "--proposals", f"a={file_a}", "--proposals", f"b={file_b}", "--definition", "both",
            "--budgets", *map(str, budgets), "--area-budgets", *map(str, area_budgets), "--budget", "5",
        ])
    with open(tmp_path / "out" / "recall_table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["definition"], r["source"]) for r in rows] == [("d2", "a"), ("d2", "b"), ("coco", "a"), ("coco", "b")]

    expected = evaluate_recall(
        gt_from_coco(coco, img_ids),
        {i: {"boxes": b, "scores": s} for i, (b, s) in proposals.items()},
        sorted(set(budgets + area_budgets)),
    )
    for row in (rows[0], rows[2]):
        metrics = expected["recall_" + row["definition"]]
        names = [metric_name("all", k) for k in budgets]
        names += [metric_name(a, k) for k in area_budgets for a in ("small", "medium", "large")]
        actual = {n: float(row[n]) if row[n] else math.nan for n in names}
        torch.testing.assert_close(actual, {n: metrics[n] for n in names}, rtol=0, atol=0, equal_nan=True)
        assert float(row["proposals/img"]) == np.mean([len(s) for _, s in proposals.values()])
        assert row["s/img"] == ""  # unknown for a file
    # the markdown table names the definition in its caption
    text = (tmp_path / "out" / "recall_table.md").read_text()
    assert 'definition "d2"' in text and 'definition "coco"' in text and text.strip() in out.getvalue()
    for name in ("recall_vs_iou_d2", "ar_vs_proposals_d2", "recall_vs_iou_coco", "ar_vs_proposals_coco"):
        path = tmp_path / "out" / f"{name}.png"
        assert path.stat().st_size > 0 and _colours(path) > 1


def test_selective_search_on_two_images(val_dicts):
    pytest.importorskip("cv2.ximgproc", reason="needs opencv-contrib-python")
    records = val_dicts[:2]
    proposals, seconds = selective_search(records, max_side=200, seed=0, workers=1)
    # side by side in two processes: each image is seeded alone, so the same boxes
    again, _ = selective_search(records, max_side=200, seed=0, workers=2)
    assert seconds > 0 and list(proposals) == [r["image_id"] for r in records]
    for record in records:
        p = proposals[record["image_id"]]
        boxes = p["boxes"]
        assert len(boxes) > 10 and boxes.dtype == np.float32
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes[:, 2] <= record["width"]).all() and (boxes[:, 3] <= record["height"]).all()
        # OpenCV's order is the ranking: scores strictly decreasing
        np.testing.assert_array_equal(p["scores"], -np.arange(len(boxes), dtype=np.float32))
        # seeded: the same boxes in the same order, whatever the number of workers
        np.testing.assert_array_equal(boxes, again[record["image_id"]]["boxes"])


def test_anchor_proposals_hand_checked():
    # 128x128 image, test size 64: scale 0.5. P2-P6 (strides 4..64) on the 64x64 input
    # have 16^2 + 8^2 + 4^2 + 2^2 + 1 = 341 locations x 3 ratios = 1023 anchors, all with
    # their centre inside the image, so none is empty after clipping.
    cfg = setup_cfg(DEMO_CONFIG, ["INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64])
    proposals, _ = anchor_proposals(cfg, [{"image_id": 7, "height": 128, "width": 128}], seed=0)
    boxes, scores = proposals[7]["boxes"], proposals[7]["scores"]
    assert boxes.shape == (1023, 4)
    # a random ranking without ties: the scores are minus a permutation
    np.testing.assert_array_equal(np.sort(-scores), np.arange(1023, dtype=np.float32))
    # the P2 square anchor at (0, 0), [-16, -16, 16, 16], clipped to [0, 0, 16, 16],
    # times 2 back to the original image
    assert any(np.array_equal(b, [0, 0, 32, 32]) for b in boxes)
    assert boxes.min() == 0 and boxes.max() == 128


def test_proposal_file_with_other_ids_is_a_clear_error(tmp_path):
    path = tmp_path / "p.pkl"
    box = (np.zeros((1, 4), np.float32), np.zeros(1, np.float32))
    _write_proposal_file(path, {1: box, 2: box, 3: box})
    with pytest.raises(DataError, match=r"no proposals for 2 of the 4 images of dataset 'toy' \(image ids 4, 5\); "
                                        r"the file has proposals for 3 images, 1 of them not in the dataset"):
        load_proposal_file(str(path), [1, 2, 4, 5], "toy")
    with pytest.raises(DataError, match="lacks"):
        with open(path, "wb") as f:
            pickle.dump({"ids": [1], "boxes": [box[0]]}, f)
        load_proposal_file(str(path), [1])


def test_proposal_file_conversions(tmp_path):
    # Detectron1 key names and XYWH boxes; extra ids in the file are ignored
    path = tmp_path / "d1.pkl"
    with open(path, "wb") as f:
        pickle.dump(
            {
                "indexes": ["5", "6"],
                "boxes": [np.array([[1, 2, 10, 20]], np.float64), np.zeros((0, 4))],
                "scores": [np.array([0.5]), np.zeros(0)],
                "bbox_mode": BoxMode.XYWH_ABS.value,
            },
            f,
        )
    proposals = load_proposal_file(str(path), [{"image_id": 5}])
    assert list(proposals) == [5]
    np.testing.assert_array_equal(proposals[5]["boxes"], np.array([[1, 2, 11, 22]], np.float32))
    np.testing.assert_array_equal(proposals[5]["scores"], np.array([0.5], np.float32))


def test_cache_reuses_and_invalidates(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"1")
    cfg = setup_cfg(DEMO_CONFIG, [], str(weights))
    records = [{"image_id": 1}, {"image_id": 2}]
    calls = []

    def compute():
        calls.append(1)
        return {1: {"boxes": np.ones((1, 4), np.float32), "scores": np.ones(1, np.float32)}}, 0.25

    key = cache_key("model", "d", records, cfg)
    first = cached(str(tmp_path / "cache"), "ours", key, compute)
    second = cached(str(tmp_path / "cache"), "ours", key, compute)
    assert (first[2], second[2], len(calls)) == (False, True, 1)
    assert second[1] == 0.25 and np.array_equal(second[0][1]["boxes"], first[0][1]["boxes"])
    # new weights (mtime and size) or other images: computed again
    weights.write_bytes(b"22")
    os.utime(weights, (1, 1))
    assert cached(str(tmp_path / "cache"), "ours", cache_key("model", "d", records, cfg), compute)[2] is False
    assert cached(str(tmp_path / "cache"), "ours", cache_key("model", "d", records[:1], cfg), compute)[2] is False
    assert len(calls) == 3


@pytest.fixture
def two_image_dataset(val_json, tmp_path):
    """The first two coco_mini val images as a COCO json of their own."""
    data = json.loads(val_json.read_text())
    images = sorted(data["images"], key=lambda im: im["id"])[:2]
    ids = {im["id"] for im in images}
    data["images"] = images
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    path = tmp_path / "val2.json"
    path.write_text(json.dumps(data))
    name = "compare_recall_test_" + uuid.uuid4().hex[:8]
    yield name, str(path), str(val_json.parents[1] / "val2017")
    for catalog in (DatasetCatalog, MetadataCatalog):
        if name in catalog.list():
            catalog.remove(name)


def test_eval_only_export_loads_into_dataset(two_image_dataset, tmp_path):
    name, json_file, image_root = two_image_dataset
    register = ["DATASETS.REGISTER_COCO", f"[['{name}', '{json_file}', '{image_root}']]"]
    weights = str(tmp_path / "init.pth")
    cfg = setup_cfg(DEMO_CONFIG, SMALL_INPUT + register + ["DATASETS.TEST", f"('{name}',)"])
    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("init")

    out_dir = tmp_path / "eval"
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", DEMO_CONFIG, "--eval-only",
         *map(str, SMALL_INPUT + register), "DATASETS.TEST", f"('{name}',)", "MODEL.WEIGHTS", weights,
         "OUTPUT_DIR", str(out_dir)],
        check=True, capture_output=True, cwd=str(tmp_path),
    )
    path = out_dir / "inference" / name / "box_proposals.pkl"
    with open(path, "rb") as f:
        saved = pickle.load(f)

    dicts = get_dataset_dicts(name, cfgs=[cfg])
    records = load_proposals_into_dataset([dict(d) for d in dicts], str(path))
    ours, _ = run_model(setup_cfg(DEMO_CONFIG, SMALL_INPUT + register, weights), dicts)
    for record in records:
        n = saved["ids"].index(record["image_id"])
        num = len(saved["boxes"][n])
        assert num > 0 and len(record["proposal_boxes"]) == num  # every box loaded
        transform_proposals(record, (record["height"], record["width"]), T.TransformList([]), proposal_topk=10**6)
        loaded = record["proposals"]
        assert len(loaded) == num  # none lost to clipping or the empty-box filter
        # the file holds what the model gives when run here
        expected = ours[record["image_id"]]
        torch.testing.assert_close(
            _canonical(loaded.proposal_boxes.tensor.numpy(), loaded.objectness_logits.numpy()),
            _canonical(expected["boxes"], expected["scores"]),
        )
    assert load_proposal_file(str(path), dicts).keys() == {d["image_id"] for d in dicts}


def test_run_model_takes_a_detector_rpn(val_dicts, tmp_path):
    # a GeneralizedRCNN with the same backbone and RPN weights gives the same proposals
    cfg = setup_cfg(DEMO_CONFIG, SMALL_INPUT)
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("rpn")
    weights = str(tmp_path / "rpn.pth")
    detector = setup_cfg(DEMO_CONFIG, SMALL_INPUT + [
        "MODEL.META_ARCHITECTURE", "GeneralizedRCNN", "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
        "MODEL.ROI_HEADS.IN_FEATURES", ["p2", "p3", "p4", "p5"], "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead",
        "MODEL.ROI_BOX_HEAD.NUM_FC", 2, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7,
    ], weights)
    records = val_dicts[:1]
    expected, _ = run_model(setup_cfg(DEMO_CONFIG, SMALL_INPUT, weights), records)
    actual, _ = run_model(detector, records)
    image_id = records[0]["image_id"]
    assert len(actual[image_id]["scores"]) > 0
    torch.testing.assert_close(
        _canonical(actual[image_id]["boxes"], actual[image_id]["scores"]),
        _canonical(expected[image_id]["boxes"], expected[image_id]["scores"]),
    )


def test_per_source_overrides_share_one_pass_and_count_duplicates(val_dicts, tmp_path, monkeypatch):
    from fpn_rpn.analysis import proposal_sources

    cfg = setup_cfg(DEMO_CONFIG, SMALL_INPUT)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # boxes leave their anchors, so levels overlap
        model.proposal_generator.rpn_head.anchor_deltas.weight.mul_(30.0)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("moved")
    weights = str(tmp_path / "moved.pth")
    passes = []
    real = proposal_sources.run_postprocessing_variants
    monkeypatch.setattr(proposal_sources, "run_postprocessing_variants",
                        lambda cfgs, *a, **k: passes.append(len(cfgs)) or real(cfgs, *a, **k))
    tool = load_tool("compare_recall")
    with contextlib.redirect_stdout(io.StringIO()):
        rows = tool.main([
            "--dataset", "coco_mini_val", "--max-images", "2", "--output-dir", str(tmp_path / "out"),
            "--model", f"cross={DEMO_CONFIG}:{weights}", "MODEL.FPN_RPN.NMS_MODE", "cross_level",
            "--model", f"per={DEMO_CONFIG}:{weights}", "MODEL.FPN_RPN.NMS_MODE", "per_level",
            "--opts", *map(str, SMALL_INPUT),
        ])
    assert passes == [2]  # one network pass for both post-processings
    by_name = {row["source"]: row for row in rows}
    assert by_name["cross"]["dup/img"] == 0.0 and by_name["per"]["dup/img"] > 0
    for name, opts in (("cross", ["MODEL.FPN_RPN.NMS_MODE", "cross_level"]), ("per", [])):
        expected, _ = run_model(setup_cfg(DEMO_CONFIG, SMALL_INPUT + opts, weights), val_dicts[:2])
        assert by_name[name]["proposals/img"] == np.mean([len(p["scores"]) for p in expected.values()])


def test_source_overrides_must_be_pairs(tmp_path, capsys):
    tool = load_tool("compare_recall")
    with pytest.raises(SystemExit) as info:
        tool.parse_args(["--dataset", "d", "--output-dir", str(tmp_path),
                         "--model", f"a={DEMO_CONFIG}:w.pth", "MODEL.FPN_RPN.NMS_MODE"])
    assert info.value.code == 2 and "KEY VALUE pairs" in capsys.readouterr().err


def test_misspelled_dataset_names_the_closest_registered_one(catalogs):
    from detectron2.data import DatasetCatalog

    from fpn_rpn.analysis.proposal_sources import get_dataset_dicts
    from fpn_rpn.errors import DataError

    DatasetCatalog.register("cr_tiny_val", lambda: [])
    with pytest.raises(DataError, match=r"^the command line names dataset 'cr_tinny_val', which is not "
                                        r"registered; did you mean 'cr_tiny_val'\? "):
        get_dataset_dicts("cr_tinny_val")
