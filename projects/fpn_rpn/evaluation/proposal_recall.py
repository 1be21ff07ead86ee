"""Class-agnostic proposal recall, under two named definitions.

Both count how many ground-truth boxes the top-k proposals of each image recover,
for IoU thresholds 0.50:0.05:0.95, proposal budgets k and gt area ranges; AR is the
mean recall over the thresholds. Values are fractions in [0, 1] (Detectron2's
COCOEvaluator prints the "d2" numbers in percent), and NaN where no gt counts.

"d2": Detectron2's proposal evaluation (``_evaluate_box_proposals`` in
    ``detectron2/evaluation/coco_evaluation.py``). Per image, proposals sorted by
    score with ``torch.sort`` (not stable: tied scores keep torch's order, so we call
    the same sort), cut to k, matched to the non-crowd gts of the area range by
    greedy maximum overlap: repeatedly the highest IoU left (ties: lowest gt index,
    then lowest proposal index) pairs one proposal with one gt. A gt counts at
    threshold t if its pair has IoU >= t. **Images without any proposal are skipped
    entirely: their gts count in neither numerator nor denominator**, so an empty
    output cannot lower this recall. IoUs in float32, by Detectron2's ``pairwise_iou``.
"coco": pycocotools' COCOeval with ``useCats = 0``, ``iouType = "bbox"``, ``maxDets``
    = the budgets, proposals given as detections in Detectron2's result format (XYWH
    computed in float32 as ``instances_to_coco_json`` does). Per threshold,
    proposals in stable score order each take the unmatched in-range non-crowd gt of
    highest IoU >= t (ties: the later gt in COCOeval's category-grouped order). Crowd
    and out-of-range gts are COCOeval's "ignored" gts: they can absorb a proposal but
    never count, so recall does not depend on them. Every image counts, with or
    without proposals. IoUs in float64, by ``pycocotools.mask.iou`` (as COCOeval).

Category groups (``TEST.RECALL_CATEGORY_GROUPS``): the recall of a group is either
definition computed with only the group's annotations as ground truth (crowd regions
included, ignored as above) and every proposal a candidate, i.e. the originals run on an
annotation file filtered to the group (:func:`gt_of_categories`).

Area ranges are closed on both sides, on the annotation's ``area`` (not the box's),
like both originals; a gt of area exactly 32**2 is both small and medium.

Both matchings are greedy matchings of a bipartite graph under a strict priority
of its edges, computed here for all images at once in rounds of "locally dominant"
edges (the best edge left at both of its ends), which accept exactly the edges the
one-edge-at-a-time loops of the originals accept. Only edges of IoU >= the lowest
threshold are built: lower ones can never count.
"""
from typing import Collection, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.structures import Boxes, pairwise_iou
from pycocotools import mask as coco_mask
from tabulate import tabulate

__all__ = [
    "COCO_AREAS",
    "COCO_IOU_THRESHOLDS",
    "DEFAULT_BUDGETS",
    "DEFINITIONS",
    "check_budgets",
    "evaluate_recall",
    "format_recall_table",
    "gt_from_coco",
    "gt_of_categories",
    "metric_name",
    "recall_curves",
    "results_key",
]

DEFINITIONS = ("d2", "coco")
DEFAULT_BUDGETS = (10, 20, 50, 100, 300, 1000)
# pycocotools' Params.iouThrs; as float32 these equal Detectron2's
# torch.arange(0.5, 0.95 + 1e-5, 0.05, dtype=torch.float32).
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
# name -> closed range of annotation area; pycocotools' Params.areaRng.
COCO_AREAS = {
    "all": (0.0, 1e5**2),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e5**2),
}
_AREA_SUFFIX = {"all": "", "small": "_s", "medium": "_m", "large": "_l"}


def metric_name(area: str, budget: int) -> str:
    """"AR@100" for area "all", "AR_s@100" for "small"; other areas: "AR_<name>@100"."""
    return "AR{}@{:d}".format(_AREA_SUFFIX.get(area, "_" + area), budget)


