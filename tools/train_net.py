#!/usr/bin/env python
"""
Train and evaluate fpn_rpn (or Detectron2's stock RPN) proposal networks.

    python tools/train_net.py --config-file configs/fpn_rpn_R_50_FPN_1x.yaml --num-gpus 8
    python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth

Evaluation reports proposal recall (fpn_rpn.ProposalRecallEvaluator) and writes the
proposals as box_proposals.pkl (Detectron2's PROPOSAL_FILES format) in
OUTPUT_DIR/inference/<dataset>/. Without CUDA, ``--num-gpus N`` runs N CPU processes.

Bad data, configs and checkpoints, diverged training, faults of the machine (a full disk,
an OUTPUT_DIR that cannot be written, a --dist-url port in use) and a failed process of a
multi-process run stop the run with one line on stderr naming the file, record, key or port
and the fault, and exit status 1; the traceback goes to OUTPUT_DIR/log.txt only. Ctrl-C
stops with "interrupted at iteration N; continue with --resume" and exit status 130.
"""
import contextlib
import functools
import logging
import os
import traceback
import weakref

import fpn_rpn  # noqa: F401  (registers the components; must precede detectron2)
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from fpn_rpn import ProposalRecallEvaluator, register_datasets, setup_cfg
from fpn_rpn.config import check_cfg
from fpn_rpn.engine.checkpoint import CheckedCheckpointer
from fpn_rpn.data.coco_checks import CheckedDatasetMapper
from fpn_rpn.data.proposal_files import check_proposal_files
from fpn_rpn.cli import error_line, run_cli, tracebacks_to_log_only  # noqa: F401  (error_line: for tests)
from fpn_rpn.errors import ConfigError, Interrupted, os_faults, prepare_output_dir  # noqa: F401  (ConfigError: for tests)
from fpn_rpn.data.build import check_datasets, dataset_assertions, loader_worker_deaths, train_dataset_dicts
from fpn_rpn.engine.hooks import no_eval_after_failure
from fpn_rpn.engine.launch import cpu_ddp_for_trainer, launch


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        with cpu_ddp_for_trainer():
            super().__init__(cfg)

    def build_hooks(self):
        # DefaultTrainer.__init__ makes its checkpointer just before its hooks: replaced
        # here, the periodic checkpointer hook saves through the checked one too
        self.checkpointer = CheckedCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
            allow_partial_backbone=self.cfg.MODEL.FPN_RPN.ALLOW_PARTIAL_BACKBONE_WEIGHTS)
        # no final evaluation after a failed last iteration: with several processes it would hang
        return no_eval_after_failure(super().build_hooks())

    def run_step(self):
        try:
            super().run_step()
        except FloatingPointError as e:
            if "iteration" in str(e):  # Detectron2's loss check names it
                raise
            raise FloatingPointError(f"{e} (iteration {self.iter})") from e

    @classmethod
    def build_train_loader(cls, cfg):
        with dataset_assertions(cfg):
            # the records with DATASETS.TRAIN_CATEGORIES applied
            return build_detection_train_loader(cfg, mapper=CheckedDatasetMapper(cfg, is_train=True),
                                                dataset=train_dataset_dicts(cfg))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        with dataset_assertions(cfg):
            return build_detection_test_loader(cfg, dataset_name, mapper=CheckedDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return ProposalRecallEvaluator(cfg, dataset_name, output_dir=output_folder, save_proposals=True)


def setup(args):
    # a file that cannot be read ends with one line only: there is no OUTPUT_DIR for a log yet
    cfg = setup_cfg(args.config_file, args.opts, check=False)
    # nor when OUTPUT_DIR is a file or cannot be written
    prepare_output_dir(cfg.OUTPUT_DIR, "OUTPUT_DIR")
    with traceback_in_log(cfg.OUTPUT_DIR), os_faults(cfg.OUTPUT_DIR):
        default_setup(cfg, args)  # log.txt, with the config and environment, before any check
        # fpn_rpn's messages (such as dataset repairs) on the console and in log.txt, like Detectron2's;
        # still passed on to the root logger's handlers, which setup_logger would cut off
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="fpn_rpn")
        logging.getLogger("fpn_rpn").propagate = True
        # logged tracebacks (Detectron2's "Exception during training:") in log.txt, not on the console
        tracebacks_to_log_only()
        check_cfg(cfg)
        register_datasets(cfg)
        splits = ("TEST",) if args.eval_only else ("TRAIN", "TEST")
        check_datasets(cfg, splits)
        if cfg.MODEL.LOAD_PROPOSALS:
            check_proposal_files(cfg, splits)
    return cfg


@contextlib.contextmanager
def traceback_in_log(output_dir):
    """Append the traceback of an exception to log.txt (log.txt.rankN), for bug reports; the
    terminal gets one line from run_cli for a CLEAR_ERRORS fault."""
    try:
        yield
    except Exception:
        rank = comm.get_rank()
        try:
            with open(os.path.join(output_dir, "log.txt" + (f".rank{rank}" if rank else "")), "a") as f:
                traceback.print_exc(file=f)
        except OSError:  # a full disk: the fault being reported is likely this one
            pass
        raise


def main(args):
    cfg = setup(args)
    with traceback_in_log(cfg.OUTPUT_DIR), os_faults(cfg.OUTPUT_DIR), loader_worker_deaths():
        return _run(cfg, args)


def _run(cfg, args):
    if cfg.MODEL.DEVICE == "cpu":
        logging.getLogger("fpn_rpn").info("No CUDA device: training and evaluating on CPU")
    if args.eval_only:
        model = Trainer.build_model(cfg)
        CheckedCheckpointer(model, save_dir=cfg.OUTPUT_DIR, require_all=True).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    try:
        return trainer.train()
    except KeyboardInterrupt as e:  # Ctrl-C: the hooks' after_train has run; the checkpoints stay
        raise Interrupted(f"interrupted at iteration {trainer.iter}; continue with --resume") from e


EPILOG = """
Without a GPU, --num-gpus N runs N CPU processes joined with gloo. KEY VALUE pairs after the
options override the config (MODEL.WEIGHTS, OUTPUT_DIR, SOLVER.MAX_ITER, ...).

examples:
  train the long CPU config on coco_mini (checkpoints, log.txt and metrics in OUTPUT_DIR):
    python tools/train_net.py --config-file configs/fpn_rpn_EffLite0_FPN_coco_cpu_long.yaml OUTPUT_DIR output/long
  continue that run from its last checkpoint after a stop:
    python tools/train_net.py --config-file configs/fpn_rpn_EffLite0_FPN_coco_cpu_long.yaml --resume OUTPUT_DIR output/long
  proposal recall (AR@k, small/medium/large) of trained weights:
    python tools/train_net.py --config-file configs/fpn_rpn_EffLite0_FPN_coco_cpu_long.yaml --eval-only \\
        MODEL.WEIGHTS output/long/model_final.pth OUTPUT_DIR output/long_eval
  8 GPUs on one machine:
    python tools/train_net.py --config-file configs/fpn_rpn_R_50_FPN_1x.yaml --num-gpus 8
"""


def invoke_main():
    parser = default_argument_parser(epilog=EPILOG)
    args = parser.parse_args()
    print("Command Line Args:", args)
    run_cli(
        functools.partial(launch, main, args.num_gpus, num_machines=args.num_machines,
                          machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,)),
        parser.prog,
    )


if __name__ == "__main__":
    invoke_main()
