"""Batched anchor matching and sampling against Detectron2's per-image path, and the other
speed-ups of the RPN (anchor cache, sparse head backward, top-K, early-stopping NMS): each
must give Detectron2's result."""
import fpn_rpn  # noqa: F401  # before detectron2

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.modeling.proposal_generator.rpn import RPN, StandardRPNHead
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage
from torchvision.ops import nms

from fpn_rpn import FPNAnchorGenerator, FPNRPNHead, add_fpn_rpn_config
from fpn_rpn.modeling import anchor_matching
from fpn_rpn.modeling.anchor_matching import label_anchors, match_and_sample
from fpn_rpn.modeling.proposal_selection import nms_first_k, top_k_scores

MATCHER = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)  # RPN's defaults


def _d2_match(anchors, gt_boxes, matcher=MATCHER):
    """Detectron2's per-image matching: (matched gt index, labels) for each image."""
    return [matcher(pairwise_iou(Boxes(gt), Boxes(anchors))) if len(gt) else
            (torch.zeros(len(anchors), dtype=torch.int64), torch.zeros(len(anchors), dtype=torch.int8))
            for gt in gt_boxes]


def _match_all(anchors, gt_boxes, matcher=MATCHER):
    """match_and_sample with every anchor sampled, so labels and matches are the matcher's."""
    return match_and_sample(anchors, gt_boxes, matcher, batch_size_per_image=len(anchors) + 1, positive_fraction=1.0)


# ---------------------------------------------------------------- matching

HAND_ANCHORS = torch.tensor([
    [0.0, 0, 10, 10],  # 0
    [0.0, 0, 10, 7],  # 1
    [0.0, 0, 10, 5],  # 2
    [0.0, 0, 10, 3],  # 3
    [0.0, 0, 10, 2],  # 4
    [50.0, 50, 60, 60],  # 5
    [100.0, 100, 120, 110],  # 6
    [100.0, 100, 120, 105],  # 7
    [100.0, 110, 120, 120],  # 8
    [100.0, 100, 120, 108],  # 9
])
HAND_GT = [
    # A = (0, 0, 10, 10): anchors 0-4 have IoU 1, 0.7, 0.5, 0.3, 0.2.
    # B = (100, 100, 120, 120): anchors 6, 7, 8, 9 have IoU 0.5, 0.25, 0.5, 0.4; 6 and 8 are its best.
    torch.tensor([[0.0, 0, 10, 10], [100.0, 100, 120, 120]]),
    # Two gts of area 140 that anchor 0 overlaps equally (100 / 140 == 0.714): it matches the first.
    torch.tensor([[0.0, 0, 10, 14], [0.0, -4, 10, 10]]),
    # A gt that overlaps no anchor: its best IoU is 0, so every anchor is positive (Detectron2's quirk).
    torch.tensor([[300.0, 300, 310, 310]]),
    torch.zeros((0, 4)),  # no gt: all negative
]
HAND_LABELS = [
    [1, 1, -1, -1, 0, 0, 1, 0, 1, -1],  # 0.7 is positive, [0.3, 0.7) ignored, B's tied best both positive
    # anchor 0: 0.714; 1: 70/140 = 0.5; 2: 50/140 = 0.357 (ignored); 3: 30/140 = 0.214 -> 0 but
    # gt 1's best is anchor 0 only (IoU 100/140; anchor 1: 70/140); anchor 4: 20/140 -> 0
    [1, -1, -1, 0, 0, 0, 0, 0, 0, 0],
    [1] * 10,
    [0] * 10,
]


def test_hand_built_labels_and_matches():
    labels, matched = _match_all(HAND_ANCHORS, HAND_GT)
    torch.testing.assert_close(labels, torch.tensor(HAND_LABELS, dtype=torch.int8), rtol=0, atol=0)
    a, b = HAND_GT[0]
    torch.testing.assert_close(matched[0, [0, 1, 6, 8]], torch.stack([a, a, b, b]), rtol=0, atol=0)
    torch.testing.assert_close(matched[1, 0], HAND_GT[1][0], rtol=0, atol=0)  # first of the tied gts
    torch.testing.assert_close(matched[2], HAND_GT[2].expand(10, 4), rtol=0, atol=0)
    torch.testing.assert_close(matched[3], torch.zeros(10, 4), rtol=0, atol=0)
    for i, (matches, d2_labels) in enumerate(_d2_match(HAND_ANCHORS, HAND_GT)):
        torch.testing.assert_close(labels[i], d2_labels, rtol=0, atol=0)
        positive = d2_labels == 1
        if len(HAND_GT[i]):
            torch.testing.assert_close(matched[i, positive], HAND_GT[i][matches[positive]], rtol=0, atol=0)