def results_key(definition: str, group: Optional[str] = None) -> str:
    """"recall_d2" for all gts; "recall_d2/novel" for category group "novel"."""
    return f"recall_{definition}" + (f"/{group}" if group is not None else "")


def gt_of_categories(gt_by_image: Mapping, category_ids: Collection[int]) -> Dict[int, dict]:
    """
    ``gt_by_image`` (as :func:`gt_from_coco` gives it, with "category_ids") with only the
    annotations of ``category_ids``, crowd regions included: the ground truth of an
    annotation file filtered to those categories. Every image stays.
    """
    category_ids = np.array(sorted(category_ids), dtype=np.int64)
    selected = {}
    for img_id, g in gt_by_image.items():
        if "category_ids" not in g:
            raise ValueError(f"Image {img_id!r}: category groups need the gts' \"category_ids\"")
        keep = np.isin(np.asarray(g["category_ids"]).reshape(-1), category_ids)
        selected[img_id] = {name: np.asarray(values)[keep] for name, values in g.items()}
    return selected


def gt_from_coco(coco_api, img_ids: Optional[Iterable[int]] = None) -> Dict[int, dict]:
    """
    Ground truth of a pycocotools ``COCO`` object in the form :func:`evaluate_recall` takes.

    Args:
        coco_api: pycocotools.coco.COCO.
        img_ids: images to include (default: all of ``coco_api``). An id without
            annotations gets empty arrays.

    Returns:
        dict image_id -> dict of per-annotation arrays, in the annotation order of
        ``coco_api.getAnnIds``:
            "boxes" (G, 4) float64 XYXY; "areas" (G,) float64, the annotation "area";
            "iscrowd" (G,) bool; "category_ids" (G,) int64; "xywh" (G, 4) float64,
            the annotation "bbox" as stored, so that box arithmetic matches the
            originals bit for bit.
    """
    if img_ids is None:
        img_ids = coco_api.getImgIds()
    gt = {}
    for img_id in img_ids:
        anns = coco_api.loadAnns(coco_api.getAnnIds(imgIds=[img_id]))
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        gt[img_id] = {
            "boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
            "areas": np.array([a["area"] for a in anns], dtype=np.float64),
            "iscrowd": np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
            "category_ids": np.array([a["category_id"] for a in anns], dtype=np.int64),
            "xywh": xywh,
        }
    return gt


def evaluate_recall(
    gt_by_image: Mapping,
    proposals_by_image: Mapping,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS,
    areas: Mapping[str, Tuple[float, float]] = COCO_AREAS,
    definitions: Sequence[str] = DEFINITIONS,
    category_groups: Optional[Mapping[str, Collection[int]]] = None,
) -> Dict[str, Dict[str, float]]:
    """
    AR of proposals under each definition (see the module docstring), of all gts and of
    each category group.

    Args:
        gt_by_image: image_id -> dict with "boxes" (G, 4) XYXY, "areas" (G,),
            "iscrowd" (G,); optional "category_ids" (G,) (COCOeval's gt order, used only
            to break exact IoU ties) and "xywh" (G, 4) (the COCO "bbox", used instead of
            "boxes" for exact arithmetic). :func:`gt_from_coco` builds it.
        proposals_by_image: image_id -> dict with "boxes" (N, 4) XYXY (treated as
            float32, as Detectron2 holds them) and "scores" (N,), any order. The
            evaluated images are exactly these keys; give an image without proposals
            as empty arrays (it then counts in "coco" but not in "d2").
        budgets: proposals per image (k); sorted and deduplicated.
        iou_thresholds: AR averages recall over these.
        areas: name -> closed (min, max) annotation area.
        definitions: any of "d2", "coco".
        category_groups: name -> category ids (the gts' "category_ids"): also the AR
            with only the group's gts (:func:`gt_of_categories`), every proposal counting.

    Returns:
        {"recall_<definition>": {"AR@k" / "AR_s@k" / ...: fraction or NaN}}, the
        layout Detectron2's ``flatten_results_dict`` turns into "recall_d2/AR@100";
        then "recall_<definition>/<group>" for each group (:func:`results_key`).
    """
    budgets = check_budgets(budgets)
    gts = {None: gt_by_image}
    for group, category_ids in (category_groups or {}).items():
        gts[group] = gt_of_categories(gt_by_image, category_ids)
    results = {}
    for group, gt in gts.items():
        for definition in definitions:
            recall, _ = recall_curves(gt, proposals_by_image, budgets, iou_thresholds, areas, definition)
            with np.errstate(invalid="ignore"):
                ar = recall.mean(axis=2)  # (A, K); NaN stays NaN
            results[results_key(definition, group)] = {
                metric_name(area, k): float(ar[a, i])
                for a, area in enumerate(areas)
                for i, k in enumerate(budgets)
            }
    return results


