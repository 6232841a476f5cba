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

from .functional import (FLOAT_DTYPES, _check_extent, autocast_available, autocasting, check_backend,
                         deformable_local_attention, empty_output, not_scriptable, refuse_jit)
from ..kernels import cpu as _cpu
from ..kernels.layout import unit_align_corners

from . import cpu_cache

from .torch_path import _traced, is_exporting, refuse_double_backward


class LayerNormProxy(nn.Module):
    """LayerNorm over the channels of a [B, C, H, W] map (official name: keys end in .norm.*)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return _layer_norm_channels(x, self.norm.weight, self.norm.bias, self.norm.eps)


def _layer_norm_channels(x, weight, bias, eps):
    if _native(x, weight):  # no graph to keep: one pass in NCHW, no permuted copies
        return _ln_forward(x, weight, bias, eps)
    if torch.is_grad_enabled() and _native_ok(x, weight, modes=True) and bias.dtype == x.dtype:
        if _traced():  # a dispatch mode (the bench's fake trace): the op it sees, keeping what eager keeps
            return torch.ops.lda_aqu.layer_norm_channels(x, weight, bias, eps)
        return _LayerNormChannels.apply(x, weight, bias, eps)
    # the affine after the permute back, so that the result is not a view (see LDAAQU.forward)
    xn = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=eps).permute(0, 3, 1, 2)
    return torch.addcmul(bias[:, None, None], xn, weight[:, None, None])


def _empty_like_on(shape, like: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor of like's dtype and device; eager CPU ones from the CPU cache."""
    if like.device.type == "cpu" and not _traced():
        return cpu_cache.empty(shape, like.dtype)
    return like.new_empty(shape)


def _native_ok(x, weight, modes=False) -> bool:
    """Whether a native CPU kernel may stand in for torch's ops on x (and weight): eager fp32/fp64, and
    under dispatch modes (fake tensors) too where `modes`; never while compiling or exporting."""
    traced = torch.compiler.is_compiling() or is_exporting() if modes else _traced()
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype \
        and not autocasting("cpu") and not traced and _cpu.unavailable() is None


def _native(x, weight) -> bool:
    """Whether a native CPU kernel without autograd may stand in for torch's ops on x (and weight)."""
    return not torch.is_grad_enabled() and _native_ok(x, weight)


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
                and not autocasting("cpu") and not _traced():
            # F.interpolate's kernel into a cached buffer: q is the largest map of the module's own
            return torch._C._nn.upsample_bilinear2d(x, size, True, out=_empty_like_on((*x.shape[:2], *size), x))
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
                    dq = _empty_like_on(q.shape, q).zero_() if dq is None else dq
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
            out = _empty_like_on((*o.shape[:2], Ho, o.shape[3]), o)
        # (torch.tanh(..., out=) into the strided rows cost more than this copy at 1024x1024)
        out[:, :, r0:r1] = o
    return out


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


