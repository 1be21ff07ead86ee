#!/usr/bin/env python
"""
Draw the top proposals of a model or a proposal file, coloured by FPN level, with their
scores and the ground truth, over a dataset's first images; one PNG per image.

    python tools/visualize_proposals.py --dataset coco_mini_val --num-images 4 --top 20 \\
        --model configs/demo/fpn_rpn_R_18_GN_synthetic.yaml:output/demo/fpn_rpn/model_final.pth \\
        --output-dir output/vis
    python tools/visualize_proposals.py --dataset coco_mini_val \\
        --proposals output/inference/coco_mini_val/box_proposals.pkl --output-dir output/vis

Levels (--level-rule): "fpn" is FPN's assignment k = floor(4 + log2(sqrt(wh) / 224))
clamped to P2..P6, on the box at the network's input resolution (the config's test
resize; the original image for a proposal file without --config); "anchor" is the level
whose anchor sizes are nearest to the box's size, which needs a config.
"""
import argparse
import os

from tqdm import tqdm

import fpn_rpn  # noqa: F401  (before detectron2)
from detectron2.data.detection_utils import read_image
from fpn_rpn import setup_cfg
from fpn_rpn.analysis.anchor_analysis import anchor_params, gt_boxes, input_size_at_test
from fpn_rpn.analysis.proposal_drawing import anchor_size_levels, draw_proposals, fpn_levels
from fpn_rpn.data.proposal_files import load_proposal_file
from fpn_rpn.analysis.proposal_sources import (
    get_dataset_dicts,
    run_model,
    split_config_and_weights,
)
from fpn_rpn.errors import prepare_output_dir
from fpn_rpn.cli import ArgumentParser, positive_int, run_cli


def _model_spec(text):
    try:
        return split_config_and_weights(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None):
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=_model_spec, metavar="CONFIG[:WEIGHTS]",
                        help="run this model (weights default to the config's MODEL.WEIGHTS and must hold every parameter)")
    source.add_argument("--proposals", metavar="FILE", help="a Detectron2 proposal file, e.g. the box_proposals.pkl of train_net.py --eval-only")
    parser.add_argument("--config", help="with --proposals: the config whose test resize and anchors set the levels")
    parser.add_argument("--dataset", required=True, help="registered dataset whose first images are drawn, e.g. coco_mini_val")
    parser.add_argument("--num-images", type=positive_int, default=4, help="images drawn, from the first (default: %(default)s)")
    parser.add_argument("--top", type=positive_int, default=20, help="proposals drawn per image, highest scores first (default: %(default)s)")
    parser.add_argument("--level-rule", choices=["fpn", "anchor"], default="fpn",
                        help="how a box's FPN level (its colour) is chosen; see below (default: %(default)s)")
    parser.add_argument("--output-dir", required=True, help="folder for the PNGs, one per image")
    parser.add_argument("--opts", nargs="*", default=[], help="KEY VALUE pairs merged into the config, e.g. MODEL.RPN.NMS_THRESH 0.5")
    args = parser.parse_args(argv)
    if args.level_rule == "anchor" and not (args.model or args.config):
        parser.error("--level-rule anchor needs the anchor sizes: give --model, or --config with --proposals")
    return args


def main(argv=None):
    args = parse_args(argv)
    prepare_output_dir(args.output_dir, "--output-dir")  # a file, or not writable: one line, before any work
    cfg = None
    if args.model:
        config_file, weights = args.model
        cfg = setup_cfg(config_file, args.opts, weights)
    elif args.config:
        cfg = setup_cfg(args.config, args.opts)
    dataset_dicts = get_dataset_dicts(args.dataset, args.num_images, [cfg] if cfg is not None else ())
    if args.model:
        proposals, _ = run_model(cfg, dataset_dicts, progress=True)
    else:
        proposals = load_proposal_file(args.proposals, dataset_dicts, args.dataset)

    for record in tqdm(dataset_dicts, desc="drawing", unit="img"):
        image = read_image(record["file_name"], format="RGB")
        height, width = image.shape[:2]
        # level rules are defined on the network's input, not the original image
        scale = input_size_at_test(cfg, height, width)[0] / height if cfg is not None else 1.0
        p = proposals[record["image_id"]]
        if args.level_rule == "fpn":
            levels, names = fpn_levels(p["boxes"], scale)
        else:
            sizes, _ = anchor_params(cfg, len(cfg.MODEL.RPN.IN_FEATURES))
            levels, names = anchor_size_levels(p["boxes"], sizes, cfg.MODEL.RPN.IN_FEATURES, scale)
        canvas = draw_proposals(image, p["boxes"], p["scores"], levels, names, gt_boxes(record), args.top,
                                title=f"top {args.top} of {len(p['scores'])}")
        stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
        path = os.path.join(args.output_dir, f"{stem}.png")
        canvas.save(path)
        tqdm.write(f"[visualize_proposals] wrote {path}")


if __name__ == "__main__":
    run_cli(main)
