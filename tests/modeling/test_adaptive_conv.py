"""Cascade RPN's adaptive convolution: where its taps fall for a box, and its output against
a direct bilinear reference, for both implementations."""
import fpn_rpn  # noqa: F401  # before detectron2

import pytest
import torch
import torch.nn.functional as F

from fpn_rpn.errors import ConfigError
from fpn_rpn.modeling.adaptive_conv import (
    ADAPTIVE_CONV_IMPLS,
    AdaptiveConv,
    box_aligned_offsets,
    sampling_locations,
)


def test_taps_span_the_box():
    # 4 x 5 map of stride 4; the box of location (i=1, j=2) is (4, 0, 20, 12) px = (1, 0, 5, 3) cells:
    # centre (x 3, y 1.5), half width 2, half height 1.5 -> taps at x 1, 3, 5 and y 0, 1.5, 3
    boxes = torch.zeros(1, 4 * 5, 4)
    boxes[0, 1 * 5 + 2] = torch.tensor([4.0, 0.0, 20.0, 12.0])
    taps = sampling_locations(box_aligned_offsets(boxes, 4, 4, 5))[0, :, 1, 2]  # (9, 2) as (y, x)
    expected = [[y, x] for y in (0.0, 1.5, 3.0) for x in (1.0, 3.0, 5.0)]
    torch.testing.assert_close(taps, torch.tensor(expected))


def test_anchor_offset_shifts_the_taps():
    # with OFFSET 0.5 the location j is the input point (j + 0.5) * stride: a box centred there
    # of 2 cells puts the taps where a plain 3x3 conv has them (offsets 0)
    stride, h, w = 8, 3, 4
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    centres = torch.stack((xs, ys), -1).reshape(1, -1, 2) * stride
    boxes = torch.cat((centres - stride, centres + stride), -1)
    torch.testing.assert_close(box_aligned_offsets(boxes, stride, h, w, anchor_offset=0.5), torch.zeros(1, 18, h, w))


def _reference(x, offsets, weight, bias):
    """Deformable 3x3 convolution written out: bilinear sampling point by point, zeros outside."""
    n, c, h, w = x.shape
    points = sampling_locations(offsets)
    out = torch.zeros(n, weight.shape[0], h, w, dtype=torch.float64)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                for k in range(9):
                    py, px = points[b, k, i, j].tolist()
                    y0, x0 = int(torch.floor(torch.tensor(py))), int(torch.floor(torch.tensor(px)))
                    value = torch.zeros(c, dtype=torch.float64)
                    for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                        if 0 <= yy < h and 0 <= xx < w:
                            weight_yx = (1 - abs(py - yy)) * (1 - abs(px - xx))
                            value += weight_yx * x[b, :, yy, xx].double()
                    out[b, :, i, j] += weight[:, :, k // 3, k % 3].double() @ value
    return (out + bias.double()[:, None, None]).float()


@pytest.mark.parametrize("impl", ADAPTIVE_CONV_IMPLS)
def test_offset_mode_equals_the_direct_reference(impl):
    torch.manual_seed(0)
    n, c, h, w, stride = 2, 3, 3, 4, 4
    x = torch.randn(n, c, h, w)
    # boxes of 0.5 to 6 cells around their locations, some reaching past the map
    xy = torch.rand(n, h * w, 2) * torch.tensor([w, h]) * stride
    wh = (torch.rand(n, h * w, 2) * 5.5 + 0.5) * stride
    boxes = torch.cat((xy - wh / 2, xy + wh / 2), -1)
    conv = AdaptiveConv(c, 2, mode="offset", impl=impl)
    torch.nn.init.normal_(conv.bias)
    offsets = box_aligned_offsets(boxes, stride, h, w)
    with torch.no_grad():
        torch.testing.assert_close(conv(x, offsets), _reference(x, offsets, conv.weight, conv.bias),
                                   atol=1e-5, rtol=1e-5)


def test_implementations_agree_on_output_and_gradients():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 6, 7, requires_grad=True)
    xy = torch.rand(2, 42, 2) * 28
    boxes = torch.cat((xy, xy + torch.rand(2, 42, 2) * 30 + 1), -1)
    offsets = box_aligned_offsets(boxes, 4, 6, 7)
    convs = [AdaptiveConv(4, 5, mode="offset", impl=impl) for impl in ADAPTIVE_CONV_IMPLS]
    convs[1].load_state_dict(convs[0].state_dict())
    grads = []
    for conv in convs:
        x.grad = None
        out = conv(x, offsets)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_zero_offsets_are_a_plain_convolution():
    torch.manual_seed(2)
    x = torch.randn(1, 3, 5, 6)
    conv = AdaptiveConv(3, 4, mode="offset")
    torch.testing.assert_close(conv(x, torch.zeros(1, 18, 5, 6)), F.conv2d(x, conv.weight, conv.bias, padding=1),
                               atol=1e-6, rtol=1e-5)


def test_dilation_mode_is_a_dilated_convolution():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 9, 8)
    conv = AdaptiveConv(3, 4, mode="dilation", dilation=3)
    out = conv(x)
    assert out.shape == (2, 4, 9, 8)
    torch.testing.assert_close(out, F.conv2d(x, conv.weight, conv.bias, padding=3, dilation=3))


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "deform"}, "mode must be one of"),
    ({"impl": "mmcv"}, "impl must be one of"),
    ({"mode": "dilation", "dilation": 0}, "dilation must be an integer >= 1"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AdaptiveConv(3, 3, **kwargs)


def test_offset_mode_without_offsets_is_an_error():
    with pytest.raises(ValueError, match="needs offsets"):
        AdaptiveConv(3, 3, mode="offset")(torch.zeros(1, 3, 2, 2))
