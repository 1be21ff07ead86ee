import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

import fpn_rpn  # noqa: F401  (must precede detectron2)
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode
from pycocotools.coco import COCO

from fpn_rpn.data import synthetic_data
from fpn_rpn.data.synthetic_data import generate_synthetic_dataset, render_image

# Images 0 and 20 of each split are the empty ones (EMPTY_EVERY == 20).
NUM_TRAIN, NUM_VAL = 24, 8


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _file_digests(root: Path) -> dict:
    return {str(p.relative_to(root)): _digest(p) for p in root.rglob("*") if p.is_file()}


def _load(json_file) -> dict:
    with open(json_file) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "shapes"
    return root, generate_synthetic_dataset(root, seed=0, num_train=NUM_TRAIN, num_val=NUM_VAL, workers=2)


def test_layout(generated):
    root, paths = generated
    assert paths == {
        "train": (str(root / "annotations" / "instances_train.json"), str(root / "train")),
        "val": (str(root / "annotations" / "instances_val.json"), str(root / "val")),
    }
    assert len(list((root / "train").iterdir())) == NUM_TRAIN
    assert len(list((root / "val").iterdir())) == NUM_VAL
    # nothing but the dataset next to it: the temporary folder is gone
    assert [p.name for p in root.parent.iterdir()] == ["shapes"]


def test_same_seed_same_bytes_other_seed_other_data(generated, tmp_path):
    root, _ = generated
    # one thread here, two in the fixture: the files do not depend on the threads either
    generate_synthetic_dataset(tmp_path / "again", seed=0, num_train=NUM_TRAIN, num_val=NUM_VAL, workers=1)
    digests = _file_digests(root)
    assert len(digests) == 1 + 2 + NUM_TRAIN + NUM_VAL  # manifest, 2 JSON files, images
    assert _file_digests(tmp_path / "again") == digests

    generate_synthetic_dataset(tmp_path / "other", seed=1, num_train=NUM_TRAIN, num_val=NUM_VAL)
    other = _file_digests(tmp_path / "other")
    assert other.keys() == digests.keys()
    changed = [name for name in digests if other[name] != digests[name]]
    assert len(changed) == len(digests)  # the manifest records the seed, so it changes too


def test_loads_in_pycocotools_and_detectron2(generated):
    _, paths = generated
    for split, num_images in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        json_file, image_root = paths[split]
        coco = COCO(json_file)
        assert len(coco.getImgIds()) == num_images
        names = [c["name"] for c in coco.loadCats(coco.getCatIds())]
        assert names == ["rectangle", "ellipse", "triangle", "polygon"]
        anns = coco.dataset["annotations"]
        assert len({a["id"] for a in anns}) == len(anns)
        for a in anns:
            image = coco.imgs[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert 0 <= x and x + w <= image["width"] and 0 <= y and y + h <= image["height"]
            assert 0 < a["area"] <= w * h and a["iscrowd"] == 0

        records = load_coco_json(json_file, image_root, f"synthetic_test_{split}")
        assert len(records) == num_images
        assert sum(len(r["annotations"]) for r in records) == len(anns)
        assert all(Path(r["file_name"]).is_file() for r in records)
        boxes = [obj["bbox"] for r in records for obj in r["annotations"]]
        assert boxes == [a["bbox"] for a in anns]
        assert {obj["bbox_mode"] for r in records for obj in r["annotations"]} == {BoxMode.XYWH_ABS}
        assert {obj["category_id"] for r in records for obj in r["annotations"]} == {0, 1, 2, 3}


def test_sizes_and_shapes_span_fpn_levels(generated):
    _, paths = generated
    anns = [a for split in paths for a in _load(paths[split][0])["annotations"]]
    area = np.array([a["area"] for a in anns])
    # COCO's area buckets
    small, large = (area < 32**2).mean(), (area >= 96**2).mean()
    medium = 1 - small - large
    assert min(small, medium, large) > 0.2, (small, medium, large)
    boxes = np.array([a["bbox"] for a in anns])
    box_size = np.sqrt(boxes[:, 2] * boxes[:, 3])
    assert box_size.min() < 16 and box_size.max() > 256  # P2 to P6 anchors are 32 to 512
    ratio = boxes[:, 2] / boxes[:, 3]
    assert ratio.min() < 0.5 and ratio.max() > 2


def test_empty_images_and_disjoint_splits(generated):
    _, paths = generated
    pixels = {}
    for split, (json_file, image_root) in paths.items():
        dataset = _load(json_file)
        annotated = {a["image_id"] for a in dataset["annotations"]}
        empty = [im["id"] for im in dataset["images"] if im["id"] not in annotated]
        # ids start at 1; images 0, EMPTY_EVERY, ... are empty
        assert empty == list(range(1, len(dataset["images"]) + 1, synthetic_data.EMPTY_EVERY))
        assert len(empty) == {"train": 2, "val": 1}[split]
        pixels[split] = {_digest(Path(image_root) / im["file_name"]) for im in dataset["images"]}
        assert len(pixels[split]) == len(dataset["images"])
    assert not pixels["train"] & pixels["val"]


@pytest.mark.parametrize("seed", range(5))
def test_annotations_match_drawn_pixels(seed):
    image, objects, labels = render_image(np.random.default_rng(seed))
    assert image.dtype == np.uint8 and image.shape == labels.shape + (3,)
    assert len(objects) > 0
    assert labels.max() == len(objects)
    for k, obj in enumerate(objects, start=1):
        ys, xs = np.nonzero(labels == k)
        assert obj["area"] == len(ys) > 0
        x, y, w, h = obj["bbox"]
        assert x <= xs.min() and xs.max() < x + w and y <= ys.min() and ys.max() < y + h


def test_render_image_empty():
    image, objects, labels = render_image(np.random.default_rng(0), empty=True)
    assert objects == [] and not labels.any()


def test_existing_dataset_is_reused(generated):
    root, paths = generated
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert generate_synthetic_dataset(root, seed=0, num_train=NUM_TRAIN, num_val=NUM_VAL) == paths
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    with pytest.raises(ValueError, match=re.escape(str(root))):
        generate_synthetic_dataset(root, seed=0, num_train=NUM_TRAIN + 1, num_val=NUM_VAL)


def test_root_may_exist_empty_but_not_hold_other_files(tmp_path):
    (tmp_path / "empty").mkdir()
    json_file, image_root = generate_synthetic_dataset(tmp_path / "empty", num_train=1, num_val=1)["val"]
    assert Path(json_file).is_file() and len(list(Path(image_root).iterdir())) == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a dataset")
    with pytest.raises(ValueError, match="remove it or choose another root"):
        generate_synthetic_dataset(tmp_path / "other", num_train=1, num_val=1)


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def render_then_fail(rng, empty=False):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render_image(rng, empty)

    monkeypatch.setattr(synthetic_data, "render_image", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_dataset(tmp_path / "shapes", num_train=4, num_val=2)
    assert list(tmp_path.iterdir()) == []
