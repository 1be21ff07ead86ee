"""Detectron2 proposal files (``box_proposals.pkl``, as ``DATASETS.PROPOSAL_FILES_*`` take them):
reading them with the checks Detectron2's ``load_proposals_into_dataset`` lacks (it fails
with a bare KeyError or an unpickling traceback), checking a config's files before
training, loading one as arrays for the recall tools, and writing one.

- :func:`read_proposal_file`, :func:`check_covers_images`: the file's dict, checked.
- :func:`check_proposal_file`, :func:`check_proposal_files`: before training or evaluating.
- :func:`load_proposal_file`: per image, boxes and scores as arrays (compare_recall.py,
  visualize_proposals.py).
- :func:`write_proposal_file`: the file the recall evaluator saves.

A proposal file is a pickled dict with "ids", "boxes" (per image (N, 4)),
"objectness_logits" (per image (N,)) and optionally "bbox_mode" (default XYXY_ABS);
Detectron1's "indexes"/"scores" names are accepted, as Detectron2 does. Ids are
matched as strings, as Detectron2 matches them.
"""
import os
import pickle
from typing import Any, Dict, Iterable, Sequence

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

from ..errors import ConfigError, DataError, examples, first_line

__all__ = [
    "PROPOSAL_KEYS",
    "check_covers_images",
    "check_proposal_file",
    "check_proposal_files",
    "load_proposal_file",
    "read_proposal_file",
    "write_proposal_file",
]

PROPOSAL_KEYS = ("ids", "boxes", "objectness_logits")


def read_proposal_file(path) -> Dict[str, Any]:
    """
    The proposal file's dict, with Detectron1's key names renamed to Detectron2's.

    Raises:
        DataError: the file is missing, is not a pickle, is not a dict, lacks a key, or
            its lists differ in length.
    """
    path = os.fspath(path)
    try:
        with PathManager.open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    except FileNotFoundError as e:
        raise DataError(f"{path}: proposal file does not exist") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, KeyError,
            IndexError) as e:  # what unpickling a file of another kind raises
        raise DataError(
            f"{path}: cannot be read as a proposal file ({type(e).__name__}: {first_line(e)})"
        ) from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: holds a {type(data).__name__}, not a proposal file (a dict with {list(PROPOSAL_KEYS)})")
    data = dict(data)
    for old, new in (("indexes", "ids"), ("scores", "objectness_logits")):  # Detectron1 names
        if old in data and new not in data:
            data[new] = data.pop(old)
    missing = [k for k in PROPOSAL_KEYS if k not in data]
    if missing:
        raise DataError(f"{path}: proposal file lacks {missing}; it has keys {sorted(data)}")
    lengths = [len(data[k]) for k in PROPOSAL_KEYS]
    if len(set(lengths)) > 1:
        raise DataError(
            f"{path}: {lengths[0]} ids, {lengths[1]} box arrays and {lengths[2]} objectness_logits arrays; "
            "they must be as many"
        )
    return data


def check_covers_images(path, data: Dict[str, Any], image_ids: Iterable, dataset_name: str) -> None:
    """Raise DataError unless the file's ``data`` has proposals for every one of ``image_ids``."""
    image_ids = list(image_ids)
    have = {str(i) for i in data["ids"]}  # Detectron2 matches ids as strings
    missing = [i for i in image_ids if str(i) not in have]
    if missing:
        extra = len(have - {str(i) for i in image_ids})
        raise DataError(
            f"{os.fspath(path)}: no proposals for {len(missing)} of the {len(image_ids)} images of dataset "
            f"'{dataset_name}' (image ids {examples(missing)}); the file has proposals for {len(have)} "
            f"images, {extra} of them not in the dataset: was it made for another dataset?"
        )


def check_proposal_file(proposal_file, dataset_name: str) -> None:
    """
    Raise DataError unless ``proposal_file`` (Detectron2's precomputed-proposal
    format, as ``DATASETS.PROPOSAL_FILES_*`` take) has proposals for every image of
    the registered dataset ``dataset_name``; Detectron2 would stop with a bare
    KeyError at the first image without.
    """
    data = read_proposal_file(proposal_file)
    image_ids = [record["image_id"] for record in DatasetCatalog.get(dataset_name)]
    check_covers_images(proposal_file, data, image_ids, dataset_name)


def check_proposal_files(cfg, splits=("TRAIN", "TEST")):
    """
    DataError unless each dataset of ``DATASETS.<split>`` has a proposal file that covers
    all its images (Detectron2: a KeyError). Evaluating alone needs only ``("TEST",)``.
    """
    for split in splits:
        names, files = cfg.DATASETS.get(split), cfg.DATASETS.get(f"PROPOSAL_FILES_{split}")
        if len(names) != len(files):
            raise ConfigError(f"DATASETS.PROPOSAL_FILES_{split} has {len(files)} files for the "
                              f"{len(names)} datasets of DATASETS.{split}: give one per dataset")
        for name, proposal_file in zip(names, files):
            check_proposal_file(proposal_file, name)


def load_proposal_file(path: str, dataset_dicts_or_ids: Iterable, dataset_name: str = "") -> Dict[Any, Dict[str, np.ndarray]]:
    """
    The proposals of a proposal file for the given images.

    Args:
        path: the ``.pkl`` file.
        dataset_dicts_or_ids: the dataset's records (with "image_id") or image ids.
        dataset_name: named in messages.

    Returns:
        image_id (as in the dataset) -> {"boxes": (N, 4) float32 XYXY_ABS, "scores": (N,)
        float32}, every box of the file kept.

    Raises:
        DataError: the file cannot be read as a proposal file, or images of the dataset
            have no entry in it.
    """
    data = read_proposal_file(path)
    image_ids = [d["image_id"] if isinstance(d, dict) else d for d in dataset_dicts_or_ids]
    check_covers_images(path, data, image_ids, dataset_name)
    bbox_mode = BoxMode(data.get("bbox_mode", BoxMode.XYXY_ABS))
    index = {str(i): n for n, i in enumerate(data["ids"])}
    proposals = {}
    for img_id in image_ids:
        n = index[str(img_id)]
        b = np.asarray(data["boxes"][n], dtype=np.float32).reshape(-1, 4)
        s = np.asarray(data["objectness_logits"][n], dtype=np.float32).reshape(-1)
        if len(b) != len(s):
            raise DataError(f"{path}: image {img_id!r} has {len(b)} boxes but {len(s)} objectness_logits")
        if bbox_mode != BoxMode.XYXY_ABS:
            b = BoxMode.convert(b, bbox_mode, BoxMode.XYXY_ABS).astype(np.float32)
        proposals[img_id] = {"boxes": b, "scores": s}
    return proposals


def write_proposal_file(path, ids: Sequence, boxes: Sequence[np.ndarray], objectness_logits: Sequence[np.ndarray]) -> None:
    """
    Write a proposal file, in the layout COCOEvaluator writes and
    ``load_proposals_into_dataset`` reads: per image, ``boxes`` (N, 4) XYXY_ABS and
    ``objectness_logits`` (N,).
    """
    proposal_data = {
        "ids": list(ids),
        "boxes": list(boxes),
        "objectness_logits": list(objectness_logits),
        "bbox_mode": BoxMode.XYXY_ABS.value,
    }
    path = os.fspath(path)
    PathManager.mkdirs(os.path.dirname(path) or ".")
    with PathManager.open(path, "wb") as f:
        pickle.dump(proposal_data, f)
