"""One recall table and two recall curves for several proposal sources on one dataset.

All numbers come from :mod:`fpn_rpn.evaluation.proposal_recall` (``evaluate_recall`` for the table,
``recall_curves`` for the curves), under one named definition at a time.
"""
import csv
import math
from typing import Collection, Dict, List, Mapping, Optional, Sequence

import numpy as np
from tabulate import tabulate

from ..evaluation.proposal_recall import (
    COCO_AREAS,
    COCO_IOU_THRESHOLDS,
    evaluate_recall,
    metric_name,
    recall_curves,
    results_key,
)
from .proposal_sources import SourceProposals

__all__ = [
    "DEFINITION_NAMES",
    "ar_vs_proposals",
    "budget_grid",
    "comparison_rows",
    "format_comparison_table",
    "recall_vs_iou",
    "write_csv",
]

DEFINITION_NAMES = {
    "d2": "Detectron2's proposal evaluation (images without proposals are skipped)",
    "coco": "pycocotools COCOeval with useCats=0 (every image counts)",
}
_ALL = {"all": COCO_AREAS["all"]}


def comparison_rows(
    gt_by_image,
    sources: Sequence[SourceProposals],
    budgets: Sequence[int],
    area_budgets: Sequence[int],
    definition: str,
    duplicates: Mapping[str, float],
    category_groups: Optional[Mapping[str, Collection[int]]] = None,
) -> List[dict]:
    """
    One row per source: "source", "AR@k" for each budget, "AR_s@k", "AR_m@k",
    "AR_l@k" for each area budget, "proposals/img", "dup/img" (``duplicates`` of the
    source's name: near-duplicate pairs per image, which do not depend on the
    definition) and "s/img" (NaN where unknown). The AR values are ``evaluate_recall``'s, fractions,
    NaN where no gt counts.

    With ``category_groups`` (name -> category ids), a "categories" column after "source",
    and rows for all gts ("all"), then each group's (only its gts, every proposal), each
    block one row per source.
    """
    all_budgets = sorted({int(k) for k in list(budgets) + list(area_budgets)})
    groups = [None] + list(category_groups or {})
    results = {source.name: evaluate_recall(gt_by_image, source.proposals, all_budgets, definitions=[definition],
                                            category_groups=category_groups)
               for source in sources}
    rows = []
    for group in groups:
        for source in sources:
            metrics = results[source.name][results_key(definition, group)]
            row = {"source": source.name}
            if category_groups:
                row["categories"] = group or "all"
            row.update({metric_name("all", k): metrics[metric_name("all", k)] for k in budgets})
            for k in area_budgets:
                for area in ("small", "medium", "large"):
                    row[metric_name(area, k)] = metrics[metric_name(area, k)]
            row["proposals/img"] = source.proposals_per_image
            row["dup/img"] = duplicates[source.name]
            row["s/img"] = source.seconds_per_image
            rows.append(row)
    return rows


def format_comparison_table(rows: List[dict], caption: str = "") -> str:
    """Markdown (pipe) table of :func:`comparison_rows`, with an optional caption line above."""
    if not rows:
        return caption
    headers = list(rows[0])
    body = []
    for row in rows:
        cells = []
        for key in headers:
            value = row[key]
            if isinstance(value, float) and math.isnan(value):
                cells.append("n/a")
            elif key == "proposals/img":
                cells.append(f"{value:.0f}")
            elif key == "dup/img":
                cells.append(f"{value:.1f}")
            elif key == "s/img":
                cells.append(f"{value:.3f}")
            elif isinstance(value, float):
                cells.append(f"{value:.4f}")
            else:
                cells.append(value)
        body.append(cells)
    table = tabulate(body, headers=headers, tablefmt="pipe", disable_numparse=True)
    return f"{caption}\n\n{table}" if caption else table


def write_csv(rows: List[dict], path: str, extra: Dict[str, str] = None) -> None:
    """The rows as CSV (full precision, empty cells for NaN), with ``extra`` columns first."""
    extra = extra or {}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if not rows:
            return
        writer.writerow(list(extra) + list(rows[0]))
        for row in rows:
            values = ["" if isinstance(v, float) and math.isnan(v) else v for v in row.values()]
            writer.writerow(list(extra.values()) + values)


def recall_vs_iou(
    gt_by_image, proposals, budget: int, iou_thresholds: Sequence[float], definition: str
) -> np.ndarray:
    """(T,) recall of all gts at each IoU threshold, with ``budget`` proposals per image."""
    recall, _ = recall_curves(gt_by_image, proposals, [budget], iou_thresholds, _ALL, definition)
    return recall[0, 0]


def ar_vs_proposals(gt_by_image, proposals, budgets: Sequence[int], definition: str) -> np.ndarray:
    """(K,) AR of all gts (IoU 0.50:0.05:0.95) at each budget, sorted ascending."""
    recall, _ = recall_curves(gt_by_image, proposals, budgets, COCO_IOU_THRESHOLDS, _ALL, definition)
    with np.errstate(invalid="ignore"):
        return recall[0].mean(axis=1)


def budget_grid(max_proposals: int) -> List[int]:
    """1, 2, 5, 10, 20, 50, ... below ``max_proposals``, then ``max_proposals`` itself."""
    grid = []
    for decade in range(int(math.log10(max(max_proposals, 1))) + 1):
        grid += [m * 10**decade for m in (1, 2, 5) if m * 10**decade < max_proposals]
    return grid + [max(int(max_proposals), 1)]
