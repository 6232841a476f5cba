"""LDA-AQU as an nn.Module with the official parameter names, shapes and initialisation."""
from __future__ import annotations

import contextlib
import fractions
import functools
import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .functional import (FLOAT_DTYPES, _check_extent, autocasting, check_backend, deformable_local_attention,
                         empty_output, not_scriptable, refuse_jit)
from kernels import cpu as _cpu

from .torch_path import _traced, is_exporting
from .naive import align_corners_ratio


class LayerNormProxy(nn.Module):
    """LayerNorm over the channels of a [B, C, H, W] map (official name: keys end in .norm.*)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return _layer_norm_channels(x, self.norm.weight, self.norm.bias, self.norm.eps)


def _layer_norm_channels(x, weight, bias, eps):
    if _native_layer_norm(x, weight):  # no graph to keep: one pass in NCHW, no permuted copies
        return _cpu.layer_norm_channels(x, weight, bias, eps)
    # the affine after the permute back, so that the result is not a view (see LDAAQU.forward)
    xn = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=eps).permute(0, 3, 1, 2)
    return torch.addcmul(bias[:, None, None], xn, weight[:, None, None])


def _native_layer_norm(x, weight) -> bool:
    return not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) \
        and weight.dtype == x.dtype and not autocasting("cpu") and not _traced() and _cpu.unavailable() is None


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
    span = torch.sym_max(n_in - 1, 1)
    i = torch.arange(n_in, device=g.device)
    o = (((i - 1) * (n_out - 1)).div(span, rounding_mode="floor").clamp(min=0)[:, None]
         + torch.arange(2 * (n_out - 1) // span + 3, device=g.device))  # [n_in, M]
    w = (1 - (o.to(g.dtype) * align_corners_ratio(n_in, n_out) - i[:, None]).abs()).clamp(min=0) * (o < n_out)
    o = o.clamp(max=n_out - 1)
    if dim == -1:
        return (g[..., o] * w).sum(-1)
    return (g[..., o, :] * w[..., None]).sum(-2)


class _Recomputed(torch.autograd.Function):
    """fn(*args), whose backward runs fn again under autograd: only args are kept for the backward.
    args are the branch's input and the parameters fn reads, so that their gradients flow."""

    @staticmethod
    def forward(ctx, fn, *args):
        dev = args[0].device.type
        ctx.fn, ctx.device = fn, dev
        ctx.autocast_dtype = torch.get_autocast_dtype(dev) if autocasting(dev) else None
        ctx.save_for_backward(*args)
        return fn(*args)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        args = [a.detach().requires_grad_(n) for a, n in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        dev, dtype = ctx.device, ctx.autocast_dtype
        # the forward's autocast state again (devices without autocast, e.g. meta, have none to set)
        cast = torch.autocast(dev, dtype, enabled=dtype is not None) if torch.amp.is_autocast_available(dev) \
            else contextlib.nullcontext()
        with torch.enable_grad(), cast:
            out = ctx.fn(*args)
        need = [a for a in args if a.requires_grad]
        grads = iter(torch.autograd.grad(out, need, grad, allow_unused=True) if need else ())
        return (None, *(next(grads) if a.requires_grad else None for a in args))


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _odd_int(name: str, value) -> int:
    if _positive_int(name, value) % 2 == 0:
        raise ValueError(f"{name} must be odd (a centred window), got {value}")
    return int(value)


def _check_input(x, channels: int, weight: torch.Tensor, name: str = "x"):
    """x of a module whose parameters are like `weight`: a floating (B, channels, H, W) map on the
    parameters' device, in their dtype unless autocast casts it. H and W must be positive; B may be 0."""
    refuse_jit()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must be (B, {channels}, H, W), got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, one of {FLOAT_DTYPES}, got {x.dtype}: convert it, "
                        f"e.g. {name}.float()")
    if x.device != weight.device:
        raise ValueError(f"{name} is on {x.device} but the module's parameters are on {weight.device}: move one "
                         f"to the other (module.to({name}.device))")
    if x.dtype != weight.dtype and not autocasting(x.device.type):
        raise TypeError(f"{name} has dtype {x.dtype} but the module's parameters are {weight.dtype}: convert the "
                        f"module (module.to({x.dtype})) or the input ({name}.to({weight.dtype})), or for mixed "
                        f"precision run under torch.autocast(\"{x.device.type}\", dtype=torch.bfloat16 or float16)")
    _check_extent(name, x)


