"""fpn_rpn: FPN multi-level Region Proposal Network components for Detectron2.

Importing this package registers, in Detectron2's registries:

- ``FPNAnchorGenerator`` (ANCHOR_GENERATOR_REGISTRY)
- ``FPNRPNHead`` (RPN_HEAD_REGISTRY)
- ``FPNRPN`` (PROPOSAL_GENERATOR_REGISTRY)

Call :func:`add_fpn_rpn_config` on a config before merging a YAML that uses them.
"""
from .compat import apply as _apply_compat

_apply_compat()  # must run before anything imports detectron2

from .config import add_fpn_rpn_config  # noqa: E402
from .modeling.anchor_generator import FPNAnchorGenerator  # noqa: E402
from .modeling.rpn_head import FPNRPNHead  # noqa: E402
from .modeling.proposal_generator import FPNRPN  # noqa: E402
from .data.datasets import register_coco_json, register_datasets  # noqa: E402
from .data.synthetic_data import generate_synthetic_dataset  # noqa: E402
from .evaluation.recall_evaluator import ProposalRecallEvaluator  # noqa: E402

__all__ = [
    "add_fpn_rpn_config",
    "FPNAnchorGenerator",
    "FPNRPNHead",
    "FPNRPN",
    "register_coco_json",
    "register_datasets",
    "generate_synthetic_dataset",
    "ProposalRecallEvaluator",
]
