import fpn_rpn  # noqa: F401  # before detectron2

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator, build_anchor_generator

from fpn_rpn import FPNAnchorGenerator, add_fpn_rpn_config

STRIDES = [4, 8, 16, 32, 64]  # P2-P6
SIZES = [[32], [64], [128], [256], [512]]


def _cfg(name="FPNAnchorGenerator", offset=0.0):
    cfg = get_cfg()
    add_fpn_rpn_config(cfg)
    cfg.MODEL.ANCHOR_GENERATOR.NAME = name
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = SIZES
    cfg.MODEL.ANCHOR_GENERATOR.OFFSET = offset
    return cfg


def _features(hw_per_level, channels=2):
    return [torch.zeros(1, channels, h, w) for h, w in hw_per_level]


def test_num_anchors_is_hwk_per_level():
    gen = FPNAnchorGenerator(sizes=[[32, 40], [64, 80], [128, 160]], aspect_ratios=[[0.5, 1.0, 2.0]],
                             strides=[4, 8, 16])
    assert gen.num_anchors == [6, 6, 6]  # k = 2 sizes x 3 ratios
    anchors = gen(_features([(5, 7), (3, 4), (1, 2)]))
    assert [len(a) for a in anchors] == [5 * 7 * 6, 3 * 4 * 6, 1 * 2 * 6]


@pytest.mark.parametrize(
    "offset, expected",
    [
        (
            0.0,
            # size s = 8; ratios r = 4, 1, 0.25 give w = s*sqrt(r), h = s/sqrt(r):
            # (16, 4), (8, 8), (4, 16). Centres (x, y) = (0, 0) and (4, 0): (j + 0.0) * stride 4.
            [
                [-8.0, -2.0, 8.0, 2.0],  # 0 -+ 16/2, 0 -+ 4/2
                [-4.0, -4.0, 4.0, 4.0],  # 0 -+ 8/2
                [-2.0, -8.0, 2.0, 8.0],  # 0 -+ 4/2, 0 -+ 16/2
                [-4.0, -2.0, 12.0, 2.0],  # -4.0 == 4 - 16/2
                [0.0, -4.0, 8.0, 4.0],  # 0.0 == 4 - 8/2
                [2.0, -8.0, 6.0, 8.0],  # 2.0 == 4 - 4/2
            ],
        ),
        (
            0.5,
            # Same cells, centres (2, 2) and (6, 2): (j + 0.5) * stride 4.
            [
                [-6.0, 0.0, 10.0, 4.0],  # 2 -+ 16/2, 2 -+ 4/2
                [-2.0, -2.0, 6.0, 6.0],  # 2 -+ 8/2
                [0.0, -6.0, 4.0, 10.0],  # 2 -+ 4/2, 2 -+ 16/2
                [-2.0, 0.0, 14.0, 4.0],  # -2.0 == 6 - 16/2
                [2.0, -2.0, 10.0, 6.0],  # 2.0 == 6 - 8/2
                [4.0, -6.0, 8.0, 10.0],  # 4.0 == 6 - 4/2
            ],
        ),
    ],
)
def test_anchors_on_1x2_grid(offset, expected):
    gen = FPNAnchorGenerator(sizes=[[8]], aspect_ratios=[[0.25, 1.0, 4.0]], strides=[4], offset=offset)
    (anchors,) = gen(_features([(1, 2)]))  # H = 1, W = 2
    torch.testing.assert_close(anchors.tensor, torch.tensor(expected), rtol=0, atol=0)


def test_cell_anchors_follow_height_over_width_ratio():
    gen = FPNAnchorGenerator(sizes=[[32]], aspect_ratios=[[0.5, 1.0, 2.0]], strides=[4])
    # w = s / sqrt(a), h = s * sqrt(a): 22.627417 == 32 / sqrt(0.5) / 2 and 11.313708 == 32 * sqrt(0.5) / 2,
    # so a = 0.5 is wide
    expected = torch.tensor([
        [-22.627417, -11.313708, 22.627417, 11.313708],  # a = 0.5: w = 45.25, h = 22.63
        [-16.0, -16.0, 16.0, 16.0],  # a = 1: w = h = 32
        [-11.313708, -22.627417, 11.313708, 22.627417],  # a = 2: w = 22.63, h = 45.25
    ])
    (anchors,) = gen(_features([(1, 1)]))  # one location, centre (0, 0)
    torch.testing.assert_close(anchors.tensor, expected)


def test_kwargs_offset_default_is_config_default():
    gen = FPNAnchorGenerator(sizes=[[32]], aspect_ratios=[[1.0]], strides=[4])
    assert gen.offset == get_cfg().MODEL.ANCHOR_GENERATOR.OFFSET == 0.0


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_equals_detectron2_default_anchor_generator_via_cfg(offset):
    shapes = [ShapeSpec(channels=2, stride=s) for s in STRIDES]
    ours_cfg, d2_cfg = _cfg(offset=offset), _cfg("DefaultAnchorGenerator", offset)
    # one key for both: Detectron2's height / width default, the model zoo's anchor order
    assert ours_cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS == d2_cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS == [[0.5, 1.0, 2.0]]
    ours = build_anchor_generator(ours_cfg, shapes)
    d2 = build_anchor_generator(d2_cfg, shapes)
    assert type(ours) is FPNAnchorGenerator and type(d2) is DefaultAnchorGenerator
    features = _features([(6, 5), (3, 3), (2, 2), (1, 1), (1, 1)])
    for ours_i, d2_i in zip(ours(features), d2(features)):
        torch.testing.assert_close(ours_i.tensor, d2_i.tensor, rtol=0, atol=0)


