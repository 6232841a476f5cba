"""F.interpolate(mode="bilinear", align_corners=True) with a backward that stays correct under
torch.compile (LDA-AQU's query upsampling)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.layout import unit_align_corners
from .cpu_cache import empty_like_on
from .dispatch import autocasting, traced


class BilinearAlignCorners(torch.autograd.Function):
    """F.interpolate(x, size, mode="bilinear", align_corners=True) whose backward is the transposed
    interpolation as gathers: each input row (column) sums the few output rows whose two taps reach it,
    so the backward costs two taps per output row and column, like the forward.

    Autograd's own backward, under torch.compile, is Inductor's decomposition: four accumulating
    index_puts into zeros, then their sum. Inductor 2.13's C++ backend can run the sum before the
    index_puts (a mutation dependency lost when it recomputes a node's loops for fusion,
    pytorch/pytorch#185509): the gradient through q silently vanished on CPU. Gathers write nothing in
    place. ATen's backward kernel has no meta function for symbolic sizes, so it cannot stand in under
    dynamic shapes; eager runs it (one pass, four taps per output pixel).
    """

    @staticmethod
    def forward(ctx, x, size):
        ctx.in_size = x.shape[-2:]
        if x.device.type == "cpu" and x.is_contiguous() and x.dtype in (torch.float32, torch.float64) \
                and not autocasting("cpu") and not traced():
            # F.interpolate's kernel into a cached buffer: q is the largest map of the module's own
            return torch._C._nn.upsample_bilinear2d(x, size, True, out=empty_like_on((*x.shape[:2], *size), x))
        return F.interpolate(x, size, mode="bilinear", align_corners=True)

    @staticmethod
    def backward(ctx, grad):
        H, W = ctx.in_size
        acc = torch.promote_types(grad.dtype, torch.float32)  # as ATen's kernel: weights and sums in fp32
        with torch.autocast(grad.device.type, enabled=False):
            if not torch.compiler.is_compiling():  # eager: ATen's own kernel, four taps per output pixel
                dx = torch.ops.aten.upsample_bilinear2d_backward(grad.to(acc), grad.shape[-2:], (*grad.shape[:2], H, W),
                                                                 True)
            else:
                dx = _tent_transposed(_tent_transposed(grad.to(acc), W, -1), H, -2)
        return dx.to(grad.dtype), None


def _tent_transposed(g: torch.Tensor, n_in: int, dim: int) -> torch.Tensor:
    """The transposed 1-D align-corners interpolation of g along dim (n_out long), to n_in: input i sums
    tap weight max(0, 1 - |o * ratio - i|) times g[o] over the M outputs o from the first that can reach
    it, M = 2 (n_out - 1) // (n_in - 1) + 3 (integer size arithmetic: no guard under dynamic shapes)."""
    n_out = g.shape[dim]
    # Dynamo before torch 2.13 refuses sym_max of plain ints (a static compile's sizes)
    span = torch.sym_max(n_in - 1, 1) if isinstance(n_in, torch.SymInt) else max(n_in - 1, 1)
    i = torch.arange(n_in, device=g.device)
    o = (((i - 1) * (n_out - 1)).div(span, rounding_mode="floor").clamp(min=0)[:, None]
         + torch.arange(2 * (n_out - 1) // span + 3, device=g.device))  # [n_in, M]
    w = (1 - (o.to(g.dtype) * unit_align_corners(n_in, n_out) - i[:, None]).abs()).clamp(min=0) * (o < n_out)
    o = o.clamp(max=n_out - 1)
    if dim == -1:
        return (g[..., o] * w).sum(-1)
    return (g[..., o, :] * w[..., None]).sum(-2)
