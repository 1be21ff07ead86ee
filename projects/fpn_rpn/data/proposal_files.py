"""Reading Detectron2 proposal files (``box_proposals.pkl``, as ``DATASETS.PROPOSAL_FILES_*``
take them), with the checks Detectron2's ``load_proposals_into_dataset`` lacks: it fails
with a bare KeyError or an unpickling traceback.

A proposal file is a pickled dict with "ids", "boxes" (per image (N, 4)),
"objectness_logits" (per image (N,)) and optionally "bbox_mode" (default XYXY_ABS);
Detectron1's "indexes"/"scores" names are accepted, as Detectron2 does. Ids are
matched as strings, as Detectron2 matches them.
"""
import os
import pickle
from typing import Any, Dict, Iterable

from detectron2.utils.file_io import PathManager

from ..errors import DataError, examples, first_line

__all__ = ["read_proposal_file", "check_covers_images"]

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
