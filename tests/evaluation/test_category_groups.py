"""Recall by category group (TEST.RECALL_CATEGORY_GROUPS, compare_recall --category-groups)."""
import contextlib
import copy
import csv
import io
import json
import math
import pickle

import numpy as np
import pytest
import torch

import fpn_rpn  # noqa: F401  (before detectron2)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from pycocotools.coco import COCO

from fpn_rpn import ProposalRecallEvaluator, setup_cfg
from fpn_rpn.data.build import check_datasets
from fpn_rpn.data.categories import COCO_THING_NAMES, NAMED_SETS, category_groups
from fpn_rpn.errors import ConfigError
from fpn_rpn.evaluation.proposal_recall import (
    evaluate_recall,
    format_recall_table,
    gt_from_coco,
    gt_of_categories,
    metric_name,
    recall_curves,
)

from conftest import REPO, cli, coco_dict, load_tool
from test_proposal_recall import _coco_mini_proposals, _original_recalls, _proposals

NAN = float("nan")
GROUPS = [["seen", "voc"], ["novel", "nonvoc"]]


def _coco(dataset) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(dataset)
        coco.createIndex()
    return coco


def _named(dataset):
    """Give a coco_dict's categories COCO's names."""
    for category in dataset["categories"]:
        category["name"] = COCO_THING_NAMES[category["id"]]
    return dataset


def _filtered(dataset, category_ids):
    """The annotation file with only the annotations of ``category_ids`` (images and categories all kept)."""
    return dict(dataset, annotations=[a for a in dataset["annotations"] if a["category_id"] in category_ids])


# Hand-checked case, test_proposal_recall's boxes (y-range 0..10 for every box, IoU = overlap / union of
# x-ranges) with two categories: person (1, VOC) and giraffe (25, not VOC).
# Image 1: A = x[0,10] person, B = x[4,14] giraffe, D = x[3,13] a giraffe crowd; image 2: C, a medium
# person, without proposals. Proposals p1 = x[3,13] (.9), p2 = x[4,14] (.8), p3 = x[0,10] (.7).
#   IoU(p1, A) = 7/13 = .538, IoU(p1, B) = 9/11 = .818, IoU(p2, B) = 1, IoU(p2, A) = 6/14 = .43, IoU(p3, A) = 1.
# seen (A, C): B is not ground truth, so p1 goes to A (at IoU .50 only) instead of to B.
#   d2 (image 2 skipped: A alone): k=1,2: A by p1, 1 of 10 thresholds -> .1; k=3: A by p3 -> 1.
#   coco (A and C count): k=1,2: .5 x .1 = .05; k=3: p1 takes A at .50, p3 at .55-.95 -> .5.
#     AR_s: A alone (.1, .1, 1); AR_m: C alone, never found -> 0; d2 counts no medium gt -> NaN.
# novel (B; the crowd D is ignored, and may absorb a proposal without cost):
#   k=1: B by p1 at .50-.80, 7 of 10 -> .7 in both; k=2: p2 (IoU 1) -> 1 in both. No medium gt -> NaN.
HAND_GTS = [
    (1, (0, 0, 10, 10), 100, 0, 1),  # A
    (1, (4, 0, 14, 10), 100, 0, 25),  # B
    (1, (3, 0, 13, 10), 100, 1, 25),  # D, crowd
    (2, (0, 0, 80, 80), 6400, 0, 1),  # C, medium
]
HAND_DATASET = _named(coco_dict([1, 2], HAND_GTS, categories=(1, 25)))
HAND_PROPOSALS = {
    1: _proposals([[0, 0, 10, 10], [3, 0, 13, 10], [4, 0, 14, 10]], [0.7, 0.9, 0.8]),
    2: _proposals([], []),
}
HAND_EXPECTED = {
    "recall_d2/seen": {"AR@1": 0.1, "AR@2": 0.1, "AR@3": 1.0, "AR_s@3": 1.0, "AR_m@3": NAN},
    "recall_coco/seen": {"AR@1": 0.05, "AR@2": 0.05, "AR@3": 0.5, "AR_s@1": 0.1, "AR_s@3": 1.0, "AR_m@3": 0.0},
    "recall_d2/novel": {"AR@1": 0.7, "AR@2": 1.0, "AR@3": 1.0, "AR_m@3": NAN},
    "recall_coco/novel": {"AR@1": 0.7, "AR@2": 1.0, "AR@3": 1.0, "AR_s@1": 0.7, "AR_m@3": NAN},
}


def _assert_ar(results, expected):
    for key, values in expected.items():
        actual = {name: results[key][name] for name in values}
        torch.testing.assert_close(actual, values, atol=1e-12, rtol=0, equal_nan=True)


