"""The paired study of post-processing on one set of weights: per-level vs cross-level
NMS, NMS IoU and the per-level pre-NMS top-K, beside Selective Search, the bare anchors
and an untrained network, at several checkpoints of one training run.

Every post-processing of a checkpoint comes from one network pass per image
(:func:`run_models_cached`); recall is counted image by image
(:func:`per_image_counts`), so that each cross-level minus per-level difference comes
with a bootstrap 95% interval over images (:func:`paired_difference`).
"""
import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..evaluation.duplicates import duplicates_per_image
from ..choices import NMS_MODES
from ..evaluation.proposal_recall import gt_from_coco, metric_name
from ..evaluation.recall_evaluator import load_coco_ground_truth
from .paired_recall import paired_difference, per_image_counts, pooled_ar
from .proposal_sources import anchor_proposals, cache_key, cached, run_models_cached, selective_search

__all__ = ["Variant", "variant_grid", "run_checkpoint", "run_baselines", "study_rows", "paired_rows", "paired_cells"]

AREA_BUDGETS = (100, 1000)


@dataclass(frozen=True)
class Variant:
    mode: str
    nms_thresh: float
    pre_nms_topk: int

    @property
    def opts(self) -> List:
        return ["MODEL.FPN_RPN.NMS_MODE", self.mode, "MODEL.RPN.NMS_THRESH", self.nms_thresh,
                "MODEL.RPN.PRE_NMS_TOPK_TEST", self.pre_nms_topk]

    @property
    def name(self) -> str:
        """The variant's row name in the study's tables and CSV files."""
        return f"{self.mode} NMS {self.nms_thresh:g} top-K {self.pre_nms_topk}"

    @classmethod
    def of_config(cls, cfg) -> "Variant":
        """The post-processing ``cfg`` itself sets: its NMS mode, NMS IoU and top-K at test."""
        return cls(cfg.MODEL.FPN_RPN.NMS_MODE, cfg.MODEL.RPN.NMS_THRESH, cfg.MODEL.RPN.PRE_NMS_TOPK_TEST)


def variant_grid(nms_threshs: Sequence[float], pre_nms_topks: Sequence[int], nms_thresh: float,
                 pre_nms_topk: int) -> List[Variant]:
    """Both modes at every NMS IoU (at ``pre_nms_topk``) and every top-K (at ``nms_thresh``)."""
    grid = [Variant(m, t, pre_nms_topk) for m, t in itertools.product(NMS_MODES, nms_threshs)]
    grid += [Variant(m, nms_thresh, k) for m, k in itertools.product(NMS_MODES, pre_nms_topks)]
    return list(dict.fromkeys(grid))


@dataclass
class SourceResult:
    """One row source: its per-image counts under each definition, duplicates, speed."""

    name: str
    counts: Dict[str, object]  # definition -> PerImageCounts
    duplicates: np.ndarray  # pairs per image
    seconds_per_image: float
    proposals_per_image: float
    variant: Optional[Variant] = None
    checkpoint: str = ""


def evaluate_source(name, proposals, seconds, gt, budgets, duplicate_iou, variant=None, checkpoint=""):
    """Counts under both definitions; duplicates at ``duplicate_iou`` (a variant: its own NMS IoU)."""
    counts = {d: per_image_counts(gt, proposals, sorted(set(budgets) | set(AREA_BUDGETS)), d) for d in ("d2", "coco")}
    dups = duplicates_per_image(proposals, duplicate_iou, max(budgets))
    per_image = float(np.mean([len(p["scores"]) for p in proposals.values()]))
    return SourceResult(name, counts, dups, seconds, per_image, variant, checkpoint)


def run_checkpoint(cfgs_by_variant: Dict[Variant, object], dataset_name, dataset_dicts, gt, budgets, cache_dir,
                   checkpoint: str, progress=True) -> List[SourceResult]:
    """Every variant of one checkpoint, from one network pass per image."""
    models = [(f"{checkpoint} {v.name}", cfg, False) for v, cfg in cfgs_by_variant.items()]
    found = run_models_cached(models, dataset_name, dataset_dicts, cache_dir, progress)
    return [
        evaluate_source(v.name, *found[name][:2], gt, budgets, v.nms_thresh, v, checkpoint)
        for (name, _, _), v in zip(models, cfgs_by_variant)
    ]


