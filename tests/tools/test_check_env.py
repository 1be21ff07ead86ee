"""python -m fpn_rpn.check_env says which torch, CUDA and Detectron2 it found, and whether
Detectron2's _C is compiled, on both kinds of install."""
import fpn_rpn  # noqa: F401  # before detectron2

import os

import detectron2
import torch

from fpn_rpn import check_env, compat
from fpn_rpn.lazy_config import lazy_config_problem


def test_report_names_what_was_found(capsys):
    check_env.main()
    lines = capsys.readouterr().out.splitlines()
    report = dict(check_env.environment_report())
    assert len(lines) == len(report) and all(line.startswith("[check_env] ") for line in lines)
    assert report["detectron2"].endswith(" at " + os.path.dirname(os.path.abspath(detectron2.__file__)))
    assert report["torch"].startswith(torch.__version__ + " at ")
    assert report["CUDA"].startswith(f"torch built with {torch.version.cuda or 'none'}")
    assert report["fpn_rpn"] == os.path.dirname(os.path.abspath(fpn_rpn.__file__))


def test_report_tells_the_two_detectron2s_apart():
    report = dict(check_env.environment_report())
    if compat.is_complete_detectron2():
        assert report["detectron2._C"].startswith("compiled (_C.")
    else:
        assert report["detectron2._C"].startswith("missing: fpn_rpn.compat's placeholder")
    problem = lazy_config_problem()
    assert report["LazyConfig"] == ("supported" if problem is None else f"not supported: {problem}")
