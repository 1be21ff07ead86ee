"""fpn_rpn: FPN multi-level Region Proposal Network components for Detectron2.

Importing this package registers, in Detectron2's registries:

- ``FPNAnchorGenerator`` (ANCHOR_GENERATOR_REGISTRY)
- ``FPNRPNHead``, ``CascadeRPNHead`` (RPN_HEAD_REGISTRY)
- ``FPNRPN``, ``CascadeRPN`` (PROPOSAL_GENERATOR_REGISTRY)
- ``build_efficientnet_lite_backbone``, ``build_efficientnet_lite_fpn_backbone`` (BACKBONE_REGISTRY)

Call :func:`add_fpn_rpn_config` on a config before merging a YAML that uses them.
"""
from .compat import apply as _apply_compat, quiet_torchscript_deprecation as _quiet_torchscript

_apply_compat()  # must run before anything imports detectron2

with _quiet_torchscript():  # these script functions when imported, which torch >= 2.10 warns about
    import fvcore.nn  # noqa: E402, F401
    import detectron2.modeling.box_regression  # noqa: E402, F401

from .config import add_fpn_rpn_config, setup_cfg  # noqa: E402
from .modeling.anchor_generator import FPNAnchorGenerator  # noqa: E402
from .modeling.rpn_head import FPNRPNHead  # noqa: E402
from .modeling.proposal_generator import FPNRPN  # noqa: E402
from .modeling.cascade_rpn_head import CascadeRPNHead  # noqa: E402
from .modeling.cascade_rpn import CascadeRPN  # noqa: E402
from .modeling.backbone.efficientnet_lite import EfficientNetLite  # noqa: E402  (also registers its builders)
from .data.datasets import register_coco_json, register_datasets  # noqa: E402
from .data.synthetic_data import generate_synthetic_dataset  # noqa: E402
from .evaluation.recall_evaluator import ProposalRecallEvaluator  # noqa: E402

__all__ = [
    "add_fpn_rpn_config",
    "setup_cfg",
    "FPNAnchorGenerator",
    "FPNRPNHead",
    "FPNRPN",
    "CascadeRPNHead",
    "CascadeRPN",
    "EfficientNetLite",
    "register_coco_json",
    "register_datasets",
    "generate_synthetic_dataset",
    "ProposalRecallEvaluator",
]
