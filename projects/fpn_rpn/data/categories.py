"""Subsets of COCO's categories, for training on some classes and measuring recall on others
(OLN: Kim et al., "Learning Open-World Object Proposals without Learning to Classify", RA-L 2022).

A *category spec* (``DATASETS.TRAIN_CATEGORIES``, the second item of each
``TEST.RECALL_CATEGORY_GROUPS`` entry) is one item or a list of items, meaning their union:

- ``"all"``: COCO's 80 categories;
- ``"voc"``: the 20 that are PASCAL VOC's classes (OLN's training classes);
- ``"nonvoc"``: the other 60 (OLN's novel classes);
- a COCO category name, as COCO spells it: ``"dog"``, ``"traffic light"``;
- a COCO category id: ``18``.

COCO's categories are Detectron2's list (``detectron2.data.datasets.builtin_meta.COCO_CATEGORIES``).
A dataset used with a spec must number its categories as COCO does (coco_mini, coco_extra,
Detectron2's built-in COCO, and ``DATASETS.REGISTER_COCO`` files exported from COCO):
:func:`check_coco_categories` holds that rule.
"""
import difflib
from typing import Dict, FrozenSet, List, Mapping, Sequence, Tuple

from detectron2.data import MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from ..errors import ConfigError, examples, is_int

__all__ = [
    "COCO_THING_NAMES",
    "NAMED_SETS",
    "VOC_CATEGORY_NAMES",
    "VOC_TO_COCO_NAMES",
    "category_ids",
    "category_groups",
    "check_coco_categories",
    "dataset_category_names",
    "describe",
    "keep_categories",
]

# COCO id -> name, the 80 object ("thing") categories
COCO_THING_NAMES: Dict[int, str] = {c["id"]: c["name"] for c in COCO_CATEGORIES if c["isthing"]}
# PASCAL VOC's 20 classes: VOC's name -> COCO's name of the same class
VOC_TO_COCO_NAMES = {
    "aeroplane": "airplane", "bicycle": "bicycle", "bird": "bird", "boat": "boat", "bottle": "bottle",
    "bus": "bus", "car": "car", "cat": "cat", "chair": "chair", "cow": "cow", "diningtable": "dining table",
    "dog": "dog", "horse": "horse", "motorbike": "motorcycle", "person": "person",
    "pottedplant": "potted plant", "sheep": "sheep", "sofa": "couch", "train": "train", "tvmonitor": "tv",
}
VOC_CATEGORY_NAMES = tuple(VOC_TO_COCO_NAMES.values())
_ID_OF_NAME = {name: i for i, name in COCO_THING_NAMES.items()}
_VOC_IDS = frozenset(_ID_OF_NAME[name] for name in VOC_CATEGORY_NAMES)
NAMED_SETS: Dict[str, FrozenSet[int]] = {
    "all": frozenset(COCO_THING_NAMES),
    "voc": _VOC_IDS,
    "nonvoc": frozenset(COCO_THING_NAMES) - _VOC_IDS,
}
_GROUP_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def category_ids(spec, key: str) -> FrozenSet[int]:
    """
    The COCO category ids of a category spec (see the module docstring).

    Args:
        spec: an item or a list/tuple of items.
        key: the config key it comes from, for the error message.

    Raises:
        ConfigError: naming ``key`` and the first item that is no named set, COCO name or
            COCO id (with the closest existing name), or an empty list.
    """
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise ConfigError(f"{key} = {spec!r} is invalid: name at least one category (or \"all\")")
    ids = set()
    for item in items:
        if isinstance(item, str) and item in NAMED_SETS:
            ids |= NAMED_SETS[item]
        elif isinstance(item, str) and item in _ID_OF_NAME:
            ids.add(_ID_OF_NAME[item])
        elif is_int(item) and item in COCO_THING_NAMES:
            ids.add(int(item))
        else:
            raise ConfigError(f"{key}: {_unknown(item)}")
    return frozenset(ids)