def _random_case(seed, num_images=4):
    """FPN anchors on 3 small levels and gts of all kinds: small, large, off-image, degenerate, none."""
    g = torch.Generator().manual_seed(seed)
    gen = FPNAnchorGenerator(sizes=[[16, 24], [32, 48], [64, 96]], aspect_ratios=[[0.5, 1.0, 2.0]], strides=[4, 8, 16])
    anchors = Boxes.cat(gen([torch.zeros(1, 1, 24, 20), torch.zeros(1, 1, 12, 10), torch.zeros(1, 1, 6, 5)]))
    gt_boxes = []
    for i in range(num_images):
        m = [0, 1, 7, 25][i % 4]
        xy = torch.rand(m, 2, generator=g) * 100 - 10
        wh = torch.rand(m, 2, generator=g) ** 2 * 90 + 0.5
        boxes = torch.cat((xy, xy + wh), dim=1)
        if m == 7:
            boxes[1] = torch.tensor([500.0, 500, 520, 530])  # overlaps no anchor
        if m > 5:
            boxes[0] = torch.tensor([30.0, 30, 20, 40])  # x2 < x1
            boxes[2] = boxes[3]  # duplicate gt: ties between gts
        gt_boxes.append(boxes)
    return anchors.tensor, gt_boxes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_labels_ious_and_matches_equal_detectron2(seed):
    anchors, gt_boxes = _random_case(seed)
    labels, ious = label_anchors(anchors, gt_boxes, MATCHER)
    _, matched = _match_all(anchors, gt_boxes)
    for i, (matches, d2_labels) in enumerate(_d2_match(anchors, gt_boxes)):
        if len(gt_boxes[i]):
            torch.testing.assert_close(ious[i], pairwise_iou(Boxes(gt_boxes[i]), Boxes(anchors)), rtol=0, atol=0)
        torch.testing.assert_close(labels[i], d2_labels, rtol=0, atol=0)
        positive = d2_labels == 1
        assert positive.any() == (len(gt_boxes[i]) > 0)
        if len(gt_boxes[i]):
            torch.testing.assert_close(matched[i, positive], gt_boxes[i][matches[positive]], rtol=0, atol=0)


def test_iou_in_chunks_gives_the_same_labels(monkeypatch):
    anchors, gt_boxes = _random_case(6)
    labels, ious = label_anchors(anchors, gt_boxes, MATCHER)
    monkeypatch.setattr(anchor_matching, "_IOU_CHUNK_ELEMENTS", 3 * len(anchors))  # 3 gt rows at a time
    chunked_labels, chunked_ious = label_anchors(anchors, gt_boxes, MATCHER)
    torch.testing.assert_close(chunked_labels, labels, rtol=0, atol=0)
    for chunked, iou in zip(chunked_ious, ious):
        torch.testing.assert_close(chunked, iou, rtol=0, atol=0)


def test_other_thresholds_and_no_low_quality_matches():
    anchors, gt_boxes = _random_case(3)
    for matcher in (Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=False),
                    Matcher([0.2, 0.5, 0.6], [0, -1, 0, 1], allow_low_quality_matches=True),
                    Matcher([0.5, 0.5], [0, -1, 1], allow_low_quality_matches=False)):
        labels, _ = label_anchors(anchors, gt_boxes, matcher)
        for i, (_, d2_labels) in enumerate(_d2_match(anchors, gt_boxes, matcher)):
            torch.testing.assert_close(labels[i], d2_labels, rtol=0, atol=0)


# ---------------------------------------------------------------- sampling and losses, in the model

C = 8
SHAPES = {f: ShapeSpec(channels=C, stride=2 ** (i + 2)) for i, f in enumerate(["p2", "p3", "p4"])}


def _rpn(**rpn_keys):
    cfg = get_cfg()
    add_fpn_rpn_config(cfg)
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "FPNRPN"
    cfg.MODEL.ANCHOR_GENERATOR.NAME = "FPNAnchorGenerator"
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16, 24], [32, 48], [64, 96]]
    cfg.MODEL.RPN.HEAD_NAME = "FPNRPNHead"
    cfg.MODEL.RPN.IN_FEATURES = list(SHAPES)
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 64  # fewer than the positives of some images
    for key, value in rpn_keys.items():
        setattr(cfg.MODEL.RPN, key, value)
    return build_proposal_generator(cfg, SHAPES)


