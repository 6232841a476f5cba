"""The Triton backend as torch.library custom ops (so torch.compile(fullgraph=True) traces through
them) and the autograd Function that pairs forward and backward."""
from typing import Optional

import torch

from kernels.launchers import Problem, dla_bwd, dla_fwd


def _config(q, v, offset, num_heads: int, num_groups: int, backward: bool):
    if not q.is_cuda:
        return None
    from autotune.cache import lookup  # lazy: the cache file is read on first use only
    return lookup(Problem.of(q, v, offset, num_groups, num_heads), q.dtype, backward=backward)


@torch.library.custom_op("lda_aqu::dla_fwd", mutates_args=())
def dla_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: torch.Tensor, rpb: Optional[torch.Tensor],
               num_heads: int, num_groups: int, scale: float, need_attn: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, attn = dla_fwd(q, k, v, offset, rpb, num_heads, num_groups, scale,
                        config=_config(q, v, offset, num_heads, num_groups, False), need_attn=need_attn)
    return out, (attn if need_attn else q.new_empty(0))


@dla_fwd_op.register_fake
def _(q, k, v, offset, rpb, num_heads, num_groups, scale, need_attn):
    B, _, Ho, Wo = q.shape
    K = offset.shape[1] // (2 * num_groups)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    attn = q.new_empty(B, num_heads, K, Ho, Wo, dtype=acc) if need_attn else q.new_empty(0)
    return q.new_empty(B, v.shape[1], Ho, Wo), attn


@torch.library.custom_op("lda_aqu::dla_bwd", mutates_args=())
def dla_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: torch.Tensor,
               rpb: Optional[torch.Tensor], attn: torch.Tensor, num_heads: int, num_groups: int, scale: float,
               deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = dla_bwd(dout, q, k, v, offset, rpb, attn, num_heads, num_groups, scale,
                    config=_config(q, v, offset, num_heads, num_groups, True), deterministic=deterministic)
    *grads, drpb = (_like(g, t) for g, t in zip(grads, (q, k, v, offset, rpb)))
    return *grads, (drpb if drpb is not None else q.new_empty(0))


def _like(grad, t):
    """grad laid out as torch.empty_like(t), the fake kernel's promise (Inductor checks it): the kernels
    write dq contiguous, which a channels-last q (Inductor's choice before a conv) is not."""
    if grad is None or grad.stride() == torch.empty_like(t, device="meta").stride():
        return grad
    return torch.empty_like(t).copy_(grad)


@dla_bwd_op.register_fake
def _(dout, q, k, v, offset, rpb, attn, num_heads, num_groups, scale, deterministic):
    drpb = torch.empty_like(rpb) if rpb is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(offset), drpb


class DeformableLocalAttentionFunction(torch.autograd.Function):
    """Saves the inputs and the [B, nh, K, Ho, Wo] attention, never the sampled copies of k and v."""

    @staticmethod
    def forward(ctx, q, k, v, offset, rpb, num_heads: int, num_groups: int, scale: float, need_attn: bool):
        out, attn = torch.ops.lda_aqu.dla_fwd(q, k, v, offset, rpb, num_heads, num_groups, scale, need_attn)
        ctx.save_for_backward(q, k, v, offset, rpb, attn)
        ctx.args = (num_heads, num_groups, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, offset, rpb, attn = ctx.saved_tensors
        dq, dk, dv, doff, drpb = torch.ops.lda_aqu.dla_bwd(
            dout, q, k, v, offset, rpb, attn, *ctx.args, torch.are_deterministic_algorithms_enabled())
        return dq, dk, dv, doff, (drpb if rpb is not None else None), None, None, None, None


def local_upsample_triton(v, size, *, offset, q, k, rpb, logits, weights, kernel_size, num_groups, num_heads, scale,
                          coords, padding):
    if q is None or logits is not None or weights is not None or kernel_size is not None \
            or coords != "align_corners" or padding != "zeros":
        raise NotImplementedError("the Triton kernels take LDA-AQU's attention only, for now")
    need_attn = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, offset, rpb))
    return DeformableLocalAttentionFunction.apply(q, k, v, offset, rpb, num_heads, num_groups, scale, need_attn)
