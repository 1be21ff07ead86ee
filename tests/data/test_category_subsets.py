"""DATASETS.TRAIN_CATEGORIES: category specs, the VOC set, and the training records they give."""
import json
from pathlib import Path

import pytest
from PIL import Image

import fpn_rpn  # noqa: F401  (before detectron2)
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts

from fpn_rpn import add_fpn_rpn_config, register_datasets, setup_cfg
from fpn_rpn.data.build import category_dataset_dicts, train_dataset_dicts
from fpn_rpn.data.categories import (
    COCO_THING_NAMES,
    NAMED_SETS,
    VOC_CATEGORY_NAMES,
    category_groups,
    category_ids,
    keep_categories,
)
from fpn_rpn.data.datasets import register_coco_json
from fpn_rpn.errors import ConfigError

from conftest import REPO, coco_dict, load_tool

KEY = "DATASETS.TRAIN_CATEGORIES"
CONFIG = REPO / "configs" / "Base-FPN-RPN.yaml"


def _cfg(train, categories, filter_empty=True):
    from detectron2.config import get_cfg

    cfg = add_fpn_rpn_config(get_cfg())
    cfg.DATASETS.TRAIN = tuple(train)
    cfg.DATASETS.TRAIN_CATEGORIES = categories
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = filter_empty
    return cfg


# ---- the named sets -------------------------------------------------------------------


def test_voc_set_against_coco_category_names(coco_mini_val):
    coco_names = {c["id"]: c["name"] for c in coco_mini_val.dataset["categories"]}
    # Detectron2's list, which the specs read, is COCO's own
    assert COCO_THING_NAMES == coco_names
    assert len(set(VOC_CATEGORY_NAMES)) == 20
    assert set(VOC_CATEGORY_NAMES) <= set(coco_names.values())
    voc_ids = {i for i, name in coco_names.items() if name in VOC_CATEGORY_NAMES}
    assert NAMED_SETS["voc"] == voc_ids
    assert NAMED_SETS["nonvoc"] == set(coco_names) - voc_ids and len(NAMED_SETS["nonvoc"]) == 60
    assert NAMED_SETS["all"] == set(coco_names)


def test_category_specs():
    assert category_ids("voc", KEY) == NAMED_SETS["voc"]
    assert category_ids(["all"], KEY) == NAMED_SETS["all"]
    # the union of names, ids and sets
    assert category_ids([18, "cat", "traffic light"], KEY) == {18, 17, 10}
    assert category_ids(["voc", "giraffe"], KEY) == NAMED_SETS["voc"] | {25}
    assert category_ids(("nonvoc", "voc"), KEY) == NAMED_SETS["all"]


@pytest.mark.parametrize(
    "spec, message",
    [
        (["dgo"], f"{KEY}: 'dgo' is not a COCO category or one of the sets all, voc, nonvoc; did you mean 'dog'?"),
        (["voc", "tvmonitor"], f"{KEY}: 'tvmonitor' is not a COCO category or one of the sets all, voc, nonvoc; "
                               "did you mean 'tv'?"),
        (["Traffic_Light"], f"{KEY}: 'Traffic_Light' is not a COCO category or one of the sets all, voc, nonvoc; "
                            "did you mean 'traffic light'?"),
        ([12], f"{KEY}: 12 is not a COCO category id (COCO's are 1 to 90 without 12, 26, 29, 30, 45, 66, 68, 69, "
               "71, 83)"),
        ([], f"{KEY} = [] is invalid: name at least one category (or \"all\")"),
    ],
)
def test_bad_specs_are_one_line(spec, message):
    with pytest.raises(ConfigError) as info:
        category_ids(spec, KEY)
    assert str(info.value) == message


def test_bad_keys_stop_setup_cfg():
    with pytest.raises(ConfigError, match=r"^DATASETS.TRAIN_CATEGORIES: 'girafe' .* did you mean 'giraffe'\?$"):
        setup_cfg(str(CONFIG), ["DATASETS.TRAIN_CATEGORIES", "['voc', 'girafe']"])
    # yacs checks the type: a list, even for one set
    with pytest.raises(ConfigError, match=r"^DATASETS.TRAIN_CATEGORIES = voc is a str where a list is expected"):
        setup_cfg(str(CONFIG), ["DATASETS.TRAIN_CATEGORIES", "voc"])
    with pytest.raises(ConfigError, match=r"^TEST.RECALL_CATEGORY_GROUPS group 'novel': 'nonvok' .*'nonvoc'\?$"):
        setup_cfg(str(CONFIG), ["TEST.RECALL_CATEGORY_GROUPS", "[['seen', 'voc'], ['novel', 'nonvok']]"])
    cfg = setup_cfg(str(CONFIG), ["DATASETS.TRAIN_CATEGORIES", "['voc', 25]"])
    assert category_ids(cfg.DATASETS.TRAIN_CATEGORIES, KEY) == NAMED_SETS["voc"] | {25}


