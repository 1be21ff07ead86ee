import contextlib
import io
import math

import numpy as np
import pytest
import torch

import fpn_rpn  # noqa: F401  (before detectron2)
from detectron2.evaluation.coco_evaluation import _evaluate_box_proposals
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.structures import Boxes, BoxMode, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fpn_rpn.evaluation.proposal_recall import (
    COCO_AREAS,
    evaluate_recall,
    format_recall_table,
    gt_from_coco,
    metric_name,
    recall_curves,
)

from conftest import coco_dict

BUDGETS = [10, 20, 50, 100, 300, 1000]
AREAS = list(COCO_AREAS)  # the four area names both originals know


def _coco(images, annotations):
    """An in-memory pycocotools COCO; annotations as (image_id, xyxy, area, iscrowd, category_id)."""
    dataset = coco_dict(images, annotations, categories=(1, 2))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def _proposals(boxes, scores):
    return {
        "boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
        "scores": np.array(scores, dtype=np.float32),
    }


def _original_recalls(coco, proposals, budgets):
    """
    Recall (A, K, T) of Detectron2's ``_evaluate_box_proposals`` and of COCOeval with
    useCats=0, both on ``proposals`` (image_id -> boxes, scores), NaN where no gt counts.
    """
    predictions = []
    for img_id, p in proposals.items():
        instances = Instances((100, 100))
        instances.proposal_boxes = Boxes(torch.from_numpy(p["boxes"]))
        instances.objectness_logits = torch.from_numpy(p["scores"])
        predictions.append({"image_id": img_id, "proposals": instances})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # its many small max() calls are 50x slower threaded on 2 cores
    try:
        d2 = np.array(
            [
                [
                    _evaluate_box_proposals(predictions, coco, area=area, limit=k)["recalls"].numpy()
                    for k in budgets
                ]
                for area in AREAS
            ],
            dtype=np.float64,
        )
    finally:
        torch.set_num_threads(threads)

    category_id = coco.getCatIds()[0]  # any valid category: useCats=0 ignores it
    detections = [
        {"image_id": img_id, "category_id": category_id, "bbox": box, "score": score}
        for img_id, p in proposals.items()
        # XYWH as COCOEvaluator's instances_to_coco_json computes it (float32)
        for box, score in zip(
            BoxMode.convert(p["boxes"], BoxMode.XYXY_ABS, BoxMode.XYWH_ABS).tolist(), p["scores"].tolist()
        )
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco, coco.loadRes(detections), "bbox")
        coco_eval.params.useCats = 0
        coco_eval.params.maxDets = list(budgets)
        coco_eval.params.imgIds = sorted(proposals)
        coco_eval.evaluate()
        coco_eval.accumulate()
    coco_recall = coco_eval.eval["recall"][:, 0].transpose(1, 2, 0)  # (T, A, K) -> (A, K, T)
    coco_recall[coco_recall == -1] = np.nan
    return {"d2": d2, "coco": coco_recall}


def _assert_ar(results, expected):
    """expected: {"recall_d2": {name: value}, ...}; compares only the names given."""
    for group, values in expected.items():
        actual = {name: results[group][name] for name in values}
        torch.testing.assert_close(actual, values, atol=1e-12, rtol=0, equal_nan=True)


def _assert_same_as_originals(coco, proposals, budgets):
    gt = gt_from_coco(coco)
    originals = _original_recalls(coco, proposals, budgets)
    results = evaluate_recall(gt, proposals, budgets)
    for definition, original in originals.items():
        recall, _ = recall_curves(gt, proposals, budgets, definition=definition)
        torch.testing.assert_close(recall, original, atol=1e-6, rtol=0, equal_nan=True)
        # AR: each original's mean over thresholds (COCOeval.summarize, d2's recalls.mean())
        expected_ar = {
            metric_name(area, k): float(original[a, i].mean())
            for a, area in enumerate(AREAS)
            for i, k in enumerate(budgets)
        }
        torch.testing.assert_close(
            results["recall_" + definition], expected_ar, atol=1e-6, rtol=0, equal_nan=True
        )
    return results


