import importlib.util
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


def load_tool(name: str):
    """tools/<name>.py as a module (the tools are scripts, not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def coco_dict(images, annotations, categories=(1,)):
    """A COCO-format dict of 100x100 images; annotations as (image_id, xyxy, area, iscrowd, category_id)."""
    return {
        "images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in images],
        "annotations": [
            {
                "id": n + 1,
                "image_id": img,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": area,
                "iscrowd": crowd,
                "category_id": cat,
            }
            for n, (img, (x1, y1, x2, y2), area, crowd, cat) in enumerate(annotations)
        ],
        "categories": [{"id": c, "name": str(c)} for c in categories],
    }
