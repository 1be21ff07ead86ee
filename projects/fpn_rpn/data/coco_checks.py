"""Checks of COCO-format datasets (a JSON file and an image folder) as users bring them.

Detectron2 reads such data without checking it: a missing key or id fails deep
inside pycocotools or its loader, and bad boxes are silently dropped, clipped or
trained on. :func:`load_checked_coco_json`, which :func:`fpn_rpn.register_coco_json`
registers, checks the file when the dataset is first loaded (before any training
step), and :class:`CheckedDatasetMapper` checks each image when it is read.

- Errors, raised as :class:`DataError` with one line naming the file and the record:
  the annotation file is missing or not JSON; it lacks an ``images``,
  ``annotations`` or ``categories`` list (an unlabelled set has
  ``"annotations": []``); an image record lacks ``id``, ``file_name``, ``width``
  or ``height``, or its file does not exist; an image, annotation or category id
  is repeated; an annotation names an unknown image or category; a ``bbox`` is not
  four numbers, or has a NaN or infinite value (no rounding makes those: the
  export is broken, and Detectron2 would drop the box, or clip an infinite side to
  the image border and train on it); ``ignore`` is set (Detectron2 does not
  support it); an image file cannot be decoded or has another size than its record.
- Repaired, with one warning per kind and dataset: boxes with zero or negative
  width or height are dropped, boxes entirely outside their image are dropped,
  boxes partly outside are clipped to it. Images left without annotations stay.
  Integer boxes are made floats, without a warning: Detectron2 would truncate them
  to whole pixels of the resized image.
- Left to Detectron2: images without annotations or with crowd annotations only
  are removed from training when ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` is true,
  and kept (trained on as negatives) when it is false.

Image files are only checked for existence when loading: decoding them all would
cost as much as an epoch, so corrupt files are found when first read.
"""
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional

from detectron2.data import DatasetMapper
from detectron2.data.datasets import load_coco_json
from detectron2.data.detection_utils import SizeMismatchError
from PIL import ExifTags, Image

from ..errors import DataError, examples, first_line, is_number

__all__ = [
    "DataError",
    "read_coco_json",
    "check_coco_json",
    "load_checked_coco_json",
    "CheckedDatasetMapper",
]

logger = logging.getLogger(__name__)

COCO_KEYS = ("images", "annotations", "categories")
IMAGE_KEYS = ("id", "file_name", "width", "height")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
def _is_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def read_coco_json(json_file) -> Dict[str, Any]:
    """Parse ``json_file`` and check it has the three COCO lists; raise DataError if not."""
    json_file = os.fspath(json_file)
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise DataError(f"{json_file}: annotation file does not exist") from e
    except IsADirectoryError as e:
        raise DataError(f"{json_file}: is a folder, not an annotation file") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{json_file}: not a JSON file ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{json_file}: holds a JSON {type(data).__name__}, not an object with {list(COCO_KEYS)}")
    missing = [key for key in COCO_KEYS if key not in data]
    if missing:
        raise DataError(
            f"{json_file}: no {' / '.join(repr(k) for k in missing)} key; a COCO instances file has "
            f"{', '.join(repr(k) for k in COCO_KEYS)} lists (an unlabelled set has \"annotations\": [])"
        )
    for key in COCO_KEYS:
        if not isinstance(data[key], list):
            raise DataError(f"{json_file}: {key!r} is a JSON {type(data[key]).__name__}, not a list")
    return data


def _check_records(json_file: str, records: List, key: str, required) -> None:
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{json_file}: {key}[{index}] is not a JSON object")
        missing = [k for k in required if k not in record]
        if missing:
            raise DataError(f"{json_file}: {key}[{index}] (id {record.get('id')!r}) has no {missing}")
        if not _is_id(record["id"]):
            raise DataError(f"{json_file}: {key}[{index}] has id {record['id']!r}: ids are integers or strings")


def _index_by_id(json_file: str, records: List, kind: str) -> Dict[Any, dict]:
    by_id = {}
    for index, record in enumerate(records):
        if record["id"] in by_id:
            first = next(i for i, r in enumerate(records) if r["id"] == record["id"])
            raise DataError(
                f"{json_file}: {kind} id {record['id']!r} appears more than once "
                f"({kind}s[{first}] and {kind}s[{index}])"
            )
        by_id[record["id"]] = record
    return by_id