def run_baselines(anchor_cfg, random_cfg, random_name, dataset_name, dataset_dicts, gt, budgets, cache_dir,
                  ss_max_side=None, progress=True) -> List[SourceResult]:
    """
    Selective Search (fast, seeded), the bare anchors (random order) and an untrained
    network (none if ``random_cfg`` is None); their duplicates at ``anchor_cfg``'s NMS IoU.
    """
    iou = anchor_cfg.MODEL.RPN.NMS_THRESH
    key = cache_key("selective_search", dataset_name, dataset_dicts, mode="fast", max_side=ss_max_side, seed=0)
    ss, ss_seconds, _ = cached(cache_dir, "selective_search", key,
                               lambda: selective_search(dataset_dicts, ss_max_side, 0, progress))
    anchors, anchor_seconds = anchor_proposals(anchor_cfg, dataset_dicts, 0, progress)
    results = [
        evaluate_source("Selective Search (fast)", ss, ss_seconds, gt, budgets, iou),
        evaluate_source("anchors (random order)", anchors, anchor_seconds, gt, budgets, iou),
    ]
    if random_cfg is not None:
        untrained = run_models_cached([(random_name, random_cfg, True)], dataset_name, dataset_dicts, cache_dir,
                                      progress)
        results.append(evaluate_source(random_name, *untrained[random_name][:2], gt, budgets, iou))
    return results


def ground_truth(dataset_name, dataset_dicts):
    return gt_from_coco(load_coco_ground_truth(dataset_name), [d["image_id"] for d in dataset_dicts])


def study_rows(results: Sequence[SourceResult], budgets: Sequence[int], definition: str) -> List[dict]:
    """AR@k, AR_s/m/l at 100 and 1000, dup/img (mean and max) and s/img of each source."""
    rows = []
    for r in results:
        counts = r.counts[definition]
        row = {"source": r.name}
        row.update({metric_name("all", k): counts.ar("all", k) for k in budgets})
        for k in AREA_BUDGETS:
            row.update({metric_name(a, k): counts.ar(a, k) for a in ("small", "medium", "large")})
        row["proposals/img"] = r.proposals_per_image
        row["dup/img"] = float(r.duplicates.mean())
        row["s/img"] = r.seconds_per_image
        rows.append(row)
    return rows


def paired_rows(cross: SourceResult, per: SourceResult, budgets: Sequence[int], definition: str,
                area: str = "all") -> List[dict]:
    """Cross-level minus per-level AR at each budget, with 95% intervals over images."""
    rows = []
    for k in budgets:
        d = paired_difference(cross.counts[definition], per.counts[definition], area, k)
        rows.append({
            "budget": k, "cross": float(pooled_ar(cross.counts[definition], area, k)),
            "per-level": float(pooled_ar(per.counts[definition], area, k)),
            "difference": d["difference"], "ci_low": d["ci_low"], "ci_high": d["ci_high"],
            "images differing": d["images_differing"],
        })
    return rows


def paired_cells(row: dict) -> dict:
    """A :func:`paired_rows` row with the difference and its interval in one cell, for tables."""
    row = dict(row)
    low, high = row.pop("ci_low"), row.pop("ci_high")
    row["difference [95% interval]"] = f"{row.pop('difference'):+.4f} [{low:+.4f}, {high:+.4f}]"
    return row


def find(results: Sequence[SourceResult], checkpoint: str, variant: Variant) -> SourceResult:
    return next(r for r in results if r.variant == variant and r.checkpoint == checkpoint)


def default_pair(nms_thresh: float, pre_nms_topk: int) -> Tuple[Variant, Variant]:
    return Variant("cross_level", nms_thresh, pre_nms_topk), Variant("per_level", nms_thresh, pre_nms_topk)