def _empty_batch(module: nn.Module, x: torch.Tensor, size) -> torch.Tensor:
    """A module's output for an empty batch, [0, C, *size], on the graph of x and every parameter (so
    they get gradients, empty or zero, as a convolution's would); no layer runs, as some (pixel_shuffle's
    backward) fail on an empty batch."""
    return empty_output((0, x.shape[1], *size), x, *module.parameters())


def _size_arg(size, default):
    """A module's output size: `default` when size is None, else size checked as a pair of positive ints."""
    if size is None:
        return default
    if not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2 \
            or not all(isinstance(n, (int, torch.SymInt)) and not isinstance(n, bool) for n in size):
        raise TypeError(f"size must be None or a pair of ints (h, w), got {size!r}")
    if size[0] < 1:
        raise ValueError(f"size must be positive, got height {size[0]}")
    if size[1] < 1:
        raise ValueError(f"size must be positive, got width {size[1]}")
    return tuple(size)


def _same_size(size, other) -> bool:
    """size == other, without a guard where a size is symbolic (torch.export would otherwise tie the FPN
    level sizes to each other): what is not known to be equal counts as different, and the callers'
    path for a different size is exact for an equal one too."""
    return all(statically_known_true(a == b) for a, b in zip(size, other))


SIZES_CHECKED = 2 ** 17  # symbolic_scaled's small ratios are checked against int(H*s) for H up to this


