"""A row-banded computation and its recomputing backward: LDA-AQU's offset branch, band by band, keeping
only its input for backward."""
from __future__ import annotations

import contextlib

import torch

from .cpu_cache import empty_like_on
from .dispatch import autocast_available, autocasting


class _Recomputed(torch.autograd.Function):
    """The offset rows of band(q, rows, *params) for every band of `rows` output rows, whose backward
    runs each band again under autograd: only q and the parameters are kept. band(qs, r0, r1, Ho,
    *params) computes output rows r0:r1 from qs, the rows reads(Ho, r0, r1) of q; each band's gradient
    lands in those rows, so a band's working set stays in cache however large the map (one band where
    rows >= Ho)."""

    @staticmethod
    def forward(ctx, band, reads, rows, q, *params):
        dev = q.device.type
        ctx.band, ctx.reads, ctx.rows, ctx.device = band, reads, rows, dev
        ctx.autocast_dtype = torch.get_autocast_dtype(dev) if autocasting(dev) else None
        ctx.save_for_backward(q, *params)
        return _bands(band, reads, rows, q, params)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        dev, dtype, Ho = ctx.device, ctx.autocast_dtype, q.shape[2]
        # the forward's autocast state again (devices without autocast, e.g. meta, have none to set)
        cast = torch.autocast(dev, dtype, enabled=dtype is not None) if autocast_available(dev) \
            else contextlib.nullcontext()
        ps = [p.detach().requires_grad_(n) for p, n in zip(params, needs[1:])]
        dq, dps = None, [None] * len(ps)
        for r0 in range(0, Ho, ctx.rows):
            r1 = min(Ho, r0 + ctx.rows)
            qa, qb = ctx.reads(Ho, r0, r1)
            qs = q[:, :, qa:qb].detach().requires_grad_(needs[0])
            with torch.enable_grad(), cast:
                out = ctx.band(qs, r0, r1, Ho, *ps)
            leaves = [t for t in (qs, *ps) if t.requires_grad]
            grads = iter(torch.autograd.grad(out, leaves, grad[:, :, r0:r1], allow_unused=True) if leaves else ())
            if needs[0]:
                g = next(grads)
                if dq is None and (qa, qb) == (0, Ho):
                    dq = g
                else:
                    dq = empty_like_on(q.shape, q).zero_() if dq is None else dq
                    dq[:, :, qa:qb] += g
            for i, p in enumerate(ps):
                if p.requires_grad:
                    g = next(grads)
                    dps[i] = g if dps[i] is None else dps[i] + g
        return (None, None, None, dq, *dps)


def _bands(band, reads, rows: int, q, params):
    """band's rows for every band, without a graph (inference, and the forward of _Recomputed)."""
    Ho = q.shape[2]
    if rows >= Ho:
        return band(q, 0, Ho, Ho, *params)
    out = None
    for r0 in range(0, Ho, rows):
        r1 = min(Ho, r0 + rows)
        qa, qb = reads(Ho, r0, r1)
        o = band(q[:, :, qa:qb], r0, r1, Ho, *params)
        if out is None:
            out = empty_like_on((*o.shape[:2], Ho, o.shape[3]), o)
        # (torch.tanh(..., out=) into the strided rows cost more than this copy at 1024x1024)
        out[:, :, r0:r1] = o
    return out
