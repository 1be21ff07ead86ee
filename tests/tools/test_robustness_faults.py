"""Faults: bad checkpoint files stop with one CheckpointError line instead of a silent random
initialisation (fpn_rpn.engine.checkpoint); diverged training stops naming the iteration and keeps
the last good checkpoint; a run killed with SIGKILL resumes from its last checkpoint with
its history; a proposal file for other images is named. tools/train_net.py is run as users
run it, in a subprocess, on a tiny config."""
import fpn_rpn  # noqa: F401  # before detectron2

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from conftest import REPO, cli, load_tool, needs_coco_mini
from fpn_rpn import add_fpn_rpn_config, register_coco_json
from fpn_rpn.engine.checkpoint import CheckedCheckpointer, CheckpointError
from fpn_rpn.data.coco_checks import DataError
from fpn_rpn.data.proposal_files import check_proposal_file

CONFIG = REPO / "configs" / "demo" / "fpn_rpn_R_18_GN_synthetic.yaml"
TRAIN_NET = REPO / "tools" / "train_net.py"
VAL_IDS = [802, 10764, 11813, 20992]  # four small coco_mini val images


def _cfg():
    cfg = get_cfg()
    add_fpn_rpn_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.FPN.OUT_CHANNELS = 32  # a small model: fast on CPU
    return cfg


def _model(seed):
    torch.manual_seed(seed)
    return build_model(_cfg())


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state_equal(model, state):
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


def _one_line_error(error_type, match, fn, *args, **kwargs):
    with pytest.raises(error_type, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An output folder with one checkpoint (iteration 9) of a model (seed 1), and that model's state."""
    out = tmp_path_factory.mktemp("checkpoints")
    model = _model(seed=1)
    CheckedCheckpointer(model, str(out)).save("model_0000009", iteration=9)
    return out, _state(model)


# ---- checkpoint files -----------------------------------------------------------------


def test_own_checkpoint_loads_and_resumes(saved):
    out, state = saved
    assert (out / "last_checkpoint").read_text() == "model_0000009.pth"
    assert not list(out.glob("*.tmp"))  # last_checkpoint was written through a renamed temporary file
    model = _model(seed=2)
    extra = CheckedCheckpointer(model, str(out)).resume_or_load("", resume=True)
    assert extra["iteration"] == 9
    _assert_state_equal(model, state)
    model = _model(seed=2)
    CheckedCheckpointer(model, require_all=True).load(str(out / "model_0000009.pth"))
    _assert_state_equal(model, state)


def test_missing_checkpoint(tmp_path):
    model = _model(seed=2)
    _one_line_error(CheckpointError, f"^checkpoint {re.escape(str(tmp_path / 'nope.pth'))} does not exist$",
                    CheckedCheckpointer(model).load, str(tmp_path / "nope.pth"))


def test_truncated_checkpoint_is_an_error_and_loads_nothing(saved, tmp_path):
    out, _ = saved
    data = (out / "model_0000009.pth").read_bytes()
    (tmp_path / "model_0000009.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    model = _model(seed=2)
    before = _state(model)
    match = f"^{re.escape(str(tmp_path / 'model_0000009.pth'))}: cannot be read as a checkpoint, it may be truncated"
    _one_line_error(CheckpointError, match, CheckedCheckpointer(model).load, str(tmp_path / "model_0000009.pth"))
    _one_line_error(CheckpointError, match, CheckedCheckpointer(model, str(tmp_path)).resume_or_load, "", resume=True)
    _assert_state_equal(model, before)


@pytest.mark.parametrize(
    "write, match",
    [
        (lambda path: path.write_text("not a checkpoint"), "cannot be read as a checkpoint"),
        (lambda path: torch.save([1, 2, 3], path), "not a checkpoint: holds a list where a dict of weights should be"),
        (lambda path: torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, path),
         r"has none of the model's \d+ parameters; it is not a checkpoint of this model \(its keys: conv1.weight, "
         r"fc.weight\)"),
    ],
    ids=["text", "list", "foreign_state_dict"],
)
def test_foreign_file_is_an_error(tmp_path, write, match):
    path = tmp_path / "foreign.pth"
    write(path)
    model = _model(seed=2)
    before = _state(model)
    _one_line_error(CheckpointError, f"^{re.escape(str(path))}: {match}", CheckedCheckpointer(model).load, str(path))
    _assert_state_equal(model, before)


def test_imagenet_backbone_weights_still_load(saved, tmp_path):
    # ImageNet weights as Detectron2 takes them (tools/convert-torchvision-to-d2.py): backbone
    # names without the "backbone.bottom_up." prefix, matched by Detectron2's heuristics
    _, state = saved
    prefix = "backbone.bottom_up."
    weights = {k[len(prefix):]: v.numpy() for k, v in state.items() if k.startswith(prefix)}
    with open(tmp_path / "R-18.pkl", "wb") as f:
        pickle.dump({"model": weights, "__author__": "torchvision", "matching_heuristics": True}, f)
    model = _model(seed=2)
    before = _state(model)
    CheckedCheckpointer(model).load(str(tmp_path / "R-18.pkl"))
    for key, value in model.state_dict().items():
        expected = state[key] if key.startswith(prefix) else before[key]  # the rest keeps its initialisation
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)


