"""Faults of the machine, each one line and a non-zero exit status: a full disk (no partial
checkpoint, last_checkpoint kept, no "--- Logging error ---"), an output folder that is a file,
under a file or not writable (the one rule of every tool, fpn_rpn.errors.prepare_output_dir), a
--dist-url port in use, a fault on one of two machines (both end promptly), weights that cannot be
read, a MODEL.DEVICE this machine lacks; and a traceback logged during training goes to log.txt
only. The datasets and the train_net command are those of test_robustness_faults."""
import fpn_rpn  # noqa: F401  # before detectron2

import errno
import functools
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, cli, load_tool, needs_coco_mini
from fpn_rpn.engine.checkpoint import CheckedCheckpointer, CheckpointError
from fpn_rpn.config_checks import check_device
from fpn_rpn.errors import ConfigError, OSFaultError, prepare_output_dir
from fpn_rpn.cli import run_cli
from test_robustness_faults import (CONFIG, ENV, _command, _dataset_copy, _model, _run, _tiny_dataset,
                                    _with_train_set)

ROOT = os.geteuid() == 0
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _one_line(run, prog="train_net.py"):
    """The last stderr line of a failed run, checked to be its only error output (no traceback anywhere)."""
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stdout + run.stderr and "--- Logging error ---" not in run.stderr, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), last
    return last[len(f"{prog}: error: "):]


@pytest.fixture
def tiny(coco_mini, tmp_path):
    return _tiny_dataset(coco_mini, tmp_path)


# ---- a full disk ------------------------------------------------------------------------


def _full_disk_save(obj, f, *args, **kwargs):
    f.write(b"the first bytes of a checkpoint")  # a partial file, as a full disk leaves it
    raise ENOSPC


def test_full_disk_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    checkpointer = CheckedCheckpointer(_model(seed=1), str(tmp_path))
    checkpointer.save("model_0000004", iteration=4)
    monkeypatch.setattr(torch, "save", _full_disk_save)
    with pytest.raises(OSFaultError) as info:
        checkpointer.save("model_0000009", iteration=9)
    assert re.fullmatch(f"no space left on device writing {re.escape(str(tmp_path / 'model_0000009.pth'))} "
                        rf"\(\d+ MB free\); the last checkpoint is {re.escape(str(tmp_path / 'model_0000004.pth'))}",
                        str(info.value)), info.value
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000004.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"


