"""The values of fpn_rpn's arguments (and config keys) that take one of a fixed set: the
modules that use them and :mod:`fpn_rpn.config_checks` read them here, so that a check and
the code it guards cannot disagree, and the checks need not import the modules they check."""

__all__ = [
    "ADAPTIVE_CONV_IMPLS", "BOX_REG_LOSS_TYPES", "DECODED_BOX_LOSS_TYPES", "EFFICIENTNET_NORMS",
    "EFFICIENTNET_STAGES", "EFFICIENTNET_VARIANTS", "LOSS_NORMALIZERS", "NMS_MODES", "OBJECTNESS_MODES",
]

# FPNRPN (MODEL.FPN_RPN.NMS_MODE, *_LOSS_NORMALIZER; MODEL.RPN.BBOX_REG_LOSS_TYPE)
NMS_MODES = ("cross_level", "per_level")
LOSS_NORMALIZERS = ("batch_size", "num_sampled", "num_positive", "anchor_locations")
DECODED_BOX_LOSS_TYPES = ("iou", "giou")  # losses of decoded boxes: the only ones Cascade RPN takes
BOX_REG_LOSS_TYPES = ("smooth_l1", "l1") + DECODED_BOX_LOSS_TYPES
# FPNRPNHead (MODEL.FPN_RPN.OBJECTNESS)
OBJECTNESS_MODES = ("sigmoid", "softmax", "centerness")
# CascadeRPNHead (MODEL.FPN_RPN.CASCADE.ADAPTIVE_CONV_IMPL)
ADAPTIVE_CONV_IMPLS = ("grid_sample", "deform_conv2d")
# EfficientNetLite (MODEL.FPN_RPN.EFFICIENTNET.VARIANT, NORM, OUT_FEATURES)
EFFICIENTNET_VARIANTS = ("lite0", "lite1", "lite2")
EFFICIENTNET_NORMS = ("FrozenBN", "BN", "SyncBN")
EFFICIENTNET_STAGES = ("stage2", "stage3", "stage4", "stage5")  # strides 4, 8, 16, 32