def test_proposal_file_as_weights_is_named(tmp_path):
    # fvcore: "ValueError: Unsupported type found in checkpoint! ids: <class 'list'>" and a traceback
    path = _proposal_file(tmp_path / "box_proposals.pkl", VAL_IDS)
    model = _model(seed=2)
    before = _state(model)
    match = f"^{re.escape(str(path))}: is a proposal file .*, not a checkpoint: give MODEL.WEIGHTS a model's .pth"
    _one_line_error(CheckpointError, match, CheckedCheckpointer(model, require_all=True).load, str(path))
    _one_line_error(CheckpointError, match, CheckedCheckpointer(model).load, str(path))
    _assert_state_equal(model, before)


def _heads_only_checkpoint(saved, path):
    """The two head biases only: what an EfficientNet-Lite checkpoint shares with an R-18 model."""
    _, state = saved
    torch.save({"model": {k: v for k, v in state.items() if k.startswith("proposal_generator.") and
                          k.endswith(("objectness_logits.bias", "anchor_deltas.bias"))}}, path)
    return path


def test_start_from_another_backbone_is_an_error_unless_allowed(saved, tmp_path):
    path = _heads_only_checkpoint(saved, tmp_path / "lite0_rpn.pth")
    match = (f"^{re.escape(str(path))}: supplies 0.0% of the backbone's parameter values \\(names and shapes "
             r"matching, 0 of \d+\); .* set MODEL.FPN_RPN.ALLOW_PARTIAL_BACKBONE_WEIGHTS True to train from it")
    _one_line_error(CheckpointError, match, CheckedCheckpointer(_model(seed=2), str(tmp_path / "out")).resume_or_load,
                    str(path), resume=False)
    # by values, not tensors: without res5 (about 3/4 of R-18's values) it is under half too
    _, state = saved
    torch.save({"model": {k: v for k, v in state.items() if ".res5." not in k}}, tmp_path / "no_res5.pth")
    _one_line_error(CheckpointError, r"supplies \d+\.\d% of the backbone's parameter values",
                    CheckedCheckpointer(_model(seed=2)).load, str(tmp_path / "no_res5.pth"))
    allowed = CheckedCheckpointer(_model(seed=2), allow_partial_backbone=True)
    allowed.load(str(path))
    allowed.load(str(tmp_path / "no_res5.pth"))
    # backbones loading their ImageNet weights when built (EfficientNet-Lite) take MODEL.WEIGHTS ""
    CheckedCheckpointer(_model(seed=2), str(tmp_path / "empty")).resume_or_load("", resume=False)


def _partial_checkpoint(saved, out, drop=(), reshape=()):
    _, state = saved
    weights = {k: v for k, v in state.items() if not any(k.startswith(d) for d in drop)}
    for key in reshape:
        weights[key] = torch.zeros(2 * weights[key].shape[0], *weights[key].shape[1:])  # a softmax head's
    out.mkdir()
    torch.save({"model": weights, "iteration": 9}, out / "model_0000009.pth")
    (out / "last_checkpoint").write_text("model_0000009.pth")
    return out / "model_0000009.pth"


def test_resuming_needs_every_parameter(saved, tmp_path):
    path = _partial_checkpoint(saved, tmp_path / "out", drop=["proposal_generator.rpn_head.anchor_deltas"])
    model = _model(seed=2)
    match = (f"^{re.escape(str(path))}: resuming needs every parameter, but it misses 2: "
             r"proposal_generator.rpn_head.anchor_deltas.bias, proposal_generator.rpn_head.anchor_deltas.weight; "
             r"is it a checkpoint of this config\?$")
    _one_line_error(CheckpointError, match, CheckedCheckpointer(model, str(path.parent)).resume_or_load, "",
                    resume=True)
    # the same file given as MODEL.WEIGHTS (fine-tuning) loads what it has, as in Detectron2
    CheckedCheckpointer(model, str(tmp_path / "elsewhere")).resume_or_load(str(path), resume=True)
    _, state = saved
    torch.testing.assert_close(model.state_dict()["proposal_generator.rpn_head.conv.weight"],
                               state["proposal_generator.rpn_head.conv.weight"], rtol=0, atol=0)