# Hand-checked case: one y-range (0..10) for every box, so IoU = overlap / union of x-ranges.
# Image 1: gts A = x[0,10], B = x[4,14], a crowd box D = x[3,13]; image 2: gt C, no proposals.
# Proposals p1 = x[3,13] (score .9), p2 = x[4,14] (.8), p3 = x[0,10] (.7), listed p3, p1, p2.
#   IoU(p1, A) = 7/13 = .538 (>= .50 only), IoU(p1, B) = 9/11 = .818 (>= .50 ... .80),
#   IoU(p2, B) = 1, IoU(p2, A) = 6/14 = .43, IoU(p3, A) = 1.
GREEDY_GTS = [
    (1, (0, 0, 10, 10), 100, 0, 1),  # A, small
    (1, (4, 0, 14, 10), 100, 0, 1),  # B, small
    (1, (3, 0, 13, 10), 100, 1, 1),  # D, crowd: ignored by both definitions
    (2, (0, 0, 80, 80), 6400, 0, 1),  # C, medium, on an image without proposals
]
GREEDY_PROPOSALS = {
    1: _proposals([[0, 0, 10, 10], [3, 0, 13, 10], [4, 0, 14, 10]], [0.7, 0.9, 0.8]),
    2: _proposals([], []),
}


def test_greedy_matching_and_empty_image():
    results = evaluate_recall(gt_from_coco(_coco([1, 2], GREEDY_GTS)), GREEDY_PROPOSALS, [1, 2, 3])
    nan = float("nan")
    # d2 (image 2 skipped: 2 gts). k=1: p1 pairs with B (9/11): 1/2 at 7 thresholds -> .35.
    # k=2: highest IoU first: (p2, B) = 1, then (p1, A) = 7/13: (2/2 + 9 * 1/2) / 10 = .55.
    # k=3: (p3, A) = 1 and (p2, B) = 1: 1.0.
    # coco (3 gts). k=1: p1 takes B (its best) at t <= .80: 7 * 1/3 / 10 = 7/30.
    # k=2: t <= .80: p1 takes B, p2 is left with A at .43; t >= .85: p2 takes B: 1/3.
    # k=3: p3 takes A: 2/3. Small: the same over 2 gts; medium: C, never found.
    expected = {
        "recall_d2": {
            "AR@1": 0.35, "AR@2": 0.55, "AR@3": 1.0,
            "AR_s@1": 0.35, "AR_s@2": 0.55, "AR_s@3": 1.0,
            "AR_m@1": nan, "AR_m@2": nan, "AR_m@3": nan,
            "AR_l@1": nan, "AR_l@2": nan, "AR_l@3": nan,
        },
        "recall_coco": {
            "AR@1": 7 / 30, "AR@2": 1 / 3, "AR@3": 2 / 3,
            "AR_s@1": 0.35, "AR_s@2": 0.5, "AR_s@3": 1.0,
            "AR_m@1": 0.0, "AR_m@2": 0.0, "AR_m@3": 0.0,
            "AR_l@1": nan, "AR_l@2": nan, "AR_l@3": nan,
        },
    }
    _assert_ar(results, expected)
    assert list(results["recall_d2"]) == list(expected["recall_d2"])  # area-major, budget order


def test_greedy_matching_and_empty_image_match_originals():
    _assert_same_as_originals(_coco([1, 2], GREEDY_GTS), GREEDY_PROPOSALS, [1, 2, 3])


def test_counted_gts():
    gt = gt_from_coco(_coco([1, 2], GREEDY_GTS))
    _, num_d2 = recall_curves(gt, GREEDY_PROPOSALS, [3], definition="d2")
    _, num_coco = recall_curves(gt, GREEDY_PROPOSALS, [3], definition="coco")
    np.testing.assert_array_equal(num_d2, [2, 2, 0, 0])  # all, small, medium, large
    np.testing.assert_array_equal(num_coco, [3, 2, 1, 0])


# Ties: gts E = x[10,20], F = x[14,24]; p1 = x[12,22] (score .9) has IoU 80/120 = 2/3 with
# both; p2 = x[7,17] (.8) has IoU 7/13 with E, 3/17 with F. Who gets p1 decides the result:
# E gets p1 -> F is left with 3/17: 1/2 at .50-.65 -> AR .2;
# F gets p1 -> E gets p2 (7/13 >= .50): (2/2 + 3 * 1/2) / 10 -> AR .25.
# d2 gives a tie to the first gt; COCOeval to the last one in its category-grouped order.
# With p2' = x[8,18] (.8) instead, IoU 2/3 with E and 1/4 with F, E has two proposals at
# 2/3: d2 pairs E with the first (p1), leaving F 1/4 -> AR .2 (E with p2' would be .4);
# COCOeval gives p1 to F, then p2' to E -> AR .4.
E_BOX, F_BOX = (10, 0, 20, 10), (14, 0, 24, 10)
TIE_PROPOSALS = _proposals([[12, 0, 22, 10], [7, 0, 17, 10]], [0.9, 0.8])
TIE_PROPOSALS_2 = _proposals([[8, 0, 18, 10], [12, 0, 22, 10]], [0.8, 0.9])


