#!/usr/bin/env python
"""
The paired study of per-level vs cross-level NMS on one trained model (same weights).

    python tools/nms_study.py --config configs/fpn_rpn_EffLite0_FPN_coco_cpu.yaml \\
        --checkpoints 120=output/efflite0_coco_cpu/model_0000119.pth \\
                      480=output/efflite0_coco_cpu/model_final.pth \\
        --datasets coco_mini_val coco_extra_val --output-dir docs/nms_study

For the LAST checkpoint: both NMS modes at every --nms-threshs (at the config's
PRE_NMS_TOPK_TEST) and every --pre-nms-topks (at its NMS_THRESH), all from one network
pass per image; Selective Search, the bare anchors and --random-init-config untrained.
For every checkpoint: both modes at the config's settings, with cross-level minus
per-level AR and its bootstrap 95% interval over images. Under both recall definitions.
Writes OUTPUT_DIR/study.md, study.csv and ar_vs_proposals_<dataset>.png; proposals are
cached in --cache-dir.
"""
import argparse
import os
import sys
from pathlib import Path

import fpn_rpn  # noqa: F401  (before detectron2)
from fpn_rpn import setup_cfg
from fpn_rpn.analysis.nms_study import (
    default_pair,
    find,
    paired_cells,
    paired_rows,
    run_baselines,
    run_checkpoint,
    study_rows,
    variant_grid,
    ground_truth,
)
from fpn_rpn.analysis.paired_recall import pooled_ar
from fpn_rpn.analysis.plots import plot_ar_vs_proposals
from fpn_rpn.analysis.proposal_sources import get_dataset_dicts
from fpn_rpn.analysis.recall_comparison import format_comparison_table, write_csv
from fpn_rpn.errors import prepare_output_dir
from fpn_rpn.cli import ArgumentParser, positive_int, run_cli, unit_interval
from fpn_rpn.evaluation.proposal_recall import DEFAULT_BUDGETS

REPO = Path(__file__).resolve().parents[1]


def _max_side(text):
    return text if text == "test" else positive_int(text)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--config", required=True, help="the YAML config the checkpoints were trained with")
    add("--checkpoints", nargs="+", required=True, metavar="LABEL=WEIGHTS",
        help="checkpoints in training order, e.g. 480=output/efflite0_coco_cpu/model_final.pth; "
             "the sweeps run on the last one")
    add("--datasets", nargs="+", required=True, help="registered datasets to evaluate on, e.g. coco_mini_val coco_extra_val")
    add("--output-dir", required=True, help="folder for study.md, study.csv and the plots")
    add("--cache-dir", default=None, help="where computed proposals are cached, so a re-run is fast (default: OUTPUT_DIR/cache)")
    add("--nms-threshs", type=unit_interval, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9],
        help="NMS IoU sweep on the last checkpoint, both modes (default: 0.5 0.6 0.7 0.8 0.9)")
    add("--pre-nms-topks", type=positive_int, nargs="+", default=[250, 500, 1000, 2000],
        help="pre-NMS top-K per level sweep on the last checkpoint, both modes (default: 250 500 1000 2000)")
    add("--random-init-config", default=str(REPO / "configs" / "demo" / "fpn_rpn_R_18_GN_synthetic.yaml"),
        help="an untrained network for the table (random init), at the study config's input size and anchors; "
             "'none': no untrained row (default: configs/demo/fpn_rpn_R_18_GN_synthetic.yaml)")
    add("--max-images", type=positive_int, default=None, help="use only the first N images of each dataset (default: all)")
    add("--ss-max-side", type=_max_side, default=None,
        help="shrink images to this longer side for Selective Search (default: full size); "
             "'test': the config's INPUT.MAX_SIZE_TEST, the largest side the network sees")
    add("--opts", nargs="*", default=[], help="KEY VALUE pairs merged into every config, e.g. MODEL.DEVICE cpu")
    args = parser.parse_args(argv)
    try:
        args.checkpoints = [tuple(c.split("=", 1)) for c in args.checkpoints]
        assert all(len(c) == 2 and c[0] and c[1] for c in args.checkpoints)
    except AssertionError:
        parser.error(f"--checkpoints: expected LABEL=WEIGHTS, got {args.checkpoints}")
    return args