def test_evaluating_needs_every_parameter(saved, tmp_path):
    path = _partial_checkpoint(saved, tmp_path / "out",
                               reshape=["proposal_generator.rpn_head.objectness_logits.weight"])
    model = _model(seed=2)
    _one_line_error(CheckpointError,
                    f"^{re.escape(str(path))}: evaluating needs every parameter, but it misses 1 \\(1 with "
                    r"another shape\): proposal_generator.rpn_head.objectness_logits.weight;",
                    CheckedCheckpointer(model, require_all=True).load, str(path))
    _one_line_error(CheckpointError, r"^no checkpoint to load \(MODEL.WEIGHTS is empty\)",
                    CheckedCheckpointer(model, require_all=True).load, "")


def test_diverged_weights_are_not_saved(saved, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(saved[0], out)
    model = _model(seed=2)
    with torch.no_grad():
        model.proposal_generator.rpn_head.conv.weight[0, 0, 0, 0] = float("nan")
    match = (r"^training has diverged at iteration 12: NaN or infinite values in 1 of the model's tensors "
             r"\(proposal_generator.rpn_head.conv.weight\); checkpoint model_0000012 not saved, the last one is "
             f"{re.escape(str(out / 'model_0000009.pth'))}$")
    _one_line_error(FloatingPointError, match, CheckedCheckpointer(model, str(out)).save, "model_0000012",
                    iteration=12)
    assert (out / "last_checkpoint").read_text() == "model_0000009.pth"
    assert not (out / "model_0000012.pth").exists()


# ---- proposal files -------------------------------------------------------------------


def _tiny_dataset(coco_mini, folder):
    """A COCO json of four coco_mini val images (the images stay in place): (json_file, image_root)."""
    if not coco_mini.is_dir():
        pytest.skip(f"{coco_mini} not found")
    data = json.loads((coco_mini / "annotations" / "instances_val2017.json").read_text())
    data["images"] = [im for im in data["images"] if im["id"] in VAL_IDS]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in VAL_IDS]
    (folder / "tiny.json").write_text(json.dumps(data))
    return folder / "tiny.json", coco_mini / "val2017"


@pytest.fixture
def tiny_dataset(coco_mini, tmp_path):
    return _tiny_dataset(coco_mini, tmp_path)


def _proposal_file(path, ids):
    with open(path, "wb") as f:
        pickle.dump({"ids": ids, "boxes": [np.zeros((1, 4), np.float32)] * len(ids),
                     "objectness_logits": [np.zeros(1, np.float32)] * len(ids), "bbox_mode": 0}, f)
    return path


# Detectron2 itself stops with a bare KeyError ('11813') at the first image without proposals
MISSING_PROPOSALS = (r"no proposals for 2 of the 4 images of dataset 'rb_proposals' \(image ids 11813, 20992\); "
                     r"the file has proposals for 3 images, 1 of them not in the dataset")


def test_proposal_file_for_other_images(tiny_dataset, tmp_path, catalogs):
    register_coco_json("rb_proposals", *tiny_dataset)
    # two of the four images, and one of another dataset
    path = _proposal_file(tmp_path / "box_proposals.pkl", [802, 10764, 123])
    _one_line_error(DataError, f"^{re.escape(str(path))}: {MISSING_PROPOSALS}", check_proposal_file, path,
                    "rb_proposals")
    check_proposal_file(_proposal_file(path, VAL_IDS), "rb_proposals")  # every image has proposals: no error