@pytest.mark.parametrize(
    "annotations, proposals, ar_d2, ar_coco",
    [
        ([(1, E_BOX, 100, 0, 1), (1, F_BOX, 100, 0, 1)], TIE_PROPOSALS, 0.2, 0.25),
        ([(1, F_BOX, 100, 0, 1), (1, E_BOX, 100, 0, 1)], TIE_PROPOSALS, 0.25, 0.2),
        # COCOeval lists category 1 (F) before category 2 (E)
        ([(1, E_BOX, 100, 0, 2), (1, F_BOX, 100, 0, 1)], TIE_PROPOSALS, 0.2, 0.2),
        ([(1, E_BOX, 100, 0, 1), (1, F_BOX, 100, 0, 1)], TIE_PROPOSALS_2, 0.2, 0.4),
    ],
)
def test_iou_ties_follow_each_definition(annotations, proposals, ar_d2, ar_coco):
    results = _assert_same_as_originals(_coco([1], annotations), {1: proposals}, [10])
    _assert_ar(results, {"recall_d2": {"AR@10": ar_d2}, "recall_coco": {"AR@10": ar_coco}})


def test_thresholds_are_inclusive():
    # Four 10x10 gts; each proposal covers w/10 of one: IoU exactly .5, .75, .9, .95.
    # Gts found at .50: 4; .55-.75: 3 each (5 thresholds); .80-.90: 2 each (3); .95: 1.
    # AR = (4 + 15 + 6 + 1) / 4 / 10 = .65 for both definitions.
    offsets, widths = [0, 20, 40, 60], [5, 7.5, 9, 9.5]
    coco = _coco([1], [(1, (x, 0, x + 10, 10), 100, 0, 1) for x in offsets])
    proposals = {1: _proposals([[x, 0, x + w, 10] for x, w in zip(offsets, widths)], [0.4, 0.3, 0.2, 0.1])}
    results = _assert_same_as_originals(coco, proposals, [10])
    _assert_ar(results, {"recall_d2": {"AR@10": 0.65}, "recall_coco": {"AR@10": 0.65}})


def test_area_ranges_are_closed_and_empty_ones_give_nan():
    # area exactly 32**2: small and medium at once; nothing large.
    coco = _coco([1], [(1, (0, 0, 32, 32), 1024, 0, 1)])
    proposals = {1: _proposals([[0, 0, 32, 32]], [1.0])}
    results = _assert_same_as_originals(coco, proposals, [1])
    for group in ("recall_d2", "recall_coco"):
        assert results[group]["AR@1"] == results[group]["AR_s@1"] == results[group]["AR_m@1"] == 1.0
        assert math.isnan(results[group]["AR_l@1"])


def test_result_names():
    results = evaluate_recall(gt_from_coco(_coco([1, 2], GREEDY_GTS)), GREEDY_PROPOSALS, [100, 10])
    flat = flatten_results_dict(results)
    assert sorted(flat) == sorted(
        f"recall_{d}/AR{s}@{k}" for d in ("d2", "coco") for s in ("", "_s", "_m", "_l") for k in (10, 100)
    )
    table = format_recall_table(results, [10, 100])
    assert "| d2           | small  | 1.0000  | 1.0000   |" in table
    assert "| coco         | all    | 0.6667  | 0.6667   |" in table


def test_gt_from_coco():
    gt = gt_from_coco(_coco([1, 2, 3], GREEDY_GTS))
    assert sorted(gt) == [1, 2, 3]
    np.testing.assert_array_equal(gt[1]["boxes"], [[0, 0, 10, 10], [4, 0, 14, 10], [3, 0, 13, 10]])
    np.testing.assert_array_equal(gt[1]["xywh"], [[0, 0, 10, 10], [4, 0, 10, 10], [3, 0, 10, 10]])
    np.testing.assert_array_equal(gt[1]["areas"], [100, 100, 100])
    np.testing.assert_array_equal(gt[1]["iscrowd"], [False, False, True])
    np.testing.assert_array_equal(gt[1]["category_ids"], [1, 1, 1])
    assert gt[3]["boxes"].shape == (0, 4) and gt[3]["areas"].shape == (0,)


