"""The Triton backend as torch.library custom ops (so torch.compile(fullgraph=True) traces through
them) and the autograd Function that pairs forward and backward.

The fake implementations promise exactly the layouts the real ones return: the output and the
saved weights contiguous, every gradient laid out like its input (torch.empty_like's rule)."""
from typing import Optional

import torch

from kernels.launchers import Problem, Spec, upsample_bwd, upsample_fwd
from kernels.layout import acc_dtype, neighbours

from .torch_path import refuse_double_backward


def _config(v, size, q, spec: Spec, backward: bool):
    if not v.is_cuda:
        return None
    from autotune.cache import lookup  # lazy: the cache file is read on first use only
    return lookup(Problem.of(v, size, q, spec), v.dtype, backward=backward)


@torch.library.custom_op("lda_aqu::upsample_fwd", mutates_args=())
def upsample_fwd_op(v: torch.Tensor, size: list[int], offset: Optional[torch.Tensor], q: Optional[torch.Tensor],
                    k: Optional[torch.Tensor], rpb: Optional[torch.Tensor], wts: Optional[torch.Tensor], G: int,
                    NH: int, K: int, weights: str, coords: str, padding: str, grid: int, scale: float,
                    need_attn: bool) -> tuple[torch.Tensor, torch.Tensor]:
    spec = Spec(G, NH, K, weights, coords, padding, grid, scale)
    out, attn = upsample_fwd(v, size, spec, offset, q, k, rpb, wts, config=_config(v, size, q, spec, False),
                             need_attn=need_attn)
    return out, (attn if attn is not None else v.new_empty(0))


@upsample_fwd_op.register_fake
def _(v, size, offset, q, k, rpb, wts, G, NH, K, weights, coords, padding, grid, scale, need_attn):
    B, C = v.shape[:2]
    keep = need_attn and weights in ("attention", "logits")
    attn = v.new_empty(B, NH, K, *size, dtype=acc_dtype(v.dtype)) if keep else v.new_empty(0)
    return v.new_empty(B, C, *size), attn


@torch.library.custom_op("lda_aqu::upsample_bwd", mutates_args=())
def upsample_bwd_op(dout: torch.Tensor, v: torch.Tensor, size: list[int], offset: Optional[torch.Tensor],
                    q: Optional[torch.Tensor], k: Optional[torch.Tensor], rpb: Optional[torch.Tensor],
                    wts: Optional[torch.Tensor], attn: Optional[torch.Tensor], G: int, NH: int, K: int, weights: str,
                    coords: str, padding: str, grid: int, scale: float, deterministic: bool) -> list[torch.Tensor]:
    spec = Spec(G, NH, K, weights, coords, padding, grid, scale)
    grads = upsample_bwd(dout, v, size, spec, offset, q, k, rpb, wts, attn, config=_config(v, size, q, spec, True),
                         deterministic=deterministic)
    return [g if g is not None else v.new_empty(0) for g in grads]


@upsample_bwd_op.register_fake
def _(dout, v, size, offset, q, k, rpb, wts, attn, G, NH, K, weights, coords, padding, grid, scale, deterministic):
    return [torch.empty_like(t) if t is not None else v.new_empty(0) for t in (v, offset, q, k, rpb, wts)]


refuse_double_backward("lda_aqu::upsample_bwd")


class LocalUpsampleFunction(torch.autograd.Function):
    """Saves the inputs and, for softmax weights, the [B, nh, K, Ho, Wo] weights; never the sampled
    copies of k and v."""

    @staticmethod
    def forward(ctx, v, offset, q, k, rpb, wts, size, spec: Spec, need_attn: bool):
        out, attn = torch.ops.lda_aqu.upsample_fwd(v, size, offset, q, k, rpb, wts, *spec, need_attn)
        ctx.save_for_backward(v, offset, q, k, rpb, wts, attn if attn.numel() else None)
        ctx.size, ctx.spec = size, spec
        return out

    @staticmethod
    def backward(ctx, dout):
        v, offset, q, k, rpb, wts, attn = ctx.saved_tensors
        grads = torch.ops.lda_aqu.upsample_bwd(dout, v, ctx.size, offset, q, k, rpb, wts, attn, *ctx.spec,
                                               torch.are_deterministic_algorithms_enabled())
        dv, doff, dq, dk, drpb, dwts = (g if t is not None else None
                                        for g, t in zip(grads, (v, offset, q, k, rpb, wts)))
        return dv, doff, dq, dk, drpb, dwts, None, None, None


def local_upsample_triton(v, size, *, offset, q, k, rpb, logits, weights, kernel_size, num_groups, num_heads, scale,
                          coords, padding):
    """`upsampler.local_upsample` through the Triton kernels; arguments already checked."""
    mode = "attention" if q is not None else "logits" if logits is not None else \
        "weights" if weights is not None else "unit"
    wts = logits if logits is not None else weights
    K = neighbours(offset, rpb, logits, weights, kernel_size, num_groups)
    spec = Spec(num_groups, num_heads, K, mode, coords, padding, kernel_size or 0, scale)
    need_attn = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in (v, offset, q, k, rpb, wts))
    return LocalUpsampleFunction.apply(v, offset, q, k, rpb, wts, list(size), spec, need_attn)
