import fpn_rpn  # noqa: F401  # before detectron2

import math

import pytest
import torch
from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals
from detectron2.structures import pairwise_iou

from fpn_rpn.modeling.proposal_selection import select_proposals, top_k_proposals_per_level, top_k_scores

NMS_THRESH = 0.7


class _ProposalsAsDeltas:
    """Stands in for Box2BoxTransform: the "deltas" given are the decoded proposals themselves."""

    def apply_deltas(self, deltas, boxes):
        return deltas


def _top(proposals, logits, image_sizes, pre=1000, post=1000, min_size=0.0, training=False,
         per_level=False, score_thresh=0.0, nms_thresh=NMS_THRESH, device="cpu"):
    """
    FPNRPN's selection (per-level top-K, then filter, NMS and top-K) of L levels of proposals
    (N, Ri, 4), computed on ``device``; the results are returned on CPU.
    """
    proposals, logits = [p.to(device) for p in proposals], [s.to(device) for s in logits]
    anchors = [torch.zeros(p.shape[1], 4, device=device) for p in proposals]  # unused: the proposals are given decoded
    boxes, scores, levels = top_k_proposals_per_level(anchors, proposals, logits, pre, _ProposalsAsDeltas())
    results = select_proposals(boxes, scores, levels, image_sizes, nms_thresh, post, min_size, training,
                               per_level_nms=per_level, score_thresh=score_thresh)
    assert all(r.proposal_boxes.tensor.device.type == torch.device(device).type for r in results)
    return [r.to("cpu") for r in results]


def _far_apart_boxes(num, offset=0.0):
    """num disjoint 10x10 boxes on a row, 20 px apart, so NMS removes none of them."""
    x = torch.arange(num, dtype=torch.float32) * 20 + offset
    return torch.stack((x, torch.zeros(num), x + 10, torch.full((num,), 10.0)), dim=1)