@pytest.mark.parametrize("offset", [0.0, 0.5])
@pytest.mark.parametrize("ratios", [[0.5, 1.0, 2.0], [0.25, 1.0, 4.0]])
def test_equals_detectron2_default_anchor_generator_via_kwargs(offset, ratios):
    ours = FPNAnchorGenerator(sizes=SIZES, aspect_ratios=[ratios], strides=STRIDES, offset=offset)
    d2 = DefaultAnchorGenerator(sizes=SIZES, aspect_ratios=[ratios], strides=STRIDES, offset=offset)
    features = _features([(4, 7), (2, 4), (1, 2), (1, 1), (1, 1)])
    for ours_i, d2_i in zip(ours(features), d2(features)):
        torch.testing.assert_close(ours_i.tensor, d2_i.tensor, rtol=0, atol=0)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("SIZES", [[32], [64]], "MODEL.ANCHOR_GENERATOR.SIZES has 2 lists but there are 5"),
        ("SIZES", [[32], [0], [128], [256], [512]], r"MODEL.ANCHOR_GENERATOR.SIZES\[1\]"),
        ("SIZES", [[-32]], r"MODEL.ANCHOR_GENERATOR.SIZES\[0\].*positive"),
        ("SIZES", [[32], [64], [128], [256], [512, 600]], "MODEL.ANCHOR_GENERATOR.SIZES x MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS"),
        ("ASPECT_RATIOS", [[]], r"MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS\[0\] is empty"),
        ("ASPECT_RATIOS", [], "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS must be a non-empty list"),
        ("ASPECT_RATIOS", [[1.0, -2.0]], r"MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS\[0\].*positive"),
        ("OFFSET", 1.0, r"MODEL.ANCHOR_GENERATOR.OFFSET must be in \[0, 1\)"),
    ],
)
def test_bad_config_raises_value_error_naming_the_key(key, value, match):
    cfg = _cfg()
    setattr(cfg.MODEL.ANCHOR_GENERATOR, key, value)
    with pytest.raises(ValueError, match=match):
        build_anchor_generator(cfg, [ShapeSpec(channels=2, stride=s) for s in STRIDES])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sizes=[[32], [64]], aspect_ratios=[[1.0]], strides=[4, 8, 16]), "sizes has 2 lists but there are 3"),
        (dict(sizes=[[32]], aspect_ratios=[[]], strides=[4]), r"ratios\[0\] is empty"),
        (dict(sizes=[[0.0]], aspect_ratios=[[1.0]], strides=[4]), r"sizes\[0\].*positive"),
    ],
)
def test_bad_kwargs_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FPNAnchorGenerator(**kwargs)


# ---------------------------------------------------------------- anchors per input size and device

TWO_LEVEL_STRIDES = [4, 8]


def _generators():
    ours = FPNAnchorGenerator(sizes=[[32], [64]], aspect_ratios=[[0.5, 1.0, 2.0]], strides=TWO_LEVEL_STRIDES)
    d2 = DefaultAnchorGenerator(sizes=[[32], [64]], aspect_ratios=[[0.5, 1.0, 2.0]], strides=TWO_LEVEL_STRIDES, offset=0.0)
    return ours, d2


def _maps(h, w, dtype=torch.float32):
    return [torch.zeros(1, 1, h, w, dtype=dtype), torch.zeros(1, 1, -(-h // 2), -(-w // 2), dtype=dtype)]


def test_anchors_equal_detectron2s_for_each_input_size_and_dtype():
    ours, d2 = _generators()
    for size in ((5, 7), (6, 3), (5, 7)):
        for a, b in zip(ours(_maps(*size)), d2(_maps(*size))):
            torch.testing.assert_close(a.tensor, b.tensor, rtol=0, atol=0)
    assert ours.state_dict() == {}  # the cell anchors are not saved, as in Detectron2
    ours.double()
    for a, b in zip(ours(_maps(5, 4)), d2(_maps(5, 4))):
        torch.testing.assert_close(a.tensor, b.tensor, rtol=0, atol=0)  # Boxes are float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_anchors_follow_the_module_to_cuda():
    ours, d2 = _generators()
    ours(_maps(4, 4))
    ours.cuda()
    anchors = ours([x.cuda() for x in _maps(4, 4)])
    assert all(a.tensor.is_cuda for a in anchors)
    for a, b in zip(anchors, d2(_maps(4, 4))):
        torch.testing.assert_close(a.tensor.cpu(), b.tensor, rtol=0, atol=0)
