#!/usr/bin/env python
"""
Compare the proposal recall of models, proposal files and baselines on one dataset.

    python tools/compare_recall.py --dataset coco_mini_val --output-dir output/compare \\
        --model ours=configs/demo/fpn_rpn_R_18_GN_synthetic.yaml:output/demo/fpn_rpn/model_final.pth \\
        --proposals old=output/inference/coco_mini_val/box_proposals.pkl \\
        --selective-search --anchors anchors=configs/demo/fpn_rpn_R_18_GN_synthetic.yaml

Sources, in any number and order (the table keeps the command line's order):
  --model NAME=CONFIG[:WEIGHTS] [KEY VALUE ...]
                                 run a model (weights default to the config's MODEL.WEIGHTS),
                                 which must hold every parameter, as for train_net --eval-only;
                                 KEY VALUE pairs override that source's config (after --opts)
  --random-init NAME=CONFIG [KEY VALUE ...]
                                 run a model with random weights (an untrained baseline),
                                 marked "(random init)" in the table
  --proposals NAME=FILE          a Detectron2 proposal file (box_proposals.pkl)
  --selective-search [NAME]      OpenCV Selective Search, fast mode (opencv-contrib-python)
  --anchors [NAME=]CONFIG        the config's anchors, unregressed, in random order: AR at
                                 a budget >= the anchor count is the anchor set's upper bound

Models whose configs differ only in post-processing (MODEL.FPN_RPN.NMS_MODE,
MODEL.RPN.NMS_THRESH, top-K, score threshold, min size) and share their weights run the
network once per image; each post-processing then works on the same head outputs:

    --model per_level=CFG:W.pth --model cross=CFG:W.pth MODEL.FPN_RPN.NMS_MODE cross_level

With --category-groups NAME=CATEGORIES ..., the table also reports, for each group, the
recall of that group's boxes alone (every proposal a candidate), OLN's seen/novel split:

    --category-groups seen=voc novel=nonvoc animals=bird,cat,dog,18

CATEGORIES: comma-separated "all", "voc", "nonvoc", COCO names and COCO ids (see
fpn_rpn.data.categories); the dataset must number its categories as COCO does. The plots
show all boxes.

The "dup/img" column counts near-duplicates: pairs among each image's top
max(--budgets) proposals with IoU above --duplicate-iou (0.7, Detectron2's NMS
threshold). For an RPN with that NMS threshold these are pairs from different levels.

Writes OUTPUT_DIR/recall_table.{md,csv}, recall_vs_iou.png (recall at --budget against
the IoU threshold) and ar_vs_proposals.png (AR against proposals per image, log x).
Proposals of models and Selective Search are cached in OUTPUT_DIR/cache/, keyed by the
merged config, the weights file's mtime and size, the dataset and its image ids, so a
second run only re-evaluates and re-plots.
"""
import argparse
import os
import re
import sys

import numpy as np

import fpn_rpn  # noqa: F401  (before detectron2)
from fpn_rpn import setup_cfg
from fpn_rpn.data.categories import category_groups, check_coco_categories, describe
from fpn_rpn.errors import CheckpointError, ConfigError, prepare_output_dir
from fpn_rpn.cli import ArgumentParser, non_negative_int, positive_int, run_cli, unit_interval
from fpn_rpn.data.proposal_files import load_proposal_file
from fpn_rpn.evaluation.duplicates import duplicates_per_image
from fpn_rpn.evaluation.proposal_recall import COCO_IOU_THRESHOLDS, DEFAULT_BUDGETS, gt_from_coco
from fpn_rpn.evaluation.recall_evaluator import load_coco_ground_truth
from fpn_rpn.analysis.proposal_sources import (
    SourceProposals,
    anchor_proposals,
    cache_key,
    cached,
    get_dataset_dicts,
    run_models_cached,
    selective_search,
    split_config_and_weights,
)
from fpn_rpn.analysis.plots import plot_ar_vs_proposals, plot_recall_vs_iou
from fpn_rpn.analysis.recall_comparison import (
    DEFINITION_NAMES,
    ar_vs_proposals,
    budget_grid,
    comparison_rows,
    format_comparison_table,
    recall_vs_iou,
    write_csv,
)

