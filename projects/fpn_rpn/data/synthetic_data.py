"""The embedded default dataset: shapes on cluttered backgrounds, generated from a seed.

It lets the project train and evaluate a proposal network with nothing downloaded.
Objects span the FPN levels P2-P6 (square-root areas of about 10 to 480 px, aspect
ratios 1:3 to 3:1); the clutter they sit on is desaturated, thin or tiny, so that it is
told apart from objects by what it looks like, not by memory.

Layout under ``root`` (COCO format, boxes only, no segmentation)::

    manifest.json                  parameters; written last, so it marks a complete dataset
    annotations/instances_{train,val}.json
    {train,val}/000001.jpg, ...

Annotations: ``bbox`` is the tight XYWH box of the object's whole silhouette in pixels
(x, y of the top-left pixel, w, h in pixels), also where other objects cover part of it;
``area`` is the number of silhouette pixels left visible by the objects drawn over it,
as COCO's ``area`` is the visible mask's; an outlined shape's silhouette includes its
hollow interior. No object is drawn where it would leave an earlier one less than
``MIN_VISIBLE`` visible, so every drawn object is annotated.

Every image has its own random generator, seeded by (seed, split, image index), so
that the same seed gives byte-identical files (with the same numpy and OpenCV) and an
image does not depend on how many images are generated.
"""
import colorsys
import functools
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from ..errors import DataError

__all__ = [
    "CATEGORIES",
    "DEFAULT_NUM_TRAIN",
    "DEFAULT_NUM_VAL",
    "DEFAULT_SEED",
    "dataset_paths",
    "generate_synthetic_dataset",
    "render_image",
]

DEFAULT_SEED = 0
# Enough images for the demo's few hundred iterations, and few enough to draw in well
# under a minute on 2 CPU cores (timings: docs/demo.md).
DEFAULT_NUM_TRAIN = 400
DEFAULT_NUM_VAL = 100
# Bump when a change alters the generated files, so that an old dataset is not reused.
GENERATOR_VERSION = 1

SPLITS = ("train", "val")
CATEGORIES = [
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "polygon", "supercategory": "shape"},
]
# Image sides are drawn from this range, so that a 480 px object fits and the data
# loader sees several aspect ratios.
IMAGE_SIDES = (448, 480, 512, 544, 576, 608, 640)
# Square root of the object's box area, drawn log-uniformly: about 30 % COCO small
# (< 32), 30 % medium and 40 % large.
OBJECT_SIZE_RANGE = (10.0, 480.0)
ASPECT_RATIO_RANGE = (1.0 / 3.0, 3.0)  # width / height
MAX_OBJECTS = 14
MIN_VISIBLE = 0.6
# Every EMPTY_EVERY-th image (index 0 included) has clutter but no object.
EMPTY_EVERY = 20
JPEG_QUALITY = 95
_MANIFEST = "manifest.json"


def dataset_paths(root) -> Dict[str, Tuple[str, str]]:
    """split -> (json_file, image_root) of a dataset under ``root``, generated or not."""
    root = Path(root)
    return {s: (str(root / "annotations" / f"instances_{s}.json"), str(root / s)) for s in SPLITS}


