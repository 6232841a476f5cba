"""LDA-AQU as an nn.Module with the official parameter names, shapes and initialisation."""
from __future__ import annotations

import fractions
import functools
import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu as _cpu
from . import cpu_cache
from .args import _check_input, _empty_batch, _odd_int, _positive_int, _size_arg
from .banded import _bands, _Recomputed
from .bilinear import BilinearAlignCorners
from .dispatch import can_run_native, capture, check_backend, traced
from .functional import deformable_local_attention, not_scriptable
from .layernorm import LayerNormProxy, _layer_norm_channels


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
        if capture(modes=False):
            # the graph compile and export take: every branch output kept, no bands
            return q, k, self._offset_band(q, 0, Ho, Ho, *params)
        rows = Ho
        row_bytes = q.element_size() * Wo * (3 * D + 2 * G * self.k_u ** 2)  # q, h and o of a row, h padded
        if q.device.type == "cpu" and not traced() and isinstance(Ho * Wo, int) and Ho * row_bytes > 4 * OFFSET_BAND_BYTES:
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
        if not torch.is_grad_enabled() and can_run_native(h, w, b) is None:
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
