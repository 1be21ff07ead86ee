import fpn_rpn  # noqa: F401  # before detectron2

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator.rpn import StandardRPNHead, build_rpn_head

from fpn_rpn import FPNRPNHead, add_fpn_rpn_config

C, A = 8, 3  # input channels, anchors per location


def _features(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, C, h, w, generator=g).to(device) for h, w in ((6, 5), (3, 3), (1, 2))]


def _randomize(module, seed=1):
    # the default init (std 0.01, zero bias) would make softmax and sigmoid checks near-trivial
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


@pytest.mark.parametrize("objectness", ["sigmoid", "softmax"])
def test_output_shapes(objectness, device):
    head = FPNRPNHead(in_channels=C, num_anchors=A, objectness=objectness).to(device)
    features = _features(device=device)
    logits, deltas = head(features)
    assert [tuple(x.shape) for x in logits] == [(2, A, 6, 5), (2, A, 3, 3), (2, A, 1, 2)]
    assert [tuple(x.shape) for x in deltas] == [(2, A * 4, 6, 5), (2, A * 4, 3, 3), (2, A * 4, 1, 2)]


@pytest.mark.parametrize("objectness, channels", [("sigmoid", A), ("softmax", 2 * A)])
def test_built_from_config(objectness, channels):
    cfg = get_cfg()
    add_fpn_rpn_config(cfg)
    cfg.MODEL.RPN.HEAD_NAME = "FPNRPNHead"
    cfg.MODEL.ANCHOR_GENERATOR.NAME = "FPNAnchorGenerator"
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64]]
    cfg.MODEL.FPN_RPN.OBJECTNESS = objectness
    head = build_rpn_head(cfg, [ShapeSpec(channels=C, stride=4), ShapeSpec(channels=C, stride=8)])
    assert type(head) is FPNRPNHead and head.objectness == objectness
    assert head.objectness_logits.out_channels == channels  # A = 1 size x 3 default ratios
    assert head.anchor_deltas.out_channels == A * 4


def test_standard_rpn_head_checkpoint_loads_in_sigmoid_mode(device):
    stock = _randomize(StandardRPNHead(in_channels=C, num_anchors=A)).to(device)
    ours = FPNRPNHead(in_channels=C, num_anchors=A, objectness="sigmoid").to(device)
    ours.load_state_dict(stock.state_dict(), strict=True)
    features = _features(device=device)
    for ours_out, stock_out in zip(ours(features), stock(features)):
        for x, y in zip(ours_out, stock_out):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_softmax_logit_is_object_minus_background(device):
    head = _randomize(FPNRPNHead(in_channels=C, num_anchors=A, objectness="softmax")).to(device)
    features = _features(device=device)
    logits, _ = head(features)
    conv, cls = head.conv, head.objectness_logits
    for x, logit in zip(features, logits):
        hidden = F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1))
        scores = F.conv2d(hidden, cls.weight, cls.bias)  # (N, 2A, Hi, Wi): background x A, object x A
        background, obj = scores[:, :A], scores[:, A:]
        torch.testing.assert_close(logit, obj - background)
        # sigmoid(o - b) == e^o / (e^b + e^o): the two-class softmax object probability
        softmax = torch.stack((background, obj)).softmax(dim=0)
        torch.testing.assert_close(logit.sigmoid(), softmax[1])
        # so BCE on the logit is the two-class cross-entropy
        labels = torch.randint(0, 2, logit.shape, generator=torch.Generator().manual_seed(2)).to(device)
        bce = F.binary_cross_entropy_with_logits(logit, labels.float(), reduction="sum")
        ce = F.cross_entropy(torch.stack((background, obj), dim=1), labels, reduction="sum")
        torch.testing.assert_close(bce, ce)


def test_softmax_gradients_reach_both_score_channels(device):
    head = _randomize(FPNRPNHead(in_channels=C, num_anchors=A, objectness="softmax")).to(device)
    logits, _ = head(_features(device=device))
    sum(x.sum() for x in logits).backward()
    grad = head.objectness_logits.bias.grad  # d(obj - bg)/d bias: -1 per background, +1 per object
    num_logits = sum(x[:, 0].numel() for x in logits)
    torch.testing.assert_close(grad.cpu(), torch.tensor([-1.0] * A + [1.0] * A) * num_logits)