def study_dataset(args, dataset, out):
    budgets = list(DEFAULT_BUDGETS)
    base = setup_cfg(args.config, args.opts)
    thresh, topk = base.MODEL.RPN.NMS_THRESH, base.MODEL.RPN.PRE_NMS_TOPK_TEST
    dicts = get_dataset_dicts(dataset, args.max_images, [base])
    gt = ground_truth(dataset, dicts)
    cache = args.cache_dir or os.path.join(args.output_dir, "cache")
    final_label = args.checkpoints[-1][0]
    results = []
    for label, weights in args.checkpoints:
        grid = variant_grid(args.nms_threshs, args.pre_nms_topks, thresh, topk) if label == final_label \
            else list(default_pair(thresh, topk))
        cfgs = {v: setup_cfg(args.config, list(args.opts) + v.opts, weights) for v in grid}
        print(f"[nms_study] {dataset}, checkpoint {label}: {len(grid)} post-processings", file=sys.stderr)
        results += run_checkpoint(cfgs, dataset, dicts, gt, budgets, cache, label)
    same_input = ["INPUT.MIN_SIZE_TEST", base.INPUT.MIN_SIZE_TEST, "INPUT.MAX_SIZE_TEST", base.INPUT.MAX_SIZE_TEST,
                  "MODEL.ANCHOR_GENERATOR.SIZES", str(base.MODEL.ANCHOR_GENERATOR.SIZES)]
    random_cfg = None if args.random_init_config == "none" else setup_cfg(args.random_init_config, same_input)
    ss_max_side = base.INPUT.MAX_SIZE_TEST if args.ss_max_side == "test" else args.ss_max_side
    baselines = run_baselines(base, random_cfg, "R-18 GN FPN (random init)", dataset, dicts, gt, budgets, cache,
                              ss_max_side)
    cross, per = (find(results, final_label, v) for v in default_pair(thresh, topk))
    csv_rows = []
    for definition in ("d2", "coco"):
        out.append(f"\n### {dataset} ({len(dicts)} images), definition \"{definition}\"\n")
        main = study_rows([cross, per] + baselines, budgets, definition)
        main[0]["source"], main[1]["source"] = (f"checkpoint {final_label}, {r.variant.name}" for r in (cross, per))
        out += [f"Checkpoint {final_label}, NMS IoU {thresh:g}, pre-NMS top-K {topk} per level; "
                f"dup/img = pairs among the top {max(budgets)} with IoU > {thresh:g}.\n",
                format_comparison_table(main)]
        out += ["\nCross-level minus per-level, same weights, 95% bootstrap interval over images "
                "(2000 resamples):\n"]
        diffs = []
        for label, _ in args.checkpoints:
            c, p = (find(results, label, v) for v in default_pair(thresh, topk))
            for row in paired_rows(c, p, budgets, definition):
                diffs.append({"checkpoint": label, **row, "per-level dup/img": float(p.duplicates.mean())})
        out.append(format_comparison_table([paired_cells(r) for r in diffs]))
        sweeps = []
        for v_cross in variant_grid(args.nms_threshs, args.pre_nms_topks, thresh, topk):
            if v_cross.mode != "cross_level":
                continue
            c = find(results, final_label, v_cross)
            p = find(results, final_label, default_pair(v_cross.nms_thresh, v_cross.pre_nms_topk)[1])
            for row in paired_rows(c, p, [10, 100, 1000], definition):
                sweeps.append({"NMS IoU": f"{v_cross.nms_thresh:g}", "pre-NMS top-K": v_cross.pre_nms_topk, **row,
                               "cross dup/img": float(c.duplicates.mean()),
                               "per-level dup/img": float(p.duplicates.mean())})
        out += [f"\nSweeps on checkpoint {final_label} (NMS IoU at top-K {topk}; top-K at NMS IoU {thresh:g}):\n",
                format_comparison_table([paired_cells(r) for r in sweeps])]
        everything = study_rows([r for r in results if r.checkpoint == final_label] + baselines, budgets, definition)
        csv_rows += [dict(dataset=dataset, definition=definition, kind="sources", **r) for r in everything]
        csv_rows += [dict(dataset=dataset, definition=definition, kind="paired", **r) for r in diffs + sweeps]
    curves = {r.name: (budgets, [pooled_ar(r.counts["d2"], "all", k) for k in budgets])
              for r in [cross, per] + baselines}
    plot_ar_vs_proposals(curves, os.path.join(args.output_dir, f"ar_vs_proposals_{dataset}.png"),
                         f"AR vs proposals per image ({dataset}, d2 definition)")
    return csv_rows


def main(argv=None):
    args = parse_args(argv)
    prepare_output_dir(args.output_dir, "--output-dir")  # a file, or not writable: one line
    out = [f"# NMS study: {args.config}, checkpoints {', '.join(l for l, _ in args.checkpoints)}"]
    csv_rows = []
    for dataset in args.datasets:
        csv_rows += study_dataset(args, dataset, out)
        with open(os.path.join(args.output_dir, "study.md"), "w") as f:  # after each dataset: no lost work
            f.write("\n".join(out) + "\n")
    columns = list(dict.fromkeys(k for r in csv_rows for k in r))
    write_csv([{k: r.get(k, float("nan")) for k in columns} for r in csv_rows], os.path.join(args.output_dir, "study.csv"))
    print("\n".join(out))


if __name__ == "__main__":
    run_cli(main)
