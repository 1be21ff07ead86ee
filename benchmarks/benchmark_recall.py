#!/usr/bin/env python
"""
Time fpn_rpn's proposal-recall scoring on synthetic data.

Scores the default case, 5000 images x 1000 proposals with about 7 gts each, under
both definitions ("d2" and "coco"), every budget (10..1000) and area (all/s/m/l),
and prints the seconds taken. The data are generated from --seed, so a run is
repeatable: gts of log-uniform size (all three area ranges occur, 1% crowd), and per
image 30% of the proposals jittered around the gts, the rest random boxes, with
random scores.

    python benchmarks/benchmark_recall.py [--images 5000] [--proposals 1000] [--gts 7]
"""
import argparse
import time

import numpy as np

from fpn_rpn.cli import ArgumentParser, non_negative_int, positive_float, positive_int
from fpn_rpn.evaluation.proposal_recall import DEFAULT_BUDGETS, evaluate_recall, format_recall_table

IMAGE_W, IMAGE_H = 640, 480


def _random_xyxy(rng, n, min_side, max_side):
    wh = np.exp(rng.uniform(np.log(min_side), np.log(max_side), (n, 2)))
    xy = rng.uniform(0, 1, (n, 2)) * (np.array([IMAGE_W, IMAGE_H]) - wh)
    return np.concatenate([xy, xy + wh], axis=1)


def make_synthetic(num_images, num_proposals, gts_per_image, seed=0, jittered_fraction=0.3):
    """gt_by_image and proposals_by_image in the form evaluate_recall takes."""
    rng = np.random.default_rng(seed)
    gt_by_image, proposals_by_image = {}, {}
    for img_id in range(num_images):
        num_gt = max(1, rng.poisson(gts_per_image))
        gt = _random_xyxy(rng, num_gt, 8, 400)
        gt_by_image[img_id] = {
            "boxes": gt,
            "areas": (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]),
            "iscrowd": rng.random(num_gt) < 0.01,
        }
        num_jittered = int(num_proposals * jittered_fraction)
        src = gt[rng.integers(0, num_gt, num_jittered)]
        wh = src[:, 2:] - src[:, :2]
        ctr = (src[:, :2] + src[:, 2:]) / 2 + rng.normal(0, 0.1, (num_jittered, 2)) * wh
        wh = wh * np.exp(rng.normal(0, 0.15, (num_jittered, 2)))
        jittered = np.concatenate([ctr - wh / 2, ctr + wh / 2], axis=1)
        boxes = np.concatenate([jittered, _random_xyxy(rng, num_proposals - num_jittered, 8, 480)])
        boxes = np.clip(boxes, 0, [IMAGE_W, IMAGE_H, IMAGE_W, IMAGE_H]).astype(np.float32)
        proposals_by_image[img_id] = {
            "boxes": boxes,
            "scores": rng.random(num_proposals).astype(np.float32),
        }
    return gt_by_image, proposals_by_image


def main():
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example (the figure in docs/performance.md):\n"
               "    python benchmarks/benchmark_recall.py --images 5000 --proposals 1000 --gts 7",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", type=positive_int, default=5000, help="synthetic images to score (default: %(default)s)")
    parser.add_argument("--proposals", type=positive_int, default=1000, help="proposals per image (default: %(default)s)")
    parser.add_argument("--gts", type=positive_float, default=7.0, help="mean ground-truth boxes per image (default: %(default)s)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the generated boxes and scores (default: %(default)s)")
    args = parser.parse_args()

    gt, proposals = make_synthetic(args.images, args.proposals, args.gts, args.seed)
    num_gt = sum(len(g["areas"]) for g in gt.values())
    start = time.perf_counter()
    results = evaluate_recall(gt, proposals, DEFAULT_BUDGETS)
    seconds = time.perf_counter() - start
    print(format_recall_table(results, DEFAULT_BUDGETS))
    print(
        f"Scored {args.images} images x {args.proposals} proposals ({num_gt} gts), "
        f"definitions d2 + coco, {len(DEFAULT_BUDGETS)} budgets, 4 areas: {seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