def test_train_net_checks_proposal_files_at_setup(tiny_dataset, tmp_path, catalogs):
    train_net = load_tool("train_net")
    path = _proposal_file(tmp_path / "box_proposals.pkl", [802, 10764, 123])

    def setup(train_files, test_files, flags=()):
        return train_net.setup(train_net.default_argument_parser().parse_args(
            ["--config-file", str(CONFIG), *flags, "MODEL.LOAD_PROPOSALS", "True",
             "DATASETS.REGISTER_COCO", repr([["rb_proposals", *map(str, tiny_dataset)]]),
             "DATASETS.TRAIN", "('rb_proposals',)", "DATASETS.TEST", "('rb_proposals',)",
             "DATASETS.PROPOSAL_FILES_TRAIN", repr(train_files), "DATASETS.PROPOSAL_FILES_TEST", repr(test_files),
             "OUTPUT_DIR", str(tmp_path / "out")]  # fmt: skip
        ))

    good = str(_proposal_file(tmp_path / "all.pkl", VAL_IDS))
    _one_line_error(DataError, MISSING_PROPOSALS, setup, (good,), (str(path),))
    _one_line_error(train_net.ConfigError, r"^DATASETS.PROPOSAL_FILES_TEST has 0 files for the 1 datasets of "
                                           r"DATASETS.TEST: give one per dataset$", setup, (good,), ())
    assert setup((good,), (good,)).MODEL.LOAD_PROPOSALS
    # evaluating alone needs only the test set's file; training needs both
    assert setup((), (good,), ["--eval-only"]).MODEL.LOAD_PROPOSALS
    _one_line_error(train_net.ConfigError, r"^DATASETS.PROPOSAL_FILES_TRAIN has 0 files", setup, (), (good,))


# ---- compare_recall's and visualize_proposals' inputs ------------------------------------