def _unknown(item) -> str:
    if is_int(item):
        gaps = sorted(set(range(1, max(COCO_THING_NAMES) + 1)) - set(COCO_THING_NAMES))
        return f"{item} is not a COCO category id (COCO's are 1 to 90 without {', '.join(map(str, gaps))})"
    if not isinstance(item, str):
        return f"{item!r} is not a category name or id"
    names = list(NAMED_SETS) + list(_ID_OF_NAME)
    if item.lower() in VOC_TO_COCO_NAMES:  # VOC's spelling of a COCO class
        close = [VOC_TO_COCO_NAMES[item.lower()]]
    else:
        close = difflib.get_close_matches(item.lower(), names, n=1) or difflib.get_close_matches(
            item.lower().replace("_", " "), names, n=1
        )
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"'{item}' is not a COCO category or one of the sets {', '.join(NAMED_SETS)}{hint}"


def category_groups(groups, key: str = "TEST.RECALL_CATEGORY_GROUPS") -> Dict[str, FrozenSet[int]]:
    """
    ``[[name, spec], ...]`` -> {name: COCO category ids}, in the given order.

    Raises:
        ConfigError: naming ``key``: an entry that is not a [name, spec] pair, a name that is
            empty, repeated or has characters other than letters, digits, "_" and "-" (it
            becomes part of metric names), or a bad spec.
    """
    result = {}
    for entry in groups:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ConfigError(f"{key}: entries are [name, categories], got {entry!r}")
        name, spec = entry
        if not isinstance(name, str) or not name or not set(name) <= _GROUP_NAME_CHARS:
            raise ConfigError(f"{key}: group name {name!r} is invalid: use letters, digits, '_' and '-'")
        if name in result:
            raise ConfigError(f"{key}: group name '{name}' is given twice")
        result[name] = category_ids(spec, f"{key} group '{name}'")
    return result


def check_coco_categories(names_by_id: Mapping[int, str], dataset_name: str, key: str) -> None:
    """
    Raise ConfigError naming ``key`` unless every category of the dataset (id -> name) is
    the COCO category of that id, so that COCO ids and names mean the same in it.
    """
    for i, name in sorted(names_by_id.items()):
        if COCO_THING_NAMES.get(i) != name:
            coco = f"COCO's {i} is '{COCO_THING_NAMES[i]}'" if i in COCO_THING_NAMES else f"COCO has no id {i}"
            raise ConfigError(
                f"{key} names COCO categories, but dataset '{dataset_name}' does not number its categories as "
                f"COCO does: its category {i} is '{name}' ({coco})"
            )


def dataset_category_names(dataset_name: str, key: str) -> Tuple[Dict[int, str], Dict[int, int]]:
    """
    ({category id: name}, {category id: contiguous id}) of a loaded dataset's metadata
    (``thing_dataset_id_to_contiguous_id`` and ``thing_classes``), checked by
    :func:`check_coco_categories`.
    """
    metadata = MetadataCatalog.get(dataset_name)
    id_map = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    classes = getattr(metadata, "thing_classes", None)
    if id_map is None or classes is None:
        raise ConfigError(
            f"{key} names COCO categories, but dataset '{dataset_name}' has no category ids in its metadata "
            "(thing_dataset_id_to_contiguous_id, thing_classes)"
        )
    names = {int(i): classes[c] for i, c in id_map.items()}
    check_coco_categories(names, dataset_name, key)
    return names, {int(i): int(c) for i, c in id_map.items()}


def keep_categories(dataset_dicts: Sequence[dict], category_ids) -> List[dict]:
    """
    The records with only the annotations whose ``category_id`` is in ``category_ids``
    (crowd regions included), every image kept; the records are copied, the
    annotations shared.
    """
    category_ids = set(category_ids)
    return [
        dict(record, annotations=[a for a in record["annotations"] if a["category_id"] in category_ids])
        if "annotations" in record else record
        for record in dataset_dicts
    ]


def describe(ids) -> str:
    """A short name of a set of COCO ids, for log lines: a named set, or its first names."""
    for name, named in NAMED_SETS.items():
        if frozenset(ids) == named:
            return f"{name} ({len(named)} categories)"
    return f"{len(ids)} categories: {examples([COCO_THING_NAMES[i] for i in sorted(ids)])}"
