import contextlib
import io
import json
import math
import pickle
import uuid

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fpn_rpn  # noqa: F401  (before detectron2)
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.build import load_proposals_into_dataset
from detectron2.data.detection_utils import transform_proposals
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.structures import Boxes, BoxMode, Instances
from pycocotools.coco import COCO

from fpn_rpn import add_fpn_rpn_config
from fpn_rpn.engine.launch import destroy_process_group
from fpn_rpn.evaluation.proposal_recall import evaluate_recall, gt_from_coco
from fpn_rpn.evaluation.recall_evaluator import ProposalRecallEvaluator
from conftest import coco_dict

# The hand-checked case of test_proposal_recall.py: image 1 has gts A = x[0,10],
# B = x[4,14] (y 0..10) and a crowd box; image 2 has a medium gt C and no proposals.
# Proposals of image 1: p1 = x[3,13] (.9), p2 = x[4,14] (.8), p3 = x[0,10] (.7).
GTS = [  # image_id, XYXY, area, iscrowd
    (1, [0, 0, 10, 10], 100, 0),
    (1, [4, 0, 14, 10], 100, 0),
    (1, [3, 0, 13, 10], 100, 1),
    (2, [0, 0, 80, 80], 6400, 0),
]
PROPOSALS = {
    1: (
        np.array([[0, 0, 10, 10], [3, 0, 13, 10], [4, 0, 14, 10]], np.float32),
        np.array([0.7, 0.9, 0.8], np.float32),
    ),
    2: (np.zeros((0, 4), np.float32), np.zeros(0, np.float32)),
}
# derived in test_proposal_recall.test_greedy_matching_and_empty_image
EXPECTED = {
    "recall_d2": {"AR@1": 0.35, "AR@2": 0.55, "AR@3": 1.0, "AR_m@3": float("nan")},
    "recall_coco": {"AR@1": 7 / 30, "AR@2": 1 / 3, "AR@3": 2 / 3, "AR_m@3": 0.0},
}


def _coco_json(path):
    dataset = coco_dict((1, 2), [(img, box, area, crowd, 1) for img, box, area, crowd in GTS])
    path.write_text(json.dumps(dataset))
    return str(path)


def _dataset_dicts():
    return [
        {
            "image_id": img_id,
            "file_name": f"{img_id}.jpg",
            "height": 100,
            "width": 100,
            "annotations": [
                {"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": crowd}
                for img, box, _, crowd in GTS
                if img == img_id
            ],
        }
        for img_id in (1, 2)
    ]


@pytest.fixture
def dataset_name():
    name = "test_recall_" + uuid.uuid4().hex[:8]
    yield name
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def _outputs(boxes, logits):
    instances = Instances((100, 100))
    instances.proposal_boxes = Boxes(torch.as_tensor(boxes))
    instances.objectness_logits = torch.as_tensor(logits)
    return {"proposals": instances}


def _run(evaluator, proposals):
    evaluator.reset()
    for img_id, (boxes, logits) in proposals.items():
        evaluator.process([{"image_id": img_id}], [_outputs(boxes, logits)])
    return evaluator.evaluate()


def _assert_results(results, expected):
    for group, values in expected.items():
        actual = {name: results[group][name] for name in values}
        torch.testing.assert_close(actual, values, atol=1e-12, rtol=0, equal_nan=True)


@pytest.mark.parametrize("distributed", [False, True])  # True: gather on one process
def test_evaluate_from_json_file(dataset_name, tmp_path, distributed):
    MetadataCatalog.get(dataset_name).set(json_file=_coco_json(tmp_path / "gt.json"))
    evaluator = ProposalRecallEvaluator(dataset_name, budgets=[3, 1, 2], distributed=distributed)
    results = _run(evaluator, PROPOSALS)
    _assert_results(results, EXPECTED)
    assert len(flatten_results_dict(results)) == 2 * 4 * 3 + 3
    # image 1: p1 = x[3,13] and p2 = x[4,14] overlap at IoU 9/11 = 0.82 > 0.7 (the others
    # at 7/13 and 6/14); image 2 has no proposals
    assert results["duplicates"] == {"pairs/img": 0.5, "max/img": 1.0, "images": 1.0}
    assert flatten_results_dict(results)["recall_d2/AR@2"] == pytest.approx(0.55, abs=1e-12)


@pytest.mark.parametrize("use_output_dir", [False, True])
def test_evaluate_dataset_without_json_file(dataset_name, tmp_path, use_output_dir):
    DatasetCatalog.register(dataset_name, _dataset_dicts)
    MetadataCatalog.get(dataset_name).set(thing_classes=["one"])
    output_dir = str(tmp_path) if use_output_dir else None
    evaluator = ProposalRecallEvaluator(dataset_name, budgets=[1, 2, 3], output_dir=output_dir)
    # Detectron2's conversion computes each area from the box: 100 and 6400, as in GTS
    _assert_results(_run(evaluator, PROPOSALS), EXPECTED)
    assert (tmp_path / f"{dataset_name}_coco_format.json").is_file() == use_output_dir


