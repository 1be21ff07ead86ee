"""The dataset faults that Detectron2's data loaders (detectron2/data/build.py) stop on with
a bare assertion or KeyError, found before any work, or named in one DataError line.

- :func:`check_datasets`, before training: a dataset name that is not registered (a
  KeyError listing every registered name), or a Detectron2 built-in dataset whose
  annotation file is not where ``$DETECTRON2_DATASETS`` says (a FileNotFoundError
  from pycocotools); and a test set without COCO's categories for
  ``TEST.RECALL_CATEGORY_GROUPS``.
- :func:`dataset_assertions`, around building a loader: a training set left without
  any image by ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` ("No valid data found in ..."),
  and a dataset without images ("Dataset '...' is empty!").
- :func:`loader_worker_deaths`, around training and evaluation: a data-loading worker
  process killed (torch's RuntimeError), as a :class:`ProcessDiedError`.

:func:`train_dataset_dicts` builds the training records, with ``DATASETS.TRAIN_CATEGORIES``
applied (:func:`category_dataset_dicts`, which LazyConfigs call); the trainer hands them to
``build_detection_train_loader``.
"""
import contextlib
import difflib
import logging
import os
import re
from typing import List

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts

from ..errors import ConfigError, DataError, ProcessDiedError, first_line
from .categories import NAMED_SETS, category_ids, dataset_category_names, describe, keep_categories
from .datasets import missing_dataset_hint

__all__ = ["category_dataset_dicts", "check_datasets", "dataset_assertions", "loader_worker_deaths", "train_dataset_dicts",
           "unregistered_dataset_error"]