def check_coco_json(json_file, image_root) -> Dict[Any, Optional[list]]:
    """
    Check a COCO instances file and its image folder (see the module docstring).

    Args:
        json_file: the annotation file.
        image_root: the folder the images' ``file_name`` are relative to.

    Returns:
        dict: the repairs, annotation id -> clipped ``bbox`` ([x, y, w, h]), or
        None for an annotation to drop. A warning per kind of repair is logged.

    Raises:
        DataError: for the faults that cannot be repaired.
    """
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    data = read_coco_json(json_file)
    for key in ("images", "categories"):
        if not data[key]:
            raise DataError(f"{json_file}: {key!r} is empty")
    _check_records(json_file, data["images"], "images", IMAGE_KEYS)
    _check_records(json_file, data["categories"], "categories", ("id", "name"))
    _check_records(json_file, data["annotations"], "annotations", ANNOTATION_KEYS)
    images = _index_by_id(json_file, data["images"], "image")
    categories = _index_by_id(json_file, data["categories"], "category")
    _index_by_id(json_file, data["annotations"], "annotation")

    missing_files = []
    for image_id, image in images.items():
        if not (is_number(image["width"]) and is_number(image["height"])
                and image["width"] > 0 and image["height"] > 0):
            raise DataError(
                f"{json_file}: image id {image_id!r}: width {image['width']!r} and height "
                f"{image['height']!r} must be positive numbers"
            )
        if not isinstance(image["file_name"], str):
            raise DataError(f"{json_file}: image id {image_id!r}: file_name {image['file_name']!r} is not a string")
        path = os.path.join(image_root, image["file_name"])
        if not os.path.isfile(path):
            missing_files.append((image_id, path))
    if missing_files:
        image_id, path = missing_files[0]
        raise DataError(
            f"{json_file}: {len(missing_files)} of {len(images)} image files do not exist, "
            f"e.g. {path} of image id {image_id!r}"
        )

    unknown_images = [a for a in data["annotations"] if not _is_id(a["image_id"]) or a["image_id"] not in images]
    if unknown_images:
        raise DataError(
            f"{json_file}: {len(unknown_images)} annotations refer to images not in 'images', e.g. "
            f"annotation id {unknown_images[0]['id']!r} -> image id {unknown_images[0]['image_id']!r}"
        )

    repairs, empty, outside, clipped = {}, [], [], []
    for ann in data["annotations"]:
        record = f"{json_file}: annotation id {ann['id']!r} (image id {ann['image_id']!r})"
        if not _is_id(ann["category_id"]) or ann["category_id"] not in categories:
            raise DataError(f"{record}: category_id {ann['category_id']!r} is not in 'categories'")
        if ann.get("ignore", 0) != 0:
            raise DataError(f"{record}: \"ignore\": {ann['ignore']!r} is not supported by Detectron2; remove the key")
        bbox = ann["bbox"]
        if isinstance(bbox, list) and any(isinstance(v, float) and not math.isfinite(v) for v in bbox):
            raise DataError(f"{record}: bbox {bbox!r} has a NaN or infinite value")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
            raise DataError(f"{record}: bbox {bbox!r} is not [x, y, width, height] (4 numbers)")
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            empty.append(ann["id"])
            repairs[ann["id"]] = None
            continue
        image = images[ann["image_id"]]
        x1, y1 = max(x, 0), max(y, 0)
        x2, y2 = min(x + w, image["width"]), min(y + h, image["height"])
        if x2 <= x1 or y2 <= y1:
            outside.append(ann["id"])
            repairs[ann["id"]] = None
        elif (x1, y1, x2, y2) != (x, y, x + w, y + h):
            clipped.append(ann["id"])
            repairs[ann["id"]] = [x1, y1, x2 - x1, y2 - y1]
    for ids, what in (
        (empty, "dropped {} annotations with zero or negative width or height"),
        (outside, "dropped {} annotations whose box lies outside its image"),
        (clipped, "clipped {} boxes that extend past their image's border"),
    ):
        if ids:
            logger.warning(f"{json_file}: {what.format(len(ids))} (annotation ids {examples(ids)})")
    return repairs


def load_checked_coco_json(json_file, image_root, dataset_name: Optional[str] = None) -> List[dict]:
    """
    :func:`detectron2.data.datasets.load_coco_json` after :func:`check_coco_json`,
    with its repairs applied. Same arguments and return value as ``load_coco_json``.
    """
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    repairs = check_coco_json(json_file, image_root)
    # the file is parsed twice (here and by pycocotools), which load_coco_json's
    # interface (a path) leaves no way around
    dataset_dicts = load_coco_json(json_file, image_root, dataset_name, extra_annotation_keys=["id"])
    for record in dataset_dicts:
        annotations = []
        for obj in record["annotations"]:
            bbox = repairs.get(obj.pop("id"), obj["bbox"])
            if bbox is None:
                continue
            # floats: Detectron2 resizes integer boxes in place in an integer array, truncating them
            obj["bbox"] = [float(v) for v in bbox]
            annotations.append(obj)
        record["annotations"] = annotations
    return dataset_dicts


class CheckedDatasetMapper(DatasetMapper):
    """
    :class:`DatasetMapper` that turns an image it cannot use (missing, not an image,
    truncated, or of another size than its record says) into a :class:`DataError`
    naming the file and the image id. Same arguments as ``DatasetMapper``.
    """

    # what PIL and Detectron2's read_image / check_image_size raise for a bad file
    IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except self.IMAGE_ERRORS as e:
            raise DataError(
                f"{dataset_dict.get('file_name')}: image id {dataset_dict.get('image_id')!r}: "
                f"cannot be used ({type(e).__name__}: {first_line(e)}){_exif_rotation_hint(dataset_dict, e)}"
            ) from e


def _exif_rotation_hint(dataset_dict, error) -> str:
    """Why a file's size is its record's with width and height swapped, if EXIF says so."""
    if not isinstance(error, SizeMismatchError):
        return ""
    try:
        with Image.open(dataset_dict["file_name"]) as image:
            stored_size, orientation = image.size, image.getexif().get(ExifTags.Base.Orientation)
    except OSError:
        return ""
    # orientations 5-8 turn the stored pixels by 90 degrees; Detectron2's read_image applies them
    if orientation not in (5, 6, 7, 8) or stored_size != (dataset_dict.get("width"), dataset_dict.get("height")):
        return ""
    return (f"; likely cause: its EXIF orientation ({orientation}) rotates it by 90 degrees when read, and the "
            "record has the size of the unrotated pixels: give the record the rotated width and height (and "
            "boxes on the rotated image), or remove the EXIF orientation from the file")