@functools.lru_cache(maxsize=None)
def _small_ratio(s: float):
    """(a, c) with H*a//c == int(H*s) for every H in 1..SIZES_CHECKED and c <= 10000, or None. The float
    product rounds: s = 1.4 is a little below 7/5, yet int(5 * 1.4) = 7, and its exact ratio gives 6."""
    H = np.arange(1, SIZES_CHECKED + 1, dtype=np.int64)
    want = np.floor(H * s).astype(np.int64)
    for d in (10, 100, 1000, 10000):
        f = fractions.Fraction(s).limit_denominator(d)
        if np.array_equal(H * f.numerator // f.denominator, want):
            return f.numerator, f.denominator
    return None


def symbolic_scaled(n, s: float):
    """int(n*s) for a symbolic size n: n*a//c where a small ratio is exact (integers, 1.5, 0.3, 2.6: the
    exported program's guards stay simple), else the float product floored, which rounds as eager does."""
    if s.is_integer():
        return n * int(s)
    ratio = _small_ratio(s)
    return n * ratio[0] // ratio[1] if ratio else math.floor(n * s)


# the offset branch's working set per band of rows at inference (LDAAQU._offsets_in_bands), about a
# core's L2; maps under four bands' worth run whole (a band's calls cost more there than the cache saves)
OFFSET_BAND_BYTES = 1 << 21


class LDAAQU(nn.Module):
    """Learned upsampler: each output pixel attends, with its bilinearly upsampled query, to k_u x k_u
    keys/values sampled around it at learned offsets. [B, C, H, W] -> [B, C, int(H*s), int(W*s)], or
    [B, C, *size] for `forward(x, size=(h, w))` (the align-corners rule maps any size onto the input).

    Loads the official LDA_AQU state dict unchanged (strict=True).
    """

    def __init__(self, in_channels: int, scale_factor: float = 2, reduction_factor: int = 4, k_e: int = 3,
                 k_u: int = 3, n_groups: int = 2, range_factor: float = 11, num_heads: int = 1, rpb: bool = True,
                 backend: str = "auto"):
        super().__init__()
        C = _positive_int("in_channels", in_channels)
        r = _positive_int("reduction_factor", reduction_factor)
        G = _positive_int("n_groups", n_groups)
        nh = _positive_int("num_heads", num_heads)
        _odd_int("k_u", k_u)
        _odd_int("k_e", k_e)
        if isinstance(scale_factor, bool) or not isinstance(scale_factor, numbers.Real) \
                or not math.isfinite(scale_factor) or scale_factor <= 0:
            raise ValueError(f"scale_factor must be a positive finite number, got {scale_factor!r}")
        if isinstance(range_factor, bool) or not isinstance(range_factor, numbers.Real) \
                or not math.isfinite(range_factor):
            raise ValueError(f"range_factor must be a finite number, got {range_factor!r}")
        if not isinstance(rpb, bool):
            raise ValueError(f"rpb must be a bool, got {rpb!r}")
        check_backend(backend)
        if C % r:
            raise ValueError(f"reduction_factor={r} must divide in_channels={C}")
        D = C // r
        for name, n in (("n_groups", G), ("num_heads", nh)):
            if D % n or C % n:
                raise ValueError(f"{name}={n} must divide in_channels={C} and the hidden width "
                                 f"in_channels // reduction_factor = {D}")

        self.in_channels, self.scale_factor, self.k_u, self.k_e = C, scale_factor, k_u, k_e
        self.n_groups, self.num_heads, self.range_factor = G, nh, range_factor
        self.hidden_dim, self.rpb, self.backend = D, rpb, backend
        self.scale = (D // nh) ** -0.5
        self.layer_norm = LayerNormProxy(C)
        self.proj_q = nn.Conv2d(C, D, 1, bias=False)
        self.proj_k = nn.Conv2d(C, D, 1, bias=False)
        self.conv_offset = nn.Sequential(
            nn.Conv2d(D // G, D // G, 3, 1, 1, groups=D // G, bias=False),
            LayerNormProxy(D // G),
            nn.GELU(),
            nn.Conv2d(D // G, 2 * k_u * k_u, k_e, 1, k_e // 2),
        )
        # neighbour n = i*k_u + j sits at (i - k_u//2, j - k_u//2): channels (2n, 2n+1) = (y, x)
        base = torch.arange(k_u, dtype=torch.float32) - k_u // 2
        grid = torch.stack(torch.meshgrid(base, base, indexing="ij"), -1)
        self.register_buffer("base_offset", grid.reshape(1, -1, 1, 1), persistent=False)
        if rpb:
            self.relative_position_bias_table = nn.Parameter(torch.zeros(1, nh, 1, k_u * k_u, D // nh))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)  # timm's, at +-2
        self.init_weights()

    def init_weights(self):
        """Official initialisation: xavier-uniform convs with zero bias, unit layer norms, and a zero last
        offset conv, so training starts from the plain neighbourhood grid."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.conv_offset[-1].weight)
        nn.init.zeros_(self.conv_offset[-1].bias)

    def output_size(self, H: int, W: int) -> tuple[int, int]:
        """(int(H*s), int(W*s)). Symbolic sizes (export, compile(dynamic=True)) stay symbolic (int() of
        one would bake it in) and give the same: see `symbolic_scaled`."""
        s = float(self.scale_factor)
        if isinstance(H, int) and isinstance(W, int):
            return int(H * s), int(W * s)
        return symbolic_scaled(H, s), symbolic_scaled(W, s)

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        _check_input(x, self.in_channels, self.proj_q.weight)
        B, C, H, W = x.shape
        Ho, Wo = _size_arg(size, self.output_size(H, W))
        for name, n in (("height", Ho), ("width", Wo)):
            if n < 1:
                raise ValueError(f"x of shape {tuple(x.shape)} at scale_factor={self.scale_factor} gives an output "
                                 f"{name} of {n}: pass a larger x or size=(h, w)")
        if B == 0:
            return _empty_batch(self, x, (Ho, Wo))
        q, k, offset = self._query_key_offset(x, Ho, Wo)
        rpb = self.relative_position_bias_table.reshape(self.num_heads, self.k_u ** 2, -1) if self.rpb else None
        return deformable_local_attention(q, k, x, offset, rpb, num_heads=self.num_heads, num_groups=self.n_groups,
                                          scale=self.scale, backend=self.backend)

    def sampling_offsets(self, x: torch.Tensor, size=None) -> torch.Tensor:
        """Where the op samples for input x: [B, G*2K, Ho, Wo] in output pixels, the base grid included
        (channel g*2K + 2n the y, +1 the x of neighbour n of group g), for inspection and plots."""
        _check_input(x, self.in_channels, self.proj_q.weight)
        return self._query_key_offset(x, *_size_arg(size, self.output_size(*x.shape[-2:])))[2]

    def _query_key_offset(self, x, Ho: int, Wo: int):
        B = x.shape[0]
        G, D = self.n_groups, self.hidden_dim
        # Under torch.compile with dynamic H and W, no tensor that autograd saves (a conv's input, the
        # Triton op's inputs) may be a permute or reshape view: Inductor 2.13 orders such a view's
        # symbolic strides with bare sympy comparisons and fails ("cannot determine truth value of
        # Relational", pytorch/pytorch#185510). Hence the layer norm's affine after its permute, the
        # official depth-wise conv of q viewed as [B*G, D//G, Ho, Wo] as a conv of q itself with the
        # weight tiled over the groups, and the base grid added after the reshape.
        xn = self.layer_norm(x)
        q = BilinearAlignCorners.apply(self.proj_q(xn), (Ho, Wo))
        k = self.proj_k(xn)
        dw = self.conv_offset[0]
        row_bytes = q.element_size() * Wo * (3 * D + 2 * G * self.k_u ** 2)  # q, h and o of a row, h padded
        if not torch.is_grad_enabled() and q.device.type == "cpu" and not _traced() and isinstance(Ho * Wo, int) \
                and Ho * row_bytes > 4 * OFFSET_BAND_BYTES:
            return q, k, self._offsets_in_bands(q, max(8, OFFSET_BAND_BYTES // row_bytes))
        h = F.conv2d(q, dw.weight.repeat(G, 1, 1, 1), padding=dw.padding, groups=D)
        _, ln, gelu, conv = self.conv_offset
        params = (ln.norm.weight, ln.norm.bias, conv.weight, conv.bias)

        def offsets(h, ln_w, ln_b, w, b):  # the offset branch after the depth-wise conv, base grid included
            h = F.gelu(_layer_norm_channels(h.reshape(B * G, D // G, Ho, Wo), ln_w, ln_b, ln.norm.eps),
                       approximate=gelu.approximate)
            o = F.conv2d(h, w, b, conv.stride, conv.padding)
            base = self.base_offset.to(o.dtype).repeat(1, G, 1, 1)
            if torch.is_grad_enabled():
                return (o.tanh() * self.range_factor).reshape(B, -1, Ho, Wo) + base
            # no graph to keep (inference, or the recomputed branch's forward): in place, two passes fewer
            return o.tanh_().mul_(self.range_factor).reshape(B, -1, Ho, Wo).add_(base)
        if torch.is_grad_enabled() and not (torch.compiler.is_compiling() or is_exporting() or torch.jit.is_tracing()):
            # eager training: the branch's layer norm, GELU and tanh outputs (4 maps of D and 2GK channels
            # at output resolution) would be kept for backward; recomputing the branch there costs one
            # small conv and keeps only h
            offset = _Recomputed.apply(offsets, h, *params)
        else:
            offset = offsets(h, *params)
        return q, k, offset

    def _offsets_in_bands(self, q, rows: int):
        """The offset branch (no graph) on a map larger than the cache, `rows` output rows at a time: each
        band's depth-wise conv, layer norm, GELU, offset conv and tanh then run in cache, as on a small
        map (whole-map convs cost 4-5x more per pixel at 1024x1024 than at 128x128). Halo rows come
        from the map, zero rows only past its edges: the whole-map branch's result."""
        B, D, Ho, Wo = q.shape
        G = self.n_groups
        dw, ln, gelu, conv = self.conv_offset
        e, d = conv.padding[0], dw.padding[0]
        w = dw.weight.repeat(G, 1, 1, 1)
        base = self.base_offset.to(q.dtype).repeat(1, G, 1, 1)
        out = q.new_empty(B, G * 2 * self.k_u ** 2, Ho, Wo)
        for r0 in range(0, Ho, rows):
            r1 = min(Ho, r0 + rows)
            a, b = max(0, r0 - e), min(Ho, r1 + e)  # the rows of h the band's offset conv reads
            qa, qb = max(0, a - d), min(Ho, b + d)  # the rows of q their depth-wise conv reads
            h = F.conv2d(F.pad(q[:, :, qa:qb], (0, 0, d - (a - qa), d - (qb - b))), w, padding=(0, d), groups=D)
            h = F.gelu(_layer_norm_channels(h.reshape(B * G, D // G, b - a, Wo), ln.norm.weight, ln.norm.bias,
                                            ln.norm.eps), approximate=gelu.approximate)
            o = F.conv2d(F.pad(h, (0, 0, e - (r0 - a), e - (b - r1))), conv.weight, conv.bias, conv.stride, (0, e))
            out[:, :, r0:r1] = o.tanh_().mul_(self.range_factor).reshape(B, -1, r1 - r0, Wo).add_(base)
        return out

    __prepare_scriptable__ = not_scriptable

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, scale_factor={self.scale_factor}, k_u={self.k_u}, "
                f"n_groups={self.n_groups}, num_heads={self.num_heads}, rpb={self.rpb}, backend={self.backend!r}")
