"""Mixed precision (SOLVER.AMP.ENABLED, autocast): a training step of FPNRPN and CascadeRPN under
CPU autocast in bfloat16 gives finite losses and gradients, and proposals close to float32's."""
import fpn_rpn  # noqa: F401  # before detectron2

from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from fpn_rpn import setup_cfg

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = [
    "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.BACKBONE.FREEZE_AT", 0,
    "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.RESNETS.NORM", "GN",
    "MODEL.FPN.NORM", "GN", "MODEL.FPN.OUT_CHANNELS", 32,
    "MODEL.RPN.POST_NMS_TOPK_TEST", 100,
]


def _batch():
    g = torch.Generator().manual_seed(0)
    batch = []
    for hw, boxes in (((128, 160), [[10, 20, 70, 90], [80, 30, 150, 120]]), ((160, 128), [[5, 5, 60, 140]])):
        inst = Instances(hw)
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.gt_classes = torch.zeros(len(boxes), dtype=torch.int64)
        batch.append({"image": torch.rand(3, *hw, generator=g) * 255, "instances": inst})
    return batch


def _training_step(model, batch, autocast):
    model.train()
    model.zero_grad()
    with EventStorage(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = model(batch)
    sum(losses.values()).backward()
    return losses


@pytest.mark.parametrize("config", ["fpn_rpn_R_50_FPN_1x.yaml", "cascade_rpn_R_50_FPN_1x.yaml"])
def test_bfloat16_autocast_training_step_and_proposals(config):
    cfg = setup_cfg(str(CONFIGS / config), SMALL)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = _batch()
    fp32 = _training_step(model, batch, autocast=False)
    fp32_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    bf16 = _training_step(model, batch, autocast=True)
    assert set(bf16) == set(fp32)
    for name, loss in bf16.items():
        assert loss.dtype == torch.float32 and torch.isfinite(loss), name
        # bfloat16 keeps 8 significant bits: losses agree to a few percent
        torch.testing.assert_close(loss, fp32[name], rtol=0.05, atol=1e-3, msg=name)
    head_grads = {n: p.grad for n, p in model.named_parameters() if "proposal_generator" in n and p.grad is not None}
    assert head_grads and head_grads.keys() <= fp32_grads.keys()
    assert all(bool(torch.isfinite(g).all()) for g in head_grads.values())

    # inference: each of float32's proposals has a bfloat16 one on top of it
    model.eval()
    image = [{"image": batch[0]["image"]}]
    with torch.no_grad():
        ref = model(image)[0]["proposals"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = model(image)[0]["proposals"]
    assert amp.proposal_boxes.tensor.dtype == torch.float32 and len(amp) > 0
    assert bool(torch.isfinite(amp.proposal_boxes.tensor).all())
    best_iou = pairwise_iou(ref.proposal_boxes[:50], amp.proposal_boxes).max(dim=1).values
    assert best_iou.median() > 0.9, best_iou