def test_hand_computed_groups():
    gt = gt_from_coco(_coco(HAND_DATASET))
    results = evaluate_recall(gt, HAND_PROPOSALS, [1, 2, 3], category_groups=category_groups(GROUPS))
    _assert_ar(results, HAND_EXPECTED)
    # all boxes, as without groups: p1 goes to B, so A waits for p3
    torch.testing.assert_close(results["recall_d2"], evaluate_recall(gt, HAND_PROPOSALS, [1, 2, 3])["recall_d2"],
                               atol=0, rtol=0, equal_nan=True)
    assert results["recall_coco"]["AR@1"] == pytest.approx(7 / 30)  # B at 7 of 10 thresholds, of 3 gts
    assert list(results) == ["recall_d2", "recall_coco", "recall_d2/seen", "recall_coco/seen",
                             "recall_d2/novel", "recall_coco/novel"]


def test_hand_case_matches_originals_on_the_filtered_file():
    gt = gt_from_coco(_coco(HAND_DATASET))
    for name, ids in category_groups(GROUPS).items():
        originals = _original_recalls(_coco(_filtered(HAND_DATASET, ids)), HAND_PROPOSALS, [1, 2, 3])
        for definition, original in originals.items():
            recall, _ = recall_curves(gt_of_categories(gt, ids), HAND_PROPOSALS, [1, 2, 3], definition=definition)
            torch.testing.assert_close(recall, original, atol=1e-12, rtol=0, equal_nan=True)


def test_gt_of_categories_keeps_images_and_crowds():
    gt = gt_of_categories(gt_from_coco(_coco(HAND_DATASET)), {25})
    assert sorted(gt) == [1, 2]
    np.testing.assert_array_equal(gt[1]["boxes"], [[4, 0, 14, 10], [3, 0, 13, 10]])
    np.testing.assert_array_equal(gt[1]["iscrowd"], [False, True])
    assert gt[2]["boxes"].shape == (0, 4) and gt[2]["xywh"].shape == (0, 4) and gt[2]["areas"].shape == (0,)
    without_categories = {1: {k: v for k, v in gt[1].items() if k != "category_ids"}}
    with pytest.raises(ValueError, match="category groups need the gts' \"category_ids\""):
        gt_of_categories(without_categories, {25})


def test_table_has_a_categories_column():
    results = evaluate_recall(gt_from_coco(_coco(HAND_DATASET)), HAND_PROPOSALS, [1, 3],
                              category_groups=category_groups(GROUPS))
    table = format_recall_table(results, [1, 3])
    assert table.splitlines()[0].split("|")[1:4] == [" definition   ", " categories   ", " area   "]
    assert "| coco         | seen         | all    | 0.0500 | 0.5000 |" in table
    assert "| d2           | novel        | all    | 0.7000 | 1.0000 |" in table
    assert "| d2           | all          | all    | 0.3500 | 1.0000 |" in table


@pytest.fixture(scope="module")
def coco_mini_proposals(coco_mini_val):
    return _coco_mini_proposals(coco_mini_val)


@pytest.mark.parametrize("group", [["seen", "voc"], ["novel", "nonvoc"], ["some", [18, "giraffe", "tv"]]])
def test_matches_cocoeval_on_filtered_coco_mini(coco_mini_val, coco_mini_proposals, group):
    budgets = [10, 100, 1000]
    ((name, ids),) = category_groups([group]).items()
    filtered = _coco(_filtered(coco_mini_val.dataset, ids))
    if name == "seen":  # crowd regions of the group (persons) are there to be ignored
        assert any(a["iscrowd"] for a in filtered.dataset["annotations"])
    results = evaluate_recall(gt_from_coco(coco_mini_val), coco_mini_proposals, budgets,
                              category_groups={name: ids})
    originals = _original_recalls(filtered, coco_mini_proposals, budgets)
    for definition, original in originals.items():
        expected = {metric_name(area, k): float(original[a, i].mean())
                    for a, area in enumerate(("all", "small", "medium", "large")) for i, k in enumerate(budgets)}
        torch.testing.assert_close(results[f"recall_{definition}/{name}"], expected, atol=1e-6, rtol=0,
                                   equal_nan=True)
    assert results[f"recall_coco/{name}"]["AR@100"] != results["recall_coco"]["AR@100"]


# ---- the evaluator --------------------------------------------------------------------


@pytest.fixture
def hand_dataset(tmp_path, catalogs):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(HAND_DATASET))
    MetadataCatalog.get("hand_val").set(json_file=str(path))
    return "hand_val"


def _evaluate(evaluator):
    evaluator.reset()
    for img_id, p in HAND_PROPOSALS.items():
        instances = Instances((100, 100))
        instances.proposal_boxes = Boxes(torch.as_tensor(p["boxes"]))
        instances.objectness_logits = torch.as_tensor(p["scores"])
        evaluator.process([{"image_id": img_id}], [{"proposals": instances}])
    return evaluator.evaluate()


def test_evaluator_reports_groups(hand_dataset):
    evaluator = ProposalRecallEvaluator(hand_dataset, budgets=[1, 2, 3], category_groups=GROUPS, distributed=False)
    _assert_ar(_evaluate(evaluator), HAND_EXPECTED)