def generate_synthetic_dataset(
    root,
    seed: int = DEFAULT_SEED,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    workers: Optional[int] = None,
) -> Dict[str, Tuple[str, str]]:
    """
    Generate the dataset under ``root`` unless it already holds one made with the same
    parameters.

    The files are written to a temporary folder next to ``root`` that is renamed to
    ``root`` once complete, so an interrupted run leaves no partial dataset behind.

    Args:
        workers: threads drawing images side by side (default: one per CPU core). NumPy
            and OpenCV release the GIL in the whole-image work, and each image has its
            own generator, so the files do not depend on it.

    Returns:
        dict: split ("train", "val") -> (json_file, image_root), as strings.

    Raises:
        DataError (a ValueError): ``root`` exists and is not empty but holds something else, such
            as a dataset made with other parameters.
    """
    root = Path(root).resolve()
    params = {
        "generator": "fpn_rpn.data.synthetic_data",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
    }
    if _has_dataset(root, params):
        return dataset_paths(root)
    if root.exists() and not (root.is_dir() and not any(root.iterdir())):
        raise DataError(
            f"{root} exists but does not hold a synthetic dataset made with {params}; "
            "remove it or choose another root"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        print(f"fpn_rpn: generating the synthetic dataset {params} in {root}", flush=True)
        start = time.perf_counter()
        workers = max(1, workers or os.cpu_count() or 1)
        for split_index, (split, num_images) in enumerate(zip(SPLITS, (num_train, num_val))):
            _write_split(tmp, split, split_index, num_images, seed, workers)
        _write_json(tmp / _MANIFEST, params)
        try:
            os.rename(tmp, root)
        except OSError:
            # another process finished the same dataset first
            if not _has_dataset(root, params):
                raise
        print(f"fpn_rpn: synthetic dataset ready in {time.perf_counter() - start:.1f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dataset_paths(root)


def _has_dataset(root: Path, params: dict) -> bool:
    try:
        with open(root / _MANIFEST) as f:
            return json.load(f) == params
    except (OSError, ValueError):
        return False


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))


def _encoded_image(seed: int, split_index: int, index: int) -> Tuple[bytes, Tuple[int, int], List[dict]]:
    """Image ``index`` of a split as JPEG bytes, with its (height, width) and objects."""
    # spawn_key makes each image's stream independent of the others and of the counts
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split_index, index)))
    image, objects, _ = render_image(rng, empty=index % EMPTY_EVERY == 0)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode image {index + 1} as JPEG")
    return encoded.tobytes(), image.shape[:2], objects


def _write_split(root: Path, split: str, split_index: int, num_images: int, seed: int, workers: int) -> None:
    image_dir = root / split
    image_dir.mkdir()
    images, annotations = [], []
    with ThreadPoolExecutor(workers) as pool:
        encoded_images = pool.map(functools.partial(_encoded_image, seed, split_index), range(num_images))
        for i, (encoded, (height, width), objects) in enumerate(encoded_images):
            file_name = f"{i + 1:06d}.jpg"
            (image_dir / file_name).write_bytes(encoded)
            images.append({"id": i + 1, "file_name": file_name, "height": height, "width": width})
            for obj in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "iscrowd": 0, **obj})
            if (i + 1) % 100 == 0 or i + 1 == num_images:
                print(f"fpn_rpn: {split}: {i + 1}/{num_images} images", flush=True)
    (root / "annotations").mkdir(exist_ok=True)
    dataset = {
        "info": {"description": "fpn_rpn synthetic shapes", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    _write_json(root / "annotations" / f"instances_{split}.json", dataset)


def render_image(rng: np.random.Generator, empty: bool = False) -> Tuple[np.ndarray, List[dict], np.ndarray]:
    """
    Draw one image.

    Returns:
        image (H, W, 3) uint8 BGR;
        objects: one dict per object with "category_id", "bbox" (XYWH) and "area";
        labels (H, W) int32: 1 + the index in ``objects`` of the object seen at each
            pixel (its silhouette), 0 for background.
    """
    height, width = (int(s) for s in rng.choice(IMAGE_SIDES, size=2))
    image = _background(rng, height, width)
    _draw_clutter(rng, image, num_lines=int(rng.integers(2, 20)), num_blobs=int(rng.integers(0, 40)))
    labels = np.zeros((height, width), np.int32)
    objects: List[dict] = []
    if not empty:
        objects = _draw_objects(rng, image, labels, int(rng.integers(1, MAX_OBJECTS + 1)))
    # a few lines cross the objects too, as clutter does in real images
    _draw_clutter(rng, image, num_lines=int(rng.integers(0, 4)), num_blobs=0)
    image += np.float32(rng.uniform(0.0, 4.0)) * rng.standard_normal((height, width, 1), np.float32)
    image = np.clip(image, 0, 255).astype(np.uint8)
    return image, objects, labels


def _saturated_color(rng) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.65, 1.0), rng.uniform(0.55, 1.0))
    return np.array(rgb[::-1], np.float32) * 255  # BGR


