# LazyConfig equivalent of configs/cascade_rpn_R_50_FPN_1x.yaml: fpn_rpn_R_50_FPN_1x.py with
# Cascade RPN as the proposal generator, with MMDetection's published settings
# (configs/cascade_rpn/crpn_r50_caffe_fpn_1x_coco.py; each named in Base-CascadeRPN.yaml).
# Tested to build the same modules and give the same proposals as the YAML config.
from detectron2.config import LazyCall as L
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher

from fpn_rpn import CascadeRPN, CascadeRPNHead, FPNAnchorGenerator
from fpn_rpn.engine.solver import clipped_sgd

from .fpn_rpn_R_50_FPN_1x import dataloader, datasets, lr_multiplier, model, optimizer, train  # noqa: F401

model.proposal_generator = L(CascadeRPN)(
    in_features=["p2", "p3", "p4", "p5", "p6"],
    head=L(CascadeRPNHead)(
        in_channels=256,
        strides=[4, 8, 16, 32, 64],
        anchor_offset=0.0,
        dilation=3,  # stage 1: adapt_cfg=dict(type="dilation", dilation=3)
        adaptive_conv_impl="grid_sample",  # stage 2: adapt_cfg=dict(type="offset")
    ),
    # one square anchor per location, 8 x stride: scales=[8], ratios=[1.0]
    anchor_generator=L(FPNAnchorGenerator)(
        sizes=[[32], [64], [128], [256], [512]], aspect_ratios=[[1.0]], strides=[4, 8, 16, 32, 64], offset=0.0
    ),
    # stage 2: MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.7, min_pos_iou=0.3)
    anchor_matcher=L(Matcher)(thresholds=[0.7], labels=[0, 1], allow_low_quality_matches=True),
    min_pos_iou=0.3,
    # target_stds (0.05, 0.05, 0.1, 0.1) and, for stage 1, (0.1, 0.1, 0.5, 0.5), inverted
    box2box_transform=L(Box2BoxTransform)(weights=[20.0, 20.0, 10.0, 10.0]),
    stage1_box2box_transform=L(Box2BoxTransform)(weights=[10.0, 10.0, 2.0, 2.0]),
    # RegionAssigner(center_ratio=0.2, ignore_ratio=0.5)
    center_ratio=0.2,
    ignore_ratio=0.5,
    batch_size_per_image=256,  # RandomSampler(num=256, pos_fraction=0.5)
    positive_fraction=0.5,
    pre_nms_topk=(2000, 2000),  # (training, test), per FPN level: nms_pre=2000
    post_nms_topk=(1000, 2000),  # (training, test), per image: max_per_img=2000
    nms_thresh=0.8,
    nms_mode="per_level",
    # IoULoss(linear=True, loss_weight=10.0) for both stages; CrossEntropyLoss(use_sigmoid, 1.0)
    box_reg_loss_type="iou",
    loss_weight={"loss_rpn_cls": 1.0, "loss_rpn_loc": 10.0},
    stage1_loss_weight=10.0,
    cls_loss_normalizer="num_sampled",
    loc_loss_normalizer="num_sampled",
)

# optimizer_config = dict(grad_clip=dict(max_norm=35, norm_type=2)), as SOLVER.CLIP_GRADIENTS
optimizer._target_ = clipped_sgd
optimizer.clip_type = "norm"
optimizer.clip_value = 35.0
optimizer.norm_type = 2.0
