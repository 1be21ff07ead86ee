"""How well a config's anchors cover a dataset's boxes, and anchor settings that cover more.

Coverage is measured the way the RPN labels anchors: each non-crowd ground-truth box,
scaled to the test resolution, against every anchor the config's generator places on
the padded input's feature maps (unclipped, as matching sees them). A gt with an anchor
at IoU >= 0.7 gets an ordinary positive; below that it only gets its best anchor as a
low-quality match.

Suggestions come from a greedy local search over the anchor sizes of each level and the
shared aspect ratios, maximising the gts at IoU >= 0.5 plus those at IoU >= 0.7 (then
the mean best IoU). It starts from the config, so it never lowers coverage on the
dataset it is run on; use a training split and check the suggestion on another.
The search computes each gt's best IoU in closed form: for an anchor shape, the best
location is the grid centre nearest to the gt's centre along each axis, because the
overlap along one axis only shrinks as the centres move apart.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.modeling import build_anchor_generator, build_backbone
from detectron2.structures import Boxes, BoxMode, pairwise_iou
from tqdm import tqdm

from ..errors import ConfigError
from ..modeling.anchor_generator import validate_anchor_params

__all__ = [
    "AnchorGrid",
    "GtAnchorMatches",
    "SIZE_BUCKETS",
    "anchor_config_lines",
    "anchor_params",
    "best_iou_closed_form",
    "coverage_rows",
    "gt_boxes",
    "input_size_at_test",
    "match_gts_to_anchors",
    "suggest_anchors",
    "with_anchor_params",
]

# COCO's small/medium/large on the box area in the original image, half-open so that
# each gt has one bucket (COCO's ranges are closed and share their ends).
SIZE_BUCKETS = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, math.inf)}
COVERAGE_THRESHOLDS = (0.5, 0.7)


def input_size_at_test(cfg, height: int, width: int) -> Tuple[int, int]:
    """(h, w) of an image after the test-time resize of ``cfg.INPUT`` (DatasetMapper's)."""
    return ResizeShortestEdge.get_output_shape(height, width, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)


class AnchorGrid:
    """
    The anchors a model config places on an input image: its anchor generator on the
    backbone's feature maps, whose sizes follow from the input padded to the
    backbone's ``size_divisibility`` and the feature strides.
    """

    def __init__(self, cfg):
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        self.level_names = list(cfg.MODEL.RPN.IN_FEATURES)
        self.strides = [shapes[f].stride for f in self.level_names]
        self.size_divisibility = max(backbone.size_divisibility, 1)
        self.generator = build_anchor_generator(cfg, [shapes[f] for f in self.level_names])

    @property
    def offset(self) -> float:
        return float(self.generator.offset)

    def cell_shapes(self) -> List[np.ndarray]:
        """(A, 2) widths and heights of the anchors of each level, in the generator's order."""
        return [
            (cell[:, 2:] - cell[:, :2]).numpy().astype(np.float64)
            for cell in self.generator.cell_anchors
        ]

    def feature_sizes(self, height: int, width: int) -> List[Tuple[int, int]]:
        """(Hi, Wi) of each level for an input of (height, width) before padding."""
        d = self.size_divisibility
        ph, pw = math.ceil(height / d) * d, math.ceil(width / d) * d
        return [(math.ceil(ph / s), math.ceil(pw / s)) for s in self.strides]

    def anchors(self, height: int, width: int) -> List[Boxes]:
        """Anchors of each level (Hi*Wi*A boxes, location-major) for an input (height, width)."""
        # the generator reads only the features' spatial sizes
        features = [torch.empty(1, 0, h, w) for h, w in self.feature_sizes(height, width)]
        with torch.no_grad():
            return self.generator(features)


@dataclass
class GtAnchorMatches:
    """
    Per non-crowd gt of a dataset (G of them), its best anchor. Arrays of length G:

    Attributes:
        image_ids: the gt's image.
        boxes: (G, 4) XYXY in the original image.
        areas: box area in the original image (bucketed by :data:`SIZE_BUCKETS`).
        scaled_boxes: (G, 4) XYXY at the test resolution.
        grid_sizes: (G, L, 2) the (Hi, Wi) of each level for the gt's image.
        best_iou: IoU of the best anchor.
        best_level: its level index (into ``level_names``).
        best_cell: its index among the level's cell anchors (size-major, then ratio).
        level_names: the L feature names.
    """

    image_ids: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray
    scaled_boxes: np.ndarray
    grid_sizes: np.ndarray
    best_iou: np.ndarray
    best_level: np.ndarray
    best_cell: np.ndarray
    level_names: List[str]

    @property
    def buckets(self) -> np.ndarray:
        out = np.empty(len(self.areas), dtype=object)
        for name, (lo, hi) in SIZE_BUCKETS.items():
            out[(self.areas >= lo) & (self.areas < hi)] = name
        return out


def gt_boxes(record: dict) -> np.ndarray:
    """(G, 4) float64 XYXY boxes of a dataset record's non-crowd annotations."""
    boxes = [
        BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)
        for a in record.get("annotations", [])
        if not a.get("iscrowd", 0)  # DatasetMapper drops crowd boxes before the RPN sees them
    ]
    return np.array(boxes, dtype=np.float64).reshape(-1, 4)


