"""The Triton backend as torch.library custom ops (so torch.compile(fullgraph=True) traces through
them), with the forward's autograd formula calling the backward op.

The fake implementations promise exactly the layouts the real ones return: the output and the
saved weights contiguous, every gradient laid out like its input (torch.empty_like's rule)."""
from typing import Optional

import torch

from ..kernels.launchers import Problem, Spec, upsample_bwd, upsample_fwd
from ..kernels.layout import acc_dtype

from .torch_path import refuse_double_backward


def _tunable(v) -> bool:
    return v.is_cuda


def _config(kernel: str, v, size, q, offset, rpb, spec: Spec):
    """The tuned configuration of the kernel variant this launch runs, on v's device; None (the
    launcher's default) off CUDA or where that variant was never tuned."""
    if not _tunable(v):
        return None
    from ..autotune.cache import Variant, lookup  # lazy: the cache file is read on first use only
    return lookup(Problem.of(v, size, q, spec), v.dtype, Variant.of(kernel, spec, offset, rpb), v.device)


@torch.library.custom_op("lda_aqu::upsample_fwd", mutates_args=())
def upsample_fwd_op(v: torch.Tensor, size: list[int], offset: Optional[torch.Tensor], q: Optional[torch.Tensor],
                    k: Optional[torch.Tensor], rpb: Optional[torch.Tensor], wts: Optional[torch.Tensor], G: int,
                    NH: int, K: int, weights: str, coords: str, padding: str, grid: int, scale: float, window: str,
                    ratio: float, need_attn: bool) -> tuple[torch.Tensor, torch.Tensor]:
    spec = Spec(G, NH, K, weights, coords, padding, grid, scale, window, ratio)
    # the launcher stores the softmax weights (for the backward) only for softmax weight modes
    kernel = "fwd-train" if _keeps_attn(weights, need_attn) else "fwd"
    cfg = _config(kernel, v, size, q, offset, rpb, spec)
    out, attn = upsample_fwd(v, size, spec, offset, q, k, rpb, wts, config=cfg, need_attn=need_attn)
    return out, (attn if attn is not None else v.new_empty(0))


@upsample_fwd_op.register_fake
def _(v, size, offset, q, k, rpb, wts, G, NH, K, weights, coords, padding, grid, scale, window, ratio, need_attn):
    B, C = v.shape[:2]
    attn = v.new_empty(B, NH, K, *size, dtype=acc_dtype(v.dtype)) if _keeps_attn(weights, need_attn) else v.new_empty(0)
    return v.new_empty(B, C, *size), attn


@torch.library.custom_op("lda_aqu::upsample_bwd", mutates_args=())
def upsample_bwd_op(dout: torch.Tensor, v: torch.Tensor, size: list[int], offset: Optional[torch.Tensor],
                    q: Optional[torch.Tensor], k: Optional[torch.Tensor], rpb: Optional[torch.Tensor],
                    wts: Optional[torch.Tensor], attn: Optional[torch.Tensor], G: int, NH: int, K: int, weights: str,
                    coords: str, padding: str, grid: int, scale: float, window: str, ratio: float,
                    deterministic: bool) -> list[torch.Tensor]:
    spec = Spec(G, NH, K, weights, coords, padding, grid, scale, window, ratio)
    cfg = _config("bwd-det" if deterministic else "bwd", v, size, q, offset, rpb, spec)
    grads = upsample_bwd(dout, v, size, spec, offset, q, k, rpb, wts, attn, config=cfg, deterministic=deterministic)
    return [g if g is not None else v.new_empty(0) for g in grads]


@upsample_bwd_op.register_fake
def _(dout, v, size, offset, q, k, rpb, wts, attn, G, NH, K, weights, coords, padding, grid, scale, window, ratio,
      deterministic):
    return [torch.empty_like(t) if t is not None else v.new_empty(0) for t in (v, offset, q, k, rpb, wts)]


refuse_double_backward("lda_aqu::upsample_bwd")


def _keeps_attn(weights: str, need_attn: bool) -> bool:
    return need_attn and weights in ("attention", "logits")


def _setup(ctx, inputs, output):
    """Saves the inputs and, for softmax weights, the [B, nh, K, Ho, Wo] weights; never the sampled
    copies of k and v."""
    v, size, offset, q, k, rpb, wts, *spec, need_attn = inputs
    spec, attn = Spec(*spec), output[1]
    ctx.mark_non_differentiable(attn)
    # decided from the arguments, not attn.numel(): under symbolic shapes that would guard on the sizes
    keep = _keeps_attn(spec.weights, need_attn)
    ctx.save_for_backward(v, offset, q, k, rpb, wts, attn if keep else None)
    ctx.size, ctx.spec = size, spec


def _grad(ctx, dout, _dattn):
    v, offset, q, k, rpb, wts, attn = ctx.saved_tensors
    if attn is None and ctx.spec.weights in ("attention", "logits"):
        raise RuntimeError("lda_aqu::upsample_fwd was called with need_attn=False, so it kept no softmax weights "
                           "for the backward; pass need_attn=True when a backward may follow")
    grads = torch.ops.lda_aqu.upsample_bwd(dout, v, ctx.size, offset, q, k, rpb, wts, attn, *ctx.spec,
                                           torch.are_deterministic_algorithms_enabled())
    dv, doff, dq, dk, drpb, dwts = (g if t is not None else None for g, t in zip(grads, (v, offset, q, k, rpb, wts)))
    return (dv, None, doff, dq, dk, drpb, dwts) + (None,) * (len(Spec._fields) + 1)


torch.library.register_autograd("lda_aqu::upsample_fwd", _grad, setup_context=_setup)


def local_upsample_triton(v, size, spec: Spec, *, offset, q, k, rpb, logits, weights):
    """`upsampler.local_upsample` through the Triton kernels; arguments already checked and resolved."""
    wts = logits if logits is not None else weights
    need_attn = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in (v, offset, q, k, rpb, wts))
    return torch.ops.lda_aqu.upsample_fwd(v, list(size), offset, q, k, rpb, wts, *spec, need_attn)[0]