def recall_curves(
    gt_by_image: Mapping,
    proposals_by_image: Mapping,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS,
    areas: Mapping[str, Tuple[float, float]] = COCO_AREAS,
    definition: str = "d2",
) -> Tuple[np.ndarray, np.ndarray]:
    """
    Recall at every (area, budget, threshold) under one definition. Arguments as
    :func:`evaluate_recall` takes them.

    Returns:
        recall (A, K, T) float64, NaN for an area without counted gt; and the number
        of counted gts (A,) int64 (for "d2", gts of images with proposals only).
    """
    if definition not in DEFINITIONS:
        raise ValueError(f"Unknown recall definition {definition!r}; expected one of {DEFINITIONS}")
    budgets = check_budgets(budgets)
    thresholds = np.asarray(iou_thresholds, dtype=np.float64)
    ranges = np.array(list(areas.values()), dtype=np.float64).reshape(-1, 2)
    edges, in_area, num_gt = _build_edges(
        gt_by_image, proposals_by_image, budgets[-1], thresholds, ranges, definition
    )
    if definition == "d2":
        counts = _match_d2(edges, in_area, budgets, thresholds.astype(np.float32))
    else:
        counts = _match_coco(edges, in_area, budgets, np.minimum(thresholds, 1 - 1e-10))
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = counts / num_gt[:, None, None]
    recall[num_gt == 0] = np.nan
    return recall, num_gt


def format_recall_table(
    results: Mapping[str, Mapping[str, float]],
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    areas: Iterable[str] = tuple(COCO_AREAS),
) -> str:
    """
    A table of AR (fractions), one row per definition and area, one column per budget;
    with category groups (keys "recall_<definition>/<group>"), a "categories" column
    ("all" for every gt).
    """
    budgets = check_budgets(budgets)
    rows = []
    grouped = any("/" in key for key in results)
    for key, metrics in results.items():
        definition, _, group = (key[len("recall_"):] if key.startswith("recall_") else key).partition("/")
        for area in areas:
            rows.append(
                [definition] + ([group or "all"] if grouped else []) + [area]
                + [metrics.get(metric_name(area, k), np.nan) for k in budgets]
            )
    headers = ["definition"] + (["categories"] if grouped else []) + ["area"] + ["AR@{}".format(k) for k in budgets]
    return tabulate(rows, headers=headers, tablefmt="pipe", floatfmt=".4f", numalign="left")


def check_budgets(budgets: Sequence[int]) -> List[int]:
    """The budgets sorted and deduplicated; ValueError unless they are positive integers."""
    budgets = sorted({int(k) for k in budgets})
    if not budgets or budgets[0] < 1:
        raise ValueError(f"Recall budgets must be positive integers, got {budgets}")
    return budgets