# runs train_net with torch.save failing from the second checkpoint on, and log.txt's handler too from then
FULL_DISK = """
import errno, logging, runpy, sys, torch
real_save, full = torch.save, []
def save(obj, f, *args, **kwargs):
    if full or getattr(f, "name", "").endswith("model_0000009.pth.tmp"):
        full.append(1)
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(obj, f, *args, **kwargs)
torch.save = save
real_flush = logging.StreamHandler.flush
def flush(self):
    if full and str(getattr(self.stream, "name", "")).endswith("log.txt"):
        raise OSError(errno.ENOSPC, "No space left on device")
    real_flush(self)
logging.StreamHandler.flush = flush
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@needs_coco_mini
def test_train_net_on_a_full_disk(tiny, tmp_path):
    (tmp_path / "full_disk.py").write_text(FULL_DISK)
    out = tmp_path / "out"
    cmd = _command(out, tiny, opts=["SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "5"])
    run = _run([cmd[0], str(tmp_path / "full_disk.py"), *cmd[1:]], timeout=600)
    line = _one_line(run)  # was: hundreds of lines, tracebacks and "--- Logging error ---" for each record
    assert re.fullmatch(f"no space left on device writing {re.escape(str(out / 'model_0000009.pth'))} "
                        rf"\(\d+ MB free\); the last checkpoint is {re.escape(str(out / 'model_0000004.pth'))}",
                        line), line
    assert (out / "last_checkpoint").read_text() == "model_0000004.pth"
    assert not list(out.glob("model_0000009*")) and not (out / "model_final.pth").exists()


# ---- a traceback logged during training -------------------------------------------------


@needs_coco_mini
def test_diverged_training_traceback_in_log_txt_only(tiny, tmp_path):
    # Detectron2's train loop logs "Exception during training:" with a traceback of about 40 lines,
    # which went to stdout as well
    run = _run(_command(tmp_path / "out", tiny, opts=["SOLVER.BASE_LR", "1e8", "SOLVER.WARMUP_ITERS", "0"]))
    line = _one_line(run)
    assert re.fullmatch(r"(Loss became infinite or NaN at iteration=\d+!.*|.*training has diverged.*)", line), line
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "Exception during training:" in log and "Traceback (most recent call last)" in log
    assert "FloatingPointError" in log


# ---- output folders ---------------------------------------------------------------------


def _output_dir(tmp_path, case):
    """(the output folder of ``case``, the reason its one line must give)."""
    (tmp_path / "a_file").write_text("not a folder")
    if case == "file":
        return tmp_path / "a_file", "is a file, not a folder"
    if case == "under_file":
        return tmp_path / "a_file" / "out", f"is under {tmp_path / 'a_file'}, which is a file, not a folder"
    if ROOT:
        pytest.skip("running as root, which writes into a folder of mode 500 all the same")
    (tmp_path / "locked").mkdir(mode=0o500)
    return tmp_path / "locked", "cannot be written (Permission denied)"


OUTPUT_CASES = ["file", "under_file", "unwritable"]


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_prepare_output_dir(tmp_path, case):
    path, reason = _output_dir(tmp_path, case)
    with pytest.raises(OSFaultError) as info:
        prepare_output_dir(str(path), "--output-dir")
    assert str(info.value) == f"--output-dir {path}: {reason}"
    assert prepare_output_dir(str(tmp_path / "new" / "out")) == str(tmp_path / "new" / "out")
    assert (tmp_path / "new" / "out").is_dir() and not list((tmp_path / "new" / "out").iterdir())
    with pytest.raises(OSFaultError, match="^OUTPUT_DIR is empty: give the folder the results go to$"):
        prepare_output_dir("")


def test_prepare_output_dir_that_cannot_be_created(tmp_path):
    # as root, mode 500 is no obstacle: a folder under /sys cannot be created by anyone
    path = "/sys/fpn_rpn_test_output"
    try:
        os.mkdir(path)
    except OSError as e:
        expected = e.strerror
    else:
        os.rmdir(path)
        pytest.skip("this machine lets /sys/fpn_rpn_test_output be created")
    with pytest.raises(OSFaultError) as info:
        prepare_output_dir(path)
    assert str(info.value) == f"OUTPUT_DIR {path}: cannot be created ({expected})"


def _exit(capsys, fn):
    with pytest.raises(SystemExit) as info:
        run_cli(fn, "tool.py")
    return info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_train_net_output_dir(capsys, tmp_path, case):
    path, reason = _output_dir(tmp_path, case)
    train_net = load_tool("train_net")
    args = train_net.default_argument_parser().parse_args(["--config-file", str(CONFIG), "OUTPUT_DIR", str(path)])
    code, err = _exit(capsys, functools.partial(train_net.main, args))
    assert (code, err) == (1, [f"tool.py: error: OUTPUT_DIR {path}: {reason}"])


def test_train_net_output_dir_under_a_file_in_a_subprocess(tmp_path):
    # was: two chained tracebacks, the second from train_net's own traceback-to-log code
    path, reason = _output_dir(tmp_path, "under_file")
    run = _run([sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(CONFIG),
                "OUTPUT_DIR", str(path)])
    assert _one_line(run) == f"OUTPUT_DIR {path}: {reason}"


TINY_LAZY = """
import torch
from detectron2.config import LazyCall as L