def match_gts_to_anchors(cfg, dataset_dicts: Sequence[dict], progress: bool = False) -> GtAnchorMatches:
    """The best anchor of every non-crowd gt of ``dataset_dicts`` under ``cfg``'s anchors."""
    grid = AnchorGrid(cfg)
    cols = {k: [] for k in ("image_ids", "boxes", "scaled", "grid", "iou", "level", "cell")}
    cells_per_level = [len(c) for c in grid.cell_shapes()]
    for record in tqdm(dataset_dicts, desc="anchor matching", unit="img", disable=not progress):
        boxes = gt_boxes(record)
        if len(boxes) == 0:
            continue
        h, w = input_size_at_test(cfg, record["height"], record["width"])
        # the resize scales x and y separately (ResizeTransform.apply_box)
        scale = np.array([w / record["width"], h / record["height"]] * 2)
        scaled = boxes * scale
        anchors = grid.anchors(h, w)
        iou = pairwise_iou(Boxes(torch.as_tensor(scaled, dtype=torch.float32)), Boxes.cat(anchors))
        best_iou, best = iou.max(dim=1)
        starts = np.cumsum([0] + [len(a) for a in anchors])
        level = np.searchsorted(starts, best.numpy(), side="right") - 1
        cell = (best.numpy() - starts[level]) % np.array(cells_per_level)[level]
        cols["image_ids"] += [record["image_id"]] * len(boxes)
        cols["boxes"].append(boxes)
        cols["scaled"].append(scaled)
        cols["grid"].append(np.broadcast_to(np.array(grid.feature_sizes(h, w)), (len(boxes), len(anchors), 2)))
        cols["iou"].append(best_iou.numpy().astype(np.float64))
        cols["level"].append(level)
        cols["cell"].append(cell)
    num_levels = len(grid.strides)

    def cat(values, shape, dtype):
        return np.concatenate(values).astype(dtype) if values else np.zeros(shape, dtype=dtype)

    boxes = cat(cols["boxes"], (0, 4), np.float64)
    return GtAnchorMatches(
        image_ids=np.array(cols["image_ids"], dtype=object),
        boxes=boxes,
        areas=(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        scaled_boxes=cat(cols["scaled"], (0, 4), np.float64),
        grid_sizes=cat(cols["grid"], (0, num_levels, 2), np.int64),
        best_iou=cat(cols["iou"], (0,), np.float64),
        best_level=cat(cols["level"], (0,), np.int64),
        best_cell=cat(cols["cell"], (0,), np.int64),
        level_names=grid.level_names,
    )


def coverage_rows(best_iou: np.ndarray, buckets: np.ndarray, thresholds=COVERAGE_THRESHOLDS) -> List[dict]:
    """
    One row per bucket and one for all gts: number of gts, share with a best anchor
    at IoU >= each threshold (NaN for an empty bucket), mean best IoU.
    """
    rows = []
    for name in list(SIZE_BUCKETS) + ["all"]:
        sel = np.ones(len(best_iou), dtype=bool) if name == "all" else buckets == name
        n = int(sel.sum())
        row = {"bucket": name, "gts": n}
        for t in thresholds:
            row[f"IoU>={t:g}"] = float((best_iou[sel] >= t).mean()) if n else math.nan
        row["mean best IoU"] = float(best_iou[sel].mean()) if n else math.nan
        rows.append(row)
    return rows


def best_iou_closed_form(
    boxes: np.ndarray, grid_hw: np.ndarray, stride: float, offset: float, shapes: np.ndarray
) -> np.ndarray:
    """
    Best IoU of each box with anchors of the given shapes on one level's grid.

    Args:
        boxes: (G, 4) XYXY at the input resolution.
        grid_hw: (G, 2) the level's (Hi, Wi) for each box's image.
        stride, offset: anchor centres are at ``(i + offset) * stride``, i < Wi (resp. Hi).
        shapes: (S, 2) anchor widths and heights.

    Returns:
        (G, S) the IoU with the anchor of each shape at the grid centre nearest to the
        box's centre, which is the best one (see the module docstring).
    """
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (G, 2) x, y
    sides = boxes[:, 2:] - boxes[:, :2]
    index = np.clip(np.rint(centres / stride - offset), 0, grid_hw[:, ::-1] - 1)
    anchor_centres = (index + offset) * stride  # (G, 2)
    half = shapes[None, :, :] / 2  # (1, S, 2)
    lo = np.maximum(boxes[:, None, :2], anchor_centres[:, None] - half)
    hi = np.minimum(boxes[:, None, 2:], anchor_centres[:, None] + half)
    inter = np.clip(hi - lo, 0, None).prod(axis=2)  # (G, S)
    union = sides.prod(axis=1)[:, None] + shapes.prod(axis=1)[None, :] - inter
    return inter / union


def anchor_params(cfg, num_levels: int) -> Tuple[List[List[float]], List[List[float]]]:
    """Sizes and aspect ratios (height / width) per level, as both anchor generators read them."""
    name = cfg.MODEL.ANCHOR_GENERATOR.NAME
    if name not in ("FPNAnchorGenerator", "DefaultAnchorGenerator"):
        raise ConfigError(
            f"Anchor analysis supports FPNAnchorGenerator and DefaultAnchorGenerator, not {name!r}"
        )
    generator = cfg.MODEL.ANCHOR_GENERATOR
    return validate_anchor_params(generator.SIZES, generator.ASPECT_RATIOS, num_levels, generator.OFFSET,
                                  "MODEL.ANCHOR_GENERATOR.SIZES", "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
                                  "MODEL.ANCHOR_GENERATOR.OFFSET")


def with_anchor_params(cfg, sizes: List[List[float]], ratios: List[float]):
    """A copy of ``cfg`` with these sizes per level and aspect ratios (height / width) for all levels."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [list(map(float, s)) for s in sizes]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [list(map(float, ratios))]
    cfg.freeze()
    return cfg


def _shapes(sizes: Sequence[float], ratios: Sequence[float]) -> np.ndarray:
    """(len(sizes) * len(ratios), 2) widths, heights: w = s/sqrt(a), h = s*sqrt(a) for a = h/w."""
    s, a = np.meshgrid(np.asarray(sizes, dtype=np.float64), np.asarray(ratios, dtype=np.float64), indexing="ij")
    return np.stack([s / np.sqrt(a), s * np.sqrt(a)], axis=-1).reshape(-1, 2)


def _score(best: np.ndarray) -> Tuple[int, float]:
    # gts at IoU >= 0.5 plus gts at IoU >= 0.7, then the mean best IoU to break ties
    covered = int(sum((best >= t).sum() for t in COVERAGE_THRESHOLDS))
    return covered, float(best.mean()) if len(best) else 0.0


def _moves(sizes: List[List[float]], ratios: List[float], step: float):
    """Candidate (sizes, ratios): one size, the sizes of all levels from one on, or one ratio, times step."""
    for level in range(len(sizes)):
        for j in range(len(sizes[level])):
            trial = [list(s) for s in sizes]
            trial[level][j] *= step
            yield trial, ratios
        # coupled moves: a single size cannot move past its neighbours' levels without them
        yield [list(s) if l < level else [v * step for v in s] for l, s in enumerate(sizes)], ratios
    for k in range(len(ratios)):
        trial = list(ratios)
        trial[k] *= step
        yield sizes, trial


def suggest_anchors(
    matches: GtAnchorMatches,
    strides: Sequence[float],
    offset: float,
    sizes: List[List[float]],
    ratios: List[float],
    max_sweeps: int = 10,
    steps: Sequence[float] = tuple(2.0 ** (m / 8) for m in range(-8, 9) if m != 0),
) -> Tuple[List[List[float]], List[float]]:
    """
    Sizes per level and shared ratios that raise coverage of ``matches``' gts.

    Greedy local search: each sweep tries, for every step factor, multiplying one
    size, all sizes from one level upwards (level 0: all sizes), or one ratio by it,
    and keeps a change when it scores better: more gts at IoU >= 0.5 plus gts at
    IoU >= 0.7, then a higher mean best IoU. It stops after a sweep without change.
    Sizes are rounded to 0.1 px and ratios to 0.001, so the result is what the YAML
    lines print.

    Args:
        matches: gts at the test resolution with their grid sizes (from
            :func:`match_gts_to_anchors`).
        strides, offset: of the anchor grid (:class:`AnchorGrid`).
        sizes: starting sizes, one list per level (same length on every level).
        ratios: starting aspect ratios (height / width), shared by all levels.

    Returns:
        (sizes, ratios) in the same layout.
    """
    boxes, grids = matches.scaled_boxes, matches.grid_sizes

    def score(sizes, ratios):
        best = np.zeros(len(boxes))
        for level, level_sizes in enumerate(sizes):
            if len(boxes):
                iou = best_iou_closed_form(boxes, grids[:, level], strides[level], offset, _shapes(level_sizes, ratios))
                best = np.maximum(best, iou.max(axis=1))
        return _score(best)

    sizes = [[round(float(v), 1) for v in s] for s in sizes]
    ratios = [round(float(r), 3) for r in ratios]
    best_score = score(sizes, ratios)
    for _ in range(max_sweeps):
        changed = False
        for step in steps:
            for trial_sizes, trial_ratios in _moves(sizes, ratios, step):
                trial_sizes = [[round(v, 1) for v in s] for s in trial_sizes]
                trial_ratios = [round(r, 3) for r in trial_ratios]
                if (trial_sizes, trial_ratios) == (sizes, ratios) or min(min(s) for s in trial_sizes) <= 0:
                    continue
                if len(set(trial_ratios)) < len(trial_ratios) or not all(1 / 16 <= r <= 16 for r in trial_ratios):
                    continue
                trial_score = score(trial_sizes, trial_ratios)
                if trial_score > best_score:
                    best_score, sizes, ratios, changed = trial_score, trial_sizes, trial_ratios, True
        if not changed:
            break
    return sizes, ratios


def anchor_config_lines(sizes: List[List[float]], ratios: List[float]) -> str:
    """YAML to paste into a config: the sizes, and the aspect ratios (height / width)."""
    sizes_yaml = "[" + ", ".join("[" + ", ".join(f"{s:g}" for s in level) + "]" for level in sizes) + "]"
    values = ", ".join(f"{r:g}" for r in ratios)
    return "\n".join(["MODEL:", "  ANCHOR_GENERATOR:", f"    SIZES: {sizes_yaml}",
                      f"    ASPECT_RATIOS: [[{values}]]  # height / width"])


def level_counts(matches: GtAnchorMatches) -> Dict[str, Dict[str, int]]:
    """bucket -> level name -> number of gts whose best anchor is on that level."""
    buckets = matches.buckets
    return {
        bucket: {
            name: int(((buckets == bucket) & (matches.best_level == l)).sum())
            for l, name in enumerate(matches.level_names)
        }
        for bucket in SIZE_BUCKETS
    }