SMALL = ["MODEL.FPN.OUT_CHANNELS", "32", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192"]


def _compare(capsys, tmp_path, *sources):
    argv = [*sources, "--dataset", "coco_mini_val", "--max-images", "1", "--output-dir", str(tmp_path / "out"),
            "--no-cache", "--opts", *SMALL]
    return cli(capsys, "compare_recall", argv)


def _weights_case(case, saved, tmp_path):
    out, _ = saved
    path = tmp_path / "weights.pth"
    if case == "text":
        path.write_text("some notes, not weights")
    elif case == "truncated":
        data = (out / "model_0000009.pth").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "other model":  # R-18 weights for another network: none of its parameter names
        torch.save({"model": {"backbone.res9.weight": torch.zeros(1)}}, path)
    else:  # the model without its RPN head: an untrained head would be evaluated
        state = torch.load(out / "model_0000009.pth", weights_only=False)
        state["model"] = {k: v for k, v in state["model"].items() if "rpn_head" not in k}
        torch.save(state, path)
    return path


@pytest.mark.parametrize("case, words", [
    ("text", "cannot be read as a checkpoint"),
    ("truncated", "cannot be read as a checkpoint"),
    ("other model", "has none of the model's"),
    ("partial", "evaluating needs every parameter, but it misses 6: proposal_generator.rpn_head"),
])  # fmt: skip
@pytest.mark.parametrize("tool", ["compare_recall", "visualize_proposals"])
@needs_coco_mini
def test_tool_weights_that_cannot_be_evaluated(capsys, saved, tmp_path, case, words, tool):
    path = _weights_case(case, saved, tmp_path)
    if tool == "compare_recall":
        code, err = _compare(capsys, tmp_path, "--model", f"m={CONFIG}:{path}")
    else:
        code, err = cli(capsys, tool, ["--model", f"{CONFIG}:{path}", "--dataset", "coco_mini_val", "--num-images",
                                       "1", "--output-dir", str(tmp_path / "out"), "--opts", *SMALL])
    assert code == 1 and len(err) == 1 and err[0].startswith(f"{tool}.py: error: ") and words in err[0], err


@needs_coco_mini
def test_compare_recall_needs_weights_or_an_explicit_random_init(capsys, tmp_path):
    code, err = _compare(capsys, tmp_path, "--model", f"m={CONFIG}")
    assert code == 1 and err == [
        f"compare_recall.py: error: --model m: no weights (none after '{CONFIG}:' and no MODEL.WEIGHTS in it); "
        f"give m={CONFIG}:WEIGHTS, or --random-init m={CONFIG} for an untrained baseline"
    ]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        rows = load_tool("compare_recall").main(
            ["--random-init", f"m={CONFIG}", "--dataset", "coco_mini_val", "--max-images", "1",
             "--output-dir", str(tmp_path / "out"), "--no-cache", "--opts", *SMALL])
    assert [row["source"] for row in rows] == ["m (random init)"]
    assert "| m (random init) |" in out.getvalue()


@pytest.mark.parametrize("content, words", [
    (b"not a pickle", "cannot be read as a proposal file (UnpicklingError"),
    (pickle.dumps([1, 2]), "holds a list, not a proposal file"),
    (pickle.dumps({"ids": [1]}), "proposal file lacks ['boxes', 'objectness_logits']"),
])  # fmt: skip
@pytest.mark.parametrize("tool", ["compare_recall", "visualize_proposals"])
@needs_coco_mini
def test_tool_proposal_file_that_cannot_be_read(capsys, tmp_path, content, words, tool):
    path = tmp_path / "p.pkl"
    path.write_bytes(content)
    argv = ["--dataset", "coco_mini_val", "--output-dir", str(tmp_path / "out")]
    code, err = cli(capsys, tool, ["--proposals", f"p={path}" if tool == "compare_recall" else str(path), *argv])
    assert code == 1 and len(err) == 1 and err[0].startswith(f"{tool}.py: error: {path}: ") and words in err[0], err


# ---- tools/train_net.py in a subprocess -----------------------------------------------


def _command(output_dir, dataset, flags=(), opts=()):
    """train_net's command line; ``opts`` come last, so they override the others."""
    register = [["rb_tiny", *map(str, dataset)]]
    return [sys.executable, str(TRAIN_NET), "--config-file", str(CONFIG), *flags,
            "MODEL.FPN.OUT_CHANNELS", "32", "DATASETS.REGISTER_COCO", repr(register),
            "DATASETS.TRAIN", "('rb_tiny',)", "DATASETS.TEST", "('rb_tiny',)",
            "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "192",
            "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "5", "SOLVER.STEPS", "()",
            "SOLVER.MAX_ITER", "30", "SOLVER.CHECKPOINT_PERIOD", "15", "DATALOADER.NUM_WORKERS", "0", "SEED", "1",
            "OUTPUT_DIR", str(output_dir), *opts]  # fmt: skip


ENV = dict(os.environ, OMP_NUM_THREADS="1")  # the machine's cores are shared


def _run(cmd, timeout=300):
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def _iterations(metrics_text):
    """Iterations of the training lines of metrics.json (a line being written is left out)."""
    lines = [line for line in metrics_text.splitlines() if "total_loss" in line and line.endswith("}")]
    return [json.loads(line)["iteration"] for line in lines]


@pytest.fixture(scope="module")
def killed_and_resumed(coco_mini, tmp_path_factory):
    """A run killed with SIGKILL after iteration 19 (last checkpoint: iteration 14), then resumed."""
    root = tmp_path_factory.mktemp("killed")
    dataset = _tiny_dataset(coco_mini, root)
    output_dir = root / "output"
    process = subprocess.Popen(_command(output_dir, dataset), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    metrics = output_dir / "metrics.json"
    deadline = time.time() + 300
    # Detectron2 writes metrics.json every 20 iterations: kill as soon as iteration 19 is there
    while process.poll() is None and time.time() < deadline:
        if metrics.is_file() and 19 in _iterations(metrics.read_text()):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert (output_dir / "last_checkpoint").read_text() == "model_0000014.pth"
    assert not (output_dir / "model_final.pth").exists()
    before = {name: (output_dir / name).read_bytes() for name in ("metrics.json", "log.txt", "model_0000014.pth")}

    resumed = _run(_command(output_dir, dataset, flags=["--resume"]))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return dataset, output_dir, before, resumed


def test_killed_run_resumes_from_its_last_checkpoint(killed_and_resumed):
    _, output_dir, before, resumed = killed_and_resumed
    assert "Starting training from iteration 15" in resumed.stdout + resumed.stderr
    # nothing lost: the checkpoint it resumed from, the log and the metrics history are kept and
    # appended to; iterations 15-19 were trained twice, so iteration 19 appears twice
    assert (output_dir / "model_0000014.pth").read_bytes() == before["model_0000014.pth"]
    for name in ("metrics.json", "log.txt"):
        assert (output_dir / name).read_bytes().startswith(before[name]), name
    metrics = (output_dir / "metrics.json").read_text()
    assert _iterations(before["metrics.json"].decode()) == [19]
    assert _iterations(metrics) == [19, 19, 29]
    assert "recall_d2/AR@100" in metrics.splitlines()[-1]  # then the final evaluation
    assert (output_dir / "last_checkpoint").read_text() == "model_final.pth"


def _resume_copy(killed_and_resumed, name, opts=()):
    """Copy the resumed run's output folder; return the command resuming from the copy, and the copy."""
    dataset, output_dir = killed_and_resumed[:2]
    copy = output_dir.parent / name
    shutil.copytree(output_dir, copy)
    return _command(copy, dataset, flags=["--resume"], opts=opts), copy


def _assert_one_line_error(run, pattern):
    assert run.returncode == 1, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert re.fullmatch(f"train_net.py: error: {pattern}", last), last
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    "opts, pattern",
    [
        # Detectron2's check of the summed loss (loss_rpn_loc x 1e39 is inf in float32)
        (["MODEL.RPN.BBOX_REG_LOSS_WEIGHT", "1e39"],
         r"Loss became infinite or NaN at iteration=30! loss_dict = \{.*'loss_rpn_loc': \S*(inf|nan)\S*\}"),
        # fpn_rpn's check of the predictions (a pixel std of 1e-39, positive as the config check
        # requires, makes the normalised input overflow float32 to infinity)
        (["MODEL.PIXEL_STD", "[1e-39, 1e-39, 1e-39]"],
         r"RPN predicted boxes or objectness logits contain Inf/NaN: training has diverged .* \(iteration 30\)"),
    ],
    ids=["loss", "predictions"],
)
def test_diverged_training_names_the_iteration_and_keeps_the_checkpoint(killed_and_resumed, opts, pattern):
    cmd, output_dir = _resume_copy(killed_and_resumed, f"diverged_{opts[0]}", ["SOLVER.MAX_ITER", "35", *opts])
    final = (output_dir / "model_final.pth").read_bytes()
    run = _run(cmd)  # resumes at iteration 30
    _assert_one_line_error(run, pattern)
    assert (output_dir / "last_checkpoint").read_text() == "model_final.pth"
    assert (output_dir / "model_final.pth").read_bytes() == final
    assert not list(output_dir.glob("model_00000[3-9]*.pth"))
    assert "Traceback" in (output_dir / "log.txt").read_text()  # for bug reports


def test_truncated_checkpoint_stops_resume(killed_and_resumed):
    cmd, output_dir = _resume_copy(killed_and_resumed, "truncated")
    path = output_dir / "model_final.pth"
    path.write_bytes(path.read_bytes()[:100_000])
    run = _run(cmd)
    _assert_one_line_error(run, f"{re.escape(str(path))}: cannot be read as a checkpoint, it may be truncated .*")


# ---- faults before training, and on one of several processes ---------------------------


def _dataset_copy(coco_mini, folder, ids, annotations=None, corrupt=()):
    """A COCO json of coco_mini val images ``ids``, copied to ``folder``/images (``corrupt`` ones
    overwritten with garbage); ``annotations`` replaces theirs if given: (json_file, image_root)."""
    json_file, _ = _tiny_dataset(coco_mini, folder)
    data = json.loads(json_file.read_text())
    data["images"] = [im for im in data["images"] if im["id"] in ids]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids] if annotations is None \
        else annotations  # fmt: skip
    images = folder / "images"
    images.mkdir()
    for image in data["images"]:
        shutil.copy(coco_mini / "val2017" / image["file_name"], images / image["file_name"])
        if image["id"] in corrupt:
            (images / image["file_name"]).write_bytes(b"\x00garbage" * 100)
    (folder / "copy.json").write_text(json.dumps(data))
    return folder / "copy.json", images


