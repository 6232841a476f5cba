"""The layer norm over the channels of a [B, C, H, W] map (LDA-AQU's, under the official name
LayerNormProxy): the native CPU pass where `dispatch.can_run_native` allows it, in training with its native
backward (an autograd Function in eager, the custom op `lda_aqu::layer_norm_channels` under dispatch
modes), else torch's ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu as _cpu
from . import cpu_cache
from .dispatch import can_run_native, traced
from .torch_path import refuse_double_backward


class LayerNormProxy(nn.Module):
    """LayerNorm over the channels of a [B, C, H, W] map (official name: keys end in .norm.*)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return _layer_norm_channels(x, self.norm.weight, self.norm.bias, self.norm.eps)


def _layer_norm_channels(x, weight, bias, eps):
    if not torch.is_grad_enabled():
        if can_run_native(x, weight, bias) is None:  # no graph to keep: one pass in NCHW, no permuted copies
            return _ln_forward(x, weight, bias, eps)
    elif can_run_native(x, weight, bias, node="mode") is None:
        if traced():  # a dispatch mode (the bench's fake trace): the op it sees, keeping what eager keeps
            return torch.ops.lda_aqu.layer_norm_channels(x, weight, bias, eps)
        return _LayerNormChannels.apply(x, weight, bias, eps)
    # the affine after the permute back, so that the result is not a view (see LDAAQU.forward)
    xn = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=eps).permute(0, 3, 1, 2)
    return torch.addcmul(bias[:, None, None], xn, weight[:, None, None])


# The channels' layer norm in eager CPU training: the native pass and its native backward. Autograd keeps
# x and the weight alone (torch's ops keep the normalised map for the affine too), and neither direction
# makes permuted copies: at 1024x1024 the torch form's passes were eight fresh maps of C channels a step.
def _ln_forward(x, weight, bias, eps):
    return _cpu.layer_norm_channels(x, weight, bias, eps, empty=cpu_cache.empty)


def _ln_backward(grad, x, weight, eps, needs):
    dx, dw, db = _cpu.layer_norm_channels_backward(x, weight, grad.to(x.dtype), eps, empty=cpu_cache.empty)
    return dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None


class _LayerNormChannels(torch.autograd.Function):
    """Eager calls: no custom-op dispatch (it costs as much as the pass on a small map)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _ln_forward(x, weight, bias, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return *_ln_backward(grad, *ctx.saved_tensors, ctx.eps, ctx.needs_input_grad), None


@torch.library.custom_op("lda_aqu::layer_norm_channels", mutates_args=())
def _ln_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return _ln_forward(x, weight, bias, eps)


@_ln_op.register_fake
def _(x, weight, bias, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("lda_aqu::layer_norm_channels_bwd", mutates_args=())
def _ln_bwd_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> list[torch.Tensor]:
    return list(_ln_backward(grad, x, weight, eps, (True, True, True)))


@_ln_bwd_op.register_fake
def _(grad, x, weight, eps):
    return [x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)]


def _ln_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.eps = inputs[3]


def _ln_grad(ctx, grad):
    dx, dw, db = torch.ops.lda_aqu.layer_norm_channels_bwd(grad, *ctx.saved_tensors, ctx.eps)
    return dx, dw, db, None


torch.library.register_autograd("lda_aqu::layer_norm_channels", _ln_grad, setup_context=_ln_setup)
refuse_double_backward("lda_aqu::layer_norm_channels_bwd")
