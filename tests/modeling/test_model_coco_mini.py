import fpn_rpn  # noqa: F401  # before detectron2

import copy
import math
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper
from detectron2.data.datasets import load_coco_json
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from fpn_rpn import FPNRPN, add_fpn_rpn_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "fpn_rpn_R_50_FPN_1x.yaml"


@pytest.fixture(scope="module")
def cfg():
    cfg = get_cfg()
    add_fpn_rpn_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu",
        "MODEL.WEIGHTS", "",
        # FrozenBN from random init diverges: train every stage with GroupNorm instead
        "MODEL.RESNETS.NORM", "GN", "MODEL.FPN.NORM", "GN", "MODEL.BACKBONE.FREEZE_AT", 0,
        # small inputs keep the step fast on CPU
        "INPUT.MIN_SIZE_TRAIN", (256,), "INPUT.MAX_SIZE_TRAIN", 512,
        "INPUT.MIN_SIZE_TEST", 320, "INPUT.MAX_SIZE_TEST", 480,
    ])
    cfg.freeze()
    return cfg


@pytest.fixture(scope="module")
def val_dict(coco_mini):
    dicts = load_coco_json(str(coco_mini / "annotations" / "instances_val2017.json"), str(coco_mini / "val2017"))
    return next(d for d in dicts if any(a["iscrowd"] == 0 for a in d["annotations"]))


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    assert type(model.proposal_generator) is FPNRPN
    return model


def test_one_training_step(cfg, model, val_dict):
    # one image: backward through R-50 costs seconds per image on CPU
    batch = [DatasetMapper(cfg, is_train=True)(copy.deepcopy(val_dict))]
    assert len(batch[0]["instances"]) > 0 and min(batch[0]["image"].shape[1:]) == 256
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with EventStorage():
        losses = model(batch)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}
    assert all(math.isfinite(v.item()) and v.item() > 0 for v in losses.values())
    # untrained objectness is about ln 2 per sampled anchor, and at most 256 of them per image
    assert losses["loss_rpn_cls"].item() <= math.log(2) * 1.05
    optimizer.zero_grad()
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    optimizer.step()
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert any(n.startswith("backbone.bottom_up.stem") for n in changed)  # FREEZE_AT 0 trains the stem
    assert any(n.startswith("proposal_generator.rpn_head") for n in changed)


def test_inference_on_a_real_image(cfg, model, val_dict):
    inputs = DatasetMapper(cfg, is_train=False)(copy.deepcopy(val_dict))
    height, width = inputs["height"], inputs["width"]
    assert min(inputs["image"].shape[1:]) == 320 and (height, width) != tuple(inputs["image"].shape[1:])
    model.eval()
    with torch.no_grad():
        (output,) = model([inputs])
    proposals = output["proposals"]
    assert proposals.image_size == (height, width)  # rescaled to the original image
    boxes, scores = proposals.proposal_boxes.tensor, proposals.objectness_logits
    assert 0 < len(proposals) <= cfg.MODEL.RPN.POST_NMS_TOPK_TEST
    assert bool(torch.isfinite(boxes).all()) and bool(torch.isfinite(scores).all())
    assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= width
    assert boxes[:, 1::2].min() >= 0 and boxes[:, 1::2].max() <= height
    assert bool((boxes[:, 2] > boxes[:, 0]).all()) and bool((boxes[:, 3] > boxes[:, 1]).all())
    assert bool((scores[:-1] >= scores[1:]).all())  # sorted by score
