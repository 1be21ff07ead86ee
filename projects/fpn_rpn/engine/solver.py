"""Optimizers for LazyConfig files that need what the YAML configs get from Detectron2's
``SOLVER.CLIP_GRADIENTS`` (LazyConfig's ``common/optim.py`` has no such option)."""
import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping

__all__ = ["clipped_sgd"]


def clipped_sgd(params, *, clip_type: str = "norm", clip_value: float = 35.0, norm_type: float = 2.0, **sgd_kwargs):
    """
    ``torch.optim.SGD(params, **sgd_kwargs)`` whose ``step`` first clips the gradients as
    Detectron2's ``SOLVER.CLIP_GRADIENTS`` with ``ENABLED True`` and these ``CLIP_TYPE``,
    ``CLIP_VALUE`` and ``NORM_TYPE`` does (each parameter's gradient on its own), so that a
    LazyConfig trains as its YAML twin. Set it as a LazyConfig optimizer's ``_target_``.
    """
    clip = CfgNode({"ENABLED": True, "CLIP_TYPE": clip_type, "CLIP_VALUE": clip_value, "NORM_TYPE": norm_type})
    optimizer_class = maybe_add_gradient_clipping(CfgNode({"SOLVER": CfgNode({"CLIP_GRADIENTS": clip})}),
                                                  torch.optim.SGD)
    return optimizer_class(params, **sgd_kwargs)
