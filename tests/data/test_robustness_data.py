"""Bad data as users bring it (a COCO json + an image folder): each case either loads and
trains correctly (said so in the test) or stops with one DataError line naming the file,
the record and the fault (fpn_rpn.data.coco_checks)."""
import fpn_rpn  # noqa: F401  # before detectron2

import copy
import json
import logging
import math
import re
import shutil

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data.build import get_detection_dataset_dicts
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from PIL import ExifTags, Image

from conftest import REPO, load_tool
from fpn_rpn import add_fpn_rpn_config, register_coco_json
from fpn_rpn.data.coco_checks import CheckedDatasetMapper, DataError, load_checked_coco_json

CONFIG = REPO / "configs" / "demo" / "fpn_rpn_R_18_GN_synthetic.yaml"
# three coco_mini val images: id -> (file, width, height)
IMAGES = {802: ("000000000802.jpg", 424, 640), 10764: ("000000010764.jpg", 640, 424),
          11813: ("000000011813.jpg", 333, 500)}  # fmt: skip
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]


def _image(image_id):
    file_name, width, height = IMAGES[image_id]
    return {"id": image_id, "file_name": file_name, "width": width, "height": height}


def _ann(ann_id, image_id, bbox, category_id=1, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd,
            "area": 100.0}


GOOD_ANNOTATIONS = [_ann(1, 802, [10, 20, 100, 200]), _ann(2, 10764, [300, 50, 40, 60], 3),
                    _ann(3, 11813, [5, 5, 50, 50])]  # fmt: skip


@pytest.fixture
def image_root(coco_mini, tmp_path):
    if not coco_mini.is_dir():
        pytest.skip(f"{coco_mini} not found")
    root = tmp_path / "images"
    root.mkdir()
    for file_name, _, _ in IMAGES.values():
        shutil.copy(coco_mini / "val2017" / file_name, root / file_name)
    return root


def _write(path, images=None, annotations=None, categories=None, **replace):
    data = {"images": [_image(i) for i in IMAGES] if images is None else images,
            "annotations": GOOD_ANNOTATIONS if annotations is None else annotations,
            "categories": CATEGORIES if categories is None else categories}  # fmt: skip
    data.update(replace)
    path.write_text(json.dumps(data))  # json writes NaN and Infinity as users' exports do
    return path


