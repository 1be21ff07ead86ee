#!/usr/bin/env python
"""
Train and evaluate fpn_rpn from a LazyConfig file, the counterpart of tools/train_net.py:

    python tools/lazyconfig_train_net.py --config-file configs/lazy/fpn_rpn_R_50_FPN_1x.py --num-gpus 8
    python tools/lazyconfig_train_net.py --config-file CONFIG --eval-only train.init_checkpoint=model_final.pth

Overrides are ``key=value`` (``LazyConfig.apply_overrides``); COCO-format datasets are
registered with ``datasets.register_coco="[['name', 'ann.json', 'images/']]"``. Evaluation uses the config's
``dataloader.evaluator`` (fpn_rpn's ProposalRecallEvaluator in configs/lazy/) every
``train.eval_period`` iterations, at the end, and with ``--eval-only``. The config keys are
those of Detectron2's ``configs/common/train.py``, as for Detectron2's own
tools/lazyconfig_train_net.py, which runs these configs as well. LazyConfig needs a
Detectron2 that ships its LazyConfig files (one built from the official sources); on
others the run stops with one line saying so.

As with tools/train_net.py, a fault stops the run with one line on stderr and exit status 1:
an override of a key the config lacks (with the closest existing key; ``+key=value`` adds
one), ``--eval-only`` without ``train.init_checkpoint``, and a checkpoint that cannot be used
(fpn_rpn.engine.checkpoint: a start that supplies under half of the backbone needs
``train.allow_partial_backbone_weights=True``), a ``train.output_dir`` that is a file or cannot be
written, a ``train.device`` this machine lacks, and faults of the machine (a full disk, a
``--dist-url`` port in use). Logged tracebacks go to the log file only. Ctrl-C stops with the
iteration to resume from.
"""
import functools
import logging
import os

import fpn_rpn  # noqa: F401  (registers the components; must precede detectron2)
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
)
from fpn_rpn.engine.hooks import EvalHook
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from fpn_rpn import add_fpn_rpn_config, register_datasets
from fpn_rpn.engine.checkpoint import CheckedCheckpointer
from fpn_rpn.config_checks import check_device
from fpn_rpn.engine.lazy_overrides import apply_overrides
from fpn_rpn.engine.launch import create_ddp_model, launch
from fpn_rpn.errors import Interrupted, os_faults, prepare_output_dir
from fpn_rpn.cli import run_cli, tracebacks_to_log_only

logger = logging.getLogger("fpn_rpn")


# keys this tool reads beyond Detectron2's configs/common/train.py, with their defaults
TOOL_KEYS = {"train.allow_partial_backbone_weights": False}


def load_config(config_file: str, opts):
    """The LazyConfig ``config_file`` with ``key=value`` overrides applied, each key checked
    (:func:`fpn_rpn.engine.lazy_overrides.apply_overrides`)."""
    cfg = LazyConfig.load(config_file)
    for key, default in TOOL_KEYS.items():
        group, name = key.rsplit(".", 1)
        if group in cfg and name not in cfg[group]:
            cfg[group][name] = default
    return apply_overrides(cfg, opts, f" (in {config_file})")


def checkpointer(cfg, model, **kwargs):
    """fpn_rpn's checked loader, naming this tool's keys in its messages."""
    return CheckedCheckpointer(model, cfg.train.output_dir, weights_key="train.init_checkpoint",
                               allow_key="train.allow_partial_backbone_weights",
                               allow_partial_backbone=cfg.train.get("allow_partial_backbone_weights", False),
                               **kwargs)


def register(cfg) -> None:
    """fpn_rpn's dataset names (coco_mini_*, fpn_rpn_synthetic_*, ...) and the COCO-format
    datasets listed in ``datasets.register_coco``, as train_net.py's DATASETS.REGISTER_COCO."""
    yaml_cfg = add_fpn_rpn_config(get_cfg())
    yaml_cfg.DATASETS.REGISTER_COCO = [list(entry) for entry in cfg.get("datasets", {}).get("register_coco", [])]
    register_datasets(yaml_cfg)


def do_test(cfg, model):
    """Recall of ``model`` on ``dataloader.test``, by ``dataloader.evaluator``."""
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


def do_train(cfg, resume: bool):
    model = instantiate(cfg.model).to(cfg.train.device)
    logger.info("Model:\n%s", model)
    cfg.optimizer.params.model = model  # get_default_optimizer_params reads the model
    optimizer = instantiate(cfg.optimizer)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer_class = AMPTrainer if cfg.train.amp.enabled else SimpleTrainer
    trainer = trainer_class(model, instantiate(cfg.dataloader.train), optimizer)
    checkpoints = checkpointer(cfg, model, trainer=trainer)
    main_process = comm.is_main_process()
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpoints, **cfg.train.checkpointer) if main_process else None,
        EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if main_process else None,
    ])
    checkpoints.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    # the checkpoint holds the iteration that just finished
    start_iter = trainer.iter + 1 if resume and checkpoints.has_checkpoint() else 0
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except KeyboardInterrupt as e:
        raise Interrupted(f"interrupted at iteration {trainer.iter}; continue with --resume") from e
    return trainer.storage.latest()


def main(args):
    cfg = _checked_config(args)
    with os_faults(cfg.train.output_dir):
        default_setup(cfg, args)
        tracebacks_to_log_only()  # Detectron2's "Exception during training:" traceback in log.txt only
        register(cfg)
        if not args.eval_only:
            return do_train(cfg, args.resume)
        model = instantiate(cfg.model).to(cfg.train.device)
        # every parameter from the file: an empty train.init_checkpoint would evaluate a random model
        checkpointer(cfg, model, require_all=True).resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
        return do_test(cfg, create_ddp_model(model))


def _checked_config(args):
    """The config, with its output folder created and writable and its device present."""
    cfg = load_config(args.config_file, args.opts)
    prepare_output_dir(cfg.train.output_dir, "train.output_dir")
    check_device(cfg.train.device, "train.device")
    return cfg


def _load_and_launch(args):
    _checked_config(args)  # a config that cannot load or run stops here, before any process starts
    return launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                  dist_url=args.dist_url, args=(args,))


EPILOG = """
Without a GPU, --num-gpus N runs N CPU processes joined with gloo. key=value pairs after the
options override the config (train.output_dir, train.max_iter, train.init_checkpoint, ...).

examples:
  train the LazyConfig twin of the Lite0 CPU config:
    python tools/lazyconfig_train_net.py --config-file configs/lazy/fpn_rpn_EffLite0_FPN_coco_cpu.py train.output_dir=output/lazy
  proposal recall of trained weights:
    python tools/lazyconfig_train_net.py --config-file configs/lazy/fpn_rpn_EffLite0_FPN_coco_cpu.py --eval-only \\
        train.init_checkpoint=output/lazy/model_final.pth train.output_dir=output/lazy_eval
"""


def invoke_main():
    args = default_argument_parser(epilog=EPILOG).parse_args()
    run_cli(functools.partial(_load_and_launch, args), os.path.basename(__file__))


if __name__ == "__main__":
    invoke_main()
