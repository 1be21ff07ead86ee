#!/usr/bin/env python
"""
Train and evaluate fpn_rpn (or Detectron2's stock RPN) proposal networks.

    python tools/train_net.py --config-file configs/fpn_rpn_R_50_FPN_1x.yaml --num-gpus 8
    python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth

Evaluation reports proposal recall (fpn_rpn.ProposalRecallEvaluator) and writes the
proposals as box_proposals.pkl (Detectron2's PROPOSAL_FILES format) in
OUTPUT_DIR/inference/<dataset>/. Without CUDA, ``--num-gpus N`` runs N CPU processes.
"""
import logging
import os

import torch

import fpn_rpn  # noqa: F401  (registers the components; must precede detectron2)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from fpn_rpn import ProposalRecallEvaluator, add_fpn_rpn_config, register_datasets
from fpn_rpn.config_checks import check_component_names
from fpn_rpn.launch import cpu_ddp_for_trainer, launch


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        with cpu_ddp_for_trainer():
            super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return ProposalRecallEvaluator(cfg, dataset_name, output_dir=output_folder, save_proposals=True)


def setup(args):
    cfg = get_cfg()
    add_fpn_rpn_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        # the configs target GPUs; this lets the same file run on a CPU-only machine
        cfg.MODEL.DEVICE = "cpu"
    check_component_names(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    # one process per machine generates the embedded dataset, if it is used, before the others read it
    if comm.get_local_rank() == 0:
        register_datasets(cfg)
    comm.synchronize()
    register_datasets(cfg)
    return cfg


def main(args):
    cfg = setup(args)
    if cfg.MODEL.DEVICE == "cpu":
        logging.getLogger("fpn_rpn").info("No CUDA device: training and evaluating on CPU")
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main():
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