@pytest.mark.parametrize(
    "groups, message",
    [
        ([["seen", "voc"], ["seen", "nonvoc"]], "group name 'seen' is given twice"),
        ([["a/b", "voc"]], "group name 'a/b' is invalid"),
        ([["seen"]], "entries are [name, categories], got ['seen']"),
    ],
)
def test_bad_groups(groups, message):
    with pytest.raises(ConfigError) as info:
        category_groups(groups)
    assert str(info.value).startswith("TEST.RECALL_CATEGORY_GROUPS: " + message)


# ---- training records -----------------------------------------------------------------

# person (1, VOC), dog (18, VOC), giraffe (25, not VOC); the crowd person is a VOC crowd region
TINY = [
    (1, (0, 0, 50, 50), 2500, 0, 1),
    (1, (50, 50, 90, 90), 1600, 0, 25),
    (2, (10, 10, 30, 30), 400, 0, 25),  # image 2: a giraffe only
    (3, (5, 5, 60, 60), 3025, 1, 1),  # image 3: a crowd person only
    (3, (20, 20, 40, 40), 400, 0, 18),
]  # image 4: no annotations at all


@pytest.fixture
def tiny_dataset(tmp_path, catalogs):
    """A REGISTER_COCO dataset 'tiny_train' of four 100x100 images with COCO's category ids."""
    data = coco_dict([1, 2, 3, 4], TINY, categories=(1, 18, 25))
    for category in data["categories"]:
        category["name"] = COCO_THING_NAMES[category["id"]]
    (tmp_path / "tiny.json").write_text(json.dumps(data))
    for image in data["images"]:
        Image.new("RGB", (100, 100)).save(tmp_path / image["file_name"])
    cfg = _cfg([], ["all"])
    cfg.DATASETS.REGISTER_COCO = [["tiny_train", str(tmp_path / "tiny.json"), str(tmp_path)]]
    register_datasets(cfg)
    return "tiny_train"


def _boxes(records):
    """image_id -> sorted (COCO category id, iscrowd) of its annotations."""
    to_coco = {c: i for i, c in MetadataCatalog.get("tiny_train").thing_dataset_id_to_contiguous_id.items()}
    return {r["image_id"]: sorted((to_coco[a["category_id"]], a["iscrowd"]) for a in r["annotations"])
            for r in records}


@pytest.mark.parametrize("filter_empty", [True, False])
def test_voc_training_records_keep_every_image(tiny_dataset, filter_empty):
    records = train_dataset_dicts(_cfg([tiny_dataset], ["voc"], filter_empty))
    # FILTER_EMPTY_ANNOTATIONS leaves out image 4 (nothing in its file) and keeps image 2,
    # whose only box (a giraffe) the subset removes: it trains as background
    expected = {1: [(1, 0)], 2: [], 3: [(1, 1), (18, 0)]}
    if not filter_empty:
        expected[4] = []
    assert _boxes(records) == expected
    # the same images as without the key, in the same order
    assert [r["image_id"] for r in records] == [r["image_id"] for r in
                                                train_dataset_dicts(_cfg([tiny_dataset], ["all"], filter_empty))]


def test_ids_and_names_select_the_same_boxes(tiny_dataset):
    by_name = _boxes(train_dataset_dicts(_cfg([tiny_dataset], ["giraffe"])))
    assert by_name == _boxes(train_dataset_dicts(_cfg([tiny_dataset], [25]))) == {1: [(25, 0)], 2: [(25, 0)], 3: []}


def test_all_is_detectron2s_records(tiny_dataset):
    cfg = _cfg([tiny_dataset], ["all"])
    assert train_dataset_dicts(cfg) == get_detection_dataset_dicts([tiny_dataset])


def test_the_catalog_records_are_not_changed(tiny_dataset):
    records = DatasetCatalog.get(tiny_dataset)
    DatasetCatalog.remove(tiny_dataset)
    DatasetCatalog.register(tiny_dataset, lambda: records)  # a loader that returns the same list each time
    train_dataset_dicts(_cfg([tiny_dataset], ["nonvoc"]))
    assert sum(len(r["annotations"]) for r in DatasetCatalog.get(tiny_dataset)) == len(TINY)


def test_lazyconfig_function_gives_the_same_records(tiny_dataset):
    """category_dataset_dicts, which LazyConfigs call, is what DATASETS.TRAIN_CATEGORIES applies."""
    assert category_dataset_dicts(tiny_dataset, "voc") == train_dataset_dicts(_cfg([tiny_dataset], ["voc"]))
    with pytest.raises(ConfigError, match=r"^categories = 'cat' keeps none of the categories of names \('tiny_train',\)$"):
        category_dataset_dicts(tiny_dataset, "cat")