def _with_train_set(tiny, other):
    """opts that register ``other`` (json_file, image_root) as 'rb_other' and train on it, testing on ``tiny``."""
    register = [["rb_tiny", *map(str, tiny)], ["rb_other", *map(str, other)]]
    return ["DATASETS.REGISTER_COCO", repr(register), "DATASETS.TRAIN", "('rb_other',)"]


def _assert_traceback_in_log(output_dir, error="DataError", log="log.txt"):
    text = (output_dir / log).read_text()
    assert "Traceback (most recent call last)" in text and error in text, text[-2000:]


def test_all_training_images_filtered_out(tiny_dataset, coco_mini, tmp_path):
    # one image without annotations, one with a crowd box only: with the default
    # DATALOADER.FILTER_EMPTY_ANNOTATIONS no image is left (Detectron2: "No valid data found" and a traceback)
    crowd = {"id": 1, "image_id": 802, "category_id": 1, "bbox": [10.0, 20.0, 100.0, 200.0], "area": 20000.0,
             "iscrowd": 1}
    empty = _dataset_copy(coco_mini, tmp_path, (802, 10764), annotations=[crowd])
    run = _run(_command(tmp_path / "out", tiny_dataset, opts=_with_train_set(tiny_dataset, empty)))
    _assert_one_line_error(run, r"no training images left in DATASETS.TRAIN \('rb_other',\): every image has no "
                                r"annotations or crowd annotations only, and DATALOADER.FILTER_EMPTY_ANNOTATIONS "
                                r"True leaves such images out of training; set it to False .*")
    _assert_traceback_in_log(tmp_path / "out")


