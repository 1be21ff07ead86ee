from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Raised inside Detectron2 v0.6 on torch 2.14, not by fpn_rpn: keep them out of the report.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script` is deprecated:FutureWarning")
    config.addinivalue_line("filterwarnings", "ignore:torch.meshgrid. in an upcoming release:UserWarning")


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    """The shared COCO subset (158 val, 160 train images), next to the repository."""
    return REPO.parent / "shared" / "data" / "coco_mini"
