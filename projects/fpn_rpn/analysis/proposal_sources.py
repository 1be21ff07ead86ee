"""Proposals of one dataset from several kinds of source, in one form, for comparing recall.

Every source gives :class:`SourceProposals`: per image id, boxes (N, 4) float32 XYXY in
original image coordinates and scores (N,) float32, higher first (any order; the recall
functions sort), the form :func:`fpn_rpn.evaluation.proposal_recall.evaluate_recall` takes.

- :func:`run_model`: a trained model (config + weights) over the images.
- a Detectron2 proposal file (``box_proposals.pkl``):
  :func:`fpn_rpn.data.proposal_files.load_proposal_file`.
- :func:`selective_search`: OpenCV's Selective Search, fast mode (opencv-contrib-python).
- :func:`anchor_proposals`: the anchors of a config, without regression, as proposals.

:func:`cached` keeps the proposals of slow sources on disk, keyed by what they depend on.
"""
import ctypes
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import pickle
import re
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data.detection_utils import read_image
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, BoxMode, Instances
from tqdm import tqdm

from .anchor_analysis import AnchorGrid, input_size_at_test
from .postprocessing_variants import network_key, run_postprocessing_variants
from ..config import add_fpn_rpn_config
from ..data.build import unregistered_dataset_error
from ..data.datasets import register_datasets
from ..errors import ConfigError, DataError

__all__ = [
    "SourceProposals",
    "anchor_proposals",
    "cache_key",
    "cached",
    "get_dataset_dicts",
    "run_model",
    "run_models_cached",
    "selective_search",
    "split_config_and_weights",
]

logger = logging.getLogger(__name__)

# Proposals of one image: {"boxes": (N, 4) float32 XYXY_ABS, "scores": (N,) float32}
ImageProposals = Dict[str, np.ndarray]


@dataclass
class SourceProposals:
    """
    The proposals of one source over a dataset.

    Attributes:
        name: the source's label in tables and plots.
        proposals: image_id -> {"boxes": (N, 4) float32 XYXY in original image
            coordinates, "scores": (N,) float32, higher is better}.
        seconds_per_image: mean time to compute one image's proposals, without reading
            the image file; NaN where unknown (a proposal file).
        info: what the proposals came from (config, weights, options), for reports.
    """

    name: str
    proposals: Dict[Any, ImageProposals]
    seconds_per_image: float = math.nan
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def proposals_per_image(self) -> float:
        if not self.proposals:
            return math.nan
        return float(np.mean([len(p["scores"]) for p in self.proposals.values()]))


def get_dataset_dicts(dataset_name: str, max_images: Optional[int] = None, cfgs: Sequence = ()) -> List[dict]:
    """
    The first ``max_images`` records (all if None) of a registered dataset, after
    registering fpn_rpn's datasets and the ``DATASETS.REGISTER_COCO`` entries of ``cfgs``.
    """
    for cfg in list(cfgs) or [add_fpn_rpn_config(get_cfg())]:
        register_datasets(cfg)
    if dataset_name not in DatasetCatalog.list():
        raise unregistered_dataset_error("the command line", dataset_name)
    dicts = DatasetCatalog.get(dataset_name)
    return dicts if max_images is None else dicts[:max_images]


def split_config_and_weights(spec: str) -> Tuple[str, Optional[str]]:
    """
    "CONFIG.yaml[:WEIGHTS]" -> (config, weights or None). The config ends in .yaml or .yml;
    what follows its ':' is the weights, which may be a URL.

    Raises:
        ValueError: ``spec`` names no YAML file.
    """
    match = re.match(r"^(.+?\.ya?ml)(?::(.+))?$", spec)
    if not match:
        raise ValueError(f"expected CONFIG.yaml[:WEIGHTS], got {spec!r}")
    return match.group(1), match.group(2)


def run_model(
    cfg, dataset_dicts: Sequence[dict], progress: bool = False, random_init: bool = False
) -> Tuple[Dict[Any, ImageProposals], float]:
    """
    Proposals of a model (``cfg``, with ``cfg.MODEL.WEIGHTS``) for each image, one image
    at a time, with the test-time resize of ``cfg.INPUT``: the one-variant case of
    :func:`fpn_rpn.analysis.postprocessing_variants.run_postprocessing_variants`, which
    says how weights are loaded and which models are accepted.

    Returns:
        image_id -> proposals (original image coordinates), and the mean seconds of the
        model call per image (reading and resizing the image excluded).
    """
    return run_postprocessing_variants([cfg], dataset_dicts, progress, random_init)[0]