# recall-vs-IoU curves: AR's thresholds 0.50:0.05:0.95 (even places), the midpoints, and 1.0
IOU_CURVE_THRESHOLDS = np.append(np.stack([COCO_IOU_THRESHOLDS, COCO_IOU_THRESHOLDS + 0.025], 1).ravel(), 1.0)


class _AddSource(argparse.Action):
    """
    Appends (kind, name, file, weights, opts) to args.sources, so that sources keep the
    command line's order; file is the config (models, anchors) or the proposal file, opts
    a model source's own KEY VALUE pairs.
    """

    def __call__(self, parser, namespace, value, option_string=None):
        try:
            source = _parse_source(self.const, value)
            source += (_source_opts(value) if self.const in ("model", "random_init") else [],)
        except ValueError as e:
            parser.error(f"argument {option_string}: {e}")
        namespace.sources = list(getattr(namespace, "sources", None) or []) + [source]


def _source_opts(value):
    """The KEY VALUE pairs after a model source's NAME=CONFIG (value is a list then)."""
    opts = value[1:]
    if len(opts) % 2:
        raise ValueError(f"expected KEY VALUE pairs after {value[0]}, got {' '.join(opts)}")
    return opts


def _parse_source(kind: str, value):
    if isinstance(value, list):  # a model source: NAME=CONFIG[:WEIGHTS] KEY VALUE ...
        value = value[0]
    if kind == "selective_search":  # without NAME, argparse passes const as the value
        return kind, value, None, None
    match = re.match(r"^([^=/\\]+)=(.+)$", value)
    name, spec = (match.group(1), match.group(2)) if match else (None, value)
    if kind == "anchors":
        return kind, name or "anchors", spec, None
    if name is None:
        raise ValueError(f"expected NAME={'FILE' if kind == 'proposals' else 'CONFIG'}..., got {value!r}")
    if kind == "proposals":
        return kind, name, spec, None
    config_file, weights = split_config_and_weights(spec)
    if kind == "random_init" and weights:
        raise ValueError(f"a random-init model takes no weights, got {value!r}")
    return kind, name, config_file, weights


def parse_args(argv=None):
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--model", action=_AddSource, const="model", nargs="+", metavar="NAME=CONFIG[:WEIGHTS] [KEY VALUE]",
        help="a trained model as a source named NAME: its YAML config, its weights after ':' (default: the "
             "config's MODEL.WEIGHTS), then KEY VALUE overrides for this source only; repeatable")
    add("--random-init", action=_AddSource, const="random_init", nargs="+", metavar="NAME=CONFIG [KEY VALUE]",
        help="the config's model with Detectron2's random initialisation (seed 0), a deliberate untrained "
             "baseline; repeatable")
    add("--proposals", action=_AddSource, const="proposals", metavar="NAME=FILE",
        help="a proposal file (Detectron2's PROPOSAL_FILES format, e.g. train_net.py's "
             "inference/<dataset>/box_proposals.pkl); repeatable")
    # without NAME, argparse passes const as the value: the name is then "selective_search"
    add("--selective-search", action=_AddSource, const="selective_search", nargs="?", metavar="NAME",
        help="OpenCV's Selective Search (fast mode) as a source, named NAME (default: selective_search)")
    add("--anchors", action=_AddSource, const="anchors", metavar="[NAME=]CONFIG",
        help="the bare anchors of the config's anchor generator, in random order, as a source")
    add("--dataset", required=True, help="a registered dataset, e.g. coco_mini_val, coco_2017_val")
    add("--max-images", type=positive_int, default=None, help="use only the dataset's first N images")
    add("--output-dir", required=True, help="where the table (recall_table.md), CSV, plots and proposal cache go")
    add("--budgets", type=positive_int, nargs="+", default=list(DEFAULT_BUDGETS), help="AR@k columns")
    add("--area-budgets", type=positive_int, nargs="+", default=[100, 1000],
        help="budgets of the small/medium/large columns")
    add("--budget", type=positive_int, default=100, help="proposals per image of the recall-vs-IoU plot")
    add("--definition", choices=["d2", "coco", "both"], default="d2",
        help="recall definition of the table and plots (see fpn_rpn.evaluation.proposal_recall)")
    add("--ss-max-side", type=positive_int, default=None,
        help="shrink images to this longer side before Selective Search (faster, lower recall)")
    add("--seed", type=non_negative_int, default=0, help="seed of Selective Search's and the anchors' ranking")
    add("--category-groups", type=_category_group, nargs="+", default=[], metavar="NAME=CATEGORIES",
        help="also the recall of each group's boxes alone, e.g. seen=voc novel=nonvoc pets=cat,dog")
    add("--duplicate-iou", type=unit_interval, default=0.7,
        help="IoU above which two proposals of an image count as near-duplicates (dup/img column)")
    add("--no-cache", action="store_true", help="recompute every source")
    add("--opts", nargs="*", default=[], help="KEY VALUE pairs merged into every model and anchor config")
    args = parser.parse_args(argv)
    args.sources = getattr(args, "sources", None) or []
    if not args.sources:
        parser.error("give at least one source: --model, --random-init, --proposals, --selective-search or --anchors")
    names = [name for _, name, *_ in args.sources]
    if len(set(names)) < len(names):
        parser.error(f"source names must differ, got {names}")
    try:
        args.category_groups = category_groups(args.category_groups, "--category-groups")
    except ConfigError as e:
        parser.error(str(e))
    return args


