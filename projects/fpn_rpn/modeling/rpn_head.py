from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY, StandardRPNHead

from ..errors import require
from ..choices import OBJECTNESS_MODES

__all__ = ["FPNRPNHead"]

# The sparse backward is used while at most this fraction of the locations get a gradient.
_SPARSE_MAX_FRACTION = 1 / 8
# (dy, dx) of the 3x3 taps, in the order of a conv weight's last two dims
_TAPS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def _head_forward(x, conv_weight, conv_bias, obj_weight, obj_bias, delta_weight, delta_bias):
    """StandardRPNHead's ops; the ReLU in place, as its input is not needed afterwards."""
    t = F.conv2d(x, conv_weight, conv_bias, 1, 1).relu_()
    return t, F.conv2d(t, obj_weight, obj_bias), F.conv2d(t, delta_weight, delta_bias)


def _conv_backward(grad_out, x, weight, padding, output_mask):
    """(grad_x, grad_weight, grad_bias) of a stride-1 conv2d, as autograd computes them."""
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight, [weight.shape[0]], [1, 1], [padding, padding], [1, 1], False, [0, 0], 1,
        output_mask,
    )


class _RPNHeadFunction(torch.autograd.Function):
    """
    conv3x3 -> ReLU -> two sibling 1x1 convs, computed with the same ops as
    StandardRPNHead (so the outputs are the same), with a backward that exploits
    sparse gradients.

    RPN losses reach only the sampled anchors (256 per image), so the gradient of the
    head outputs is zero at all but a few hundred of the ~100k locations of an image.
    The 3x3 conv's weight gradient is then a sum over those locations only, and its
    input gradient is non-zero only in their 3x3 neighbourhoods: both are computed from
    the gathered locations, instead of two full-size convolutions.
    """

    @staticmethod
    def forward(ctx, x, conv_weight, conv_bias, obj_weight, obj_bias, delta_weight, delta_bias):
        t, scores, deltas = _head_forward(x, conv_weight, conv_bias, obj_weight, obj_bias, delta_weight,
                                          delta_bias)
        ctx.save_for_backward(x, t, conv_weight, obj_weight, delta_weight)
        ctx.set_materialize_grads(False)  # an unused output gets None: its convolution no gradient
        return scores, deltas

    @staticmethod
    def backward(ctx, grad_obj, grad_delta):
        x, t, conv_weight, obj_weight, delta_weight = ctx.saved_tensors
        num_obj = obj_weight.shape[0]
        used = (grad_obj is not None, grad_delta is not None)
        if grad_obj is None:
            grad_obj = t.new_zeros((t.shape[0], num_obj) + t.shape[2:])
        if grad_delta is None:
            grad_delta = t.new_zeros((t.shape[0], delta_weight.shape[0]) + t.shape[2:])
        grads = _RPNHeadFunction._gradients(ctx, x, t, conv_weight, obj_weight, delta_weight, grad_obj, grad_delta)
        # as autograd: no gradient for the convolution of an output that did not reach the loss
        return grads[:3] + (grads[3:5] if used[0] else (None, None)) + (grads[5:] if used[1] else (None, None))

    @staticmethod
    def _gradients(ctx, x, t, conv_weight, obj_weight, delta_weight, grad_obj, grad_delta):
        num_obj = obj_weight.shape[0]
        grad_out = torch.cat((grad_obj, grad_delta), dim=1)  # (N, A + A*4, H, W)
        n, h, w = grad_out.ne(0).any(dim=1).nonzero(as_tuple=True)
        if len(n) > _SPARSE_MAX_FRACTION * grad_out[:, 0].numel():
            return _RPNHeadFunction._dense_backward(ctx, x, t, conv_weight, obj_weight, delta_weight,
                                                    grad_obj, grad_delta)

        head_weight = torch.cat((obj_weight, delta_weight)).flatten(1)  # (A + A*4, C)
        grad_out_p = grad_out.permute(0, 2, 3, 1)[n, h, w]  # (P, A + A*4) at the P locations
        t_p = t.permute(0, 2, 3, 1)[n, h, w]  # (P, C)
        grad_head_weight = (grad_out_p.t() @ t_p)[:, :, None, None]
        grad_head_bias = grad_out_p.sum(dim=0)
        grad_t_p = (grad_out_p @ head_weight).mul_(t_p > 0)  # through the ReLU

        height, width = x.shape[2:]
        x_hwc = x.permute(0, 2, 3, 1)
        taps = []  # per tap: the input rows (P, C) and which of them lie inside the map
        for dy, dx in _TAPS:
            y, xx = h + dy, w + dx
            inside = (y >= 0) & (y < height) & (xx >= 0) & (xx < width)
            taps.append((y.clamp(0, height - 1), xx.clamp(0, width - 1), inside))
        patches = torch.stack([x_hwc[n, y, xx] * inside[:, None] for y, xx, inside in taps], dim=2)
        grad_conv_weight = (grad_t_p.t() @ patches.flatten(1)).view_as(conv_weight)
        grad_conv_bias = grad_t_p.sum(dim=0)

        grad_x = None
        if ctx.needs_input_grad[0]:
            # (P, C_in, 9): what each location sends to each input position of its 3x3 window
            contributions = (grad_t_p @ conv_weight.flatten(1)).view(len(n), x.shape[1], len(_TAPS))
            grad_x = torch.zeros_like(x, memory_format=torch.contiguous_format)
            grad_x_hwc = grad_x.permute(0, 2, 3, 1)
            for k, (y, xx, inside) in enumerate(taps):
                grad_x_hwc.index_put_((n[inside], y[inside], xx[inside]), contributions[inside, :, k],
                                      accumulate=True)
        return (grad_x, grad_conv_weight, grad_conv_bias, grad_head_weight[:num_obj], grad_head_bias[:num_obj],
                grad_head_weight[num_obj:], grad_head_bias[num_obj:])

    @staticmethod
    def _dense_backward(ctx, x, t, conv_weight, obj_weight, delta_weight, grad_obj, grad_delta):
        """Autograd's own backward, for gradients that are not sparse."""
        grad_t, grad_obj_weight, grad_obj_bias = _conv_backward(grad_obj, t, obj_weight, 0, [True, True, True])
        grad_t_delta, grad_delta_weight, grad_delta_bias = _conv_backward(
            grad_delta, t, delta_weight, 0, [True, True, True]
        )
        grad_t = torch.ops.aten.threshold_backward(grad_t + grad_t_delta, t, 0)
        grad_x, grad_conv_weight, grad_conv_bias = _conv_backward(
            grad_t, x, conv_weight, 1, [ctx.needs_input_grad[0], True, True]
        )
        return (grad_x, grad_conv_weight, grad_conv_bias, grad_obj_weight, grad_obj_bias, grad_delta_weight,
                grad_delta_bias)