def test_categories_the_dataset_lacks_are_an_error(tiny_dataset):
    with pytest.raises(ConfigError, match=r"^DATASETS.TRAIN_CATEGORIES = \['cat'\] keeps none of the categories "
                                          r"of DATASETS.TRAIN \('tiny_train',\)$"):
        train_dataset_dicts(_cfg([tiny_dataset], ["cat"]))


def test_dataset_without_coco_ids_is_an_error(tmp_path, catalogs):
    data = coco_dict([1], [(1, (0, 0, 50, 50), 2500, 0, 1)], categories=(1,))
    data["categories"][0]["name"] = "rectangle"
    (tmp_path / "shapes.json").write_text(json.dumps(data))
    Image.new("RGB", (100, 100)).save(tmp_path / "1.jpg")
    register_coco_json("shapes_train", tmp_path / "shapes.json", tmp_path)
    with pytest.raises(ConfigError, match=r"^DATASETS.TRAIN_CATEGORIES names COCO categories, but dataset "
                                          r"'shapes_train' does not number its categories as COCO does: its "
                                          r"category 1 is 'rectangle' \(COCO's 1 is 'person'\)$"):
        train_dataset_dicts(_cfg(["shapes_train"], ["voc"]))
    assert len(train_dataset_dicts(_cfg(["shapes_train"], ["all"]))[0]["annotations"]) == 1  # all: any dataset


def test_detectron2_builtin_coco(catalogs):
    # the built-in name's own metadata (COCO ids); its loader replaced: the files are not here
    to_contiguous = MetadataCatalog.get("coco_2017_train").thing_dataset_id_to_contiguous_id
    records = [{"file_name": "a.jpg", "image_id": 1, "height": 10, "width": 10, "annotations": [
        {"bbox": [0, 0, 5, 5], "bbox_mode": 1, "category_id": to_contiguous[i], "iscrowd": 0} for i in (1, 25, 72)
    ]}]
    DatasetCatalog.remove("coco_2017_train")
    DatasetCatalog.register("coco_2017_train", lambda: records)
    (record,) = train_dataset_dicts(_cfg(["coco_2017_train"], ["nonvoc"]))
    assert [a["category_id"] for a in record["annotations"]] == [to_contiguous[25]]


def _voc_count(json_file, image_ids):
    data = json.loads(json_file.read_text())
    return sum(a["category_id"] in NAMED_SETS["voc"] for a in data["annotations"] if a["image_id"] in image_ids)


@pytest.mark.parametrize("dataset, json_name", [("coco_mini_train", "instances_train2017.json"),
                                                ("coco_extra_val", "val.json")])
def test_real_datasets_voc_only(dataset, json_name, catalogs):
    register_datasets(_cfg([], ["all"]))
    if dataset not in DatasetCatalog.list():
        pytest.skip(f"{dataset} not found next to the repository")
    all_records = train_dataset_dicts(_cfg([dataset], ["all"]))
    voc_records = train_dataset_dicts(_cfg([dataset], ["voc"]))
    assert [r["image_id"] for r in voc_records] == [r["image_id"] for r in all_records]
    voc_contiguous = {MetadataCatalog.get(dataset).thing_dataset_id_to_contiguous_id[i] for i in NAMED_SETS["voc"]}
    assert all(a["category_id"] in voc_contiguous for r in voc_records for a in r["annotations"])
    expected = _voc_count(Path(MetadataCatalog.get(dataset).json_file), {r["image_id"] for r in all_records})
    assert sum(len(r["annotations"]) for r in voc_records) == expected
    assert any(not r["annotations"] for r in voc_records)  # images with novel objects only stay


def test_trainer_trains_on_the_subset(tiny_dataset, monkeypatch):
    train_net = load_tool("train_net")
    seen = {}
    monkeypatch.setattr(train_net, "build_detection_train_loader", lambda cfg, **kwargs: seen.update(kwargs))
    cfg = setup_cfg(str(CONFIG), ["DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TRAIN_CATEGORIES", "['giraffe']"])
    train_net.Trainer.build_train_loader(cfg)
    assert _boxes(seen["dataset"]) == {1: [(25, 0)], 2: [(25, 0)], 3: []}


def test_keep_categories_leaves_records_without_annotations():
    records = [{"image_id": 1}, {"image_id": 2, "annotations": [{"category_id": 0}, {"category_id": 3}]}]
    assert keep_categories(records, {3}) == [{"image_id": 1}, {"image_id": 2, "annotations": [{"category_id": 3}]}]