def _category_group(text: str):
    """ "NAME=a,b,18" -> [NAME, ["a", "b", 18]]: digits are COCO ids, other items names or sets."""
    name, equals, spec = text.partition("=")
    if not equals or not spec:
        raise argparse.ArgumentTypeError(f"expected NAME=CATEGORIES, got {text!r}")
    return [name, [int(item) if item.strip().isdigit() else item.strip() for item in spec.split(",")]]


def parse_sources(args):
    """[(kind, name, config or None, value)] with model and anchor configs loaded."""
    parsed = []
    for kind, name, path, weights, opts in args.sources:
        cfg = None
        if kind in ("model", "random_init", "anchors"):
            cfg = setup_cfg(path, list(args.opts) + opts, weights)
        if kind == "model" and not cfg.MODEL.WEIGHTS:
            raise CheckpointError(
                f"--model {name}: no weights (none after '{path}:' and no MODEL.WEIGHTS in it); "
                f"give {name}={path}:WEIGHTS, or --random-init {name}={path} for an untrained baseline"
            )
        parsed.append((kind, name, cfg, path))
    return parsed


def load_sources(args, parsed, dataset_dicts):
    cache_dir = None if args.no_cache else os.path.join(args.output_dir, "cache")
    models = run_models_cached(
        [(name, cfg, kind == "random_init") for kind, name, cfg, _ in parsed if kind in ("model", "random_init")],
        args.dataset, dataset_dicts, cache_dir, progress=True,
    )
    sources = []
    for kind, name, cfg, value in parsed:
        if kind in ("model", "random_init"):
            random_init = kind == "random_init"
            proposals, seconds, hit = models[name]
            info = {"config": value, "weights": "random init" if random_init else cfg.MODEL.WEIGHTS, "cached": hit}
            name += " (random init)" if random_init else ""
        elif kind == "proposals":
            proposals, seconds = load_proposal_file(value, dataset_dicts, args.dataset), float("nan")
            info = {"file": value}
        elif kind == "selective_search":
            key = cache_key("selective_search", args.dataset, dataset_dicts,
                            mode="fast", max_side=args.ss_max_side, seed=args.seed)
            proposals, seconds, hit = cached(
                cache_dir, name, key,
                lambda: selective_search(dataset_dicts, args.ss_max_side, args.seed, progress=True),
            )
            info = {"mode": "fast", "max_side": args.ss_max_side, "cached": hit}
        else:  # anchors: a few ms per image, so never cached
            proposals, seconds = anchor_proposals(cfg, dataset_dicts, args.seed, progress=True)
            info = {"config": value, "ranking": f"random, seed {args.seed}"}
        sources.append(SourceProposals(name, proposals, seconds, info))
        print(f"[compare_recall] {name}: {sources[-1].proposals_per_image:.0f} proposals/image ({info})",
              file=sys.stderr)
    return sources


