#!/usr/bin/env python
"""
Export an fpn_rpn model (ProposalNetwork or GeneralizedRCNN with FPNRPN or CascadeRPN) to
TorchScript or ONNX, with the conventions of Detectron2's tools/deploy/export_model.py,
then check the exported model against the eager one on the sample image and on the same
image at another size.

    python tools/export_model.py --config-file configs/fpn_rpn_R_50_FPN_1x.yaml \\
        --format torchscript --export-method tracing --output output/export \\
        MODEL.WEIGHTS output/fpn_rpn_R_50_FPN_1x/model_final.pth MODEL.DEVICE cpu
    python tools/export_model.py --config-file configs/fpn_rpn_R_50_FPN_1x.yaml --format onnx \\
        --output output/export_onnx --opts MODEL.WEIGHTS output/fpn_rpn_R_50_FPN_1x/model_final.pth

Tracing exports ProposalNetwork and GeneralizedRCNN with FPNRPN or CascadeRPN; scripting
(TorchScript only) exports ProposalNetwork with FPNRPN. The traced model's outputs are
flattened tensors: the log prints the schema that turns them back into Instances. With
MODEL.WEIGHTS empty, the model is exported with its random initialisation. ONNX Runtime's
convolutions round differently from torch's (about 1e-6): an untrained model, whose scores
lie close together, can then swap a few neighbouring proposals.
"""
import argparse
import logging
import os

import torch

import fpn_rpn  # noqa: F401  (before detectron2)
from detectron2.modeling import build_model
from fpn_rpn import setup_cfg
from fpn_rpn.engine.checkpoint import CheckedCheckpointer
from fpn_rpn.errors import prepare_output_dir
from fpn_rpn.cli import ArgumentParser, run_cli
from fpn_rpn.export import EXPORT_FORMATS, EXPORT_METHODS, export_model, proposals_of, run_exported, sample_image

COCO_MINI_VAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "coco_mini", "val2017")

logger = logging.getLogger("export_model")


def default_sample_image():
    """The first coco_mini val image where ../shared/data/coco_mini exists, else None (a generated image)."""
    if os.path.isdir(COCO_MINI_VAL):
        names = sorted(n for n in os.listdir(COCO_MINI_VAL) if n.lower().endswith((".jpg", ".jpeg", ".png")))
        if names:
            return os.path.normpath(os.path.join(COCO_MINI_VAL, names[0]))
    return None


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to the model's config file")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="torchscript",
                        help="output format (default: %(default)s)")
    parser.add_argument("--export-method", choices=EXPORT_METHODS, default="tracing",
                        help="how the model is turned into a graph; ONNX needs tracing (default: %(default)s)")
    parser.add_argument("--sample-image", default=default_sample_image(), metavar="FILE",
                        help="image that tracing runs, resized as at test time (default: the first coco_mini val "
                             "image where ../shared/data/coco_mini exists, else a generated random image: "
                             "%(default)s)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for model.ts or model.onnx")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE",
                        help="config overrides, as KEY VALUE pairs (they may also follow the options)")
    parser.add_argument("trailing_opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides after the options, as Detectron2's tools take them")
    args = parser.parse_args(argv)
    if args.format == "onnx" and args.export_method != "tracing":
        parser.error("--format onnx needs --export-method tracing")
    args.opts = list(args.opts) + list(args.trailing_opts)
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prepare_output_dir(args.output, "--output")  # a file, or not writable: one line, before any work
    cfg = setup_cfg(args.config_file, args.opts)
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        CheckedCheckpointer(model, require_all=True).load(cfg.MODEL.WEIGHTS)
    else:
        logger.info("MODEL.WEIGHTS is empty: exporting the random initialisation")
    model.eval()
    image = sample_image(cfg, args.sample_image).to(cfg.MODEL.DEVICE)
    path, adapter = export_model(model, image, args.output, args.format, args.export_method)
    logger.info(f"exported {args.config_file} ({args.format}, {args.export_method}) to {path}")
    if adapter is not None:
        logger.info(f"inputs schema: {adapter.inputs_schema}")
        logger.info(f"outputs schema: {adapter.outputs_schema}")
    # the round trip: the sample image, and the same image at about 3/4 of its size
    h, w = image.shape[1:]
    smaller = torch.nn.functional.interpolate(image[None], size=(h * 3 // 4, w * 3 // 4), mode="bilinear")[0]
    for test_image in (image, smaller):
        with torch.no_grad():
            boxes, scores = proposals_of(model([{"image": test_image}]))
        exported_boxes, _ = run_exported(path, test_image, adapter)
        where = f"{tuple(test_image.shape[1:])} input: eager {len(boxes)} proposals, exported {len(exported_boxes)}"
        if exported_boxes.shape != boxes.shape:
            logger.info(f"{where}: they differ")
            continue
        off = (exported_boxes.to(boxes) - boxes).abs().amax(dim=1) if len(boxes) else boxes.new_zeros(0)
        logger.info(f"{where}, {int((off > 1e-4).sum())} of them more than 1e-4 px apart in the same order "
                    f"(max {off.max().item() if len(off) else 0.0:.2e})")
    return path


if __name__ == "__main__":
    run_cli(main)