# the offset branch's working set per band of rows (LDAAQU._offset_band), about a
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
        dw, ln, gelu, conv = self.conv_offset
        params = (dw.weight, ln.norm.weight, ln.norm.bias, conv.weight, conv.bias)
        if torch.compiler.is_compiling() or is_exporting() or torch.jit.is_tracing():
            # the graph compile and export take: every branch output kept, no bands
            return q, k, self._offset_band(q, 0, Ho, Ho, *params)
        rows = Ho
        row_bytes = q.element_size() * Wo * (3 * D + 2 * G * self.k_u ** 2)  # q, h and o of a row, h padded
        if q.device.type == "cpu" and not _traced() and isinstance(Ho * Wo, int) and Ho * row_bytes > 4 * OFFSET_BAND_BYTES:
            rows = max(8, OFFSET_BAND_BYTES // row_bytes)
        if torch.is_grad_enabled():
            # eager training: the branch's outputs (h, the layer norm's, GELU's and tanh's: 4 maps of D and 2GK
            # channels at output resolution) would be kept for backward; recomputing it there keeps only q
            return q, k, _Recomputed.apply(self._offset_band, self._band_reads, rows, q, *params)
        return q, k, _bands(self._offset_band, self._band_reads, rows, q, params)

    def _band_reads(self, Ho: int, r0: int, r1: int) -> tuple[int, int]:
        """The rows of q that offset rows r0:r1 read: the offset conv's and the depth-wise conv's halos."""
        e, d = self.conv_offset[3].padding[0], self.conv_offset[0].padding[0]
        return max(0, r0 - e - d), min(Ho, r1 + e + d)

    def _offset_band(self, qs, r0: int, r1: int, Ho: int, dw_w, ln_w, ln_b, w, b):
        """Offset rows r0:r1 of a map of Ho rows from qs, q's rows _band_reads(Ho, r0, r1): halo rows come
        from the map, zero rows only past its edges, so that bands give the whole-map branch's result
        (whole-map convs cost 4-5x more per pixel at 1024x1024 than at 128x128 on CPU: a band runs in cache)."""
        dw, conv = self.conv_offset[0], self.conv_offset[3]
        wt = dw_w.repeat(self.n_groups, 1, 1, 1)
        if r0 == 0 and r1 == Ho:  # the whole map: the convs' own zero padding
            h = F.conv2d(qs, wt, padding=dw.padding, groups=self.hidden_dim)
            return self._offset_rows(h, ln_w, ln_b, w, b)
        e, d = conv.padding[0], dw.padding[0]
        qa, qb = self._band_reads(Ho, r0, r1)
        a, b_ = max(0, r0 - e), min(Ho, r1 + e)  # the rows of h the band's offset conv reads
        h = F.conv2d(F.pad(qs, (0, 0, d - (a - qa), d - (qb - b_))), wt, padding=(0, d), groups=self.hidden_dim)
        return self._offset_rows(h, ln_w, ln_b, w, b, (e - (r0 - a), e - (b_ - r1)))

    def _offset_rows(self, h, ln_w, ln_b, w, b, pad=None):
        """The offset branch after the depth-wise conv, base grid included: h [B, D, rows, Wo] -> offsets
        [B, G*2K, rows - pad's, Wo]; pad: the zero rows above and below h (None: the offset conv's own
        padding)."""
        B, D, rows, Wo = h.shape
        G = self.n_groups
        _, ln, gelu, conv = self.conv_offset
        h = F.gelu(_layer_norm_channels(h.reshape(B * G, D // G, rows, Wo), ln_w, ln_b, ln.norm.eps),
                   approximate=gelu.approximate)
        base = self.base_offset.to(h.dtype)
        if _native(h, w) and b.dtype == h.dtype:
            # no graph to keep (inference, or the recomputed branch's forward): conv, tanh, scale and base
            # in one pass; oneDNN's conv and torch's CPU tanh (2.5 ns an element) were a third of the
            # module's forward on small maps
            o = _cpu.offset_conv_head(h, w, b, base.view(-1), self.range_factor, pad, empty=cpu_cache.empty)
            return o.reshape(B, -1, *o.shape[2:])
        if pad is None:
            o = F.conv2d(h, w, b, conv.stride, conv.padding)
        else:
            o = F.conv2d(F.pad(h, (0, 0, *pad)), w, b, conv.stride, (0, conv.padding[1]))
        base = base.repeat(1, G, 1, 1)
        if torch.is_grad_enabled():
            return (o.tanh() * self.range_factor).reshape(B, -1, *o.shape[2:]) + base
        # no graph to keep: in place, two passes fewer
        return o.tanh_().mul_(self.range_factor).reshape(B, -1, *o.shape[2:]).add_(base)

    __prepare_scriptable__ = not_scriptable

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, scale_factor={self.scale_factor}, k_u={self.k_u}, "
                f"n_groups={self.n_groups}, num_heads={self.num_heads}, rpb={self.rpb}, backend={self.backend!r}")