def _gt_of(gt_by_image: Mapping, img_id, definition: str):
    """Non-crowd gts of one image: boxes for the definition's IoU, areas, COCOeval rank."""
    try:
        g = gt_by_image[img_id]
    except KeyError:
        raise KeyError(f"Image {img_id!r} has proposals but no entry in gt_by_image") from None
    keep = ~np.asarray(g["iscrowd"], dtype=bool).reshape(-1)
    areas = np.asarray(g["areas"], dtype=np.float64).reshape(-1)[keep]
    if "xywh" in g:
        xywh = np.asarray(g["xywh"], dtype=np.float64).reshape(-1, 4)[keep]
    else:
        xyxy = np.asarray(g["boxes"], dtype=np.float64).reshape(-1, 4)[keep]
        xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
    if definition == "d2":
        if "xywh" in g:
            # BoxMode.convert on a list adds in float32 (torch.tensor of floats)
            xywh32 = xywh.astype(np.float32)
            boxes = np.concatenate([xywh32[:, :2], xywh32[:, :2] + xywh32[:, 2:]], axis=1)
        else:
            boxes = np.asarray(g["boxes"]).reshape(-1, 4)[keep].astype(np.float32)
        return boxes, areas, None
    if "category_ids" in g:
        # COCOeval (useCats=0) lists an image's gts category by category
        order = np.argsort(np.asarray(g["category_ids"]).reshape(-1)[keep], kind="stable")
    else:
        order = np.arange(len(areas))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return xywh, areas, rank


def _build_edges(gt_by_image, proposals_by_image, max_budget, thresholds, ranges, definition):
    """
    Proposal-gt pairs of IoU >= the lowest threshold, over all images.

    Returns:
        edges: dict of (E,) arrays: "row" (global proposal id), "col" (global
            non-crowd gt id), "rank" (proposal's place in its image's score order),
            "iou", "key" (gt tie-break key within an image, lower wins).
        in_area: (A, num_gts) bool.
        num_gt: (A,) int64 gts that count in the denominator.
    """
    d2 = definition == "d2"
    min_thr = np.float32(thresholds.min()) if d2 else min(thresholds.min(), 1 - 1e-10)
    rows, cols, ranks, ious, keys = [], [], [], [], []
    gt_areas, gt_counted = [], []
    row_offset = col_offset = 0
    for img_id, props in proposals_by_image.items():
        gt_boxes, areas, rank = _gt_of(gt_by_image, img_id, definition)
        scores = np.asarray(props["scores"]).reshape(-1)
        boxes = np.asarray(props["boxes"], dtype=np.float32).reshape(-1, 4)
        gt_areas.append(areas)
        # d2 skips images without proposals; COCOeval counts every image
        gt_counted.append(np.full(len(areas), len(scores) > 0 or not d2))
        first_col, col_offset = col_offset, col_offset + len(areas)
        if len(scores) == 0 or len(areas) == 0:
            continue
        if d2:
            order = torch.from_numpy(np.ascontiguousarray(scores)).sort(descending=True)[1].numpy()
            iou = pairwise_iou(Boxes(torch.from_numpy(boxes[order[:max_budget]])), Boxes(torch.from_numpy(gt_boxes)))
            iou = iou.numpy()
        else:
            order = np.argsort(-scores, kind="stable")
            dets = boxes[order[:max_budget]]
            dets[:, 2:] -= dets[:, :2]  # XYWH in float32, as instances_to_coco_json
            iou = coco_mask.iou(dets.astype(np.float64), gt_boxes, np.zeros(len(gt_boxes), dtype=np.uint8))
        p, g = np.nonzero(iou >= min_thr)
        rows.append(row_offset + p)
        cols.append(first_col + g)
        ranks.append(p)
        ious.append(iou[p, g])
        # d2: lowest gt index first; COCOeval: last gt of its order first
        keys.append(first_col + (g if d2 else -rank[g]))
        row_offset += iou.shape[0]
    gt_areas = np.concatenate(gt_areas) if gt_areas else np.zeros(0)
    gt_counted = np.concatenate(gt_counted) if gt_counted else np.zeros(0, dtype=bool)
    if d2:
        # torch compares float32 areas with the range in float32
        a32, r32 = gt_areas.astype(np.float32), ranges.astype(np.float32)
        in_area = (a32 >= r32[:, :1]) & (a32 <= r32[:, 1:])
    else:
        in_area = (gt_areas >= ranges[:, :1]) & (gt_areas <= ranges[:, 1:])
    num_gt = (in_area & gt_counted).sum(axis=1)
    # concatenate lists with a typed empty array so that no images gives empty edges
    empty_i, empty_f = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32 if d2 else np.float64)
    edges = {
        "row": np.concatenate(rows + [empty_i]),
        "col": np.concatenate(cols + [empty_i]),
        "rank": np.concatenate(ranks + [empty_i]),
        "iou": np.concatenate(ious + [empty_f]),
        "key": np.concatenate(keys + [empty_i]),
    }
    return edges, in_area, num_gt