def test_evaluator_groups_from_config(hand_dataset):
    cfg = setup_cfg(str(REPO / "configs" / "Base-FPN-RPN.yaml"),
                    ["TEST.RECALL_BUDGETS", "[1, 2, 3]", "TEST.RECALL_CATEGORY_GROUPS", str(GROUPS)])
    results = _evaluate(ProposalRecallEvaluator(cfg, hand_dataset, distributed=False))
    _assert_ar(results, HAND_EXPECTED)
    # without groups, the results are as before
    cfg = setup_cfg(str(REPO / "configs" / "Base-FPN-RPN.yaml"), ["TEST.RECALL_BUDGETS", "[1, 2, 3]"])
    assert sorted(_evaluate(ProposalRecallEvaluator(cfg, hand_dataset, distributed=False))) == [
        "duplicates", "recall_coco", "recall_d2"]


def test_groups_need_coco_category_ids(tmp_path, catalogs):
    dataset = coco_dict([1, 2], HAND_GTS, categories=(1, 25))  # categories named "1", "25"
    (tmp_path / "gt.json").write_text(json.dumps(dataset))
    MetadataCatalog.get("shapes_val").set(json_file=str(tmp_path / "gt.json"))
    evaluator = ProposalRecallEvaluator("shapes_val", budgets=[1], category_groups=GROUPS, distributed=False)
    with pytest.raises(ConfigError, match=r"^TEST.RECALL_CATEGORY_GROUPS names COCO categories, but dataset "
                                          r"'shapes_val' does not number its categories as COCO does: its "
                                          r"category 1 is '1' \(COCO's 1 is 'person'\)$"):
        _evaluate(evaluator)
    # train_net's setup finds it before training, from the metadata of the loaded dataset
    MetadataCatalog.get("shapes_val").set(thing_dataset_id_to_contiguous_id={1: 0, 25: 1}, thing_classes=["1", "25"])
    DatasetCatalog.register("shapes_val", lambda: [])
    cfg = setup_cfg(str(REPO / "configs" / "Base-FPN-RPN.yaml"),
                    ["DATASETS.TEST", "('shapes_val',)", "TEST.RECALL_CATEGORY_GROUPS", str(GROUPS)])
    with pytest.raises(ConfigError, match="dataset 'shapes_val' does not number its categories as COCO does"):
        check_datasets(cfg, ("TEST",))


def test_bad_group_names_in_the_evaluator():
    with pytest.raises(ConfigError, match=r"^category_groups group 'novel': 'nonvok' .* did you mean 'nonvoc'\?$"):
        ProposalRecallEvaluator("any", category_groups=[["novel", "nonvok"]])


# ---- compare_recall -------------------------------------------------------------------


def test_compare_recall_groups(coco_mini_val, coco_mini_proposals, tmp_path):
    img_ids = sorted(coco_mini_val.getImgIds())[:6]
    proposals = {i: coco_mini_proposals[i] for i in img_ids}
    with open(tmp_path / "p.pkl", "wb") as f:
        pickle.dump({"ids": img_ids, "boxes": [proposals[i]["boxes"] for i in img_ids],
                     "objectness_logits": [proposals[i]["scores"] for i in img_ids],
                     "bbox_mode": BoxMode.XYXY_ABS.value}, f)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        load_tool("compare_recall").main([
            "--dataset", "coco_mini_val", "--max-images", "6", "--output-dir", str(tmp_path / "out"),
            "--proposals", f"p={tmp_path / 'p.pkl'}", "--definition", "both", "--budgets", "10", "100",
            "--area-budgets", "100", "--category-groups", "seen=voc", "pets=cat,dog,18",
        ])
    with open(tmp_path / "out" / "recall_table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["definition"], r["categories"]) for r in rows] == [
        (d, c) for d in ("d2", "coco") for c in ("all", "seen", "pets")]
    groups = {"seen": NAMED_SETS["voc"], "pets": {17, 18}}
    expected = evaluate_recall(gt_from_coco(coco_mini_val, img_ids), proposals, [10, 100], category_groups=groups)
    for row in rows:
        key = f"recall_{row['definition']}" + ("" if row["categories"] == "all" else f"/{row['categories']}")
        names = ["AR@10", "AR@100", "AR_s@100", "AR_m@100", "AR_l@100"]
        actual = {n: float(row[n]) if row[n] else math.nan for n in names}
        torch.testing.assert_close(actual, {n: expected[key][n] for n in names}, rtol=0, atol=0, equal_nan=True)
    assert "pets = 2 categories: cat, dog" in out.getvalue()


def test_compare_recall_bad_group(capsys, tmp_path):
    status, err = cli(capsys, "compare_recall", [
        "--dataset", "coco_mini_val", "--output-dir", str(tmp_path), "--proposals", "p=p.pkl",
        "--category-groups", "novel=nonvoc,girafe"])
    assert status == 2
    assert err == ["compare_recall.py: error: --category-groups group 'novel': 'girafe' is not a COCO category or "
                   "one of the sets all, voc, nonvoc; did you mean 'giraffe'? (see --help)"]
