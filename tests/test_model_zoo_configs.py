"""fpn_rpn's components dropped into Detectron2's own model-zoo configs with the README's
YAML lines: they build, train a step and infer, in a GeneralizedRCNN and a ProposalNetwork.
The model-zoo configs ship with Detectron2 built from its official sources (not v0.6's sdist)."""
import fpn_rpn  # noqa: F401  # before detectron2

import os
import re

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from fpn_rpn import FPNRPN, FPNAnchorGenerator, FPNRPNHead, add_fpn_rpn_config

from conftest import REPO

MODEL_ZOO = os.path.join(os.path.dirname(model_zoo.__file__), "configs")
pytestmark = pytest.mark.skipif(
    not os.path.isdir(os.path.join(MODEL_ZOO, "COCO-Detection")),
    reason=f"this Detectron2 ships no model-zoo configs ({MODEL_ZOO}): the v0.6 sdist installs none",
)
# model-zoo config: (meta-architecture, the losses of a training step)
CASES = {
    "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml":
        ("GeneralizedRCNN", {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}),
    "COCO-Detection/rpn_R_50_FPN_1x.yaml": ("ProposalNetwork", {"loss_rpn_cls", "loss_rpn_loc"}),
}


@pytest.fixture(scope="module")
def readme_yaml(tmp_path_factory):
    """The README's YAML lines that put fpn_rpn's components into any FPN config, as a file."""
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = [b for b in blocks if "FPNRPN" in b and "PROPOSAL_GENERATOR" in b]
    assert lines, "README.md has no YAML block that sets PROPOSAL_GENERATOR to FPNRPN"
    path = tmp_path_factory.mktemp("readme") / "fpn_rpn_lines.yaml"
    path.write_text(lines[0])
    return str(path)


def _cfg(name, readme_yaml):
    cfg = get_cfg()
    add_fpn_rpn_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(name))
    cfg.merge_from_file(readme_yaml)
    cfg.MODEL.WEIGHTS = ""  # no download; from random initialisation GroupNorm keeps features O(1)
    cfg.MODEL.RESNETS.NORM = cfg.MODEL.FPN.NORM = "GN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # detections even from an untrained box head
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _inputs():
    torch.manual_seed(0)
    inputs = []
    for boxes in ([[8.0, 10.0, 60.0, 70.0]], [[30.0, 5.0, 120.0, 50.0], [2.0, 40.0, 40.0, 90.0]]):
        instances = Instances((96, 128))
        instances.gt_boxes = Boxes(torch.tensor(boxes))
        instances.gt_classes = torch.arange(len(boxes))
        image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)
        inputs.append({"image": image, "height": 96, "width": 128, "instances": instances})
    return inputs


@pytest.mark.parametrize("name", sorted(CASES))
def test_components_in_a_model_zoo_config_train_and_infer(name, readme_yaml):
    meta_arch, loss_names = CASES[name]
    torch.manual_seed(0)
    model = build_model(_cfg(name, readme_yaml))
    assert type(model).__name__ == meta_arch
    rpn = model.proposal_generator
    assert type(rpn) is FPNRPN and type(rpn.rpn_head) is FPNRPNHead
    assert type(rpn.anchor_generator) is FPNAnchorGenerator

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    head_before = rpn.rpn_head.conv.weight.detach().clone()
    with EventStorage():
        losses = model(_inputs())
    assert set(losses) == loss_names
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    optimizer.step()
    assert not torch.equal(rpn.rpn_head.conv.weight, head_before)  # the step reached our head

    model.eval()
    with torch.no_grad():
        outputs = model(_inputs())
    key = "instances" if meta_arch == "GeneralizedRCNN" else "proposals"
    assert [len(out[key]) > 0 for out in outputs] == [True, True]
    if meta_arch == "GeneralizedRCNN":
        assert outputs[0]["instances"].has("pred_boxes") and outputs[0]["instances"].has("scores")
