"""Per-image recall counts, and paired comparisons of two proposal sources with bootstrap
intervals over images.

A dataset's AR pools its images: recall at a threshold is (gts recovered) / (gts counted),
summed over images. Two post-processings of the same weights on the same images are
paired, so their difference is judged by resampling images (with replacement) and
recomputing both pooled ARs on each resample: the 2.5 and 97.5 percentiles of the
difference give a 95% interval.
"""
from typing import Dict, Mapping, Sequence, Tuple

import numpy as np

from ..evaluation.proposal_recall import COCO_AREAS, COCO_IOU_THRESHOLDS, check_budgets, recall_curves

__all__ = ["PerImageCounts", "per_image_counts", "pooled_ar", "paired_difference"]


class PerImageCounts:
    """
    recovered: (I, A, K, T) gts of each image recovered at each area, budget and IoU
    threshold; counted: (I, A) gts of each image that count (``recall_curves``'
    denominator). Images in the order of the proposals given.
    """

    def __init__(self, recovered: np.ndarray, counted: np.ndarray, budgets: Sequence[int], areas: Sequence[str]):
        self.recovered, self.counted = recovered, counted
        self.budgets, self.areas = list(budgets), list(areas)

    def ar(self, area: str = "all", budget: int = 100, images: np.ndarray = None) -> float:
        """Pooled AR (mean over thresholds), over ``images`` (indices, repeats allowed) or all."""
        return float(pooled_ar(self, area, budget, images))


def per_image_counts(
    gt_by_image: Mapping,
    proposals_by_image: Mapping,
    budgets: Sequence[int],
    definition: str,
    areas: Mapping[str, Tuple[float, float]] = COCO_AREAS,
) -> PerImageCounts:
    """:func:`recall_curves`' counts image by image (their sums are its pooled counts)."""
    budgets = check_budgets(budgets)
    recovered, counted = [], []
    for img_id, proposals in proposals_by_image.items():
        recall, num_gt = recall_curves(gt_by_image, {img_id: proposals}, budgets, COCO_IOU_THRESHOLDS, areas,
                                       definition)
        recovered.append(np.nan_to_num(recall) * num_gt[:, None, None])
        counted.append(num_gt)
    shape = (len(areas), len(budgets), len(COCO_IOU_THRESHOLDS))
    return PerImageCounts(
        np.asarray(recovered).reshape(-1, *shape), np.asarray(counted).reshape(-1, len(areas)), budgets, list(areas)
    )


def pooled_ar(counts: PerImageCounts, area: str, budget: int, images: np.ndarray = None) -> np.ndarray:
    """
    AR pooled over ``images``: an index array (I,) or a batch of resamples (B, I); all
    images if None. NaN where no gt counts.
    """
    a, k = counts.areas.index(area), counts.budgets.index(budget)
    recovered, counted = counts.recovered[:, a, k], counts.counted[:, a]  # (I, T), (I,)
    if images is not None:
        recovered, counted = recovered[images], counted[images]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (recovered.sum(axis=-2) / counted.sum(axis=-1)[..., None]).mean(axis=-1)


def paired_difference(
    a: PerImageCounts, b: PerImageCounts, area: str, budget: int, num_resamples: int = 2000, seed: int = 0
) -> Dict[str, float]:
    """
    AR of ``a`` minus AR of ``b`` on the same images, with a 95% bootstrap interval over
    images, and the number of images whose own recovered count differs.
    """
    if a.recovered.shape != b.recovered.shape or not np.array_equal(a.counted, b.counted):
        raise ValueError("paired sources must cover the same images with the same ground truth")
    rng = np.random.default_rng(seed)
    num_images = len(a.counted)
    resamples = rng.integers(0, num_images, size=(num_resamples, num_images))
    diffs = pooled_ar(a, area, budget, resamples) - pooled_ar(b, area, budget, resamples)
    ak, kk = a.areas.index(area), a.budgets.index(budget)
    differing = np.any(a.recovered[:, ak, kk] != b.recovered[:, ak, kk], axis=-1)
    low, high = np.nanpercentile(diffs, [2.5, 97.5])
    return {
        "difference": float(pooled_ar(a, area, budget) - pooled_ar(b, area, budget)),
        "ci_low": float(low),
        "ci_high": float(high),
        "images_differing": int(differing.sum()),
    }
