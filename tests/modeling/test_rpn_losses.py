"""FPNRPN's losses (computed on the sampled positives only) and their gradients equal
Detectron2's RPN's, on the same labels."""
import fpn_rpn  # noqa: F401  # before detectron2

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from fpn_rpn import FPNAnchorGenerator, add_fpn_rpn_config


def _random_case(seed, num_images=4):
    """FPN anchors on 3 small levels and gts of all kinds: small, large, off-image, degenerate, none."""
    g = torch.Generator().manual_seed(seed)
    gen = FPNAnchorGenerator(sizes=[[16, 24], [32, 48], [64, 96]], aspect_ratios=[[0.5, 1.0, 2.0]], strides=[4, 8, 16])
    anchors = Boxes.cat(gen([torch.zeros(1, 1, 24, 20), torch.zeros(1, 1, 12, 10), torch.zeros(1, 1, 6, 5)]))
    gt_boxes = []
    for i in range(num_images):
        m = [0, 1, 7, 25][i % 4]
        xy = torch.rand(m, 2, generator=g) * 100 - 10
        wh = torch.rand(m, 2, generator=g) ** 2 * 90 + 0.5
        boxes = torch.cat((xy, xy + wh), dim=1)
        if m == 7:
            boxes[1] = torch.tensor([500.0, 500, 520, 530])  # overlaps no anchor
        if m > 5:
            boxes[0] = torch.tensor([30.0, 30, 20, 40])  # x2 < x1
            boxes[2] = boxes[3]  # duplicate gt: ties between gts
        gt_boxes.append(boxes)
    return anchors.tensor, gt_boxes


C = 8
SHAPES = {f: ShapeSpec(channels=C, stride=2 ** (i + 2)) for i, f in enumerate(["p2", "p3", "p4"])}


def _rpn(**rpn_keys):
    cfg = get_cfg()
    add_fpn_rpn_config(cfg)
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "FPNRPN"
    cfg.MODEL.ANCHOR_GENERATOR.NAME = "FPNAnchorGenerator"
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16, 24], [32, 48], [64, 96]]
    cfg.MODEL.RPN.HEAD_NAME = "FPNRPNHead"
    cfg.MODEL.RPN.IN_FEATURES = list(SHAPES)
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 64  # fewer than the positives of some images
    for key, value in rpn_keys.items():
        setattr(cfg.MODEL.RPN, key, value)
    return build_proposal_generator(cfg, SHAPES)


def _gt_instances(gt_boxes, image_size=(90, 80)):
    result = []
    for boxes in gt_boxes:
        inst = Instances(image_size)
        inst.gt_boxes = Boxes(boxes)
        result.append(inst)
    return result


@pytest.mark.parametrize("loss_type, beta", [("smooth_l1", 0.0), ("smooth_l1", 0.2), ("giou", 0.0)])
def test_losses_and_their_gradients_equal_detectron2(loss_type, beta, device):
    rpn = _rpn(BBOX_REG_LOSS_TYPE=loss_type, SMOOTH_L1_BETA=beta).to(device)
    anchors, gt_boxes = _random_case(5)
    gt_boxes = [b[(b[:, 2:] > b[:, :2]).all(dim=1)].to(device) for b in gt_boxes]  # a box target needs a valid gt
    level_sizes = [24 * 20 * 6, 12 * 10 * 6, 6 * 5 * 6]
    anchors = list(Boxes(anchors.split(level_sizes)[i].to(device)) for i in range(3))
    torch.manual_seed(0)
    labels, matched = rpn.label_and_sample_anchors(anchors, _gt_instances(gt_boxes))
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(4, n, generator=g).to(device) for n in level_sizes]
    deltas = [(torch.randn(4, n, 4, generator=g) * 0.3).to(device) for n in level_sizes]
    results = []
    for losses_fn in (rpn.losses, lambda *args: RPN.losses(rpn, *args)):
        inputs = [x.clone().requires_grad_() for x in logits + deltas]
        with EventStorage():
            losses = losses_fn(anchors, inputs[:3], labels, inputs[3:], matched)
        sum(losses.values()).backward()
        results.append((losses, [x.grad for x in inputs]))
    (ours, our_grads), (d2, d2_grads) = results
    assert ours["loss_rpn_loc"] > 0 and ours["loss_rpn_loc"].device.type == device.type
    for key in d2:
        torch.testing.assert_close(ours[key], d2[key], rtol=0, atol=0)
    for ours_grad, d2_grad in zip(our_grads, d2_grads):
        torch.testing.assert_close(ours_grad, d2_grad, rtol=0, atol=0)