def test_from_config(dataset_name, tmp_path):
    MetadataCatalog.get(dataset_name).set(json_file=_coco_json(tmp_path / "gt.json"))
    cfg = add_fpn_rpn_config(get_cfg())
    cfg.TEST.RECALL_BUDGETS = [2]
    results = _run(ProposalRecallEvaluator(cfg, dataset_name), PROPOSALS)
    assert sorted(results["recall_d2"]) == ["AR@2", "AR_l@2", "AR_m@2", "AR_s@2"]
    _assert_results(results, {"recall_d2": {"AR@2": 0.55}, "recall_coco": {"AR@2": 1 / 3}})


def test_same_as_evaluate_recall_on_coco_mini(coco_mini, dataset_name):
    # More proposals than the largest budget, unsorted: process() sorts and cuts them.
    json_file = coco_mini / "annotations" / "instances_val2017.json"
    if not json_file.is_file():
        pytest.skip(f"{json_file} not found")
    MetadataCatalog.get(dataset_name).set(json_file=str(json_file))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(json_file))
    rng = np.random.default_rng(0)
    proposals = {}
    for img_id in sorted(coco.getImgIds())[:40]:
        gt = np.array([a["bbox"] for a in coco.imgToAnns[img_id]]).reshape(-1, 4)
        xywh = np.repeat(gt, 10, axis=0)
        xywh[:, :2] += rng.normal(0, 0.1, (len(xywh), 2)) * xywh[:, 2:]
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
        proposals[img_id] = (boxes, rng.permutation(len(boxes)).astype(np.float32))  # no ties
    budgets = [5, 20, 50]
    results = _run(ProposalRecallEvaluator(dataset_name, budgets=budgets), proposals)
    expected = evaluate_recall(
        gt_from_coco(coco, proposals),
        {i: {"boxes": b, "scores": s} for i, (b, s) in proposals.items()},
        budgets,
    )
    assert max(len(s) for _, s in proposals.values()) > budgets[-1]
    _assert_results(results, expected)


def test_outputs_without_proposals_are_an_error(dataset_name):
    evaluator = ProposalRecallEvaluator(dataset_name)
    instances = Instances((100, 100))
    with pytest.raises(ValueError, match="'proposals'"):
        evaluator.process([{"image_id": 1}], [{"instances": instances}])


def test_bad_arguments(dataset_name):
    with pytest.raises(ValueError, match="output_dir"):
        ProposalRecallEvaluator(dataset_name, save_proposals=True)
    with pytest.raises(ValueError, match="positive"):
        ProposalRecallEvaluator(dataset_name, budgets=[])


def test_save_proposals_round_trip(dataset_name, tmp_path):
    MetadataCatalog.get(dataset_name).set(json_file=_coco_json(tmp_path / "gt.json"))
    evaluator = ProposalRecallEvaluator(
        dataset_name, budgets=[1], output_dir=str(tmp_path), save_proposals=True
    )
    results = _run(evaluator, PROPOSALS)
    # the metric uses the first proposal only; the file keeps all three
    _assert_results(results, {"recall_d2": {"AR@1": 0.35}})

    with open(tmp_path / "box_proposals.pkl", "rb") as f:
        saved = pickle.load(f)
    assert saved["ids"] == [1, 2] and saved["bbox_mode"] == BoxMode.XYXY_ABS.value
    assert saved["boxes"][0].dtype == np.float32 and saved["boxes"][0].shape == (3, 4)

    records = load_proposals_into_dataset(
        [{"image_id": 2}, {"image_id": 1}], str(tmp_path / "box_proposals.pkl")
    )
    for record in records:
        transform_proposals(record, (100, 100), T.TransformList([]), proposal_topk=1000)
    boxes, logits = PROPOSALS[1]
    order = np.argsort(-logits)
    proposals = records[1]["proposals"]
    torch.testing.assert_close(proposals.proposal_boxes.tensor, torch.from_numpy(boxes[order]))
    torch.testing.assert_close(proposals.objectness_logits, torch.from_numpy(logits[order]))
    assert len(records[0]["proposals"]) == 0


def _gather_worker(rank, init_file, json_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        MetadataCatalog.get("test_recall_gather").set(json_file=json_file)
        evaluator = ProposalRecallEvaluator("test_recall_gather", budgets=[1, 2, 3])
        # rank 0 sees image 1, rank 1 sees image 2 (no proposals)
        results = _run(evaluator, {rank + 1: PROPOSALS[rank + 1]})
        with open(f"{out_dir}/{rank}.pkl", "wb") as f:
            pickle.dump(results, f)
    finally:
        destroy_process_group()  # gloo's threads joined before the interpreter exits


def test_gather_across_two_processes(tmp_path):
    json_file = _coco_json(tmp_path / "gt.json")
    mp.spawn(_gather_worker, args=(str(tmp_path / "init"), json_file, str(tmp_path)), nprocs=2)
    with open(tmp_path / "0.pkl", "rb") as f:
        main_results = pickle.load(f)
    with open(tmp_path / "1.pkl", "rb") as f:
        assert pickle.load(f) == {}
    _assert_results(main_results, EXPECTED)  # image 2's gt counts in "coco": it was gathered
    assert math.isnan(main_results["recall_d2"]["AR_m@3"])