@RPN_HEAD_REGISTRY.register()
class FPNRPNHead(StandardRPNHead):
    """
    RPN head shared across FPN levels: 3x3 conv(s) + ReLU, then sibling 1x1 convs for
    objectness and box deltas. Parameter names are StandardRPNHead's (``conv``,
    ``objectness_logits``, ``anchor_deltas``), so a Detectron2 RPN checkpoint loads
    unchanged in "sigmoid" mode.

    In "softmax" mode the objectness conv predicts two scores per anchor, channels
    ``[background x A, object x A]`` as in the original Faster R-CNN. The head then
    returns their difference ``object - background``: a logit whose sigmoid is the
    softmax object probability, and whose binary cross-entropy equals the two-class
    softmax cross-entropy. The proposal generator thus treats both modes alike.

    With one 3x3 conv (the default ``MODEL.RPN.CONV_DIMS``) on CPU, training uses a
    backward that computes the gradients only where the losses reach (the sampled
    anchors) instead of over whole feature maps; outputs are unchanged and gradients
    equal up to float rounding. See :class:`_RPNHeadFunction`. ``sparse_backward=False``
    (``MODEL.FPN_RPN.SPARSE_HEAD_BACKWARD: False``) keeps autograd's dense backward, for
    training runs that reproduce Detectron2's bit for bit.
    """

    @configurable
    def __init__(self, *, in_channels: int, num_anchors: int, box_dim: int = 4,
                 conv_dims: List[int] = (-1,), objectness: str = "sigmoid",
                 sparse_backward: bool = True):
        """
        Args:
            objectness (str): "sigmoid" (one logit per anchor), "softmax" (two scores
                per anchor) or "centerness" (one logit per anchor, whose sigmoid the proposal
                generator trains to predict localization quality: :mod:`.localization_quality`).
            sparse_backward (bool): on CPU, compute the head's gradients only at the
                locations the losses reach. Others: see :class:`StandardRPNHead`.
        """
        # named as arguments; check_rpn_config names the config keys
        require(objectness in OBJECTNESS_MODES, "objectness", objectness, f"must be one of {OBJECTNESS_MODES}")
        require(len(conv_dims) > 0, "conv_dims", list(conv_dims), "give at least one conv width (-1 = input width)")
        super().__init__(in_channels=in_channels, num_anchors=num_anchors, box_dim=box_dim,
                         conv_dims=conv_dims)
        self.objectness = objectness
        self.sparse_backward = sparse_backward
        if objectness == "softmax":
            hidden = self.objectness_logits.in_channels
            self.objectness_logits = nn.Conv2d(hidden, 2 * num_anchors, kernel_size=1)
            nn.init.normal_(self.objectness_logits.weight, std=0.01)
            nn.init.constant_(self.objectness_logits.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["objectness"] = cfg.MODEL.FPN_RPN.OBJECTNESS
        ret["sparse_backward"] = cfg.MODEL.FPN_RPN.SPARSE_HEAD_BACKWARD
        return ret

    @torch.jit.unused
    def _is_single_conv(self) -> bool:
        """True for one 3x3 conv + ReLU (the default), the case _RPNHeadFunction computes."""
        conv = self.conv
        return (
            type(conv) is Conv2d
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is not None
            and conv.norm is None and type(conv.activation) is nn.ReLU
        )

    def _raw_outputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Objectness scores (N, A or 2A, Hi, Wi) and deltas (N, A*box_dim, Hi, Wi) of one level."""
        if torch.jit.is_tracing() or torch.jit.is_scripting():
            # StandardRPNHead's modules, which an exported graph can hold; the custom
            # backward is a Python op that torch.jit.save cannot export
            t = self.conv(x)
            return self.objectness_logits(t), self.anchor_deltas(t)
        return self._eager_outputs(x)

    @torch.jit.unused
    def _eager_outputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """_raw_outputs outside export: the fused ops, and the sparse backward on CPU."""
        if not self._is_single_conv():
            t = self.conv(x)
            return self.objectness_logits(t), self.anchor_deltas(t)
        params = (self.conv.weight, self.conv.bias, self.objectness_logits.weight, self.objectness_logits.bias,
                  self.anchor_deltas.weight, self.anchor_deltas.bias)
        if not torch.is_grad_enabled():
            return _head_forward(x, *params)[1:]
        # Under autocast the convolutions' outputs are in half precision while the weights are
        # not, which the sparse backward's matmuls do not mix: autograd's backward then.
        if self.sparse_backward and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
            return _RPNHeadFunction.apply(x, *params)
        # On GPUs the dense backward is fast, and the sparse one would need a host-device sync.
        t = self.conv(x)
        return self.objectness_logits(t), self.anchor_deltas(t)

    def forward(self, features: List[torch.Tensor]):
        """
        Returns:
            list[Tensor]: L tensors (N, A, Hi, Wi), objectness logits.
            list[Tensor]: L tensors (N, A*box_dim, Hi, Wi), anchor deltas.
        """
        pred_objectness_logits, pred_anchor_deltas = [], []
        for x in features:
            scores, deltas = self._raw_outputs(x)
            if self.objectness == "softmax":
                # (N, 2A, Hi, Wi) -> background, object: each (N, A, Hi, Wi)
                background, obj = scores.chunk(2, dim=1)
                scores = obj - background
            pred_objectness_logits.append(scores)
            pred_anchor_deltas.append(deltas)
        return pred_objectness_logits, pred_anchor_deltas