def _gt_instances(gt_boxes, image_size=(90, 80)):
    result = []
    for boxes in gt_boxes:
        inst = Instances(image_size)
        inst.gt_boxes = Boxes(boxes)
        result.append(inst)
    return result


@pytest.mark.parametrize("boundary_thresh", [-1, 0])
def test_sampling_draws_the_same_anchors_as_detectron2(boundary_thresh):
    rpn = _rpn(BOUNDARY_THRESH=boundary_thresh)
    anchors, gt_boxes = _random_case(4, num_images=8)
    anchors = [Boxes(anchors)]
    gt = _gt_instances(gt_boxes)
    for seed in (0, 1):
        torch.manual_seed(seed)
        labels, matched = rpn.label_and_sample_anchors(anchors, gt)
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        d2_labels, d2_matched = RPN.label_and_sample_anchors(rpn, anchors, gt)
        assert torch.equal(torch.rand(1), after_ours)  # the RNG was used alike
        for labels_i, matched_i, d2_labels_i, d2_matched_i in zip(labels, matched, d2_labels, d2_matched):
            torch.testing.assert_close(labels_i, d2_labels_i, rtol=0, atol=0)
            positive = d2_labels_i == 1
            torch.testing.assert_close(matched_i[positive], d2_matched_i[positive], rtol=0, atol=0)
        assert sum(int((x == 1).sum()) for x in labels) > 20 and sum(int((x == 0).sum()) for x in labels) > 100


@pytest.mark.parametrize("loss_type, beta", [("smooth_l1", 0.0), ("smooth_l1", 0.2), ("giou", 0.0)])
def test_losses_and_their_gradients_equal_detectron2(loss_type, beta):
    rpn = _rpn(BBOX_REG_LOSS_TYPE=loss_type, SMOOTH_L1_BETA=beta)
    anchors, gt_boxes = _random_case(5)
    gt_boxes = [b[(b[:, 2:] > b[:, :2]).all(dim=1)] for b in gt_boxes]  # a box target needs a valid gt
    level_sizes = [24 * 20 * 6, 12 * 10 * 6, 6 * 5 * 6]
    anchors = list(Boxes(anchors.split(level_sizes)[i]) for i in range(3))
    torch.manual_seed(0)
    labels, matched = rpn.label_and_sample_anchors(anchors, _gt_instances(gt_boxes))
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(4, n, generator=g) for n in level_sizes]
    deltas = [torch.randn(4, n, 4, generator=g) * 0.3 for n in level_sizes]
    results = []
    for losses_fn in (rpn.losses, lambda *args: RPN.losses(rpn, *args)):
        inputs = [x.clone().requires_grad_() for x in logits + deltas]
        with EventStorage():
            losses = losses_fn(anchors, inputs[:3], labels, inputs[3:], matched)
        sum(losses.values()).backward()
        results.append((losses, [x.grad for x in inputs]))
    (ours, our_grads), (d2, d2_grads) = results
    assert ours["loss_rpn_loc"] > 0
    for key in d2:
        torch.testing.assert_close(ours[key], d2[key], rtol=0, atol=0)
    for ours_grad, d2_grad in zip(our_grads, d2_grads):
        torch.testing.assert_close(ours_grad, d2_grad, rtol=0, atol=0)


# ---------------------------------------------------------------- anchor cache

STRIDES = [4, 8]


def _generators():
    ours = FPNAnchorGenerator(sizes=[[32], [64]], aspect_ratios=[[0.5, 1.0, 2.0]], strides=STRIDES)
    d2 = DefaultAnchorGenerator(sizes=[[32], [64]], aspect_ratios=[[0.5, 1.0, 2.0]], strides=STRIDES, offset=0.0)
    return ours, d2