def main(argv=None):
    args = parse_args(argv)
    prepare_output_dir(args.output_dir, "--output-dir")  # a file, or not writable: one line, before any work
    parsed = parse_sources(args)
    cfgs = [cfg for _, _, cfg, _ in parsed if cfg is not None]
    dataset_dicts = get_dataset_dicts(args.dataset, args.max_images, cfgs)
    sources = load_sources(args, parsed, dataset_dicts)
    coco_api = load_coco_ground_truth(args.dataset)
    if args.category_groups:
        check_coco_categories({c["id"]: c["name"] for c in coco_api.dataset["categories"]}, args.dataset,
                              "--category-groups")
    gt = gt_from_coco(coco_api, [d["image_id"] for d in dataset_dicts])

    definitions = ["d2", "coco"] if args.definition == "both" else [args.definition]
    duplicates = {s.name: float(duplicates_per_image(s.proposals, args.duplicate_iou, max(args.budgets)).mean())
                  for s in sources}
    markdown, csv_rows = [], []
    for definition in definitions:
        rows = comparison_rows(gt, sources, args.budgets, args.area_budgets, definition, duplicates,
                               args.category_groups)
        caption = (
            f"Proposal recall on {args.dataset} ({len(dataset_dicts)} images), definition "
            f"\"{definition}\": {DEFINITION_NAMES[definition]}. AR = mean recall over IoU "
            "0.50:0.05:0.95, as a fraction; AR_s/m/l by COCO area; dup/img = pairs among the top "
            f"{max(args.budgets)} with IoU > {args.duplicate_iou}; s/img = time to compute "
            "one image's proposals, image reading excluded (n/a for files)."
        )
        if args.category_groups:
            caption += " categories = the boxes counted as ground truth (all, or one group's; every proposal " \
                "counts): " + "; ".join(f"{name} = {describe(ids)}" for name, ids in args.category_groups.items())
        markdown.append(format_comparison_table(rows, caption))
        csv_rows += [dict(definition=definition, **row) for row in rows]
    text = "\n\n".join(markdown)
    print(text)
    with open(os.path.join(args.output_dir, "recall_table.md"), "w") as f:
        f.write(text + "\n")
    write_csv(csv_rows, os.path.join(args.output_dir, "recall_table.csv"))

    for definition in definitions:
        suffix = "" if len(definitions) == 1 else f"_{definition}"
        iou_curves, ar_curves = {}, {}
        for source in sources:
            recall = recall_vs_iou(gt, source.proposals, args.budget, IOU_CURVE_THRESHOLDS, definition)
            ar = recall[:-1:2].mean()  # at AR's thresholds: evaluate_recall's AR@budget
            iou_curves[f"{source.name} (AR@{args.budget} {ar:.3f})"] = recall
            max_count = max((len(p["scores"]) for p in source.proposals.values()), default=1)
            budgets = budget_grid(max_count)
            ar_curves[f"{source.name} ({source.proposals_per_image:.0f}/img)"] = (
                budgets, ar_vs_proposals(gt, source.proposals, budgets, definition)
            )
        where = f"{args.dataset}, {len(dataset_dicts)} images, definition {definition}"
        paths = [os.path.join(args.output_dir, f"recall_vs_iou{suffix}.png"),
                 os.path.join(args.output_dir, f"ar_vs_proposals{suffix}.png")]
        plot_recall_vs_iou(IOU_CURVE_THRESHOLDS, iou_curves, paths[0],
                           f"Recall at {args.budget} proposals per image ({where})")
        plot_ar_vs_proposals(ar_curves, paths[1], f"AR vs number of proposals ({where})")
        print("\n".join(f"[compare_recall] wrote {p}" for p in paths), file=sys.stderr)
    return csv_rows


if __name__ == "__main__":
    run_cli(main)
