"""Registering COCO-format datasets in Detectron2's DatasetCatalog and MetadataCatalog.

:func:`register_datasets` registers, besides the ``DATASETS.REGISTER_COCO`` entries of
a config, the project's own names:

- ``coco_mini_train``, ``coco_mini_val``: the small COCO subset in
  ``$FPN_RPN_COCO_MINI`` (default ``<repository>/../shared/data/coco_mini``), with
  ``annotations/instances_{train,val}2017.json`` and ``{train,val}2017/``; registered
  only where those exist.
- ``coco_extra_train``, ``coco_extra_val``: 799 + 187 more real COCO photographs in
  ``$FPN_RPN_COCO_EXTRA`` (default ``<repository>/../shared/data/coco_extra``), with
  ``annotations/{train,val}.json`` and ``images/``; registered only where those exist.
  Most of their boxes are recovered from COCO's labels: no crowd regions, box areas.
- ``fpn_rpn_synthetic_train``, ``fpn_rpn_synthetic_val``: the embedded dataset of
  :mod:`fpn_rpn.data.synthetic_data` in ``$FPN_RPN_DATASETS/fpn_rpn_synthetic`` (default
  ``<repository>/datasets/fpn_rpn_synthetic``), which ``tools/make_synthetic_dataset.py``
  generates; registered always, so that loading it without its files says how to make them.

Detectron2's built-in names (``coco_2017_train``, ...) are Detectron2's, found under
``$DETECTRON2_DATASETS`` as usual.
"""
import functools
import os
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog

from . import synthetic_data
from .coco_checks import DataError, load_checked_coco_json

MAKE_SYNTHETIC = "python tools/make_synthetic_dataset.py"

__all__ = ["register_coco_json", "register_datasets"]

# projects/fpn_rpn/data/datasets.py -> the repository, when installed editable
_REPO = Path(__file__).resolve().parents[3]
COCO_MINI_SPLITS = {
    "coco_mini_train": ("annotations/instances_train2017.json", "train2017"),
    "coco_mini_val": ("annotations/instances_val2017.json", "val2017"),
}
# More real COCO photographs; most boxes recovered from COCO's labels, without crowd
# regions and with box areas (see its README before evaluating on it).
COCO_EXTRA_SPLITS = {
    "coco_extra_train": ("annotations/train.json", "images"),
    "coco_extra_val": ("annotations/val.json", "images"),
}
SYNTHETIC_PREFIX = "fpn_rpn_synthetic_"


def coco_mini_root() -> Path:
    return Path(os.environ.get("FPN_RPN_COCO_MINI", _REPO.parent / "shared" / "data" / "coco_mini")).resolve()


def coco_extra_root() -> Path:
    return Path(os.environ.get("FPN_RPN_COCO_EXTRA", _REPO.parent / "shared" / "data" / "coco_extra")).resolve()


def synthetic_root() -> Path:
    # like $DETECTRON2_DATASETS, the folder that holds the dataset's folder
    return (Path(os.environ.get("FPN_RPN_DATASETS", _REPO / "datasets")) / "fpn_rpn_synthetic").resolve()


def register_coco_json(name: str, json_file, image_root) -> None:
    """
    Register a COCO-format dataset under ``name``, as Detectron2's
    ``register_coco_instances`` does, but loaded with
    :func:`fpn_rpn.data.coco_checks.load_checked_coco_json`: the file is checked when the
    dataset is first loaded, and bad records stop it with a DataError or are repaired
    with a warning.

    Relative paths are taken from the current directory. Registering a name again
    with the same files does nothing.

    Raises:
        ValueError: ``name`` is already registered with other files.
        DataError (a ValueError): ``json_file`` or ``image_root`` does not exist.
    """
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    if name in DatasetCatalog.list():
        _check_same_files(name, json_file, image_root)
        return
    if not os.path.isfile(json_file):
        raise DataError(f"Dataset '{name}': annotation file {json_file} does not exist")
    if not os.path.isdir(image_root):
        raise DataError(f"Dataset '{name}': image folder {image_root} does not exist")
    DatasetCatalog.register(name, functools.partial(load_checked_coco_json, json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


def _check_same_files(name: str, json_file: str, image_root: str) -> None:
    metadata = MetadataCatalog.get(name)
    registered = tuple(
        None if path is None else os.path.abspath(path)
        for path in (getattr(metadata, "json_file", None), getattr(metadata, "image_root", None))
    )
    if registered != (json_file, image_root):
        raise ValueError(
            f"Dataset '{name}' is already registered with json_file={registered[0]}, "
            f"image_root={registered[1]}; cannot register it again with json_file={json_file}, "
            f"image_root={image_root}"
        )


def register_datasets(cfg) -> None:
    """
    Register the datasets of ``cfg.DATASETS.REGISTER_COCO`` and the project's own names
    (see the module docstring), leaving registered names alone, so that calling it
    twice is harmless. Nothing is read or written: files are checked when a dataset is
    first loaded (``DatasetCatalog.get``).
    """
    for entry in cfg.DATASETS.REGISTER_COCO:
        if len(entry) != 3:
            raise ValueError(f"DATASETS.REGISTER_COCO entries are [name, json_file, image_root], got {entry}")
        register_coco_json(*entry)

    for root, splits in ((coco_mini_root(), COCO_MINI_SPLITS), (coco_extra_root(), COCO_EXTRA_SPLITS)):
        for name, (json_file, image_root) in splits.items():
            json_file, image_root = root / json_file, root / image_root
            if name not in DatasetCatalog.list() and json_file.is_file() and image_root.is_dir():
                register_coco_json(name, json_file, image_root)

    root = synthetic_root()
    for split, (json_file, image_root) in synthetic_data.dataset_paths(root).items():
        name = SYNTHETIC_PREFIX + split
        if name not in DatasetCatalog.list():
            # register_coco_json, but one that says how to make the files when they are missing
            DatasetCatalog.register(name, functools.partial(_load_synthetic, json_file, image_root, name))
            MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


def _load_synthetic(json_file: str, image_root: str, name: str):
    if not os.path.isfile(json_file):
        raise DataError(f"dataset '{name}': {json_file} does not exist; generate the synthetic data with: "
                        f"{MAKE_SYNTHETIC}")
    return load_checked_coco_json(json_file, image_root, name)