def test_gt_without_xywh_or_categories():
    # XYXY boxes alone (as a synthetic source gives them) score the same on integer boxes
    gt = gt_from_coco(_coco([1, 2], GREEDY_GTS))
    for g in gt.values():
        del g["xywh"], g["category_ids"]
    expected = evaluate_recall(gt_from_coco(_coco([1, 2], GREEDY_GTS)), GREEDY_PROPOSALS, [1, 2, 3])
    _assert_ar(evaluate_recall(gt, GREEDY_PROPOSALS, [1, 2, 3]), expected)


def test_bad_inputs():
    gt = gt_from_coco(_coco([1], GREEDY_GTS[:2]))
    with pytest.raises(ValueError, match="positive"):
        evaluate_recall(gt, {1: GREEDY_PROPOSALS[1]}, [0, 10])
    with pytest.raises(KeyError, match="no entry in gt_by_image"):
        evaluate_recall(gt, GREEDY_PROPOSALS, [10])
    with pytest.raises(ValueError, match="Unknown recall definition"):
        recall_curves(gt, {1: GREEDY_PROPOSALS[1]}, [10], definition="voc")


def _coco_mini_proposals(coco, seed=0):
    """
    Realistic proposals for coco_mini val: per image jittered copies of every gt (crowd ones
    too), exact copies of some gts, random boxes, 10% duplicated boxes, scores on a coarse
    grid (many ties), in random order. Every 11th image has none; every 13th has 1100, so
    the 1000 budget cuts.
    """
    rng = np.random.default_rng(seed)
    proposals = {}
    for n, img_id in enumerate(sorted(coco.getImgIds())):
        if n % 11 == 5:
            proposals[img_id] = _proposals([], [])
            continue
        width, height = coco.imgs[img_id]["width"], coco.imgs[img_id]["height"]
        gt = np.array([a["bbox"] for a in coco.imgToAnns[img_id]], dtype=np.float64).reshape(-1, 4)
        big = n % 13 == 0
        jittered = np.repeat(gt, 60 if big else rng.integers(1, 8), axis=0)
        jittered[:, :2] += rng.normal(0, 0.12, (len(jittered), 2)) * jittered[:, 2:]
        jittered[:, 2:] *= np.exp(rng.normal(0, 0.15, (len(jittered), 2)))
        num_random = max(1100 - len(jittered), 0) if big else rng.integers(0, 80)
        wh = np.exp(rng.uniform(np.log(4), np.log(min(width, height)), (num_random, 2)))
        xy = rng.uniform(0, 1, (num_random, 2)) * (np.array([width, height]) - wh)
        xywh = np.concatenate([jittered, gt[: len(gt) // 2], np.concatenate([xy, wh], axis=1)])
        xywh = np.concatenate([xywh, xywh[rng.integers(0, len(xywh), len(xywh) // 10)]])
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        boxes = np.clip(boxes, 0, [width, height, width, height])
        scores = rng.integers(0, 40, len(boxes)) / 8.0
        order = rng.permutation(len(boxes))
        proposals[img_id] = _proposals(boxes[order], scores[order])
    return proposals


def test_matches_originals_on_coco_mini(coco_mini_val):
    proposals = _coco_mini_proposals(coco_mini_val)
    # the data exercise what differs: empty images, crowd gts, > 1000 proposals, and score
    # ties across a budget cut (where d2's torch.sort order matters)
    counts = [len(p["scores"]) for p in proposals.values()]
    assert min(counts) == 0 and max(counts) > 1000
    assert any(a["iscrowd"] for a in coco_mini_val.dataset["annotations"])
    sorted_scores = [np.sort(p["scores"])[::-1] for p in proposals.values()]
    assert any(len(s) > k and s[k - 1] == s[k] for s in sorted_scores for k in BUDGETS)

    results = _assert_same_as_originals(coco_mini_val, proposals, BUDGETS)
    assert results["recall_d2"]["AR@100"] != results["recall_coco"]["AR@100"]
