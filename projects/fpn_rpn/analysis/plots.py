"""PNG plots of proposal recall and anchor coverage.

Figures are drawn with matplotlib's object API (``Figure``, which saves through the Agg
canvas), not pyplot, so that no global backend or figure state is touched.
"""
from typing import Dict, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure

from .anchor_analysis import SIZE_BUCKETS, GtAnchorMatches, level_counts

__all__ = ["plot_anchor_coverage", "plot_ar_vs_proposals", "plot_recall_vs_iou"]

# distinct line styles as well as colours, so that curves stay apart in greyscale too
_STYLES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
_DPI = 100


def _recall_ylim(ax, curves) -> None:
    # weak models stay near 0: fit the axis to the data, but never past 1
    values = np.concatenate([np.ravel(c) for c in curves] + [np.zeros(1)])
    top = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
    ax.set_ylim(0, min(1.0, max(0.05, 1.1 * top)))


def _finish(fig: Figure, ax, path: str, title: str, legend_title: str = None) -> None:
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, title=legend_title, title_fontsize=8, loc="best", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)


def plot_recall_vs_iou(
    thresholds: Sequence[float], curves: Dict[str, np.ndarray], path: str, title: str
) -> None:
    """Recall (y) against IoU threshold (x), one curve per label."""
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for n, (label, recall) in enumerate(curves.items()):
        ax.plot(thresholds, recall, _STYLES[n % len(_STYLES)], marker=_MARKERS[n % len(_MARKERS)],
                markersize=3, linewidth=1.6, label=label)
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel("recall")
    ax.set_xlim(min(thresholds), max(thresholds))
    _recall_ylim(ax, curves.values())
    _finish(fig, ax, path, title)


def plot_ar_vs_proposals(
    curves: Dict[str, Tuple[Sequence[int], np.ndarray]], path: str, title: str
) -> None:
    """AR (y) against proposals per image (x, log scale), one curve per label."""
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for n, (label, (budgets, ar)) in enumerate(curves.items()):
        ax.plot(budgets, ar, _STYLES[n % len(_STYLES)], marker=_MARKERS[n % len(_MARKERS)],
                markersize=3, linewidth=1.6, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("proposals per image")
    ax.set_ylabel("average recall (IoU 0.50:0.95)")
    _recall_ylim(ax, [ar for _, ar in curves.values()])
    _finish(fig, ax, path, title)


def plot_anchor_coverage(matches: GtAnchorMatches, path: str, title: str) -> None:
    """
    Left: histogram of each gt's best anchor IoU per size bucket, with the 0.5 and 0.7
    lines. Right: gts per level of their best anchor, stacked by bucket.
    """
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    buckets = matches.buckets
    bins = np.linspace(0, 1, 21)
    for name in SIZE_BUCKETS:
        values = matches.best_iou[buckets == name]
        left.hist(values, bins=bins, histtype="step", linewidth=1.8, label=f"{name} ({len(values)})")
    for t in (0.5, 0.7):
        left.axvline(t, color="grey", linestyle="--", linewidth=1)
    left.set_xlabel("best anchor IoU")
    left.set_ylabel("ground-truth boxes")
    left.legend(fontsize=8, title="size bucket (gts)", title_fontsize=8, loc="best")
    left.set_title("best anchor IoU per gt", fontsize=10)

    counts = level_counts(matches)
    x = np.arange(len(matches.level_names))
    bottom = np.zeros(len(x))
    for name in SIZE_BUCKETS:
        values = np.array([counts[name][level] for level in matches.level_names])
        right.bar(x, values, bottom=bottom, label=name)
        bottom += values
    right.set_xticks(x)
    right.set_xticklabels(matches.level_names)
    right.set_xlabel("level of the best anchor")
    right.set_ylabel("ground-truth boxes")
    right.legend(fontsize=8, title="size bucket", title_fontsize=8)
    right.set_title("level of the best anchor", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
