"""Cascade RPN's stage-1 assignment on hand-made boxes. Regions are worked out in the
comments: a box (x1, y1, x2, y2) on a map of stride s is f = box / s; its centre region
(ratio 0.2) runs from round(0.6 f1 + 0.4 f2) to round(0.4 f1 + 0.6 f2), its ignore region
(ratio 0.5) from round(0.75 f1 + 0.25 f2) to round(0.25 f1 + 0.75 f2), in cells, borders in."""
import fpn_rpn  # noqa: F401  # before detectron2

import torch

from fpn_rpn import FPNAnchorGenerator
from fpn_rpn.modeling.region_assignment import assign_by_region, target_levels

STRIDES = [4, 8]


def _anchors(sizes):
    """One 8 x stride square anchor per location (offset 0: centres at j * stride) on maps of ``sizes``."""
    generator = FPNAnchorGenerator(sizes=[[32], [64]], aspect_ratios=[[1.0]], strides=STRIDES, offset=0.0)
    return [b.tensor for b in generator([torch.zeros(1, 1, h, w) for h, w in sizes])]


def _grid(h, w, *rects):
    """An (h*w,) label map, 0 but for the (value, lo, hi) squares [lo, hi]^2 painted in order."""
    grid = torch.zeros(h, w, dtype=torch.int64)
    for value, lo, hi in rects:
        grid[lo:hi + 1, lo:hi + 1] = value
    return grid.flatten()


def test_target_levels_by_scale():
    # level = floor(log2(scale / 32) + 0.5), clamped to [0, 1]: 45 -> 0 (0.49 + 0.5), 46 -> 1 (0.52 + 0.5)
    boxes = torch.tensor([[0.0, 0, 16, 16], [0, 0, 45, 45], [0, 0, 46, 46], [0, 0, 64, 64], [0, 0, 900, 900]])
    assert target_levels(boxes, 32.0, 2).tolist() == [0, 0, 1, 1, 1]


def test_one_box_centre_ignore_and_adjacent_level():
    # A = (4, 4, 36, 36): scale 32 -> level 0. Level 0: f = (1, 1, 9, 9): centre [4, 6], ignore [3, 7].
    # Level 1 (adjacent): f = (0.5, 0.5, 4.5, 4.5): ignore round(1.5) = 2 to round(3.5) = 4, i.e. [2, 3] on 4 x 4.
    anchors = _anchors([(8, 8), (4, 4)])
    labels, matched = assign_by_region(anchors, torch.tensor([[4.0, 4.0, 36.0, 36.0]]), STRIDES, 32.0)
    expected = torch.cat((_grid(8, 8, (-1, 3, 7), (1, 4, 6)), _grid(4, 4, (-1, 2, 4))))
    assert labels.tolist() == expected.tolist()
    assert matched.tolist() == [0] * len(expected)


def test_a_later_box_takes_the_anchors_of_its_ignore_region():
    # B = (12, 12, 44, 44), level 0, after A: f = (3, 3, 11, 11): centre round(6.2) = 6 to round(7.8) = 8,
    # ignore 5 to 9 (the 8 x 8 map ends at 7). B decides [5, 7]^2: its own positives [6, 7]^2, the
    # rest ignored; A keeps the positives of [4, 6]^2 outside [5, 7]^2.
    anchors = _anchors([(8, 8), (4, 4)])
    gt = torch.tensor([[4.0, 4.0, 36.0, 36.0], [12.0, 12.0, 44.0, 44.0]])
    labels, matched = assign_by_region(anchors, gt, STRIDES, 32.0)
    level0 = labels[:64].view(8, 8)
    positives = {(i, j): int(matched[i * 8 + j]) for i, j in (level0 == 1).nonzero().tolist()}
    assert positives == {(4, 4): 0, (4, 5): 0, (4, 6): 0, (5, 4): 0, (6, 4): 0,
                         (6, 6): 1, (6, 7): 1, (7, 6): 1, (7, 7): 1}
    assert level0[5, 5] == level0[5, 6] == level0[6, 5] == -1  # A's positives inside B's ignore region


def test_adjacent_level_ignores_override_positives():
    # Maps 16 x 16 and 8 x 8. A as above (level 0). C = (0, 0, 64, 64): scale 64 -> level 1, f = (0, 0, 8, 8):
    # centre round(3.2) = 3 to round(4.8) = 5, ignore [2, 6]. On level 0, f = (0, 0, 16, 16): C's ignore
    # [4, 12] covers all of A's positives [4, 6]^2, which become ignored. On level 1, A's ignore region
    # [2, 4] (f = (0.5, 0.5, 4.5, 4.5)) removes C's positives in [3, 4]^2.
    anchors = _anchors([(16, 16), (8, 8)])
    gt = torch.tensor([[4.0, 4.0, 36.0, 36.0], [0.0, 0.0, 64.0, 64.0]])
    labels, matched = assign_by_region(anchors, gt, STRIDES, 32.0)
    assert labels[:256].tolist() == _grid(16, 16, (-1, 3, 7), (-1, 4, 12)).tolist()
    level1 = labels[256:].view(8, 8)
    assert sorted(map(tuple, (level1 == 1).nonzero().tolist())) == [(3, 5), (4, 5), (5, 3), (5, 4), (5, 5)]
    assert (matched[256:][level1.flatten() == 1] == 1).all()
    expected_ignored = _grid(8, 8, (-1, 2, 6)).view(8, 8).eq(-1) & level1.ne(1)
    assert level1.eq(-1).tolist() == expected_ignored.tolist()


def test_no_boxes_all_negative():
    anchors = _anchors([(8, 8), (4, 4)])
    labels, matched = assign_by_region(anchors, torch.zeros(0, 4), STRIDES, 32.0)
    assert labels.tolist() == [0] * 80 and matched.tolist() == [0] * 80
