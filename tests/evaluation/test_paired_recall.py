"""Per-image recall counts pool to evaluate_recall's AR; paired bootstrap differences."""
import numpy as np
import pytest

import fpn_rpn  # noqa: F401  (before detectron2)
from fpn_rpn.analysis.paired_recall import paired_difference, per_image_counts, pooled_ar
from fpn_rpn.evaluation.proposal_recall import evaluate_recall, gt_from_coco, metric_name

BUDGETS = [1, 5, 20]


@pytest.fixture(scope="module")
def gt_and_proposals(coco_mini_val):
    coco = coco_mini_val
    img_ids = sorted(coco.getImgIds())[:12]
    rng = np.random.default_rng(0)
    proposals = {}
    for img_id in img_ids:  # boxes jittered around each gt, random scores
        xywh = np.array([a["bbox"] for a in coco.imgToAnns[img_id]]).reshape(-1, 4).repeat(4, axis=0)
        xywh[:, :2] += rng.normal(0, 0.1, (len(xywh), 2)) * xywh[:, 2:]
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1).astype(np.float32)
        proposals[img_id] = {"boxes": boxes, "scores": rng.random(len(boxes)).astype(np.float32)}
    return gt_from_coco(coco, img_ids), proposals


@pytest.mark.parametrize("definition", ["d2", "coco"])
def test_per_image_counts_pool_to_evaluate_recall(gt_and_proposals, definition):
    gt, proposals = gt_and_proposals
    counts = per_image_counts(gt, proposals, BUDGETS, definition)
    expected = evaluate_recall(gt, proposals, BUDGETS, definitions=[definition])["recall_" + definition]
    for area in ("all", "small", "large"):
        for k in BUDGETS:
            np.testing.assert_allclose(counts.ar(area, k), expected[metric_name(area, k)], rtol=1e-12)


def test_paired_difference_of_a_source_with_itself_is_exactly_zero(gt_and_proposals):
    gt, proposals = gt_and_proposals
    counts = per_image_counts(gt, proposals, BUDGETS, "coco")
    d = paired_difference(counts, counts, "all", 5)
    assert d == {"difference": 0.0, "ci_low": 0.0, "ci_high": 0.0, "images_differing": 0}


def test_a_worse_source_has_an_interval_below_zero(gt_and_proposals):
    gt, proposals = gt_and_proposals
    # on every other image, the boxes moved a box width to the right: IoU 0 with their gt
    worse = {}
    for n, (img_id, p) in enumerate(proposals.items()):
        boxes = p["boxes"].copy()
        if n % 2:
            boxes[:, [0, 2]] += (boxes[:, 2] - boxes[:, 0])[:, None]
        worse[img_id] = {"boxes": boxes, "scores": p["scores"]}
    a, b = (per_image_counts(gt, x, BUDGETS, "coco") for x in (worse, proposals))
    d = paired_difference(a, b, "all", 5)
    assert d["difference"] == pytest.approx(a.ar("all", 5) - b.ar("all", 5))
    assert d["ci_low"] <= d["difference"] <= d["ci_high"] < 0
    assert 0 < d["images_differing"] <= len(proposals) // 2
    # a resample made of image 0 only is that image's own AR
    assert pooled_ar(a, "all", 5, np.zeros(3, dtype=int)) == pytest.approx(pooled_ar(a, "all", 5, np.array([0])))


def test_unpaired_sources_are_refused(gt_and_proposals):
    gt, proposals = gt_and_proposals
    a = per_image_counts(gt, proposals, BUDGETS, "coco")
    b = per_image_counts(gt, dict(list(proposals.items())[:5]), BUDGETS, "coco")
    with pytest.raises(ValueError, match="same images"):
        paired_difference(a, b, "all", 5)