def _near_duplicates(num_images=2, num_boxes=60, seed=0):
    """Two levels predicting jittered copies of the same boxes, with distinct scores."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num_images, num_boxes, 2, generator=g) * 150
    wh = 20 + torch.rand(num_images, num_boxes, 2, generator=g) * 60
    base = torch.cat((xy, xy + wh), dim=2)
    proposals = [base + torch.rand(base.shape, generator=g) * 4 - 2 for _ in range(2)]
    logits = torch.randperm(2 * num_images * num_boxes, generator=g).float().reshape(2, num_images, -1)
    return proposals, list(logits)


def _level_of(result, logits):
    """Level of each kept proposal, found from its (unique) score."""
    return torch.stack([(torch.stack(logits)[:, None] == s).flatten(1).any(1).nonzero()[0, 0]
                        for s in result.objectness_logits])


def _cross_level_duplicates(result, logits):
    iou = pairwise_iou(result.proposal_boxes, result.proposal_boxes)
    levels = _level_of(result, logits)
    pairs = (iou > NMS_THRESH).triu(diagonal=1) & (levels[:, None] != levels[None, :])
    return int(pairs.sum())


def test_cross_level_nms_leaves_no_overlapping_pair(device):
    proposals, logits = _near_duplicates()
    image_sizes = [(240, 240), (200, 230)]
    per_level = _top(proposals, logits, image_sizes, per_level=True, device=device)
    cross_level = _top(proposals, logits, image_sizes, per_level=False, device=device)
    for per_level_i, cross_level_i in zip(per_level, cross_level):
        iou = pairwise_iou(cross_level_i.proposal_boxes, cross_level_i.proposal_boxes)
        assert len(cross_level_i) > 0
        assert iou.triu(diagonal=1).max() <= NMS_THRESH
        per_level_count = _cross_level_duplicates(per_level_i, logits)
        assert per_level_count > 0  # the input does have duplicates across levels
        assert _cross_level_duplicates(cross_level_i, logits) <= per_level_count
        assert _cross_level_duplicates(cross_level_i, logits) == 0


def test_pre_nms_topk_is_per_level_and_post_nms_topk_per_image(device):
    # level 0: 4 boxes scored 4, 3, 2, 1; level 1: 4 other boxes scored 3.5, 2.5, 1.5, 0.5
    proposals = [_far_apart_boxes(4)[None], _far_apart_boxes(4, offset=100)[None]]
    logits = [torch.tensor([[1.0, 4.0, 2.0, 3.0]]), torch.tensor([[0.5, 3.5, 2.5, 1.5]])]
    (result,) = _top(proposals, logits, [(50, 200)], pre=2, post=3, device=device)
    # top 2 of each level: 4, 3 | 3.5, 2.5; then the best 3 of those
    torch.testing.assert_close(result.objectness_logits, torch.tensor([4.0, 3.5, 3.0]), rtol=0, atol=0)
    torch.testing.assert_close(
        result.proposal_boxes.tensor,
        torch.tensor([[20.0, 0, 30, 10], [120.0, 0, 130, 10], [60.0, 0, 70, 10]]),  # 120 == 100 + 20
        rtol=0, atol=0,
    )
    (result,) = _top(proposals, logits, [(50, 200)], pre=2, post=100, device=device)
    torch.testing.assert_close(result.objectness_logits, torch.tensor([4.0, 3.5, 3.0, 2.5]), rtol=0, atol=0)


def test_score_thresh_compares_the_objectness_probability(device):
    proposals = [_far_apart_boxes(5)[None]]
    # sigmoid: 0.5, 0.69936, 0.70003, 0.2689, 0.9526
    logits = [torch.tensor([[0.0, 0.8443, 0.8476, -1.0, 3.0]])]
    assert 0.8443 < math.log(0.7 / 0.3) < 0.8476  # the two middle logits bracket logit(0.7)
    (result,) = _top(proposals, logits, [(20, 200)], score_thresh=0.7, device=device)  # logit(0.7) == 0.8473
    torch.testing.assert_close(result.objectness_logits, torch.tensor([3.0, 0.8476]), rtol=0, atol=0)
    (result,) = _top(proposals, logits, [(20, 200)], score_thresh=0.5, device=device)  # 0.5 itself is kept
    torch.testing.assert_close(result.objectness_logits, torch.tensor([3.0, 0.8476, 0.8443, 0.0]),
                               rtol=0, atol=0)
    (result,) = _top(proposals, logits, [(20, 200)], score_thresh=0.99, device=device)
    assert len(result) == 0 and result.proposal_boxes.tensor.shape == (0, 4)


def test_boxes_are_clipped_then_small_ones_dropped(device):
    boxes = torch.tensor([
        [0.0, 0.0, 5.0, 20.0],  # width 5 <= MIN_SIZE 5: dropped
        [20.0, 0.0, 25.5, 20.0],  # width 5.5: kept
        [-10.0, 0.0, 3.0, 20.0],  # clipped to x 0..3, width 3: dropped
        [90.0, -8.0, 120.0, 30.0],  # clipped to (90, 0, 100, 25): kept
    ])
    logits = [torch.tensor([[4.0, 3.0, 2.0, 1.0]])]
    (result,) = _top([boxes[None]], logits, [(25, 100)], min_size=5.0, device=device)
    torch.testing.assert_close(result.proposal_boxes.tensor,
                               torch.tensor([[20.0, 0.0, 25.5, 20.0], [90.0, 0.0, 100.0, 25.0]]),
                               rtol=0, atol=0)
    torch.testing.assert_close(result.objectness_logits, torch.tensor([3.0, 1.0]), rtol=0, atol=0)


def test_non_finite_predictions_raise_in_training_and_are_dropped_at_inference(device):
    boxes = _far_apart_boxes(3)[None].clone()
    boxes[0, 1, 2] = float("inf")
    logits = [torch.tensor([[1.0, 2.0, float("nan")]])]
    with pytest.raises(FloatingPointError, match="diverged"):
        _top([boxes], logits, [(20, 100)], training=True, device=device)
    (result,) = _top([boxes], logits, [(20, 100)], device=device)
    torch.testing.assert_close(result.proposal_boxes.tensor, torch.tensor([[0.0, 0, 10, 10]]), rtol=0, atol=0)


@pytest.mark.parametrize("per_level", [True, False])
def test_batch_gives_the_same_proposals_as_image_by_image(per_level, device):
    proposals, logits = _near_duplicates(num_images=3, seed=1)
    image_sizes = [(240, 240), (180, 200), (100, 230)]
    batched = _top(proposals, logits, image_sizes, pre=40, post=25, min_size=20.0, per_level=per_level,
                   device=device)
    for i, batched_i in enumerate(batched):
        (single,) = _top([p[i:i + 1] for p in proposals], [s[i:i + 1] for s in logits], image_sizes[i:i + 1],
                         pre=40, post=25, min_size=20.0, per_level=per_level, device=device)
        assert batched_i.image_size == image_sizes[i] and 0 < len(batched_i) <= 25
        torch.testing.assert_close(batched_i.proposal_boxes.tensor, single.proposal_boxes.tensor, rtol=0, atol=0)
        torch.testing.assert_close(batched_i.objectness_logits, single.objectness_logits, rtol=0, atol=0)


def _random_levels(g, nums, span, start, min_wh, wh_span, device="cpu"):
    """Random boxes (2 images x num per level, corners in [start, start + span) + wh) and logits."""
    proposals, logits = [], []
    for num in nums:
        xy = torch.rand(2, num, 2, generator=g) * span + start
        wh = min_wh + torch.rand(2, num, 2, generator=g) * wh_span
        proposals.append(torch.cat((xy, xy + wh), dim=2).to(device))
        logits.append(torch.randn(2, num, generator=g).to(device))
    return proposals, logits


@pytest.mark.parametrize("training", [False, True])
def test_per_level_mode_equals_detectron2_find_top_rpn_proposals(training, device):
    g = torch.Generator().manual_seed(3)
    image_sizes = [(120, 90), (100, 128)]
    proposals, logits = _random_levels(g, (3 * 32 * 32, 3 * 16 * 16, 3 * 8 * 8), 140, -10, 0, 60)
    ours = _top(proposals, logits, image_sizes, pre=500, post=300, min_size=2.0, training=training, per_level=True,
                device=device)
    d2 = find_top_rpn_proposals([p.to(device) for p in proposals], [s.to(device) for s in logits], image_sizes,
                                NMS_THRESH, 500, 300, 2.0, training)
    for ours, d2 in zip(ours, (r.to("cpu") for r in d2)):
        assert len(ours) == len(d2) == 300
        torch.testing.assert_close(ours.proposal_boxes.tensor, d2.proposal_boxes.tensor, rtol=0, atol=0)
        torch.testing.assert_close(ours.objectness_logits, d2.objectness_logits, rtol=0, atol=0)


def test_results_are_sorted_by_score_and_inside_the_image(device):
    proposals, logits = _near_duplicates(seed=2)
    image_sizes = [(90, 100), (120, 70)]
    for result, (h, w) in zip(_top(proposals, logits, image_sizes, device=device), image_sizes):
        scores, boxes = result.objectness_logits, result.proposal_boxes.tensor
        assert len(result) > 0 and bool((scores[:-1] >= scores[1:]).all())
        assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= w
        assert boxes[:, 1::2].min() >= 0 and boxes[:, 1::2].max() <= h


# ---------------------------------------------------------------- top-K and NMS


def test_top_k_scores_equal_a_stable_sort_with_ties(device):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (3, 200), generator=g).float()  # ties everywhere, also at the k-th place
    scores[1] = torch.randn(200, generator=g)  # and a row without ties
    for k in (1, 17, 199, 200, 300):
        values, indices = top_k_scores(scores.to(device), k)
        values, indices = values.cpu(), indices.cpu()
        sorted_values, sorted_indices = scores.sort(dim=1, descending=True, stable=True)
        torch.testing.assert_close(values, sorted_values[:, :k], rtol=0, atol=0)
        torch.testing.assert_close(indices, sorted_indices[:, :k], rtol=0, atol=0)
    untied = torch.randn(2, 500, generator=g)  # the topk path: no tie at the k-th place
    values, indices = top_k_scores(untied.to(device), 50)
    indices = indices.cpu()
    torch.testing.assert_close(indices, untied.sort(dim=1, descending=True, stable=True).indices[:, :50],
                               rtol=0, atol=0)


def test_per_image_anchors_equal_image_by_image(device):
    # Cascade RPN's stage-1 boxes: each image has its own "anchors", (N, R, 4)
    from detectron2.modeling.box_regression import Box2BoxTransform

    g = torch.Generator().manual_seed(3)
    transform = Box2BoxTransform(weights=(20.0, 20.0, 10.0, 10.0))
    xy = torch.rand(2, 30, 2, generator=g) * 50
    anchors = [torch.cat((xy, xy + 5 + torch.rand(2, 30, 2, generator=g) * 40), -1).to(device)]  # one level
    deltas = [torch.randn(2, 30, 4, generator=g).to(device)]
    logits = [torch.randn(2, 30, generator=g).to(device)]
    boxes, scores, levels = top_k_proposals_per_level(anchors, deltas, logits, 12, transform)
    for i in range(2):
        single = top_k_proposals_per_level([anchors[0][i]], [deltas[0][i:i + 1]], [logits[0][i:i + 1]], 12, transform)
        torch.testing.assert_close(boxes[i:i + 1], single[0], rtol=0, atol=0)
        torch.testing.assert_close(scores[i:i + 1], single[1], rtol=0, atol=0)
    assert levels.tolist() == [0] * 12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nms_keeps_index_order_beyond_the_half_precision_integers(dtype, device):
    # fp16 holds integers exactly only up to 2048 (bf16: 256): keys -arange(n) in that dtype
    # would tie beyond, and NMS would be free to keep either box of a pair. Pairs of the same
    # box, 3000 of them: the first of each pair (lower index, higher priority) must be kept.
    from fpn_rpn.modeling.proposal_selection import _nms_in_order, _nms_keys

    # 60 rows of 50 disjoint 10x10 boxes, 20 px apart: coordinates below 1200 stay disjoint once rounded
    boxes = torch.cat([_far_apart_boxes(50) + torch.tensor([0.0, 20.0, 0.0, 20.0]) * row for row in range(60)])
    boxes = boxes.repeat_interleave(2, dim=0).to(dtype=dtype, device=device)
    boxes, keys = _nms_keys(boxes)
    assert keys.dtype == torch.float32 and bool((keys[1:] < keys[:-1]).all())
    groups = torch.zeros(len(boxes), dtype=torch.int64, device=device)
    kept = _nms_in_order(boxes.to(dtype), groups, NMS_THRESH, num_groups=1)
    torch.testing.assert_close(kept.cpu(), torch.arange(0, 6000, 2))


@pytest.mark.parametrize("pre", [100, 500])  # <= 1000 boxes per image (torchvision shifts the levels) and more
def test_detectron2s_nms_call_image_by_image_equals_find_top_rpn_proposals(pre, device):
    # the per-level NMS that select_proposals runs on CUDA: Detectron2's own batched_nms call per
    # image, so the same coordinates (shifted by level where torchvision does) and the same IoUs
    from fpn_rpn.modeling.proposal_selection import _per_level_nms_image_by_image

    g = torch.Generator().manual_seed(5)
    image_sizes = [(800, 1216), (736, 1333)]
    proposals, logits = _random_levels(g, (3 * 50 * 76, 3 * 25 * 38, 3 * 13 * 19), 1300, -20, 8, 300, device)
    anchors = [torch.zeros(p.shape[1], 4, device=device) for p in proposals]
    boxes, scores, levels = top_k_proposals_per_level(anchors, proposals, logits, pre, _ProposalsAsDeltas())
    image_ids = torch.arange(2, device=device)[:, None].expand_as(scores).reshape(-1)
    levels = levels[None].expand_as(scores).reshape(-1)
    boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1)
    hw = torch.tensor(image_sizes, dtype=boxes.dtype, device=device)[image_ids]
    boxes = torch.stack([boxes[:, i].clamp(min=0).minimum(hw[:, 1 - i % 2]) for i in range(4)], dim=1)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # Detectron2's MIN_SIZE 0
    boxes, scores, image_ids, levels = boxes[nonempty], scores[nonempty], image_ids[nonempty], levels[nonempty]
    # sorted by image, then by descending score, as select_proposals gives them
    order = scores.sort(descending=True, stable=True).indices
    order = order[image_ids[order].sort(stable=True).indices]
    boxes, scores, image_ids, levels = boxes[order], scores[order], image_ids[order], levels[order]
    kept = _per_level_nms_image_by_image(boxes, image_ids, levels, NMS_THRESH, 2, 100000)
    d2 = find_top_rpn_proposals(proposals, logits, image_sizes, NMS_THRESH, pre, 100000, 0.0, False)
    for kept_i, d2_i in zip(kept, d2):
        assert bool((scores[kept_i][1:] < scores[kept_i][:-1]).all())  # distinct scores: by score, as Detectron2's
        torch.testing.assert_close(boxes[kept_i].cpu(), d2_i.proposal_boxes.tensor.cpu(), rtol=0, atol=0)
        torch.testing.assert_close(scores[kept_i].cpu(), d2_i.objectness_logits.cpu(), rtol=0, atol=0)
