"""The guided upsamplers of tiny-smart/detection-with-upsamplers, through `local_upsample`: SAPA and
SAPADeform (similarity-aware point affiliation, query from the high-resolution guide, key from the
low-resolution map) and FADE (reassembly kernels from both, an optional gate). Official signatures,
state-dict keys and initialisation; no compiled op (theirs are CUDA-only), any device, exportable.

Each takes the guide first, as the originals: `forward(y, x)` (SAPA, SAPADeform), `forward(en, de)`
(FADE), the guide exactly `scale_factor` times x in height and width."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .functional import check_backend, empty_output, local_upsample, not_scriptable
from .args import _check_input, _odd_int, _positive_int


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def _channels(names, guide, x) -> tuple[int, int]:
    """The guide's and x's channel counts, x's defaulting to the guide's (the originals' None)."""
    guide = _positive_int(names[0], guide)
    return guide, guide if x is None else _positive_int(names[1], x)


def _check_pair(guide, x, names, channels, scale: int, weight: torch.Tensor):
    """The guide and the map to upsample, each as a module input, the guide exactly scale times x in
    space."""
    _check_input(guide, channels[0], weight, names[0])
    _check_input(x, channels[1], weight, names[1])
    if guide.shape[0] != x.shape[0]:
        raise ValueError(f"{names[0]} has batch size {guide.shape[0]} but {names[1]} has {x.shape[0]}")
    H, W = x.shape[-2:]
    # two comparisons, not one on tuples: torch.export then records Ho = s*H and Wo = s*W apart
    if guide.shape[-2] != scale * H or guide.shape[-1] != scale * W:
        raise ValueError(f"{names[0]} must be scale_factor={scale} times {names[1]} in space, "
                         f"{(scale * H, scale * W)}, got {tuple(guide.shape[-2:])} for {names[1]} {(H, W)}")


def _init_normal(modules):
    """SAPA's _init_weights: convs N(0, 0.02) with zero bias (norms at their defaults)."""
    for m in modules:
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _SAPABase(nn.Module):
    """What SAPA and SAPADeform share: the arguments, the optional GroupNorms and the q/k projections."""

    def __init__(self, dim_y, dim_x, scale_factor, embedding_dim, heads, qkv_bias, norm, norm_groups, backend):
        super().__init__()
        self.dim_y, self.dim_x = dim_y, dim_x = _channels(("dim_y", "dim_x"), dim_y, dim_x)
        self.scale_factor = _positive_int("scale_factor", scale_factor)
        self.embedding_dim = _positive_int("embedding_dim", embedding_dim)
        self.norm, self.backend = _bool("norm", norm), check_backend(backend)
        _bool("qkv_bias", qkv_bias)
        if norm:
            norm_groups = _positive_int("norm_groups", norm_groups)
            for name, c in (("dim_y", dim_y), ("dim_x", dim_x)):
                if c % norm_groups:
                    raise ValueError(f"{name}={c} must be a multiple of norm_groups={norm_groups} (GroupNorm)")
            self.norm_y, self.norm_x = nn.GroupNorm(norm_groups, dim_y), nn.GroupNorm(norm_groups, dim_x)
        self.q = nn.Conv2d(dim_y, heads * embedding_dim, 1, bias=qkv_bias)
        self.k = nn.Conv2d(dim_x, heads * embedding_dim, 1, bias=qkv_bias)

    def init_weights(self):
        _init_normal(self.modules())

    def _embed(self, y, x):
        """(q, k, the normalised x that the key and offsets see), as the official forward."""
        _check_pair(y, x, ("y", "x"), (self.dim_y, self.dim_x), self.scale_factor, self.q.weight)
        if self.norm:
            y, x = self.norm_y(y), self.norm_x(x)
        return self.q(y), self.k(x), x

    __prepare_scriptable__ = not_scriptable


class SAPA(_SAPABase):
    """SAPA (Similarity-Aware Point Affiliation, NeurIPS 2022): output pixel (Y, X) is the softmax-weighted
    sum of the up_kernel_size x up_kernel_size window of x around its source pixel (Y//s, X//s), the
    weights softmax_n(q(Y, X) . k_n) with q = conv1x1(GroupNorm(y)) from the guide y [B, dim_y, sH, sW]
    and k = conv1x1(GroupNorm(x)) from x [B, dim_x, H, W]; no 1/sqrt(d), and a tap outside the map
    keeps logit 0 in the softmax (a zero key) and adds nothing (a zero value). Returns [B, dim_x, sH, sW].

    Keys, shapes and initialisation (convs N(0, 0.02), zero biases) are the official ones, so its
    state dicts load with strict=True. `norm_groups` (keyword only, default the official 32) sizes the
    GroupNorms for maps narrower than 32 channels.
    """

    def __init__(self, dim_y: int, dim_x=None, scale_factor: int = 2, up_kernel_size: int = 5,
                 embedding_dim: int = 32, qkv_bias: bool = True, norm: bool = True, backend: str = "auto", *,
                 norm_groups: int = 32):
        super().__init__(dim_y, dim_x, scale_factor, embedding_dim, 1, qkv_bias, norm, norm_groups, backend)
        self.up_kernel_size = _odd_int("up_kernel_size", up_kernel_size)
        self.init_weights()

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, _ = self._embed(y, x)
        size = tuple(y.shape[-2:])
        if x.shape[0] == 0:
            return empty_output((0, self.dim_x, *size), y, x, *self.parameters())
        return local_upsample(x, size, q=q, k=k, kernel_size=self.up_kernel_size, scale=1.0, coords="nearest",
                              padding="zeros", backend=self.backend)

    def extra_repr(self) -> str:
        return (f"dim_y={self.dim_y}, dim_x={self.dim_x}, scale_factor={self.scale_factor}, "
                f"up_kernel_size={self.up_kernel_size}, embedding_dim={self.embedding_dim}, norm={self.norm}, "
                f"backend={self.backend!r}")


class SAPADeform(_SAPABase):
    """SAPA's deformable form: each of `groups` channel groups (heads) of output pixel (Y, X) samples x
    bilinearly at num_point learned positions (Y//s, X//s) + offset, in input pixels, no base window,
    zeros outside the map, and sums them with softmax_n(q_g . k_g(p_n)) over its points; q =
    conv1x1(y) and k = conv1x1(x) carry embedding_dim channels per group, the offsets
    pixel_shuffle(conv1x1(x), s) (high_offset) or their nearest 2x upsampling, x before y per point.
    norm=True puts GroupNorms before q, k and the offsets as in SAPA. [B, dim_x, H, W] with the guide y
    [B, dim_y, sH, sW] -> [B, dim_x, sH, sW].

    Keys, shapes and initialisation (convs N(0, 0.02), zero biases: zero offsets, every point at the
    source pixel) are the official ones.
    """

    def __init__(self, dim_y: int, dim_x=None, scale_factor: int = 2, num_point: int = 9, groups: int = 4,
                 embedding_dim: int = 32, qkv_bias: bool = True, high_offset: bool = True, norm: bool = False,
                 backend: str = "auto", *, norm_groups: int = 32):
        G = _positive_int("groups", groups)
        super().__init__(dim_y, dim_x, scale_factor, embedding_dim, G, qkv_bias, norm, norm_groups, backend)
        self.num_point, self.groups = _positive_int("num_point", num_point), G
        self.high_offset = _bool("high_offset", high_offset)
        if self.dim_x % G:
            raise ValueError(f"groups={G} must divide dim_x={self.dim_x}")
        s = self.scale_factor
        self.offset = nn.Conv2d(self.dim_x, G * num_point * 2 * (s * s if high_offset else 1), 1, bias=qkv_bias)
        self.init_weights()

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, x_ = self._embed(y, x)
        size, s, (G, P) = tuple(y.shape[-2:]), self.scale_factor, (self.groups, self.num_point)
        if x.shape[0] == 0:
            return empty_output((0, self.dim_x, *size), y, x, *self.parameters())
        off = self.offset(x_)
        off = F.pixel_shuffle(off, s) if self.high_offset else F.interpolate(off, size=size, mode="nearest")
        # channel (g*P + n)*2 + (x|y) -> the op's g*2P + 2n + (y|x)
        off = off.unflatten(1, (G * P, 2)).flip(2).flatten(1, 2)
        return local_upsample(x, size, offset=off, q=q, k=k, num_groups=G, num_heads=G, scale=1.0,
                              coords="nearest", padding="zeros", backend=self.backend)

    def extra_repr(self) -> str:
        return (f"dim_y={self.dim_y}, dim_x={self.dim_x}, scale_factor={self.scale_factor}, "
                f"num_point={self.num_point}, groups={self.groups}, embedding_dim={self.embedding_dim}, "
                f"high_offset={self.high_offset}, norm={self.norm}, backend={self.backend!r}")


class _KernelGenerator(nn.Module):
    """FADE's SemiShift under its keys: the two compressors (the decoder's without bias) and the shared
    content encoder."""

    def __init__(self, c_en: int, c_de: int, kk: int, embedding_dim: int = 64, kernel_size: int = 3):
        super().__init__()
        self.compressor_en = nn.Conv2d(c_en, embedding_dim, 1)
        self.compressor_de = nn.Conv2d(c_de, embedding_dim, 1, bias=False)
        self.content_encoder = nn.Conv2d(embedding_dim, kk, kernel_size, padding=kernel_size // 2)


class _GateGenerator(nn.Module):
    def __init__(self, c_de: int):
        super().__init__()
        self.conv = nn.Conv2d(c_de, 1, 1)


class FADE(nn.Module):
    """FADE (Fusing the Assets of Decoder and Encoder, ECCV 2022): CARAFE's reassembly of the decoder
    map de [B, in_channels_de, H, W] (the up_kernel_size window around each output pixel's source pixel
    (Y//s, X//s), zeros outside) with kernels softmax over the window of

        content_encoder(compressor_en(en)) + nearest_s(content_encoder(compressor_de(de))),

    the encoder map en [B, in_channels_en, sH, sW] the guide (the content encoder's bias counted twice,
    as in the original). With `gating`, g * en + (1 - g) * reassembled, g = sigmoid(nearest_s(conv1x1(de)))
    (then en and de have the same channels). Returns [B, in_channels_de, sH, sW].

    Keys, shapes and initialisation (xavier-uniform convs, zero biases) are the official ones;
    `embedding_dim` (keyword only) is the compressors' width, fixed at the official 64 there. The
    original upsamples its decoder terms by 2 whatever scale_factor is, so it runs at 2 only; here they
    follow scale_factor (the same at 2).
    """

    def __init__(self, in_channels_en: int, in_channels_de=None, scale_factor: int = 2, up_kernel_size: int = 5,
                 gating: bool = False, backend: str = "auto", *, embedding_dim: int = 64):
        super().__init__()
        self.in_channels_en, self.in_channels_de = c_en, c_de = _channels(("in_channels_en", "in_channels_de"),
                                                                          in_channels_en, in_channels_de)
        self.scale_factor = _positive_int("scale_factor", scale_factor)
        self.up_kernel_size = _odd_int("up_kernel_size", up_kernel_size)
        self.gating, self.backend = _bool("gating", gating), check_backend(backend)
        if gating and c_en != c_de:
            raise ValueError(f"gating=True mixes en and the output: in_channels_en={c_en} must equal "
                             f"in_channels_de={c_de}")
        if gating:
            self.gate_generator = _GateGenerator(c_de)
        self.ker_generator = _KernelGenerator(c_en, c_de, up_kernel_size ** 2,
                                              _positive_int("embedding_dim", embedding_dim))
        self.init_weights()

    def init_weights(self):
        """The official: mmengine's xavier_init(distribution='uniform') on every conv (zero bias)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, en: torch.Tensor, de: torch.Tensor) -> torch.Tensor:
        gen = self.ker_generator
        _check_pair(en, de, ("en", "de"), (self.in_channels_en, self.in_channels_de), self.scale_factor,
                    gen.compressor_en.weight)
        size, k = tuple(en.shape[-2:]), self.up_kernel_size
        if de.shape[0] == 0:
            return empty_output((0, self.in_channels_de, *size), en, de, *self.parameters())
        # the op's softmax normalises these logits over the window on the fly
        logits = gen.content_encoder(gen.compressor_en(en)) + F.interpolate(
            gen.content_encoder(gen.compressor_de(de)), size=size, mode="nearest")
        up = local_upsample(de, size, logits=logits.unsqueeze(1), kernel_size=k, coords="nearest", padding="zeros",
                            backend=self.backend)
        if not self.gating:
            return up
        gate = torch.sigmoid(F.interpolate(self.gate_generator.conv(de), size=size, mode="nearest"))
        return gate * en + (1 - gate) * up

    __prepare_scriptable__ = not_scriptable

    def extra_repr(self) -> str:
        return (f"in_channels_en={self.in_channels_en}, in_channels_de={self.in_channels_de}, "
                f"scale_factor={self.scale_factor}, up_kernel_size={self.up_kernel_size}, gating={self.gating}, "
                f"backend={self.backend!r}")