def run_models_cached(
    models: Sequence[Tuple[str, Any, bool]],
    dataset_name: str,
    dataset_dicts: Sequence[dict],
    cache_dir: Optional[str],
    progress: bool = False,
) -> Dict[str, Tuple[Dict[Any, ImageProposals], float, bool]]:
    """
    The proposals of several models, each through :func:`cached`; models that differ only
    in post-processing and share their weights are computed together, from one network
    pass per image (:func:`run_postprocessing_variants`), when any of them is not cached.

    Args:
        models: (name, cfg, random_init) of each model.

    Returns:
        name -> (proposals, seconds per image, whether they came from the cache).
    """
    groups: Dict[Tuple, List[int]] = {}
    for i, (_, cfg, random_init) in enumerate(models):
        groups.setdefault((network_key(cfg), cfg.MODEL.WEIGHTS, random_init), []).append(i)
    results = {}
    for members in groups.values():
        computed = {}

        def compute(i, members=members, computed=computed):
            if not computed:  # the first member missing from the cache computes all
                cfgs = [models[m][1] for m in members]
                variants = run_postprocessing_variants(cfgs, dataset_dicts, progress, models[members[0]][2])
                computed.update(zip(members, variants))
            return computed[i]

        for i in members:
            name, cfg, random_init = models[i]
            key = cache_key("model", dataset_name, dataset_dicts, cfg, random_init=random_init)
            results[name] = cached(cache_dir, name, key, lambda i=i: compute(i))
    return results


def _seed_c_rand(seed: int) -> None:
    # OpenCV's Selective Search ranks regions with C rand(): seeding it makes the ranking repeatable
    try:
        ctypes.CDLL(None).srand(seed)
    except (OSError, AttributeError):  # no C library to reach (e.g. Windows): unseeded ranking
        pass


def _selective_search_image(file_name: str, max_side: Optional[int], seed: int) -> Tuple[ImageProposals, float]:
    """One image's Selective Search proposals, and the seconds the resize and search took."""
    import cv2

    image = read_image(file_name, format="BGR")
    start = time.perf_counter()
    h, w = image.shape[:2]
    scale = 1.0
    if max_side is not None and max(h, w) > max_side:
        scale = max_side / max(h, w)
        image = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    _seed_c_rand(seed)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(image)
    search.switchToSelectiveSearchFast()
    rects = np.asarray(search.process(), dtype=np.float32).reshape(-1, 4)  # XYWH, best first
    seconds = time.perf_counter() - start
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1) / scale
    boxes = np.minimum(boxes, np.array([w, h, w, h], dtype=np.float32))
    return {"boxes": boxes.astype(np.float32), "scores": -np.arange(len(boxes), dtype=np.float32)}, seconds


def selective_search(
    dataset_dicts: Sequence[dict],
    max_side: Optional[int] = None,
    seed: int = 0,
    progress: bool = False,
    workers: Optional[int] = None,
) -> Tuple[Dict[Any, ImageProposals], float]:
    """
    OpenCV's Selective Search (``cv2.ximgproc``, from opencv-contrib-python) in fast
    mode, with its own ranking: OpenCV orders the boxes by hierarchy level times a
    random number (``rand()`` seeded with ``seed`` before each image, so a run is
    repeatable), and the score given here is minus the place in that order.

    Args:
        max_side: if set, images whose longer side exceeds it are shrunk to it first
            (Selective Search takes seconds per VGA image on one core) and the boxes
            are scaled back to the original image.
        workers: processes searching images side by side (default: one per CPU core;
            the time it saves: docs/demo.md). Each image is seeded alone, so the boxes do
            not depend on it.

    Returns:
        image_id -> proposals, and the mean seconds per image (resize and search, as
        one worker measured it).
    """
    import cv2  # here: only this source needs opencv-contrib-python's ximgproc

    if not hasattr(cv2, "ximgproc"):
        raise ImportError(
            "Selective Search needs cv2.ximgproc from opencv-contrib-python "
            "(pip uninstall opencv-python; pip install opencv-contrib-python)"
        )
    workers = max(1, min(workers or os.cpu_count() or 1, len(dataset_dicts)))
    search = functools.partial(_selective_search_image, max_side=max_side, seed=seed)
    file_names = [record["file_name"] for record in dataset_dicts]
    bar = functools.partial(tqdm, total=len(file_names), desc="selective search", unit="img", disable=not progress)
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = list(bar(pool.imap(search, file_names)))
    else:
        results = list(bar(map(search, file_names)))
    proposals = {record["image_id"]: boxes for record, (boxes, _) in zip(dataset_dicts, results)}
    return proposals, sum(seconds for _, seconds in results) / max(len(dataset_dicts), 1)