def _dull_color(rng, value_range=(0.2, 0.85)) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.0, 0.25), rng.uniform(*value_range))
    return np.array(rgb[::-1], np.float32) * 255


def _projection(angle: float, height: int, width: int) -> np.ndarray:
    """(H, W) float32: each pixel's coordinate along the direction ``angle``."""
    y, x = np.ogrid[0:height, 0:width]
    return x.astype(np.float32) * np.float32(np.cos(angle)) + y.astype(np.float32) * np.float32(np.sin(angle))


def _ramp(rng, height: int, width: int) -> np.ndarray:
    """(H, W) float32 in [0, 1], increasing along a random direction."""
    t = _projection(rng.uniform(0, 2 * np.pi), height, width)
    return (t - t.min()) / max(float(t.max() - t.min()), 1.0)


def _stripes(rng, height: int, width: int, period: float) -> np.ndarray:
    """(H, W) bool stripes of the given period along a random direction."""
    t = _projection(rng.uniform(0, np.pi), height, width) / np.float32(period)
    return np.floor(t).astype(np.int64) % 2 == 1


def _background(rng, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32: a gradient between two dull colours plus a low-contrast texture."""
    c0, c1 = _dull_color(rng), _dull_color(rng)
    ramp = _ramp(rng, height, width)[..., None]
    image = c0 + ramp * (c1 - c0)
    texture = rng.integers(0, 3)
    amplitude = np.float32(rng.uniform(6, 25))
    if texture == 1:
        image += amplitude * (_stripes(rng, height, width, rng.uniform(6, 40))[..., None] - np.float32(0.5))
    elif texture == 2:
        # low-frequency blotches, lighter and darker only: coarse noise, upsampled
        coarse = rng.standard_normal((height // 32 + 2, width // 32 + 2), np.float32)
        image += amplitude * cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)[..., None]
    return image


def _draw_clutter(rng, image: np.ndarray, num_lines: int, num_blobs: int) -> None:
    """Thin dull lines and specks of at most 5 px, never annotated."""
    height, width = image.shape[:2]
    for _ in range(num_lines):
        p0 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        color = _dull_color(rng, (0.0, 1.0)).tolist()
        cv2.line(image, p0, p1, color, int(rng.integers(1, 3)), cv2.LINE_8)
    for _ in range(num_blobs):
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(image, center, int(rng.integers(1, 3)), _dull_color(rng, (0.0, 1.0)).tolist(), -1)


def _shape_mask(rng, category_id: int, h: int, w: int) -> np.ndarray:
    """(h, w) bool silhouette of a shape fitted in an h x w box (not always touching it)."""
    if category_id == 1:  # rectangle
        return np.ones((h, w), bool)
    if category_id == 2:  # ellipse, tested at pixel centres
        y, x = np.ogrid[0:h, 0:w]
        return ((x + 0.5 - w / 2) / (w / 2)) ** 2 + ((y + 0.5 - h / 2) / (h / 2)) ** 2 <= 1.0
    if category_id == 3:  # triangle: a base on one side of the box, the apex on the opposite side
        apex = rng.uniform(0, 1)
        points = np.array([[apex, 0.0], [0.0, 1.0], [1.0, 1.0]])
        if rng.integers(0, 2):
            points = points[:, ::-1]  # base on the right instead of the bottom
        if rng.integers(0, 2):
            points = 1.0 - points  # base on the top or left
    else:  # polygon: 5 to 8 vertices on a circle, stretched to the box
        num_vertices = int(rng.integers(5, 9))
        angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(num_vertices) / num_vertices
        radii = rng.uniform(0.75, 1.0, (num_vertices, 1))
        points = np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii
        points = (points - points.min(0)) / (points.max(0) - points.min(0))
    mask = np.zeros((h, w), np.uint8)
    # 4 fractional bits (shift=4) so that small polygons keep their shape
    fixed = np.round(points * [w - 1, h - 1] * 16).astype(np.int32)
    cv2.fillPoly(mask, [fixed], 1, cv2.LINE_8, 4)
    return mask.astype(bool)


def _fill(rng, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float32 paint of saturated colours: solid, stripes, checks or gradient."""
    c0, c1 = _saturated_color(rng), _saturated_color(rng)
    kind = rng.integers(0, 4)
    if kind == 0:
        paint = np.broadcast_to(c0, (h, w, 3))
    elif kind == 1:
        period = rng.uniform(3, max(4.0, min(h, w) / 3))
        paint = np.where(_stripes(rng, h, w, period)[..., None], c0, c1)
    elif kind == 2:
        cell = int(rng.integers(3, max(4, min(h, w) // 3) + 1))
        y, x = np.ogrid[0:h, 0:w]
        paint = np.where(((x // cell + y // cell) % 2 == 1)[..., None], c0, c1)
    else:
        paint = c0 + _ramp(rng, h, w)[..., None] * (c1 - c0)
    return paint + np.float32(rng.uniform(0, 8)) * rng.standard_normal((h, w, 1), np.float32)


def _draw_objects(rng, image: np.ndarray, labels: np.ndarray, num_objects: int) -> List[dict]:
    height, width = labels.shape
    log_lo, log_hi = np.log(OBJECT_SIZE_RANGE)
    sizes = np.exp(rng.uniform(log_lo, log_hi, num_objects))
    ratios = np.exp(rng.uniform(*np.log(ASPECT_RATIO_RANGE), num_objects))
    # mostly large ones first, so that small ones on top are common but not the rule
    order = np.argsort(-(np.log(sizes) + rng.normal(0, 0.7, num_objects)), kind="stable")
    objects, full_area, visible = [], [], []
    for size, ratio in zip(sizes[order], ratios[order]):
        w, h = size * np.sqrt(ratio), size / np.sqrt(ratio)
        shrink = min(1.0, (width - 2) / w, (height - 2) / h)  # the largest only fit shrunk
        w, h = max(int(round(w * shrink)), 4), max(int(round(h * shrink)), 4)
        category_id = int(rng.integers(1, len(CATEGORIES) + 1))
        mask = _shape_mask(rng, category_id, h, w)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        mask = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # tight: the crop is the bbox
        h, w = mask.shape
        for _ in range(10):
            x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            window = labels[y0 : y0 + h, x0 : x0 + w]
            covered = np.bincount(window[mask], minlength=len(objects) + 1)[1:]
            if all(v - c >= MIN_VISIBLE * a for v, c, a in zip(visible, covered, full_area)):
                break
        else:
            continue  # no place found that keeps the others visible enough: not drawn
        paint = mask
        if rng.uniform() < 0.3:  # outlined: only a border of the silhouette is painted
            thickness = max(2, int(round(min(h, w) * rng.uniform(0.08, 0.2))))
            inner = cv2.erode(np.pad(mask, 1).astype(np.uint8), np.ones((2 * thickness + 1,) * 2, np.uint8))
            paint = mask & ~inner[1:-1, 1:-1].astype(bool)
        np.copyto(image[y0 : y0 + h, x0 : x0 + w], _fill(rng, h, w), where=paint[..., None])
        window[mask] = len(objects) + 1
        visible = [v - c for v, c in zip(visible, covered)] + [int(mask.sum())]
        full_area.append(int(mask.sum()))
        objects.append({"category_id": category_id, "bbox": [float(x0), float(y0), float(w), float(h)]})
    for obj, area in zip(objects, visible):
        obj["area"] = float(area)
    return objects