@pytest.mark.parametrize(
    "opts, pattern, error",
    [
        # Detectron2 would fail in its registry; the check leaves a log, not only the line
        (["MODEL.RPN.HEAD_NAME", "FPNHead"], r"MODEL.RPN.HEAD_NAME = 'FPNHead' is not registered; registered: .*",
         "ConfigError"),
        # Detectron2: a KeyError listing every registered dataset
        (["DATASETS.TEST", "('rb_tinny',)"],
         r"DATASETS.TEST names dataset 'rb_tinny', which is not registered; did you mean 'rb_tiny'\? .*", "DataError"),
        # Detectron2: pycocotools' FileNotFoundError when the dataset is first loaded
        (["DATASETS.TRAIN", "('coco_2017_train',)"],
         r"dataset 'coco_2017_train' \(DATASETS.TRAIN\): annotation file \S+/coco/annotations/instances_train2017"
         r".json does not exist; Detectron2's built-in datasets are read from \$DETECTRON2_DATASETS .*", "DataError"),
        (["MODEL.LOAD_PROPOSALS", "True"], r"DATASETS.PROPOSAL_FILES_TRAIN has 0 files for the 1 datasets .*",
         "ConfigError"),
    ],
    ids=["head_name", "dataset_name", "builtin_dataset_files", "proposal_files"],
)
def test_faults_before_training_leave_the_traceback_in_log_txt(tiny_dataset, tmp_path, opts, pattern, error):
    env = dict(ENV, DETECTRON2_DATASETS=str(tmp_path / "datasets"))
    run = subprocess.run(_command(tmp_path / "out", tiny_dataset, opts=opts), capture_output=True, text=True,
                         env=env, timeout=300)
    _assert_one_line_error(run, pattern)
    _assert_traceback_in_log(tmp_path / "out", error)


def test_train_net_proposal_file_or_another_backbone_as_weights(tiny_dataset, tmp_path, saved):
    proposals = _proposal_file(tmp_path / "box_proposals.pkl", VAL_IDS)
    run = _run(_command(tmp_path / "eval", tiny_dataset, flags=["--eval-only"], opts=["MODEL.WEIGHTS", str(proposals)]))
    _assert_one_line_error(run, f"{re.escape(str(proposals))}: is a proposal file .*, not a checkpoint: .*")
    heads = _heads_only_checkpoint(saved, tmp_path / "lite0_rpn.pth")
    run = _run(_command(tmp_path / "train", tiny_dataset, opts=["MODEL.WEIGHTS", str(heads)]))
    _assert_one_line_error(run, f"{re.escape(str(heads))}: supplies 0.0% of the backbone's parameter values .*"
                                r"set MODEL.FPN_RPN.ALLOW_PARTIAL_BACKBONE_WEIGHTS True to train from it anyway")
    assert not (tmp_path / "train" / "model_final.pth").exists()


def test_ctrl_c_names_the_iteration_to_resume_from(tiny_dataset, tmp_path):
    output_dir = tmp_path / "out"
    cmd = _command(output_dir, tiny_dataset, opts=["SOLVER.MAX_ITER", "100000"])
    # SIGINT as the terminal sends it; its default action restored, should the test runner ignore it
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        metrics, deadline = output_dir / "metrics.json", time.time() + 240
        while not (metrics.is_file() and _iterations(metrics.read_text())):  # iteration 19 is written
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"train_net.py: interrupted at iteration (\d+); continue with --resume", last)
    assert match and int(match.group(1)) >= 19, last
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    # the checkpoints before it stay (CHECKPOINT_PERIOD 15: iteration 14, and 29 on a fast machine)
    last_checkpoint = (output_dir / "last_checkpoint").read_text()
    assert (output_dir / last_checkpoint).is_file() and int(last_checkpoint[6:13]) < int(match.group(1))
    assert not (output_dir / "model_final.pth").exists()


def test_evaluating_with_a_test_proposal_file_only(killed_and_resumed, tmp_path):
    # --eval-only with MODEL.LOAD_PROPOSALS reads no training set: PROPOSAL_FILES_TRAIN stays empty
    dataset, output_dir = killed_and_resumed[:2]
    proposals = _proposal_file(tmp_path / "tiny_proposals.pkl", VAL_IDS)
    run = _run(_command(tmp_path / "out", dataset, flags=["--eval-only"],
                        opts=["MODEL.WEIGHTS", str(output_dir / "model_final.pth"), "MODEL.LOAD_PROPOSALS", "True",
                              "DATASETS.PROPOSAL_FILES_TEST", repr((str(proposals),))]))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "copypaste: Task: recall_d2" in (tmp_path / "out" / "log.txt").read_text()
    assert (tmp_path / "out" / "inference" / "rb_tiny" / "box_proposals.pkl").is_file()


