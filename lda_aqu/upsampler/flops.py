"""Floating-point work of the library's custom ops, registered with torch.utils.flop_counter so that
FlopCounterMode counts them, and `profile(module, input_shape)`: parameters and GFLOPs of a forward.

The op's arithmetic, per output pixel and sample (a multiply-add counts 2):
    value:  C channels x (4 bilinear corners + 1 weighted sum)          = 5C multiply-adds
    key:    D channels x (4 bilinear corners + 1 dot with the query)    = 5D (attention weights only)
    bias:   D multiply-adds of q . rpb_n                                  (attention with rpb)
so a forward is 2 * B * Ho*Wo * K * (5C + 5D + D_rpb); the softmax's O(K) per pixel is left out.
A backward is twice its forward (every multiply-add has two operands to differentiate), as
flop_counter counts a matmul's.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula


from . import function as _function  # noqa: F401  (registers lda_aqu::upsample_fwd/bwd)
from . import torch_path as _torch_path  # noqa: F401  (registers lda_aqu::local_upsample_cpu[_bwd])


def op_flops(B: int, C: int, P: int, K: int, D: int = 0, rpb: bool = False, backward: bool = False) -> int:
    """FLOPs of local_upsample on v [B, C, .], P output pixels, K samples, keys of D channels (0: no
    attention); the backward alone when backward."""
    fwd = 2 * B * P * K * (5 * C + 5 * D + (D if rpb else 0))
    return 2 * fwd if backward else fwd


def _count(v, P, K, q, rpb, backward):
    return op_flops(v[0], v[1], P, K, q[1] if q is not None else 0, rpb is not None, backward)


def _register(target, formula):
    if target not in flop_registry:  # importing twice (a reload) must not raise "duplicate registrations"
        register_flop_formula(target)(formula)


def _cpu_fwd(v, offset, q, k, rpb, logits, weights, Ho, Wo, G, NH, K, *args, out_shape=None, **kwargs):
    return _count(v, Ho * Wo, K, q, rpb, False)


def _cpu_bwd(dout, v, offset, q, k, rpb, logits, weights, w, Ho, Wo, G, NH, K, *args, out_shape=None, **kwargs):
    return _count(v, Ho * Wo, K, q, rpb, True)


def _triton_fwd(v, size, offset, q, k, rpb, wts, G, NH, K, *args, out_shape=None, **kwargs):
    return _count(v, size[0] * size[1], K, q, rpb, False)


def _triton_bwd(dout, v, size, offset, q, k, rpb, wts, attn, G, NH, K, *args, out_shape=None, **kwargs):
    return _count(v, size[0] * size[1], K, q, rpb, True)


_register(torch.ops.lda_aqu.local_upsample_cpu, _cpu_fwd)
_register(torch.ops.lda_aqu.local_upsample_cpu_bwd, _cpu_bwd)
_register(torch.ops.lda_aqu.upsample_fwd, _triton_fwd)
_register(torch.ops.lda_aqu.upsample_bwd, _triton_bwd)


def count_flops(fn, *args, backward: bool = False, **kwargs) -> int:
    """FLOPs that FlopCounterMode counts in fn(*args, **kwargs), and in .sum().backward() when backward."""
    with FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


def profile(module: torch.nn.Module, input_shape, *, device=None, dtype=None) -> dict:
    """{"params": parameter count, "gflops": GFLOPs of one forward} of module on a random input of
    input_shape, on the module's device and dtype (CPU tensors work; so does "meta" where the module's
    forward runs there). Convolutions, matmuls and this library's ops are counted; elementwise work
    and the softmax are not (flop_counter's convention)."""
    if isinstance(input_shape, int) or not all(isinstance(n, int) and n > 0 for n in input_shape):
        raise ValueError(f"input_shape must be a sequence of positive ints, got {input_shape!r}")
    p = next(iter(module.parameters()), None)
    device = device or (p.device if p is not None else "cpu")
    dtype = dtype or (p.dtype if p is not None else torch.float32)
    x = torch.randn(*input_shape, device=device, dtype=dtype)
    with torch.no_grad():
        flops = count_flops(module, x)
    return {"params": sum(t.numel() for t in module.parameters()), "gflops": flops / 1e9}