def unregistered_dataset_error(where: str, name: str) -> DataError:
    """The one line for a dataset ``name`` that ``where`` (a config key, a tool option) names but
    that is not registered, with the closest registered name."""
    missing = missing_dataset_hint(name)  # the project's name, its files not found
    if missing:
        return DataError(f"{where} names dataset '{name}', which is not registered: {missing}")
    close = difflib.get_close_matches(name, DatasetCatalog.list(), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return DataError(
        f"{where} names dataset '{name}', which is not registered; {hint}a COCO json and image folder "
        "are registered with DATASETS.REGISTER_COCO [[name, json_file, image_root]]"
    )


def check_datasets(cfg, splits=("TRAIN", "TEST")) -> None:
    """
    Raise DataError if a dataset of ``DATASETS.<split>`` is not registered, or is a
    Detectron2 built-in one whose annotation file does not exist; ConfigError if
    ``TEST.RECALL_CATEGORY_GROUPS`` is set and a test dataset does not number its
    categories as COCO does (found here, before training, rather than at evaluation).
    """
    root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    for split in splits:
        for name in cfg.DATASETS.get(split):
            if name not in DatasetCatalog.list():
                raise unregistered_dataset_error(f"DATASETS.{split}", name)
            json_file = getattr(MetadataCatalog.get(name), "json_file", None)
            # only the built-in names are registered with paths under $DETECTRON2_DATASETS
            if json_file and json_file.startswith(os.path.join(root, "")) and not os.path.isfile(json_file):
                raise DataError(
                    f"dataset '{name}' ({'DATASETS.' + split}): annotation file {json_file} does not exist; "
                    + (missing_dataset_hint(name) or f"Detectron2's built-in datasets are read from "
                       f"$DETECTRON2_DATASETS (now {root!r}): set it to the folder that holds coco/")
                )
    if "TEST" in splits and cfg.TEST.RECALL_CATEGORY_GROUPS:
        for name in cfg.DATASETS.TEST:
            if not hasattr(MetadataCatalog.get(name), "thing_dataset_id_to_contiguous_id"):
                DatasetCatalog.get(name)  # loading a COCO json sets its categories in the metadata
            dataset_category_names(name, "TEST.RECALL_CATEGORY_GROUPS")


@contextlib.contextmanager
def dataset_assertions(cfg):
    """Turn the AssertionErrors of Detectron2's dataset loading into one DataError line."""
    try:
        yield
    except AssertionError as e:
        message = str(e)
        empty = re.fullmatch(r"Dataset '(.*)' is empty!", message)
        if empty:
            raise DataError(f"dataset '{empty.group(1)}' has no images") from e
        if not message.startswith("No valid data found in"):
            raise
        why = "no annotations or crowd annotations only"
        if cfg.MODEL.KEYPOINT_ON:
            why += ", or fewer than MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE keypoints"
        raise DataError(
            f"no training images left in DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)}: every image has {why}, "
            "and DATALOADER.FILTER_EMPTY_ANNOTATIONS True leaves such images out of training; set it to False "
            "to train on them as background, or check the annotation file"
        ) from e


@contextlib.contextmanager
def loader_worker_deaths():
    """Turn torch's RuntimeError for a DataLoader worker that died into one ProcessDiedError line."""
    try:
        yield
    except RuntimeError as e:
        # torch: "DataLoader worker (pid 123) is killed by signal: Killed." or "... exited unexpectedly ..."
        if not str(e).startswith("DataLoader worker (pid"):
            raise
        raise ProcessDiedError(
            f"{first_line(e).split('. Details')[0].rstrip('.')}: a data-loading process died without a Python "
            "error (the system kills processes this way when memory runs out: see dmesg; fewer "
            "DATALOADER.NUM_WORKERS use less); training continues from its last checkpoint with --resume"
        ) from e


def train_dataset_dicts(cfg) -> List[dict]:
    """
    The training records of ``cfg``: :func:`category_dataset_dicts` of ``DATASETS.TRAIN`` and
    ``DATASETS.TRAIN_CATEGORIES``, with the arguments ``build_detection_train_loader`` gives
    Detectron2's ``get_detection_dataset_dicts`` when it has no ``dataset``.
    """
    return category_dataset_dicts(
        cfg.DATASETS.TRAIN,
        cfg.DATASETS.TRAIN_CATEGORIES,
        key="DATASETS.TRAIN_CATEGORIES",
        names_key="DATASETS.TRAIN",
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )


def category_dataset_dicts(names, categories="all", *, key: str = "categories", names_key: str = "names",
                           **kwargs) -> List[dict]:
    """
    Detectron2's ``get_detection_dataset_dicts(names, **kwargs)``, then, unless
    ``categories`` is every COCO category, only the annotations of those categories
    (:func:`fpn_rpn.data.categories.keep_categories`): the other objects become background,
    as in OLN. In a LazyConfig:
    ``dataloader.train.dataset = L(category_dataset_dicts)(names=..., categories="voc")``.

    The subset changes boxes, never images: ``filter_empty`` has already left out the
    images without (non-crowd) annotations in their file, and an image whose boxes are all
    of other categories stays, without boxes (every anchor negative).

    Args:
        names (str or list[str]): registered datasets.
        categories: a category spec (:mod:`fpn_rpn.data.categories`), e.g. "voc".
        key, names_key (str): what the errors call ``categories`` and ``names`` (config keys
            or argument names).

    Raises:
        ConfigError: the subset is not every category and a dataset does not number its
            categories as COCO does, or none of them is in the subset.
    """
    names = [names] if isinstance(names, str) else list(names)
    dicts = get_detection_dataset_dicts(names, **kwargs)
    ids = category_ids(categories, key)
    if ids == NAMED_SETS["all"]:
        return dicts
    contiguous = set()
    for name in names:
        _, id_map = dataset_category_names(name, key)  # loaded above, so its metadata is set
        contiguous |= {id_map[i] for i in ids if i in id_map}
    if not contiguous:
        raise ConfigError(f"{key} = {categories!r} keeps none of the categories of {names_key} {tuple(names)}")
    kept = keep_categories(dicts, contiguous)
    before, after = (sum(len(r.get("annotations", ())) for r in records) for records in (dicts, kept))
    no_boxes = sum(not r.get("annotations") for r in kept)
    logging.getLogger(__name__).info(
        f"{key}: training on {describe(ids)}: {after} of {before} annotations kept; {no_boxes} of "
        f"{len(kept)} images have none left and are trained on as background"
    )
    return kept
