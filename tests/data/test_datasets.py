import re
from pathlib import Path

import pytest

import fpn_rpn  # noqa: F401  (must precede detectron2)
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from fpn_rpn import add_fpn_rpn_config
from fpn_rpn.data import synthetic_data
from fpn_rpn.data.build import check_datasets
from fpn_rpn.data.datasets import register_coco_json, register_datasets, shared_data_root, synthetic_root
from fpn_rpn.errors import DataError

PROJECT_NAMES = ["coco_mini_train", "coco_mini_val", "fpn_rpn_synthetic_train", "fpn_rpn_synthetic_val"]


@pytest.fixture(autouse=True)
def catalogs():
    """Run each test without the project's names registered, and undo its registrations."""
    datasets, metadata = dict(DatasetCatalog), dict(MetadataCatalog)
    for name in PROJECT_NAMES:
        DatasetCatalog.pop(name, None)
        MetadataCatalog.pop(name, None)
    yield
    for catalog, saved in ((DatasetCatalog, datasets), (MetadataCatalog, metadata)):
        catalog.clear()
        catalog.update(saved)


@pytest.fixture
def coco_mini_val(coco_mini):
    if not coco_mini.is_dir():
        pytest.skip(f"{coco_mini} not found")
    return str(coco_mini / "annotations" / "instances_val2017.json"), str(coco_mini / "val2017")


def _cfg(register=(), train=(), test=()):
    cfg = get_cfg()
    add_fpn_rpn_config(cfg)
    cfg.DATASETS.REGISTER_COCO = [list(entry) for entry in register]
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = tuple(train), tuple(test)
    return cfg


def test_register_coco_json(coco_mini_val):
    json_file, image_root = coco_mini_val
    register_coco_json("test_mini_val", json_file, image_root)
    register_coco_json("test_mini_val", json_file, image_root)  # same files: nothing to do
    records = DatasetCatalog.get("test_mini_val")
    assert len(records) == 158
    assert all(Path(r["file_name"]).parent == Path(image_root) for r in records)
    metadata = MetadataCatalog.get("test_mini_val")
    assert (metadata.json_file, metadata.image_root, metadata.evaluator_type) == (json_file, image_root, "coco")
    assert len(metadata.thing_classes) == 80


def test_register_coco_json_other_files_is_an_error(coco_mini_val, coco_mini):
    json_file, image_root = coco_mini_val
    register_coco_json("test_mini_val", json_file, image_root)
    with pytest.raises(ValueError, match="'test_mini_val' is already registered"):
        register_coco_json("test_mini_val", json_file, str(coco_mini / "train2017"))


def test_register_coco_json_missing_files(coco_mini_val, tmp_path):
    json_file, image_root = coco_mini_val
    missing = str(tmp_path / "instances_missing.json")
    with pytest.raises(ValueError, match=f"'test_missing'.*{re.escape(missing)} does not exist"):
        register_coco_json("test_missing", missing, image_root)
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'images'))} does not exist"):
        register_coco_json("test_missing", json_file, tmp_path / "images")
    assert "test_missing" not in DatasetCatalog.list()


def test_register_datasets_from_config(coco_mini_val, tmp_path):
    cfg = _cfg(register=[("test_mini_val", *coco_mini_val)])
    register_datasets(cfg)
    register_datasets(cfg)  # twice is harmless
    assert len(DatasetCatalog.get("test_mini_val")) == 158

    missing = str(tmp_path / "instances_missing.json")
    with pytest.raises(ValueError, match=re.escape(missing)):
        register_datasets(_cfg(register=[("test_missing", missing, coco_mini_val[1])]))
    with pytest.raises(ValueError, match=r"\[name, json_file, image_root\]"):
        register_datasets(_cfg(register=[("test_short", coco_mini_val[0])]))


def test_register_datasets_coco_mini(coco_mini, monkeypatch, tmp_path):
    if not coco_mini.is_dir():
        pytest.skip(f"{coco_mini} not found")
    monkeypatch.setenv("FPN_RPN_DATA", str(tmp_path / "nowhere"))
    register_datasets(_cfg())
    assert "coco_mini_val" not in DatasetCatalog.list()

    monkeypatch.delenv("FPN_RPN_DATA")  # the default: next to the repository
    register_datasets(_cfg())
    assert len(DatasetCatalog.get("coco_mini_train")) == 160
    assert len(DatasetCatalog.get("coco_mini_val")) == 158
    registered = Path(MetadataCatalog.get("coco_mini_val").json_file)
    assert registered.resolve() == (coco_mini / "annotations" / "instances_val2017.json").resolve()


def test_synthetic_root(monkeypatch, tmp_path):
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    assert synthetic_root() == Path(__file__).resolve().parents[2] / "datasets" / "fpn_rpn_synthetic"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert synthetic_root() == tmp_path / "fpn_rpn_synthetic"