model = L(torch.nn.Linear)(in_features=2, out_features=2)
train = dict(output_dir={output_dir!r}, init_checkpoint="", max_iter=10, device={device!r})
"""


def _lazy(capsys, tmp_path, output_dir, device="cpu"):
    config = tmp_path / "tiny_lazy.py"
    config.write_text(TINY_LAZY.format(output_dir=str(output_dir), device=device))
    tool = load_tool("lazyconfig_train_net")
    args = tool.default_argument_parser().parse_args(["--config-file", str(config)])
    return _exit(capsys, functools.partial(tool._load_and_launch, args))


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_lazyconfig_train_net_output_dir(capsys, tmp_path, case):
    path, reason = _output_dir(tmp_path, case)
    assert _lazy(capsys, tmp_path, path) == (1, [f"tool.py: error: train.output_dir {path}: {reason}"])


def _tool_argv(tool, out):
    """A command line of ``tool`` that reaches its output folder (``out``) first."""
    return {
        "compare_recall": ["--selective-search", "--dataset", "coco_mini_val", "--output-dir", out],
        "nms_study": ["--config", str(CONFIG), "--checkpoints", "1=x.pth", "--datasets", "coco_mini_val",
                      "--output-dir", out],
        "visualize_proposals": ["--proposals", "p.pkl", "--dataset", "coco_mini_val", "--output-dir", out],
        "analyze_anchors": ["--config", str(CONFIG), "--dataset", "coco_mini_val", "--output-dir", out],
        "export_model": ["--config-file", str(CONFIG), "--output", out],
    }[tool]


@pytest.mark.parametrize("case", OUTPUT_CASES)
@pytest.mark.parametrize("tool", ["compare_recall", "nms_study", "visualize_proposals", "analyze_anchors",
                                  "export_model"])
def test_tool_output_dir(capsys, tmp_path, tool, case):
    path, reason = _output_dir(tmp_path, case)
    option = "--output" if tool == "export_model" else "--output-dir"
    code, err = cli(capsys, tool, _tool_argv(tool, str(path)))
    assert (code, err) == (1, [f"{tool}.py: error: {option} {path}: {reason}"])


# ---- several processes and machines -----------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_coco_mini
def test_dist_url_port_in_use(tiny, tmp_path):
    # was: a 44-line traceback ending in EADDRINUSE, from the spawned processes
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        url = f"tcp://127.0.0.1:{port}"
        run = _run(_command(tmp_path / "out", tiny, flags=["--num-gpus", "2", "--dist-url", url]), timeout=240)
    assert _one_line(run) == f"port {port} on 127.0.0.1 is in use (--dist-url {url}): pick another or use --dist-url auto"


@needs_coco_mini
def test_fault_on_one_of_two_machines_ends_both(tiny, coco_mini, tmp_path):
    # two machines of one process each, on this host; machine 1's copy of the training set has
    # corrupt images. Machine 0 used to wait in its first backward pass until gloo's 30-minute timeout
    # (it now stops within seconds of the failure; the timeout only bounds a hang on a loaded machine)
    bad = _dataset_copy(coco_mini, tmp_path, (802, 10764), corrupt=(802, 10764))
    url = f"tcp://127.0.0.1:{_free_port()}"
    runs = []
    for rank, train_set in ((0, tiny), (1, bad)):
        flags = ["--num-gpus", "1", "--num-machines", "2", "--machine-rank", str(rank), "--dist-url", url]
        cmd = _command(tmp_path / f"out{rank}", tiny, flags=flags,
                       opts=_with_train_set(tiny, train_set) + ["SOLVER.MAX_ITER", "5"])
        runs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV))
    results, deadline = [], time.monotonic() + 600
    try:
        for process in runs:
            stdout, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    finally:
        for process in runs:
            process.kill()
    assert re.fullmatch(rf"{re.escape(str(bad[1]))}/\d+\.jpg: image id \d+: cannot be used \(UnidentifiedImageError: .*\)",
                        _one_line(results[1])), results[1].stderr[-2000:]
    assert _one_line(results[0]) == "another process failed (rank 1): see its output"
    assert "Connection closed by peer" in (tmp_path / "out0" / "log.txt").read_text()  # the traceback, for reports


# ---- weights that cannot be read, devices -------------------------------------------------


def test_unreadable_weights_are_named(tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    torch.save({"model": {}}, path)

    def denied(f, *args, **kwargs):  # what chmod 000 gives a user other than root
        raise PermissionError(errno.EACCES, "Permission denied", str(f))

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(CheckpointError) as info:
        CheckedCheckpointer(_model(seed=1)).load(str(path))
    assert str(info.value) == f"{path}: cannot be read (Permission denied)"  # was: "it may be truncated"


def test_weights_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError) as info:
        CheckedCheckpointer(_model(seed=1)).load(str(tmp_path))
    assert str(info.value) == f"checkpoint {tmp_path} is a folder, not a file (give MODEL.WEIGHTS a .pth or .pkl)"


@pytest.mark.parametrize("device, cuda_devices, words", [
    ("gpu", 0, "must be 'cpu', 'cuda' or 'cuda:N'"),
    ("cuda:x", 0, "must be 'cpu', 'cuda' or 'cuda:N'"),
    ("mps", 0, "must be 'cpu', 'cuda' or 'cuda:N'"),
    ("cuda:7", 2, "this machine has 2 CUDA devices (cuda:0 to cuda:1)"),
    ("cuda", 0, "this machine has no CUDA device: use 'cpu'"),
])  # fmt: skip
def test_device_this_machine_lacks(monkeypatch, device, cuda_devices, words):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    with pytest.raises(ConfigError) as info:
        check_device(device)
    assert str(info.value) == f"MODEL.DEVICE = {device!r} is invalid: {words}"
    check_device("cpu")


def test_train_net_and_lazyconfig_device(capsys, tmp_path):
    train_net = load_tool("train_net")
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", str(CONFIG), "MODEL.DEVICE", "gpu", "OUTPUT_DIR", str(tmp_path / "out")])
    code, err = _exit(capsys, functools.partial(train_net.main, args))
    assert (code, err[-1:]) == (1, ["tool.py: error: MODEL.DEVICE = 'gpu' is invalid: must be 'cpu', 'cuda' or 'cuda:N'"])
    assert _lazy(capsys, tmp_path, tmp_path / "lazy_out", device="gpu") == (
        1, ["tool.py: error: train.device = 'gpu' is invalid: must be 'cpu', 'cuda' or 'cuda:N'"])
