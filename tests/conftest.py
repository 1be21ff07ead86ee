import importlib.util
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# the real photographs the tests use where realism matters, next to the repository
needs_coco_mini = pytest.mark.skipif(
    not (REPO.parent / "shared" / "data" / "coco_mini" / "annotations").is_dir(),
    reason="coco_mini not found next to the repository (../shared/data/coco_mini)",
)


def pytest_configure(config):
    # Raised inside Detectron2 v0.6 on torch 2.14 (its stock anchor generator), not by fpn_rpn.
    config.addinivalue_line("filterwarnings", "ignore:torch.meshgrid. in an upcoming release:UserWarning")


@pytest.fixture(params=[
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
])
def device(request) -> torch.device:
    """Each test that takes it runs on CPU and on CUDA; the CUDA run (ids ``[cuda]``, selected
    by ``pytest -k cuda``, as tools/gpu_check.py does) skips where no GPU is visible."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    """The shared COCO subset (158 val, 160 train images), next to the repository (skips where it is missing)."""
    root = REPO.parent / "shared" / "data" / "coco_mini"
    if not (root / "annotations").is_dir():
        pytest.skip(f"coco_mini not found at {root}")
    return root


@pytest.fixture(scope="session")
def coco_mini_val(coco_mini):
    """pycocotools' COCO of coco_mini's val annotations (skips where they are missing)."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    json_file = coco_mini / "annotations" / "instances_val2017.json"
    if not json_file.is_file():
        pytest.skip(f"{json_file} not found")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(json_file))


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


def cli(capsys, tool: str, argv):
    """(exit status, stderr lines) of tools/<tool>.py with ``argv``, ended as its __main__ ends it."""
    from fpn_rpn.cli import run_cli

    with pytest.raises(SystemExit) as info, mock.patch.object(sys, "argv", [f"tools/{tool}.py"]):  # argparse's prog
        run_cli(load_tool(tool).main, f"{tool}.py", (argv,))
    return info.value.code, capsys.readouterr().err.strip().splitlines()


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


def gt_instances(image_size, boxes):
    """Ground-truth Instances of one image: (G, 4) XYXY ``boxes``."""
    import torch
    from detectron2.structures import Boxes, Instances

    inst = Instances(image_size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    return inst


def rpn_inputs(shapes, image_sizes, gt_boxes, seed=0, padded=128):
    """
    (ImageList of the images padded to ``padded`` x ``padded``, random features of ``shapes``
    ({name: ShapeSpec}), ground-truth Instances of ``gt_boxes``), for a proposal generator.
    """
    import torch
    from detectron2.structures import ImageList

    g = torch.Generator().manual_seed(seed)
    images = ImageList(torch.zeros(len(image_sizes), 3, padded, padded), list(image_sizes))
    features = {f: torch.randn(len(image_sizes), s.channels, padded // s.stride, padded // s.stride, generator=g)
                for f, s in shapes.items()}
    return images, features, [gt_instances(size, boxes) for size, boxes in zip(image_sizes, gt_boxes)]
