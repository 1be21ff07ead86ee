"""Registering COCO-format datasets in Detectron2's DatasetCatalog and MetadataCatalog.

:func:`register_datasets` registers, besides the ``DATASETS.REGISTER_COCO`` entries of
a config, the project's own names:

- ``coco_mini_train``, ``coco_mini_val``: the small COCO subset in
  ``$FPN_RPN_DATA/coco_mini``, with ``annotations/instances_{train,val}2017.json`` and
  ``{train,val}2017/``; registered only where those exist.
- ``coco_extra_train``, ``coco_extra_val``: 799 + 187 more real COCO photographs in
  ``$FPN_RPN_DATA/coco_extra``, with ``annotations/{train,val}.json`` and ``images/``;
  registered only where those exist. Most of their boxes are recovered from COCO's
  labels: no crowd regions, box areas.
- ``fpn_rpn_synthetic_train``, ``fpn_rpn_synthetic_val``: the embedded dataset of
  :mod:`fpn_rpn.data.synthetic_data` in ``$DETECTRON2_DATASETS/fpn_rpn_synthetic``, which
  ``tools/make_synthetic_dataset.py`` generates; registered always, so that loading it
  without its files says how to make them.

The two folders come from environment variables, read when datasets are registered:

- ``$DETECTRON2_DATASETS``: the datasets root, as for Detectron2's built-in names
  (``coco_2017_train``, ...). Unset: ``datasets/`` of the repository when the package runs
  from a checkout (an editable install), else ``./datasets`` as in Detectron2.
- ``$FPN_RPN_DATA``: the folder holding ``coco_mini/`` and ``coco_extra/``. Unset:
  ``../shared/data`` beside the repository when the package runs from a checkout, else
  none (the names are not registered). A configured name that is missing then says
  which variable to set (:func:`missing_dataset_hint`).
"""
import functools
import os
from pathlib import Path
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..errors import DataError
from . import synthetic_data
from .coco_checks import load_checked_coco_json

MAKE_SYNTHETIC = "python tools/make_synthetic_dataset.py"
GENERATE_SYNTHETIC = f"generate the synthetic data with: {MAKE_SYNTHETIC}"

__all__ = ["missing_dataset_hint", "register_coco_json", "register_datasets", "shared_data_root", "synthetic_root"]

DATASETS_ENV = "DETECTRON2_DATASETS"
SHARED_DATA_ENV = "FPN_RPN_DATA"
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
# the folders of $FPN_RPN_DATA
SHARED_SPLITS = {"coco_mini": COCO_MINI_SPLITS, "coco_extra": COCO_EXTRA_SPLITS}
SYNTHETIC_PREFIX = "fpn_rpn_synthetic_"


def _checkout() -> Optional[Path]:
    """The repository this module runs from (an editable install), or None (installed elsewhere)."""
    repo = Path(__file__).resolve().parents[3]  # <repo>/projects/fpn_rpn/data/datasets.py
    return repo if (repo / "setup.py").is_file() and (repo / "projects" / "fpn_rpn").is_dir() else None


def _from_env(variable: str, default: Optional[Path]) -> Optional[Path]:
    value = os.environ.get(variable)
    return Path(os.path.expanduser(value)).resolve() if value else default


def shared_data_root() -> Optional[Path]:
    """``$FPN_RPN_DATA``, the folder holding coco_mini/ and coco_extra/ (see the module docstring)."""
    repo = _checkout()
    return _from_env(SHARED_DATA_ENV, repo.parent / "shared" / "data" if repo else None)


def synthetic_root() -> Path:
    """``$DETECTRON2_DATASETS/fpn_rpn_synthetic`` (see the module docstring)."""
    repo = _checkout()
    return _from_env(DATASETS_ENV, repo / "datasets" if repo else Path("datasets").resolve()) / "fpn_rpn_synthetic"


def missing_dataset_hint(name: str) -> Optional[str]:
    """
    What to do, in one line naming the variable or command, when the project's dataset
    ``name`` is not registered (coco_mini_*, coco_extra_*: which file is not found under
    ``$FPN_RPN_DATA``) or lacks its annotation file (fpn_rpn_synthetic_*: the command that
    generates it); None for other names and where the files exist.
    """
    if name.startswith(SYNTHETIC_PREFIX):
        json_file, _ = synthetic_data.dataset_paths(synthetic_root()).get(name[len(SYNTHETIC_PREFIX):], (None, None))
        return None if json_file is None or os.path.isfile(json_file) else GENERATE_SYNTHETIC
    for folder, splits in SHARED_SPLITS.items():
        if name in splits:
            root = shared_data_root()
            if root is None:
                return f"${SHARED_DATA_ENV} is not set: set it to the folder that holds {folder}/"
            missing = [str(root / folder / p) for p in splits[name] if not (root / folder / p).exists()]
            if not missing:
                return None
            return (f"{missing[0]} does not exist: set ${SHARED_DATA_ENV} (now {root}) to the folder that "
                    f"holds {folder}/")
    return None


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

    shared = shared_data_root()
    for folder, splits in SHARED_SPLITS.items() if shared else ():
        for name, (json_file, image_root) in splits.items():
            json_file, image_root = shared / folder / json_file, shared / folder / image_root
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
        raise DataError(f"dataset '{name}': {json_file} does not exist; {GENERATE_SYNTHETIC}")
    return load_checked_coco_json(json_file, image_root, name)
