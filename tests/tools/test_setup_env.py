"""tools/setup_env.sh never falls back silently: a PYTHON whose complete Detectron2 a new
venv cannot see, or --into an environment without torch and Detectron2, stops it with one
line saying what to run instead."""
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO

SETUP_ENV = REPO / "tools" / "setup_env.sh"
BASE_PYTHON = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"


@pytest.fixture(scope="module")
def venv_with_complete_detectron2(tmp_path_factory):
    """A virtualenv (no pip, for speed) whose site-packages hold a stand-in complete
    Detectron2: a ``detectron2`` package with a ``_C`` module."""
    root = tmp_path_factory.mktemp("outer")
    subprocess.run([str(BASE_PYTHON), "-m", "venv", "--without-pip", str(root)], check=True)
    purelib = sysconfig.get_path("purelib", vars={"base": str(root), "platbase": str(root)})
    package = Path(purelib) / "detectron2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "_C.py").write_text("")
    return root / "bin" / "python"


def _setup_env(*args):
    return subprocess.run(["bash", str(SETUP_ENV), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_venv_that_cannot_see_the_complete_detectron2_stops(venv_with_complete_detectron2, tmp_path):
    new_venv = tmp_path / "venv"
    run = _setup_env(venv_with_complete_detectron2, new_venv)
    assert run.returncode == 1
    (line,) = run.stderr.splitlines()
    assert line.startswith(f"[setup_env] error: {venv_with_complete_detectron2} has a complete Detectron2 (")
    assert f"make install-into PYTHON={venv_with_complete_detectron2}" in line
    assert not new_venv.exists()  # removed again: a later `make test` must not find it half-made
    assert "installing" not in run.stdout  # nothing was installed


def test_into_an_environment_without_torch_stops(venv_with_complete_detectron2):
    run = _setup_env("--into", venv_with_complete_detectron2)
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        f"[setup_env] error: {venv_with_complete_detectron2} cannot import torch and detectron2; "
        "install them first, or use 'make venv' for a new environment"
    ]
