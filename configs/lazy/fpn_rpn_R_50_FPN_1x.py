# LazyConfig equivalent of configs/fpn_rpn_R_50_FPN_1x.yaml (the model zoo's
# COCO-Detection/rpn_R_50_FPN_1x schedule with fpn_rpn's components); tested to build the
# same modules and give the same proposals. The model is configs/common/models/
# mask_rcnn_fpn.py's backbone and RPN with fpn_rpn's classes, in a ProposalNetwork.
# Data, optimizer, schedule and training options are Detectron2's own common configs,
# which a Detectron2 built from its official sources installs (v0.6's sdist does not).
import torch

from detectron2.config import LazyCall as L
from detectron2.modeling import ProposalNetwork
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher

from fpn_rpn import FPNRPN, FPNAnchorGenerator, FPNRPNHead, ProposalRecallEvaluator
from fpn_rpn.data.build import category_dataset_dicts
from fpn_rpn.lazy_config import get_common_config

dataloader = get_common_config("common/data/coco.py").dataloader
dataloader.train.mapper.use_instance_mask = False  # boxes only: MODEL.MASK_ON False
# DATASETS.TRAIN_CATEGORIES: categories="voc" trains on COCO's VOC categories only (the others'
# boxes become background), for novel-class recall (docs/novel_class_recall.md)
dataloader.train.dataset = L(category_dataset_dicts)(
    names=dataloader.train.dataset.names, filter_empty=True, categories="all"
)
dataloader.evaluator = L(ProposalRecallEvaluator)(dataset_name="${..test.dataset.names}")
# [[name, json_file, image_root], ...] registered by tools/lazyconfig_train_net.py, as DATASETS.REGISTER_COCO
datasets = dict(register_coco=[])
optimizer = get_common_config("common/optim.py").SGD
lr_multiplier = get_common_config("common/coco_schedule.py").lr_multiplier_1x
train = get_common_config("common/train.py").train
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.device = "cuda" if torch.cuda.is_available() else "cpu"  # as MODEL.DEVICE's CPU fallback

model = L(ProposalNetwork)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
            stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=True, norm="FrozenBN"),
            out_features=["res2", "res3", "res4", "res5"],
            freeze_at=2,  # stem and res2, MODEL.BACKBONE.FREEZE_AT's default
        ),
        in_features="${.bottom_up.out_features}",
        out_channels=256,
        top_block=L(LastLevelMaxPool)(),
    ),
    proposal_generator=L(FPNRPN)(
        in_features=["p2", "p3", "p4", "p5", "p6"],
        head=L(FPNRPNHead)(in_channels=256, num_anchors=3),
        anchor_generator=L(FPNAnchorGenerator)(
            sizes=[[32], [64], [128], [256], [512]],  # One size for each feature map, P2-P6
            aspect_ratios=[[0.5, 1.0, 2.0]],  # height / width, as Detectron2's default
            strides=[4, 8, 16, 32, 64],
            offset=0.0,
        ),
        anchor_matcher=L(Matcher)(thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_topk=(2000, 1000),  # (training, test), per FPN level
        post_nms_topk=(1000, 2000),  # (training, test), per image
        nms_thresh=0.7,
        nms_mode="per_level",  # MODEL.FPN_RPN.NMS_MODE's default
    ),
    pixel_mean=[103.530, 116.280, 123.675],  # BGR, Detectron2's MODEL.PIXEL_MEAN
    pixel_std=[1.0, 1.0, 1.0],
)