def test_fault_on_one_of_two_processes_ends_both(tiny_dataset, coco_mini, tmp_path):
    # two processes read one image each in the only, hence last, iteration; one image is corrupt.
    # The failing process used to run the final evaluation, waiting there for the other, itself
    # waiting for it in backward: a hang until gloo's 30-minute timeout
    bad = _dataset_copy(coco_mini, tmp_path, (802, 10764), corrupt=(10764,))
    # about 20 s on 2 idle cores; the timeout (a TimeoutExpired failure) is far below the hang's 30 minutes
    run = _run(_command(tmp_path / "out", tiny_dataset, flags=["--num-gpus", "2"],
                        opts=_with_train_set(tiny_dataset, bad) + ["SOLVER.MAX_ITER", "1"]), timeout=240)
    _assert_one_line_error(run, f"{re.escape(str(bad[1] / '000000010764.jpg'))}: image id 10764: cannot be used "
                                r"\(UnidentifiedImageError: .*\)")
    logs = [(tmp_path / "out" / name).read_text() for name in ("log.txt", "log.txt.rank1")]
    assert sum("DataError" in log for log in logs) == 1  # the failing process's log has the traceback


def _children(pid, marker=""):
    """The pids of process ``pid``'s child processes whose command line holds ``marker`` (Linux)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if marker in Path(f"/proc/{c}/cmdline").read_text()]


def _kill_a_child_while_training(cmd, output_dir, marker, count):
    """Run ``cmd``; once it trains, SIGKILL the last of its ``count`` children with ``marker``: the run's result."""
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        log, children = output_dir / "log.txt", []
        deadline = time.time() + 180
        # data-loading workers start with the first iteration, after "Starting training"
        while not (log.is_file() and "Starting training" in log.read_text() and len(children) == count):
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.time() < deadline, children
            time.sleep(0.2)
            children = _children(process.pid, marker)
        while True:  # the pids are a snapshot: a child can end between the scan and the kill
            try:
                os.kill(children[-1], signal.SIGKILL)
                break
            except ProcessLookupError:
                assert process.poll() is None, process.stderr.read()[-3000:]
                assert time.time() < deadline, children
                time.sleep(0.2)
                children = _children(process.pid, marker) or children
        _, stderr = process.communicate(timeout=90)
    finally:
        process.kill()
    return subprocess.CompletedProcess(cmd, process.returncode, "", stderr)


LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the processes in /proc")


@LINUX_PROC
def test_killed_process_ends_a_two_process_run(tiny_dataset, tmp_path):
    # a process killed without a Python error (as the system's out-of-memory killer does)
    cmd = _command(tmp_path / "out", tiny_dataset, flags=["--num-gpus", "2"], opts=["SOLVER.MAX_ITER", "100000"])
    run = _kill_a_child_while_training(cmd, tmp_path / "out", "spawn_main", 2)  # torch.multiprocessing's
    _assert_one_line_error(run, r"process [01] of the 2 on this machine was killed by SIGKILL \(as the system does "
                                r"when memory runs out: see dmesg\) without a Python error; the others were stopped; .*")


@LINUX_PROC
def test_killed_data_loading_worker(tiny_dataset, tmp_path):
    # torch: "RuntimeError: DataLoader worker (pid N) is killed by signal: Killed." and a traceback
    cmd = _command(tmp_path / "out", tiny_dataset, opts=["SOLVER.MAX_ITER", "100000", "DATALOADER.NUM_WORKERS", "1"])
    run = _kill_a_child_while_training(cmd, tmp_path / "out", "", 1)  # the one worker, forked
    # which of torch's two messages comes first depends on timing
    _assert_one_line_error(run, r"DataLoader worker \(pid.*\) (is killed by signal: Killed|exited unexpectedly): "
                                r"a data-loading process "
                                r"died without a Python error \(the system kills processes this way when memory runs "
                                r"out: see dmesg; fewer DATALOADER.NUM_WORKERS use less\); .*--resume")
    _assert_traceback_in_log(tmp_path / "out", "ProcessDiedError")