def test_bad_arguments_raise_value_error_naming_the_argument():
    # the config keys are named by check_rpn_config (tests/test_robustness_config.py)
    with pytest.raises(ValueError, match="^objectness = 'softmax2' is invalid: must be one of"):
        FPNRPNHead(in_channels=C, num_anchors=A, objectness="softmax2")
    with pytest.raises(ValueError, match=r"^conv_dims = \[\] is invalid: give at least one conv width"):
        FPNRPNHead(in_channels=C, num_anchors=A, conv_dims=[])


# ---------------------------------------------------------------- sparse head backward

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
def test_head_gradients_equal_plain_autograd(objectness, density, device):
    head = _heads(objectness).to(device)
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(2, C, h, w, generator=g).to(device) for h, w in ((24, 20), (12, 10), (1, 2))]
    grads = []
    for forward in (head, lambda f: _reference(head, f)):
        head.zero_grad()
        inputs = [x.clone().requires_grad_() for x in features]
        scores, deltas = forward(inputs)
        if forward is head and device.type == "cpu":
            assert "_RPNHeadFunction" in type(deltas[0].grad_fn).__name__
        elif forward is head:  # on GPUs the head's backward is autograd's (no host-device sync)
            assert "_RPNHeadFunction" not in type(deltas[0].grad_fn).__name__
        g = torch.Generator().manual_seed(2)
        # gradient at a few anchors, as the losses give
        upstream = [(torch.randn(x.shape, generator=g) * (torch.rand(x.shape, generator=g) < density)).to(device)
                    for x in scores + deltas]
        torch.autograd.backward(scores + deltas, upstream)
        grads.append([p.grad for p in head.parameters()] + [x.grad for x in inputs] + scores + deltas)
    for ours, reference in zip(*grads):
        if density > 0.1:  # dense fallback: autograd's own kernels
            torch.testing.assert_close(ours, reference, rtol=0, atol=0)
        else:  # sums over the sampled locations only: equal up to float rounding
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_dense_backward_option_equals_standard_rpn_head_bit_for_bit(device):
    head = _heads("sigmoid").to(device)
    head.sparse_backward = False  # MODEL.FPN_RPN.SPARSE_HEAD_BACKWARD: False
    stock = StandardRPNHead(in_channels=C, num_anchors=A).to(device)
    stock.load_state_dict(head.state_dict())
    features = [torch.randn(2, C, 24, 20).to(device), torch.randn(2, C, 12, 10).to(device)]
    grads = []
    for module in (head, stock):
        module.zero_grad()
        inputs = [x.clone().requires_grad_() for x in features]
        scores, deltas = module(inputs)
        g = torch.Generator().manual_seed(2)
        upstream = [(torch.randn(x.shape, generator=g) * (torch.rand(x.shape, generator=g) < 0.003)).to(device)
                    for x in scores + deltas]
        torch.autograd.backward(scores + deltas, upstream)
        grads.append([p.grad for p in module.parameters()] + [x.grad for x in inputs])
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_head_outputs_equal_standard_rpn_head_with_and_without_grad(device):
    head = _heads("sigmoid").to(device)
    stock = StandardRPNHead(in_channels=C, num_anchors=A).to(device)
    stock.load_state_dict(head.state_dict())
    features = [torch.randn(2, C, 9, 7).to(device), torch.randn(2, C, 5, 4).to(device)]
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            for ours, reference in zip(head(features), stock(features)):
                for x, y in zip(ours, reference):
                    torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_head_without_input_gradient_and_with_unused_output(device):
    head = _heads("sigmoid").to(device)
    features = [torch.randn(1, C, 6, 6).to(device)]  # not requiring grad, as after a frozen backbone
    scores, _ = head(features)
    (scores[0][0, 0, 2, 3] * 2.0).backward()
    reference = _heads("sigmoid").to(device)
    reference_scores, _ = _reference(reference, features)
    (reference_scores[0][0, 0, 2, 3] * 2.0).backward()
    for p, q in zip(head.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