def _raises(match, fn, *args):
    """fn(*args) raises a one-line DataError matching ``match``."""
    with pytest.raises(DataError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.fixture
def warnings_seen():
    """Warnings of fpn_rpn.data.coco_checks, whatever handlers an earlier test left on 'fpn_rpn'."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("fpn_rpn.data.coco_checks")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


# ---- the annotation file --------------------------------------------------------------


def test_good_file_loads_unchanged(image_root, tmp_path, warnings_seen):
    json_file = _write(tmp_path / "good.json")
    records = load_checked_coco_json(json_file, image_root)
    assert [r["image_id"] for r in records] == [802, 10764, 11813]
    assert [[a["bbox"] for a in r["annotations"]] for r in records] == [[[10, 20, 100, 200]], [[300, 50, 40, 60]],
                                                                        [[5, 5, 50, 50]]]  # fmt: skip
    # as floats: Detectron2 v0.6 resizes integer boxes in an integer array, truncating them
    assert all(isinstance(v, float) for r in records for a in r["annotations"] for v in a["bbox"])
    assert all("id" not in a for r in records for a in r["annotations"])  # as load_coco_json gives them
    assert warnings_seen == []


def test_missing_annotation_file(image_root, tmp_path, catalogs):
    missing = tmp_path / "instances_missing.json"
    _raises(f"^{re.escape(str(missing))}: annotation file does not exist$", load_checked_coco_json, missing, image_root)
    _raises(f"'bad_missing': annotation file {re.escape(str(missing))} does not exist",
            register_coco_json, "bad_missing", missing, image_root)


@pytest.mark.parametrize(
    "content, match",
    [
        (b'{"images": [', r"not a JSON file \(Expecting value: line 1 column 13 \(char 12\)\)"),
        (b"\xff\xd8\xff\xe0 a JPEG, not JSON",
         r"not a JSON file \('utf-8' codec can't decode byte 0xff in position 0: invalid start byte\)"),
        (b"[]", r"holds a JSON list, not an object with \['images', 'annotations', 'categories'\]"),
    ],
    ids=["cut", "binary", "list"],
)
def test_not_coco_json(image_root, tmp_path, content, match):
    json_file = tmp_path / "bad.json"
    json_file.write_bytes(content)
    _raises(f"^{re.escape(str(json_file))}: {match}$", load_checked_coco_json, json_file, image_root)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(image_root, tmp_path, key):
    json_file = _write(tmp_path / "bad.json")
    data = json.loads(json_file.read_text())
    del data[key]
    json_file.write_text(json.dumps(data))
    _raises(f"^{re.escape(str(json_file))}: no '{key}' key; a COCO instances file has", load_checked_coco_json,
            json_file, image_root)


def test_top_level_key_not_a_list(image_root, tmp_path):
    json_file = _write(tmp_path / "bad.json", annotations={"1": GOOD_ANNOTATIONS[0]})
    _raises("'annotations' is a JSON dict, not a list", load_checked_coco_json, json_file, image_root)


def test_unlabelled_set_loads(image_root, tmp_path):
    # "annotations": [] is an unlabelled set (inference only): loads, every image without annotations
    records = load_checked_coco_json(_write(tmp_path / "unlabelled.json", annotations=[]), image_root)
    assert [(r["image_id"], r["annotations"]) for r in records] == [(802, []), (10764, []), (11813, [])]


# ---- image records and files ----------------------------------------------------------


@pytest.mark.parametrize(
    "record, match",
    [
        ({"id": 10764, "file_name": "000000010764.jpg", "height": 424},
         r"images\[1\] \(id 10764\) has no \['width'\]$"),
        (dict(_image(10764), width=0), "image id 10764: width 0 and height 424 must be positive numbers$"),
        (dict(_image(10764), id=[10764]), r"images\[1\] has id \[10764\]: ids are integers or strings$"),
        (dict(_image(10764), file_name=None), "image id 10764: file_name None is not a string$"),
    ],
    ids=["no_width", "zero_width", "list_id", "no_file_name"],
)
def test_bad_image_record(image_root, tmp_path, record, match):
    json_file = _write(tmp_path / "bad.json", images=[_image(802), record], annotations=[])
    _raises(f"^{re.escape(str(json_file))}: {match}", load_checked_coco_json, json_file, image_root)


def test_image_file_missing(image_root, tmp_path):
    (image_root / "000000010764.jpg").unlink()
    json_file = _write(tmp_path / "bad.json")
    _raises(f"^{re.escape(str(json_file))}: 1 of 3 image files do not exist, e.g. "
            f"{re.escape(str(image_root / '000000010764.jpg'))} of image id 10764$",
            load_checked_coco_json, json_file, image_root)


def test_duplicate_image_ids(image_root, tmp_path):
    images = [_image(802), _image(10764), dict(_image(11813), id=802)]
    json_file = _write(tmp_path / "bad.json", images=images, annotations=[])
    _raises(r"image id 802 appears more than once \(images\[0\] and images\[2\]\)", load_checked_coco_json,
            json_file, image_root)


def test_annotations_of_unknown_images(image_root, tmp_path):
    annotations = GOOD_ANNOTATIONS + [_ann(7, 999, [1, 1, 5, 5]), _ann(8, 998, [1, 1, 5, 5])]
    json_file = _write(tmp_path / "bad.json", annotations=annotations)
    _raises(r"2 annotations refer to images not in 'images', e.g. annotation id 7 -> image id 999$",
            load_checked_coco_json, json_file, image_root)


def test_duplicate_annotation_ids_and_unknown_category(image_root, tmp_path):
    json_file = _write(tmp_path / "dup.json", annotations=GOOD_ANNOTATIONS + [_ann(2, 802, [1, 1, 5, 5])])
    _raises(r"annotation id 2 appears more than once \(annotations\[1\] and annotations\[3\]\)",
            load_checked_coco_json, json_file, image_root)
    json_file = _write(tmp_path / "cat.json", annotations=[_ann(4, 802, [1, 1, 5, 5], category_id=2)])
    _raises(r"annotation id 4 \(image id 802\): category_id 2 is not in 'categories'", load_checked_coco_json,
            json_file, image_root)


# ---- boxes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bbox, match",
    [
        ([10, 20, math.nan, 50], r"bbox \[10, 20, nan, 50\] has a NaN or infinite value"),
        ([10, math.inf, 5, 50], r"bbox \[10, inf, 5, 50\] has a NaN or infinite value"),
        ([-math.inf, 20, 5, 50], r"bbox \[-inf, 20, 5, 50\] has a NaN or infinite value"),
        ([10, 20, 30], r"bbox \[10, 20, 30\] is not \[x, y, width, height\]"),
        ([10, 20, "30", 40], r"bbox \[10, 20, '30', 40\] is not \[x, y, width, height\]"),
    ],
)
def test_unusable_box_is_an_error(image_root, tmp_path, bbox, match):
    json_file = _write(tmp_path / "bad.json", annotations=GOOD_ANNOTATIONS + [_ann(9, 10764, bbox)])
    _raises(f"^{re.escape(str(json_file))}: annotation id 9 \\(image id 10764\\): {match}", load_checked_coco_json,
            json_file, image_root)


def test_bad_boxes_are_repaired_with_one_warning_per_kind(image_root, tmp_path, warnings_seen):
    annotations = GOOD_ANNOTATIONS + [
        _ann(10, 802, [50, 60, 0, 30]),  # zero width: dropped
        _ann(11, 802, [50, 60, 30, -5]),  # negative height: dropped
        _ann(12, 802, [430, 10, 20, 20]),  # right of the 424-wide image: dropped
        _ann(13, 10764, [-30, -10, 20, 5]),  # above-left of the image: dropped
        _ann(14, 10764, [600, 400, 100, 50]),  # past the right and bottom border: clipped
        _ann(15, 11813, [-10.5, 480, 40, 30]),  # past the left and bottom border: clipped
    ]
    json_file = _write(tmp_path / "repair.json", annotations=annotations)
    records = load_checked_coco_json(json_file, image_root)
    assert [[a["bbox"] for a in r["annotations"]] for r in records] == [
        [[10, 20, 100, 200]],
        [[300, 50, 40, 60], [600, 400, 40, 24]],  # 640 - 600, 424 - 400
        [[5, 5, 50, 50], [0, 480, 29.5, 20]],  # -10.5 + 40, 500 - 480
    ]
    assert [r.getMessage() for r in warnings_seen] == [
        f"{json_file}: dropped 2 annotations with zero or negative width or height (annotation ids 10, 11)",
        f"{json_file}: dropped 2 annotations whose box lies outside its image (annotation ids 12, 13)",
        f"{json_file}: clipped 2 boxes that extend past their image's border (annotation ids 14, 15)",
    ]


# ---- images without (usable) annotations -------------------------------------------------


@pytest.mark.parametrize("filter_empty, expected", [(True, [802]), (False, [802, 10764, 11813])])
def test_filter_empty_annotations_is_honoured(image_root, tmp_path, catalogs, filter_empty, expected):
    annotations = [
        _ann(1, 802, [10, 20, 100, 200]),
        _ann(2, 10764, [300, 50, 40, 60], iscrowd=1),  # crowd only
        _ann(3, 11813, [5, 5, 0, 50]),  # its only box is dropped: no annotation left
    ]
    register_coco_json("bad_empty", _write(tmp_path / "empty.json", annotations=annotations), image_root)
    # what build_detection_train_loader does with DATALOADER.FILTER_EMPTY_ANNOTATIONS
    dicts = get_detection_dataset_dicts(["bad_empty"], filter_empty=filter_empty)
    assert [d["image_id"] for d in dicts] == expected


def _cfg(**inputs):
    cfg = get_cfg()
    add_fpn_rpn_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    # a small model, fast on CPU; 64 channels make GroupNorm's 32 groups hold 2 values on a 1x1 map
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (128,), 192
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 128, 192
    cfg.INPUT.RANDOM_FLIP = "none"  # boxes where the test computes them
    for key, value in inputs.items():
        setattr(cfg.INPUT, key, value)
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(_cfg())


def test_crowd_only_image_trains_on_negatives_only(image_root, tmp_path, model):
    # kept (FILTER_EMPTY_ANNOTATIONS False), a crowd-only image trains correctly: every sampled
    # anchor is background, so there is no box loss
    annotations = [_ann(2, 10764, [300, 50, 40, 60], iscrowd=1)]
    (record,) = [r for r in load_checked_coco_json(_write(tmp_path / "crowd.json", annotations=annotations), image_root)
                 if r["image_id"] == 10764]  # fmt: skip
    batch = [CheckedDatasetMapper(_cfg(), is_train=True)(record)]
    assert len(batch[0]["instances"]) == 0  # Detectron2 leaves crowd boxes out of RPN training
    model.train()
    with EventStorage() as storage:
        losses = model(batch)
    assert losses["loss_rpn_loc"].item() == 0.0
    assert math.isfinite(losses["loss_rpn_cls"].item()) and losses["loss_rpn_cls"].item() > 0
    assert storage.latest()["rpn/num_pos_anchors"][0] == 0
    assert storage.latest()["rpn/num_neg_anchors"][0] == 256  # MODEL.RPN.BATCH_SIZE_PER_IMAGE, all negative


# ---- image sizes ----------------------------------------------------------------------


def test_image_smaller_than_the_smallest_anchor(tmp_path, model):
    # 24 x 20 pixels, under the 32-pixel anchors of P2, fed as it is (INPUT.MIN_SIZE_TEST 0: no resizing)
    root = tmp_path / "tiny"
    root.mkdir()
    Image.new("RGB", (24, 20), (120, 80, 40)).save(root / "tiny.jpg")
    json_file = root / "tiny.json"
    json_file.write_text(json.dumps({"images": [{"id": 1, "file_name": "tiny.jpg", "width": 24, "height": 20}],
                                     "annotations": [_ann(1, 1, [2, 3, 16, 12])], "categories": CATEGORIES}))
    (record,) = load_checked_coco_json(json_file, root)
    inputs = CheckedDatasetMapper(_cfg(MIN_SIZE_TEST=0), is_train=False)(copy.deepcopy(record))
    assert tuple(inputs["image"].shape) == (3, 20, 24)
    model.eval()
    with torch.no_grad():
        (output,) = model([inputs])
    boxes = output["proposals"].proposal_boxes.tensor
    assert len(boxes) > 0 and bool(torch.isfinite(boxes).all())
    assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= 24 and boxes[:, 1::2].max() <= 20

    # training: the box still gets a positive anchor (its best match), and the losses are finite
    instances = Instances((20, 24), gt_boxes=Boxes(torch.tensor([[2.0, 3.0, 18.0, 15.0]])),
                          gt_classes=torch.tensor([0]))
    model.train()
    with EventStorage() as storage:
        losses = model([{"image": inputs["image"], "instances": instances}])
    assert all(math.isfinite(v.item()) for v in losses.values())
    assert storage.latest()["rpn/num_pos_anchors"][0] >= 1


def test_very_large_image(image_root, tmp_path, model):
    # a 4000 x 3000 photo is resized to the configured input size, its boxes with it,
    # and its proposals come back in its own coordinates
    with Image.open(image_root / "000000010764.jpg") as image:
        image.resize((4000, 3000)).save(image_root / "large.jpg", quality=80)
    json_file = tmp_path / "large.json"
    json_file.write_text(json.dumps({"images": [{"id": 5, "file_name": "large.jpg", "width": 4000, "height": 3000}],
                                     "annotations": [_ann(1, 5, [1500, 600, 900, 1200])], "categories": CATEGORIES}))
    (record,) = load_checked_coco_json(json_file, image_root)

    train_inputs = CheckedDatasetMapper(_cfg(), is_train=True)(copy.deepcopy(record))
    # shortest edge 3000 -> 128, longest 4000 -> int(4000 * 128 / 3000 + 0.5) = 171
    assert tuple(train_inputs["image"].shape) == (3, 128, 171)
    expected = torch.tensor([[1500 * 171 / 4000, 600 * 128 / 3000, 2400 * 171 / 4000, 1800 * 128 / 3000]])
    torch.testing.assert_close(train_inputs["instances"].gt_boxes.tensor, expected)

    inputs = CheckedDatasetMapper(_cfg(), is_train=False)(copy.deepcopy(record))
    model.eval()
    with torch.no_grad():
        (output,) = model([inputs])
    proposals = output["proposals"]
    boxes = proposals.proposal_boxes.tensor
    assert proposals.image_size == (3000, 4000) and len(boxes) > 0
    assert boxes[:, 0::2].max() <= 4000 and boxes[:, 1::2].max() <= 3000 and boxes.min() >= 0
    assert boxes[:, 0::2].max() > 192  # in the photo's coordinates, not the network input's


# ---- unreadable images ----------------------------------------------------------------


def _corrupt(image_root, kind):
    path = image_root / "000000010764.jpg"
    data = path.read_bytes()
    if kind == "not an image":
        path.write_bytes(b"\x00garbage" * 100)
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # another size than its record says
        with Image.open(image_root / "000000000802.jpg") as image:
            image.save(path)
    return path


@pytest.mark.parametrize("kind, error", [("not an image", "UnidentifiedImageError"), ("truncated", "OSError"),
                                         ("wrong size", "SizeMismatchError")])  # fmt: skip
def test_unreadable_image_names_file_and_image_id(image_root, tmp_path, kind, error):
    path = _corrupt(image_root, kind)
    records = load_checked_coco_json(_write(tmp_path / "ann.json"), image_root)  # existence only is checked here
    record = next(r for r in records if r["image_id"] == 10764)
    for is_train in (True, False):
        _raises(f"^{re.escape(str(path))}: image id 10764: cannot be used \\({error}: ",
                CheckedDatasetMapper(_cfg(), is_train=is_train), record)


def test_unreadable_image_in_a_dataloader_worker(image_root, tmp_path, catalogs):
    # a worker process re-raises the DataError with its traceback as the message;
    # train_net reports the original line
    path = _corrupt(image_root, "not an image")
    register_coco_json("bad_worker", _write(tmp_path / "ann.json"), image_root)
    train_net = load_tool("train_net")
    cfg = _cfg()
    cfg.DATALOADER.NUM_WORKERS = 1
    with pytest.raises(DataError) as info:
        list(train_net.Trainer.build_test_loader(cfg, "bad_worker"))
    assert "DataLoader worker" in str(info.value)
    line = train_net.error_line(info.value)
    assert re.fullmatch(f"{re.escape(str(path))}: image id 10764: cannot be used \\(UnidentifiedImageError: .*\\)",
                        line), line


def test_exif_rotated_image_names_the_likely_cause(image_root, tmp_path):
    # a photo stored 640 x 424 with EXIF orientation 6 (turn 90 degrees clockwise), its record
    # giving the stored size: Detectron2 applies the orientation when reading, and gets 424 x 640
    path = image_root / "000000010764.jpg"
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    with Image.open(path) as image:
        image.save(path, exif=exif)
    records = load_checked_coco_json(_write(tmp_path / "ann.json"), image_root)
    record = next(r for r in records if r["image_id"] == 10764)
    _raises(f"^{re.escape(str(path))}: image id 10764: cannot be used \\(SizeMismatchError: .*got \\(424, 640\\), "
            r"expect \(640, 424\).*\); likely cause: its EXIF orientation \(6\) rotates it by 90 degrees when read, "
            "and the record has the size of the unrotated pixels: give the record the rotated width and height",
            CheckedDatasetMapper(_cfg(), is_train=True), record)
    # an image of another size without EXIF orientation gets no such hint
    _corrupt(image_root, "wrong size")
    assert "EXIF" not in _raises("SizeMismatchError", CheckedDatasetMapper(_cfg(), is_train=True), record)


def test_dataset_without_images(catalogs):
    # a registered loader returning no records; Detectron2: "AssertionError: Dataset 'rb_none' is empty!"
    DatasetCatalog.register("rb_none", list)
    train_net = load_tool("train_net")
    with pytest.raises(DataError, match=r"^dataset 'rb_none' has no images$"):
        train_net.Trainer.build_test_loader(_cfg(), "rb_none")