def _match_d2(edges, in_area, budgets, thresholds32) -> np.ndarray:
    """(A, K, T) counts of gts paired at IoU >= t by d2's greedy max-overlap matching."""
    row, col, iou = edges["row"], edges["col"], edges["iou"]
    # priority: highest IoU, then lowest gt index, then lowest proposal rank
    by_row = np.lexsort((edges["key"], -iou, row))
    by_col = np.lexsort((edges["rank"], -iou, col))
    counts = np.zeros((len(in_area), len(budgets), len(thresholds32)))
    for a, gt_in_area in enumerate(in_area):
        for i, k in enumerate(budgets):
            active = gt_in_area[col] & (edges["rank"] < k)
            taken = _greedy_match(row, col, by_row[active[by_row]], by_col[active[by_col]])
            counts[a, i] = (iou[taken, None] >= thresholds32).sum(axis=0)
    return counts


def _match_coco(edges, in_area, budgets, thresholds) -> np.ndarray:
    """(A, K, T) counts of gts matched by COCOeval's score-order greedy matching."""
    row, col, iou, rank = edges["row"], edges["col"], edges["iou"], edges["rank"]
    # priority: best-scored proposal first, then its highest IoU, then COCOeval's last gt
    by_row = np.lexsort((edges["key"], -iou, row))
    by_col = np.lexsort((rank, col))
    budgets = np.asarray(budgets)
    counts = np.zeros((len(in_area), len(budgets), len(thresholds)))
    for a, gt_in_area in enumerate(in_area):
        for t, thr in enumerate(thresholds):
            active = gt_in_area[col] & (iou >= thr)
            taken = _greedy_match(row, col, by_row[active[by_row]], by_col[active[by_col]])
            # a budget-k run matches exactly what the first k proposals match here
            counts[a, :, t] = (rank[taken, None] < budgets).sum(axis=0)
    return counts


def _greedy_match(row: np.ndarray, col: np.ndarray, by_row: np.ndarray, by_col: np.ndarray) -> np.ndarray:
    """
    The edges that a greedy matching accepts when it takes edges in priority order and
    keeps an edge if neither end is taken yet.

    Args:
        row, col: (E,) end ids of all edges.
        by_row, by_col: the candidate edges grouped by row (resp. col), best first in
            each group.

    Returns:
        indices of the accepted edges. Each round accepts every edge that is the best
        left in both its row and its col; the best edge overall always is one, and an
        accepted edge never had a better neighbour left, as in the sequential loop.
    """
    taken = []
    row_used = np.zeros(int(row.max(initial=-1)) + 1, dtype=bool)
    col_used = np.zeros(int(col.max(initial=-1)) + 1, dtype=bool)
    is_row_head = np.zeros(len(row), dtype=bool)
    while by_row.size:
        r = row[by_row]
        row_heads = by_row[np.r_[True, r[1:] != r[:-1]]]
        c = col[by_col]
        col_heads = by_col[np.r_[True, c[1:] != c[:-1]]]
        is_row_head[row_heads] = True
        dominant = col_heads[is_row_head[col_heads]]
        is_row_head[row_heads] = False
        taken.append(dominant)
        row_used[row[dominant]] = True
        col_used[col[dominant]] = True
        by_row = by_row[~(row_used[r] | col_used[col[by_row]])]
        by_col = by_col[~(row_used[row[by_col]] | col_used[c])]
    return np.concatenate(taken) if taken else np.zeros(0, dtype=np.int64)
