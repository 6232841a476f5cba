"""The public core op: argument checks, backend choice, autocast."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .naive import deformable_local_attention_ref

BACKENDS = ("auto", "triton", "reference")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def can_run_triton(*tensors: torch.Tensor) -> Optional[str]:
    """None if the Triton backend can take these tensors, else why not."""
    from kernels.launchers import INTERPRET
    dev = tensors[0].device
    if dev.type == "cpu" and not INTERPRET:
        return "CPU tensors run Triton kernels only under TRITON_INTERPRET=1, set before importing lda-aqu"
    if dev.type not in ("cuda", "cpu"):
        return f"Triton kernels here run on CUDA devices, not {dev.type}"
    if tensors[0].dtype not in TRITON_DTYPES:
        return f"dtype {tensors[0].dtype} is not one of {TRITON_DTYPES}"
    return None


def select_backend(backend: str, *tensors: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    refusal = can_run_triton(*tensors)
    if backend == "triton":
        if refusal:
            raise ValueError(f"backend='triton' cannot run: {refusal}; use backend='reference' or 'auto'")
        return "triton"
    return "triton" if tensors[0].is_cuda and refusal is None else "reference"


def _infer_groups(n_offset: int, D: int, C: int, rpb: Optional[torch.Tensor], num_groups: Optional[int]) -> int:
    """G from offset's G*2K channels, K = k_u**2 with k_u odd, G dividing D and C."""
    if num_groups is not None:
        candidates = [num_groups]
    elif rpb is not None and rpb.dim() == 3 and rpb.shape[1] > 0 and n_offset % (2 * rpb.shape[1]) == 0:
        candidates = [n_offset // (2 * rpb.shape[1])]
    else:
        candidates = [g for g in range(1, n_offset // 2 + 1) if n_offset % (2 * g) == 0]
    found = []
    for g in candidates:
        K = n_offset // (2 * g) if n_offset % (2 * g) == 0 else 0
        k_u = math.isqrt(K)
        if K and k_u * k_u == K and k_u % 2 == 1 and D % g == 0 and C % g == 0:
            found.append(g)
    if len(found) != 1:
        why = "no" if not found else f"several ({found})"
        raise ValueError(f"offset has {n_offset} channels: {why} way to read them as G*2*k_u**2 with odd k_u and "
                         f"G dividing q's {D} and v's {C} channels; pass num_groups")
    return found[0]


def _check(q, k, v, offset, rpb, num_heads, num_groups):
    for name, t in (("q", q), ("k", k), ("v", v), ("offset", offset)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if rpb is not None and not isinstance(rpb, torch.Tensor):
        raise TypeError(f"rpb must be a torch.Tensor or None, got {type(rpb).__name__}")
    for name, t in (("k", k), ("v", v), ("offset", offset), ("rpb", rpb)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t is not None and t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}")
    B, D, Ho, Wo = q.shape
    C, H, W = v.shape[1:]
    if k.shape[0] != B or v.shape[0] != B or offset.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}, offset {offset.shape[0]}")
    if k.shape[1] != D:
        raise ValueError(f"k has {k.shape[1]} channels but q has {D}")
    if k.shape[2:] != v.shape[2:]:
        raise ValueError(f"k is {tuple(k.shape[2:])} but v is {(H, W)} in space")
    if offset.shape[2:] != q.shape[2:]:
        raise ValueError(f"offset is {tuple(offset.shape[2:])} but q is {(Ho, Wo)} in space")
    if min(D, C, H, W, Ho, Wo) == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, v {tuple(v.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if D % num_heads or C % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide q's {D} and v's {C} channels")
    if num_groups is not None and (isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1):
        raise ValueError(f"num_groups must be a positive int or None, got {num_groups!r}")
    if offset.shape[1] % 2:
        raise ValueError(f"offset must have G*2*K channels, got {offset.shape[1]}")
    G = _infer_groups(offset.shape[1], D, C, rpb, num_groups)
    K = offset.shape[1] // (2 * G)
    if rpb is not None and tuple(rpb.shape) != (num_heads, K, D // num_heads):
        raise ValueError(f"rpb must have shape (num_heads, K, D//num_heads) = {(num_heads, K, D // num_heads)}, "
                         f"got {tuple(rpb.shape)}")
    return G


def deformable_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: torch.Tensor,
                               rpb: Optional[torch.Tensor] = None, *, num_heads: int = 1,
                               num_groups: Optional[int] = None, scale: Optional[float] = None,
                               backend: str = "auto") -> torch.Tensor:
    """Offset-sampled neighbour gathering and softmax aggregation (LDA-AQU steps 4-5).

    Args:
        q: [B, D, Ho, Wo] queries at output resolution.
        k: [B, D, H, W] keys; v: [B, C, H, W] values, at input resolution.
        offset: [B, G*2*K, Ho, Wo] sample positions in output pixels, base grid included; channel
            g*2K + 2n is the y and g*2K + 2n + 1 the x offset of neighbour n of group g.
        rpb: [nh, K, D//nh] bias added to the sampled keys, or None.
        num_heads: nh; must divide D and C.
        num_groups: G; inferred from offset (and rpb) when None, with an error if ambiguous.
        scale: logit scale, (D//nh) ** -0.5 by default.
        backend: "auto" (Triton for CUDA tensors, the eager reference otherwise), "triton", "reference".

    Returns:
        [B, C, Ho, Wo] in the inputs' dtype (the autocast dtype under autocast).
    """
    if isinstance(q, torch.Tensor) and torch.is_autocast_enabled(q.device.type):
        # one dtype for all: the autocast one, with fp32 accumulation inside
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v, offset, rpb = (t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                                for t in (q, k, v, offset, rpb))
    G = _check(q, k, v, offset, rpb, num_heads, num_groups)
    if scale is None:
        scale = (q.shape[1] // num_heads) ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    if select_backend(backend, q) == "reference":
        return deformable_local_attention_ref(q, k, v, offset, rpb, num_heads=num_heads, num_groups=G,
                                              scale=float(scale))
    from .function import DeformableLocalAttentionFunction
    need_attn = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, offset, rpb))
    return DeformableLocalAttentionFunction.apply(q, k, v, offset, rpb, num_heads, G, float(scale), need_attn)
