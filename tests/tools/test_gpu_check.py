"""tools/gpu_check.py (make gpu-check) where CI runs it, without a GPU: its arguments, its
one-line failure, and its step runner, which records a failing or hanging step and goes on."""
import fpn_rpn  # noqa: F401  # before detectron2

import sys
from unittest import mock

import pytest
import torch

from conftest import REPO, cli, load_tool


@pytest.fixture(scope="module")
def gpu_check():
    return load_tool("gpu_check")


def test_arguments(gpu_check, tmp_path):
    args = gpu_check.parse_args(["--output", str(tmp_path), "--steps", "parity", "export_tracing"])
    assert args.output == str(tmp_path) and args.steps == ["parity", "export_tracing"] and args.weights == ""
    assert gpu_check.parse_args(["--output", "x"]).steps == list(gpu_check.STEPS)


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: --output"),
    (["--output", "x", "--steps", "nope"], "invalid choice: 'nope'"),
])
def test_bad_arguments_fail_in_one_line(capsys, argv, message):
    status, err = cli(capsys, "gpu_check", argv)
    assert status == 2 and len(err) == 1 and message in err[0], err


def test_without_a_gpu_it_fails_in_one_line(gpu_check, capsys, tmp_path):
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        status = gpu_check.main(["--output", str(tmp_path)])
    assert status == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "gpu_check.py: error: no CUDA GPU is visible (torch.cuda.is_available() is False): "
        "run it on a machine with one GPU"]
    assert not (tmp_path / "summary.md").exists()


def test_the_step_limits_fit_in_eight_minutes(gpu_check, tmp_path):
    steps = gpu_check._step_commands("python", tmp_path, None)
    assert set(steps) == set(gpu_check.STEPS)
    assert sum(limit for _, limit in steps.values()) <= gpu_check.BUDGET_S == 480


def test_a_failing_or_hanging_step_is_recorded_and_the_others_run(gpu_check, tmp_path):
    py = sys.executable
    steps = {
        "fails": ([py, "-c", "import sys; print('RESULT: half done'); sys.exit(3)"], 30),
        "hangs": ([py, "-c", "import time; time.sleep(60)"], 1),
        "works": ([py, "-c", "print('noise'); print('RESULT: 2 of 2 equal')"], 30),
    }
    rows = gpu_check.run_steps(steps, tmp_path)
    assert [(name, status, results) for name, status, _, results in rows] == [
        ("fails", "FAILED (exit 3)", ["half done"]),
        ("hangs", "TIMEOUT after 1 s", []),
        ("works", "ok", ["2 of 2 equal"]),
    ]
    assert "noise" in (tmp_path / "works.log").read_text()
    gpu_check.write_summary(rows, tmp_path, "test machine")
    summary = (tmp_path / "summary.md").read_text()
    assert "| fails | FAILED (exit 3) |" in summary and "| works | ok |" in summary and "2 of 2 equal" in summary


def test_steps_past_the_budget_are_skipped(gpu_check, tmp_path):
    rows = gpu_check.run_steps({"late": ([sys.executable, "-c", "pass"], 30)}, tmp_path, budget_s=1)
    assert rows[0][1] == "skipped: the 8-minute budget is spent"