def _maps(h, w, dtype=torch.float32):
    return [torch.zeros(1, 1, h, w, dtype=dtype), torch.zeros(1, 1, -(-h // 2), -(-w // 2), dtype=dtype)]


def test_cached_anchors_are_reused_and_equal_fresh_ones():
    ours, d2 = _generators()
    first = ours(_maps(5, 7))
    second = ours(_maps(5, 7))
    assert all(a.tensor is b.tensor for a, b in zip(first, second))
    for size in ((5, 7), (6, 3), (5, 7)):
        for a, b in zip(ours(_maps(*size)), d2(_maps(*size))):
            torch.testing.assert_close(a.tensor, b.tensor, rtol=0, atol=0)
    assert len(ours._anchor_cache) == 4  # 2 sizes x 2 levels
    assert ours.state_dict() == {}  # the cache is not saved, nor are the cell anchors


def test_cache_is_bounded_and_emptied_when_the_module_moves():
    ours, d2 = _generators()
    ours.CACHE_SIZE = 4
    for h in range(1, 6):
        ours(_maps(h, 4))
    assert len(ours._anchor_cache) == 4
    assert {key[1] for key in ours._anchor_cache} == {4, 5, 2, 3}  # the last 2 sizes: (4, 4) and (5, 4)
    ours.double()
    assert len(ours._anchor_cache) == 0
    for a, b in zip(ours(_maps(5, 4)), d2(_maps(5, 4))):
        torch.testing.assert_close(a.tensor, b.tensor, rtol=0, atol=0)  # Boxes are float32
    assert [key[4] for key in ours._anchor_cache] == [torch.float64] * 2


def test_anchors_made_under_inference_mode_work_in_training():
    ours, _ = _generators()
    with torch.inference_mode():
        (anchors, _) = ours(_maps(3, 3))
    assert not anchors.tensor.is_inference()
    w = torch.ones(4, requires_grad=True)
    (anchors.tensor * w).sum().backward()  # saves the anchors for backward
    torch.testing.assert_close(w.grad, anchors.tensor.sum(dim=0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cache_follows_the_module_to_cuda():
    ours, d2 = _generators()
    ours(_maps(4, 4))
    ours.cuda()
    anchors = ours([x.cuda() for x in _maps(4, 4)])
    assert all(a.tensor.is_cuda for a in anchors)
    for a, b in zip(anchors, d2(_maps(4, 4))):
        torch.testing.assert_close(a.tensor.cpu(), b.tensor, rtol=0, atol=0)


# ---------------------------------------------------------------- sparse head backward

A = 3


def _heads(objectness):
    g = torch.Generator().manual_seed(0)
    ours = FPNRPNHead(in_channels=C, num_anchors=A, objectness=objectness)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return ours


def _reference(head, features):
    """The head's outputs through its submodules: plain autograd, no custom backward."""
    scores, deltas = [], []
    for x in features:
        t = head.conv(x)
        s = head.objectness_logits(t)
        if head.objectness == "softmax":
            background, obj = s.chunk(2, dim=1)
            s = obj - background
        scores.append(s)
        deltas.append(head.anchor_deltas(t))
    return scores, deltas


@pytest.mark.parametrize("objectness", ["sigmoid", "softmax"])
@pytest.mark.parametrize("density", [0.003, 0.5])  # sparse backward; dense fallback
def test_head_gradients_equal_plain_autograd(objectness, density):
    head = _heads(objectness)
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(2, C, h, w, generator=g) for h, w in ((24, 20), (12, 10), (1, 2))]
    grads = []
    for forward in (head, lambda f: _reference(head, f)):
        head.zero_grad()
        inputs = [x.clone().requires_grad_() for x in features]
        scores, deltas = forward(inputs)
        if forward is head:
            assert "_RPNHeadFunction" in type(deltas[0].grad_fn).__name__
        g = torch.Generator().manual_seed(2)
        # gradient at a few anchors, as the losses give
        upstream = [torch.randn(x.shape, generator=g) * (torch.rand(x.shape, generator=g) < density)
                    for x in scores + deltas]
        torch.autograd.backward(scores + deltas, upstream)
        grads.append([p.grad for p in head.parameters()] + [x.grad for x in inputs] + scores + deltas)
    for ours, reference in zip(*grads):
        if density > 0.1:  # dense fallback: autograd's own kernels
            torch.testing.assert_close(ours, reference, rtol=0, atol=0)
        else:  # sums over the sampled locations only: equal up to float rounding
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_dense_backward_option_equals_standard_rpn_head_bit_for_bit():
    head = _heads("sigmoid")
    head.sparse_backward = False  # MODEL.FPN_RPN.SPARSE_HEAD_BACKWARD: False
    stock = StandardRPNHead(in_channels=C, num_anchors=A)
    stock.load_state_dict(head.state_dict())
    features = [torch.randn(2, C, 24, 20), torch.randn(2, C, 12, 10)]
    grads = []
    for module in (head, stock):
        module.zero_grad()
        inputs = [x.clone().requires_grad_() for x in features]
        scores, deltas = module(inputs)
        g = torch.Generator().manual_seed(2)
        upstream = [torch.randn(x.shape, generator=g) * (torch.rand(x.shape, generator=g) < 0.003)
                    for x in scores + deltas]
        torch.autograd.backward(scores + deltas, upstream)
        grads.append([p.grad for p in module.parameters()] + [x.grad for x in inputs])
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_head_outputs_equal_standard_rpn_head_with_and_without_grad():
    head = _heads("sigmoid")
    stock = StandardRPNHead(in_channels=C, num_anchors=A)
    stock.load_state_dict(head.state_dict())
    features = [torch.randn(2, C, 9, 7), torch.randn(2, C, 5, 4)]
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            for ours, reference in zip(head(features), stock(features)):
                for x, y in zip(ours, reference):
                    torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_head_without_input_gradient_and_with_unused_output():
    head = _heads("sigmoid")
    features = [torch.randn(1, C, 6, 6)]  # not requiring grad, as after a frozen backbone
    scores, _ = head(features)
    (scores[0][0, 0, 2, 3] * 2.0).backward()
    reference = _heads("sigmoid")
    reference_scores, _ = _reference(reference, features)
    (reference_scores[0][0, 0, 2, 3] * 2.0).backward()
    for p, q in zip(head.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- top-K and NMS


def test_top_k_scores_equal_a_stable_sort_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (3, 200), generator=g).float()  # ties everywhere, also at the k-th place
    scores[1] = torch.randn(200, generator=g)  # and a row without ties
    for k in (1, 17, 199, 200, 300):
        values, indices = top_k_scores(scores, k)
        sorted_values, sorted_indices = scores.sort(dim=1, descending=True, stable=True)
        torch.testing.assert_close(values, sorted_values[:, :k], rtol=0, atol=0)
        torch.testing.assert_close(indices, sorted_indices[:, :k], rtol=0, atol=0)
    untied = torch.randn(2, 500, generator=g)  # the topk path: no tie at the k-th place
    values, indices = top_k_scores(untied, 50)
    torch.testing.assert_close(indices, untied.sort(dim=1, descending=True, stable=True).indices[:, :50],
                               rtol=0, atol=0)


def _clustered_boxes(num_images, per_image, spread, seed):
    """Boxes jittered around a few centres: the smaller ``spread``, the more NMS removes."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(num_images, 20, 2, generator=g) * 200
    pick = torch.randint(0, 20, (num_images, per_image), generator=g)
    ctr = centres.gather(1, pick[..., None].expand(-1, -1, 2)) + torch.randn(num_images, per_image, 2,
                                                                               generator=g) * spread
    wh = 20 + torch.rand(num_images, per_image, 2, generator=g) * 10
    return torch.cat((ctr - wh / 2, ctr + wh / 2), dim=2).reshape(-1, 4)


@pytest.mark.parametrize("spread", [1.0, 30.0])  # most boxes suppressed; few suppressed
@pytest.mark.parametrize("per_level", [False, True])
def test_nms_first_k_equals_full_nms_cut_to_k(spread, per_level):
    num_images, per_image = 3, 700  # 2100 boxes: NMS groups run on threads
    boxes = _clustered_boxes(num_images, per_image, spread, seed=int(spread))
    image_ids = torch.arange(num_images).repeat_interleave(per_image)
    levels = torch.arange(per_image).remainder(3).repeat(num_images)
    groups = image_ids * 3 + levels if per_level else image_ids
    keys = -torch.arange(len(boxes), dtype=torch.float32)  # priority: index order
    full = []
    for group in groups.unique():
        idx = (groups == group).nonzero().squeeze(1)
        full.append(idx[nms(boxes[idx], keys[idx], 0.7)])
    full = torch.cat(full).sort().values
    for k in (1, 10, 60, 150, 400):
        for first_prefix in (0, 2, 50):  # several rounds when the first prefix is small
            kept = nms_first_k(boxes, image_ids, groups, num_images, k, 0.7, first_prefix=first_prefix)
            expected = torch.cat([full[image_ids[full] == i][:k] for i in range(num_images)])
            torch.testing.assert_close(kept, expected, rtol=0, atol=0)
    assert 0 < len(full) < len(boxes)
