"""tools/train_net.py end to end on a few coco_mini images: training lowers the RPN losses,
--eval-only equals Detectron2's COCOEvaluator, --resume continues at the checkpoint's
iteration, and a 2-process CPU run trains on both ranks and gathers its evaluation."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import fpn_rpn  # noqa: F401  # before detectron2
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, inference_on_dataset

from conftest import REPO, load_tool

TRAIN_NET = REPO / "tools" / "train_net.py"
CONFIG = REPO / "configs" / "demo" / "fpn_rpn_R_18_GN_synthetic.yaml"
MAX_ITER = 30


def _subset(coco_mini, split, num_images, out):
    """A COCO json of the first ``num_images`` images of a coco_mini split (images stay in place)."""
    data = json.loads((coco_mini / "annotations" / f"instances_{split}2017.json").read_text())
    data["images"] = sorted(data["images"], key=lambda im: im["id"])[:num_images]
    ids = {im["id"] for im in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    out.write_text(json.dumps(data))
    return [str(out), str(coco_mini / f"{split}2017")]


@pytest.fixture(scope="module")
def opts(coco_mini, tmp_path_factory):
    root = tmp_path_factory.mktemp("subsets")
    register = [
        ["tn_mini_train", *_subset(coco_mini, "train", 12, root / "train.json")],
        ["tn_mini_val", *_subset(coco_mini, "val", 8, root / "val.json")],
    ]
    return [
        "DATASETS.REGISTER_COCO", repr(register),
        "DATASETS.TRAIN", "('tn_mini_train',)", "DATASETS.TEST", "('tn_mini_val',)",
        "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", "256",
        "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "256",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "5",
        "SOLVER.STEPS", "()", "DATALOADER.NUM_WORKERS", "0", "SEED", "1",
    ]  # fmt: skip


def _train(output_dir, opts, *extra, max_iter=MAX_ITER):
    cmd = [sys.executable, str(TRAIN_NET), "--config-file", str(CONFIG), *extra]
    cmd += opts + ["SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD", "10",
                   "OUTPUT_DIR", str(output_dir)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two ranks on two cores
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def _metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(opts, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("train")
    _train(output_dir, opts)
    return output_dir


def test_training_lowers_rpn_losses(trained):
    losses = [m for m in _metrics(trained) if "loss_rpn_cls" in m]
    assert [m["iteration"] for m in losses] == [19, MAX_ITER - 1]  # Detectron2 writes every 20 and at the end
    first, last = losses[0], losses[-1]
    assert last["loss_rpn_cls"] < first["loss_rpn_cls"]
    assert last["loss_rpn_cls"] + last["loss_rpn_loc"] < first["loss_rpn_cls"] + first["loss_rpn_loc"]
    assert (trained / "model_final.pth").is_file()


def test_eval_only_equals_coco_evaluator(trained, opts, tmp_path):
    train_net = load_tool("train_net")
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", str(CONFIG), "--eval-only"]
        + opts + ["MODEL.WEIGHTS", str(trained / "model_final.pth"), "OUTPUT_DIR", str(tmp_path)]
    )
    ours = train_net.main(args)["recall_d2"]
    assert (tmp_path / "inference" / "tn_mini_val" / "box_proposals.pkl").is_file()

    cfg = train_net.setup(args)
    model = train_net.Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    evaluator = COCOEvaluator("tn_mini_val", output_dir=str(tmp_path / "coco"))
    theirs = inference_on_dataset(model, build_detection_test_loader(cfg, "tn_mini_val"), evaluator)
    theirs = theirs["box_proposals"]  # percent
    assert ours["AR@100"] > 0
    for budget in (100, 1000):
        for area, suffix in (("", ""), ("_s", "s"), ("_m", "m"), ("_l", "l")):
            expected = theirs[f"AR{suffix}@{budget}"] / 100.0
            assert ours[f"AR{area}@{budget}"] == pytest.approx(expected, abs=1e-6), (area, budget)


def test_resume_continues_at_checkpoint_iteration(trained, opts, tmp_path):
    # as if the run had been stopped after its second checkpoint (iteration 19)
    output_dir = tmp_path / "resumed"
    shutil.copytree(trained, output_dir)
    (output_dir / "model_final.pth").unlink()
    (output_dir / "model_0000029.pth").unlink(missing_ok=True)
    (output_dir / "last_checkpoint").write_text("model_0000019.pth")
    history = (output_dir / "metrics.json").read_text()
    run = _train(output_dir, opts, "--resume")
    assert "Starting training from iteration 20" in run.stdout + run.stderr
    text = (output_dir / "metrics.json").read_text()
    assert text.startswith(history)
    resumed = [json.loads(line) for line in text[len(history):].splitlines()]
    assert [m["iteration"] for m in resumed if "loss_rpn_cls" in m] == [MAX_ITER - 1]
    assert "recall_d2/AR@100" in resumed[-1]  # the final evaluation ran too


def test_two_cpu_processes_train_and_gather_evaluation(opts, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU (gloo) path")
    output_dir = tmp_path / "ddp"
    run = _train(output_dir, opts, "--num-gpus", "2", "--dist-url", "auto", max_iter=4)
    log = run.stdout + run.stderr
    assert "World size: 2" in log
    rank1_log = (output_dir / "log.txt.rank1").read_text()
    assert "Starting training from iteration 0" in rank1_log
    gathered = [m for m in _metrics(output_dir) if "recall_d2/AR@100" in m][-1]

    # The same model evaluated by one process sees every image, as the gathered one must.
    train_net = load_tool("train_net")
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", str(CONFIG), "--eval-only"]
        + opts + ["MODEL.WEIGHTS", str(output_dir / "model_final.pth"), "OUTPUT_DIR", str(tmp_path / "single")]
    )
    single = train_net.main(args)
    for definition in ("recall_d2", "recall_coco"):
        for key, value in single[definition].items():
            assert gathered[f"{definition}/{key}"] == pytest.approx(value, abs=1e-9, nan_ok=True), key
