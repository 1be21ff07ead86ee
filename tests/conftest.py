from pathlib import Path

import pytest

import fpn_rpn  # noqa: F401  # applies fpn_rpn.compat before any test module imports detectron2

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Detectron2 v0.6 scripts a few helpers at import time; torch 2.14 warns on each.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script` is deprecated:FutureWarning")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    """The shared COCO subset (158 val, 160 train images), next to the repository."""
    return REPO.parent / "shared" / "data" / "coco_mini"
