#!/usr/bin/env python
"""
How well a config's anchors cover a dataset's ground truth, and anchor sizes/ratios
that cover more.

    python tools/analyze_anchors.py --config configs/demo/fpn_rpn_R_18_GN_synthetic.yaml \\
        --dataset coco_mini_train --output-dir output/anchors

For each non-crowd gt (scaled to the config's test resolution) the best IoU with any
anchor and that anchor's level; the share of gts with an anchor at IoU >= 0.5 and
>= 0.7 per COCO size bucket (box area in the original image); a histogram
(anchor_coverage.png) and per-gt CSV (anchor_coverage.csv); then suggested
MODEL.ANCHOR_GENERATOR.SIZES and ratios (greedy search on this dataset, see
fpn_rpn.analysis.anchor_analysis) as YAML lines, with the coverage they give. Suggest on a
training split and check on another (--check-dataset).
"""
import argparse
import csv
import os

from tabulate import tabulate

import fpn_rpn  # noqa: F401  (before detectron2)
from fpn_rpn import setup_cfg
from fpn_rpn.analysis.anchor_analysis import (
    AnchorGrid,
    anchor_config_lines,
    anchor_params,
    coverage_rows,
    level_counts,
    match_gts_to_anchors,
    suggest_anchors,
    with_anchor_params,
)
from fpn_rpn.analysis.plots import plot_anchor_coverage
from fpn_rpn.analysis.proposal_sources import get_dataset_dicts
from fpn_rpn.errors import prepare_output_dir
from fpn_rpn.cli import ArgumentParser, positive_int, run_cli


def parse_args(argv=None):
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="config whose anchor generator and test resize are used")
    parser.add_argument("--dataset", required=True, help="registered dataset whose ground truth is measured, e.g. coco_mini_train")
    parser.add_argument("--max-images", type=positive_int, default=None, help="use only the first N images (default: all)")
    parser.add_argument("--check-dataset", help="also report the suggestion's coverage on this registered dataset (a held-out split)")
    parser.add_argument("--output-dir", required=True, help="folder for anchor_coverage.png and anchor_coverage.csv")
    parser.add_argument("--sizes-per-level", type=positive_int, default=None,
                        help="start the search from N sizes per level, s * 2**(j/N) for the level's first size s "
                             "(RetinaNet-style octave scales; more anchors per location)")
    parser.add_argument("--no-suggest", action="store_true", help="only report the config's coverage; skip the search for better sizes/ratios")
    parser.add_argument("--opts", nargs="*", default=[], help="KEY VALUE pairs merged into the config, e.g. MODEL.ANCHOR_GENERATOR.SIZES \"[[24],[48],[96],[192],[384]]\"")
    return parser.parse_args(argv)


def coverage_table(matches) -> str:
    rows = coverage_rows(matches.best_iou, matches.buckets)
    return tabulate([list(r.values()) for r in rows], headers=list(rows[0]), tablefmt="pipe", floatfmt=".3f")


def main(argv=None):
    args = parse_args(argv)
    prepare_output_dir(args.output_dir, "--output-dir")  # a file, or not writable: one line, before any work
    cfg = setup_cfg(args.config, args.opts)
    dataset_dicts = get_dataset_dicts(args.dataset, args.max_images, [cfg])

    matches = match_gts_to_anchors(cfg, dataset_dicts, progress=True)
    where = f"{args.dataset}, {len(dataset_dicts)} images, {len(matches.best_iou)} non-crowd gts"
    print(f"## Anchor coverage of {args.config} ({where})\n")
    print("Share of gts whose best anchor (test resolution) has IoU >= 0.5 / 0.7:\n")
    print(coverage_table(matches))
    counts = level_counts(matches)
    print("\nGts per level of their best anchor:\n")
    print(tabulate([[b] + list(c.values()) for b, c in counts.items()],
                   headers=["bucket"] + matches.level_names, tablefmt="pipe"))

    csv_path = os.path.join(args.output_dir, "anchor_coverage.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "x0", "y0", "x1", "y1", "bucket", "best_iou", "best_level", "best_cell_anchor"])
        for i in range(len(matches.best_iou)):
            writer.writerow([matches.image_ids[i], *matches.boxes[i].round(2).tolist(), matches.buckets[i],
                             f"{matches.best_iou[i]:.4f}", matches.level_names[matches.best_level[i]],
                             matches.best_cell[i]])
    png_path = os.path.join(args.output_dir, "anchor_coverage.png")
    plot_anchor_coverage(matches, png_path, f"Anchors of {os.path.basename(args.config)} on {where}")
    print(f"\nwrote {csv_path}\nwrote {png_path}")
    if args.no_suggest:
        return matches, None

    grid = AnchorGrid(cfg)
    sizes, ratios = anchor_params(cfg, len(grid.strides))
    if args.sizes_per_level:
        sizes = [[level[0] * 2 ** (j / args.sizes_per_level) for j in range(args.sizes_per_level)] for level in sizes]
    new_sizes, new_ratios = suggest_anchors(matches, grid.strides, grid.offset, sizes, ratios[0])
    yaml = anchor_config_lines(new_sizes, new_ratios)
    new_cfg = with_anchor_params(cfg, new_sizes, new_ratios)
    suggested = match_gts_to_anchors(new_cfg, dataset_dicts, progress=True)
    print(f"\n## Suggested anchors (greedy search on {args.dataset})\n\n```yaml\n{yaml}\n```\n")
    print("Coverage with the suggestion:\n")
    print(coverage_table(suggested))
    with open(os.path.join(args.output_dir, "suggested_anchors.yaml"), "w") as f:
        f.write(yaml + "\n")
    if args.check_dataset:
        check_dicts = get_dataset_dicts(args.check_dataset, args.max_images, [cfg])
        for name, c in (("config", cfg), ("suggestion", new_cfg)):
            print(f"\nCoverage of the {name} on {args.check_dataset}:\n")
            print(coverage_table(match_gts_to_anchors(c, check_dicts, progress=True)))
    return matches, suggested


if __name__ == "__main__":
    run_cli(main)