def anchor_proposals(
    cfg, dataset_dicts: Sequence[dict], seed: int = 0, progress: bool = False
) -> Tuple[Dict[Any, ImageProposals], float]:
    """
    The config's anchors as regression-free proposals: all anchors of all levels at
    the test resolution, clipped and mapped back to the original image as the RPN's
    outputs are (``detector_postprocess``), empty ones dropped.

    Anchors have no score. They are ranked in a random order (a permutation drawn
    from ``seed`` and the image id), so AR@k is the recall of k anchors drawn at
    random, and at k >= the number of anchors it is the recall of the whole anchor
    set: an upper bound for proposals that only select anchors (no regression).

    Returns:
        image_id -> proposals, and the mean seconds per image.
    """
    grid = AnchorGrid(cfg)
    proposals, seconds = {}, 0.0
    for record in tqdm(dataset_dicts, desc="anchors", unit="img", disable=not progress):
        start = time.perf_counter()
        height, width = record["height"], record["width"]
        h, w = input_size_at_test(cfg, height, width)
        instances = Instances((h, w))
        instances.proposal_boxes = Boxes.cat(grid.anchors(h, w))
        instances.proposal_boxes.clip((h, w))  # as the RPN clips its proposals
        instances = detector_postprocess(instances, height, width)
        rng = np.random.default_rng([seed, zlib.crc32(str(record["image_id"]).encode())])
        order = rng.permutation(len(instances))
        seconds += time.perf_counter() - start
        proposals[record["image_id"]] = {
            "boxes": instances.proposal_boxes.tensor.numpy().astype(np.float32),
            "scores": -order.astype(np.float32),
        }
    return proposals, seconds / max(len(dataset_dicts), 1)


def _file_stamp(path: str) -> Any:
    """(path, mtime, size) of a local file; the string itself for anything else (URLs, "")."""
    if path and os.path.isfile(path):
        stat = os.stat(path)
        return [os.path.abspath(path), stat.st_mtime, stat.st_size]
    return path


def cache_key(kind: str, dataset_name: str, dataset_dicts: Sequence[dict], cfg=None, **options) -> Dict[str, Any]:
    """
    What a source's proposals depend on: its kind and options, the dataset name and
    image ids, and for a model the whole merged config (so ``_BASE_`` files and opts
    count) and the weights file's path, mtime and size.
    """
    ids = json.dumps([str(d["image_id"]) for d in dataset_dicts])
    key = {
        "kind": kind,
        "dataset": dataset_name,
        "image_ids": hashlib.sha1(ids.encode()).hexdigest(),
        "num_images": len(dataset_dicts),
        "options": options,
        "version": 1,
    }
    if cfg is not None:
        key["config"] = hashlib.sha1(cfg.dump().encode()).hexdigest()
        key["weights"] = _file_stamp(cfg.MODEL.WEIGHTS)
    return key


def cached(
    cache_dir: Optional[str],
    name: str,
    key: Dict[str, Any],
    compute: Callable[[], Tuple[Dict[Any, ImageProposals], float]],
) -> Tuple[Dict[Any, ImageProposals], float, bool]:
    """
    ``compute()`` (proposals, seconds per image), or what an earlier call with an equal
    ``key`` stored in ``cache_dir/<name>-<hash of key>.pkl``. ``cache_dir=None`` always
    computes.

    Returns:
        proposals, seconds per image (as measured when they were computed), and whether
        they came from the cache.
    """
    if cache_dir is None:
        return (*compute(), False)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, "{}-{}.pkl".format(re.sub(r"[^A-Za-z0-9_.-]+", "_", name), digest))
    if os.path.isfile(path):
        with open(path, "rb") as f:
            stored = pickle.load(f)
        if stored.get("key") == json.loads(json.dumps(key, default=str)):
            logger.info(f"Proposals of {name!r} read from the cache {path}")
            return stored["proposals"], stored["seconds_per_image"], True
    proposals, seconds = compute()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(
            {"key": json.loads(json.dumps(key, default=str)), "proposals": proposals, "seconds_per_image": seconds},
            f,
            protocol=pickle.HIGHEST_PROTOCOL,
        )
    os.replace(tmp, path)  # a run killed while writing leaves no half file under the real name
    return proposals, seconds, False