def test_shared_data_root(monkeypatch, tmp_path):
    monkeypatch.delenv("FPN_RPN_DATA", raising=False)  # the default, in this checkout: ../shared/data
    assert shared_data_root() == Path(__file__).resolve().parents[3] / "shared" / "data"
    monkeypatch.setenv("FPN_RPN_DATA", str(tmp_path))
    assert shared_data_root() == tmp_path


@pytest.mark.parametrize("name, folder, json_file", [
    ("coco_mini_val", "coco_mini", "annotations/instances_val2017.json"),
    ("coco_extra_train", "coco_extra", "annotations/train.json"),
])
def test_shared_data_not_found_names_the_variable(monkeypatch, tmp_path, name, folder, json_file, catalogs):
    monkeypatch.setenv("FPN_RPN_DATA", str(tmp_path))
    # registered by an earlier test of the session from the real folder: start without it
    for catalog in (DatasetCatalog, MetadataCatalog):
        if name in catalog.list():
            catalog.remove(name)
    cfg = _cfg(test=[name])
    register_datasets(cfg)
    missing = tmp_path / folder / json_file
    with pytest.raises(DataError, match=f"^DATASETS.TEST names dataset '{name}', which is not registered: "
                                        f"{re.escape(str(missing))} does not exist: set \\$FPN_RPN_DATA "
                                        f"\\(now {re.escape(str(tmp_path))}\\) to the folder that holds {folder}/$"):
        check_datasets(cfg)


def test_missing_synthetic_data_with_detectron2_datasets_names_the_command(synthetic_root_in_tmp):
    # under $DETECTRON2_DATASETS, like Detectron2's built-in names, but generated by a command
    cfg = _cfg(train=["fpn_rpn_synthetic_train"])
    register_datasets(cfg)
    json_file = synthetic_root_in_tmp / "annotations" / "instances_train.json"
    with pytest.raises(DataError, match=f"^dataset 'fpn_rpn_synthetic_train' \\(DATASETS.TRAIN\\): annotation file "
                                        f"{re.escape(str(json_file))} does not exist; generate the synthetic data "
                                        r"with: python tools/make_synthetic_dataset.py$"):
        check_datasets(cfg)


@pytest.fixture
def synthetic_root_in_tmp(monkeypatch, tmp_path):
    """$DETECTRON2_DATASETS under tmp_path, with nothing generated yet."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    return tmp_path / "fpn_rpn_synthetic"


def test_registering_the_synthetic_dataset_generates_nothing(synthetic_root_in_tmp):
    register_datasets(_cfg(train=["fpn_rpn_synthetic_train"], test=["fpn_rpn_synthetic_val"]))
    register_datasets(_cfg(train=["fpn_rpn_synthetic_train"], test=["fpn_rpn_synthetic_val"]))
    assert not synthetic_root_in_tmp.exists()
    metadata = MetadataCatalog.get("fpn_rpn_synthetic_val")
    assert metadata.json_file == str(synthetic_root_in_tmp / "annotations" / "instances_val.json")
    assert metadata.evaluator_type == "coco"


def test_missing_synthetic_data_names_the_command(synthetic_root_in_tmp):
    register_datasets(_cfg())
    json_file = synthetic_root_in_tmp / "annotations" / "instances_train.json"
    with pytest.raises(DataError, match=f"^dataset 'fpn_rpn_synthetic_train': {re.escape(str(json_file))} does not "
                                        r"exist; generate the synthetic data with: python tools/make_synthetic_dataset.py$"):
        DatasetCatalog.get("fpn_rpn_synthetic_train")


def test_synthetic_dataset_loads_once_generated(synthetic_root_in_tmp):
    synthetic_data.generate_synthetic_dataset(synthetic_root_in_tmp, num_train=3, num_val=2)
    register_datasets(_cfg())
    assert len(DatasetCatalog.get("fpn_rpn_synthetic_val")) == 2
    assert len(DatasetCatalog.get("fpn_rpn_synthetic_train")) == 3
    assert MetadataCatalog.get("fpn_rpn_synthetic_val").thing_classes == ["rectangle", "ellipse", "triangle", "polygon"]


def test_installed_outside_a_checkout_without_fpn_rpn_data(monkeypatch):
    from fpn_rpn.data import datasets

    monkeypatch.setattr(datasets, "_checkout", lambda: None)  # as from a wheel in site-packages
    monkeypatch.delenv("FPN_RPN_DATA", raising=False)
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    assert shared_data_root() is None
    assert synthetic_root() == Path("datasets").resolve() / "fpn_rpn_synthetic"  # Detectron2's default
    register_datasets(_cfg())
    assert "coco_mini_val" not in DatasetCatalog.list()
    assert datasets.missing_dataset_hint("coco_mini_val") == (
        "$FPN_RPN_DATA is not set: set it to the folder that holds coco_mini/")
    assert datasets.missing_dataset_hint("coco_2017_val") is None
