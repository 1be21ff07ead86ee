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


@pytest.fixture
def catalogs():
    """Undo the test's dataset registrations in Detectron2's global catalogs."""
    import fpn_rpn  # noqa: F401  # before detectron2
    from detectron2.data import DatasetCatalog, MetadataCatalog

    saved = dict(DatasetCatalog), dict(MetadataCatalog)
    yield
    for catalog, entries in zip((DatasetCatalog, MetadataCatalog), saved):
        catalog.clear()
        catalog.update(entries)
