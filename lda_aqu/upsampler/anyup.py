"""AnyUp ("Universal Feature Upsampling", ICLR 2026): upsamples the features of any vision encoder to any
resolution, guided by the image. Official signature, submodule and parameter names (wimmerth/anyup's
AnyUp with its dense window attention), so its checkpoints load with strict=True.

The image is encoded and rotated by a 2D RoPE; queries are that encoding pooled to the output size, keys
the encoding pooled to the feature size joined with a unification of the features; each output pixel
averages, over the heads, its softmax over the keys in AnyUp's window and applies it to the features
themselves (no value or output projection): `local_upsample(..., window_ratio=r, average_heads=True)`."""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .args import _output_size, _positive_int
from .dispatch import FLOAT_DTYPES, autocasting, check_backend, refuse_jit
from .functional import _check_extent, empty_output, local_upsample, not_scriptable


class ResBlock(nn.Module):
    """(GroupNorm, SiLU, conv) twice plus a shortcut, a 1x1 conv when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, num_groups: int = 8):
        super().__init__()
        pad = kernel_size // 2
        self.block = nn.Sequential(
            nn.GroupNorm(num_groups, in_channels), nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=pad, padding_mode="reflect", bias=False),
            nn.GroupNorm(num_groups, out_channels), nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size, padding=pad, padding_mode="reflect", bias=False),
        )
        self.shortcut = (nn.Identity() if in_channels == out_channels else
                         nn.Conv2d(in_channels, out_channels, 1, bias=False))

    def forward(self, x):
        return self.block(x) + self.shortcut(x)


def gaussian_derivative_basis(order: int, kernel_size: int) -> torch.Tensor:
    """2D Gaussian derivative filters d^o/dy^(o-i) dx^i G for o = 0..order, i = 0..o: [(order+1)(order+2)/2,
    k, k], sigma = (k//2) / 1.645, each 1D factor (-1)^n He_n(x/sigma) G(x) (probabilists' Hermite, no
    1/sigma^n gain)."""
    sigma = (kernel_size // 2) / 1.645
    z = torch.arange(-(kernel_size // 2), kernel_size // 2 + 1, dtype=torch.float32) / sigma
    g = torch.exp(-0.5 * z ** 2) / (sigma * math.sqrt(2 * math.pi))
    he = [torch.ones_like(z), z]
    for n in range(1, order):
        he.append(z * he[n] - n * he[n - 1])
    d = [(-1) ** n * he[n] * g for n in range(order + 1)]
    return torch.stack([torch.outer(d[o - i], d[i]) for o in range(order + 1) for i in range(o + 1)])


class LearnedFeatureUnification(nn.Module):
    """Maps features with any channel count C to `out_channels`: each channel is filtered by every basis
    kernel (zero padding, divided by the count of taps inside the map), the [C * out_channels] responses,
    laid out channel-major as a grouped convolution gives them, are read as [out_channels, C], softmaxed
    over the first axis and averaged over the second."""

    def __init__(self, out_channels: int, kernel_size: int = 3, init_gaussian_derivatives: bool = False):
        super().__init__()
        self.out_channels, self.kernel_size = out_channels, kernel_size
        if init_gaussian_derivatives:
            order = 0
            while (order + 1) * (order + 2) // 2 < out_channels:
                order += 1
            basis = gaussian_derivative_basis(order, kernel_size)[:out_channels, None]
        else:
            basis = torch.randn(out_channels, 1, kernel_size, kernel_size)
        self.basis = nn.Parameter(basis)

    def forward(self, x):
        B, C, H, W = x.shape
        p = self.kernel_size // 2
        y = F.conv2d(F.pad(x, (p, p, p, p)), self.basis.repeat(C, 1, 1, 1), groups=C)
        taps = F.conv2d(F.pad(x.new_ones(1, 1, H, W), (p, p, p, p)), x.new_ones(1, 1, self.kernel_size,
                                                                                 self.kernel_size))
        y = (y / taps).view(B, self.out_channels, C, H, W)
        return y.softmax(1).mean(2)


class RoPE(nn.Module):
    """2D rotary encoding of a [B, dim, H, W] map at coordinates (linspace(0, 1, H), linspace(0, 1, W)):
    channel c turns by y * freqs[0, c] + x * freqs[1, c], paired with channel c +- dim/2."""

    def __init__(self, dim: int, theta: int = 100):
        super().__init__()
        self.dim, self.theta = dim, theta
        self.freqs = nn.Parameter(torch.empty(2, dim))
        self.reset_parameters()

    def reset_parameters(self):
        """theta ** -t for t in linspace(0, 1, dim/4), twice: rows on the first half, columns on the second."""
        f = self.theta ** torch.linspace(0, -1, self.dim // 4)
        f = torch.cat([f, f]) * 2 * math.pi
        with torch.no_grad():
            self.freqs.zero_()
            self.freqs[0, :self.dim // 2] = f
            self.freqs[1, self.dim - self.dim // 2:] = f

    def forward(self, x):
        H, W = x.shape[-2:]
        ys = torch.linspace(0, 1, H, dtype=x.dtype, device=x.device)
        xs = torch.linspace(0, 1, W, dtype=x.dtype, device=x.device)
        angle = ys[:, None, None] * self.freqs[0] + xs[None, :, None] * self.freqs[1]  # [H, W, dim]
        angle = angle.permute(2, 0, 1)
        x1, x2 = x.chunk(2, dim=1)
        return x * angle.cos() + torch.cat((-x2, x1), 1) * angle.sin()


class CrossAttention(nn.Module):
    """RMS-normalised queries and keys and the in-projection of an nn.MultiheadAttention (kept whole for
    its checkpoint keys: its value and output projections take no part, the features are applied as they
    are)."""

    def __init__(self, qk_dim: int, num_heads: int):
        super().__init__()
        self.norm_q = nn.RMSNorm(qk_dim)
        self.norm_k = nn.RMSNorm(qk_dim)
        self.attention = nn.MultiheadAttention(qk_dim, num_heads, dropout=0.0, batch_first=True)

    def project(self, x, norm, part: int):
        """x [B, D, H, W] normalised over its channels and projected by rows part*D.. of in_proj."""
        D = x.shape[1]
        w = self.attention.in_proj_weight[part * D:(part + 1) * D]
        b = self.attention.in_proj_bias[part * D:(part + 1) * D]
        return F.linear(norm(x.permute(0, 2, 3, 1)), w, b).permute(0, 3, 1, 2)

    def forward(self, q, k, v, window_ratio: float, backend: str):
        nh = self.attention.num_heads
        q, k = self.project(q, self.norm_q, 0), self.project(k, self.norm_k, 1)
        return local_upsample(v, tuple(q.shape[-2:]), q=q, k=k, num_heads=nh, scale=(q.shape[1] // nh) ** -0.5,
                              window_ratio=window_ratio, average_heads=True, backend=backend)


class CrossAttentionBlock(nn.Module):
    """A 3x3 conv on the queries, then the window cross-attention."""

    def __init__(self, qk_dim: int, num_heads: int, window_ratio: float = 0.1):
        super().__init__()
        self.cross_attn = CrossAttention(qk_dim, num_heads)
        self.window_ratio = window_ratio
        self.conv2d = nn.Conv2d(qk_dim, qk_dim, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, q, k, v, backend: str = "auto"):
        # a ratio <= 0 is the official "no mask"; a ratio of 1 makes every window the whole map
        r = self.window_ratio if self.window_ratio > 0 else 1.0
        return self.cross_attn(self.conv2d(q), k, v, r, backend)


def _check_map(name: str, x, channels, weight: torch.Tensor):
    refuse_jit()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or (channels is not None and x.shape[1] != channels):
        raise ValueError(f"{name} must be (B, {channels or 'C'}, H, W), got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, one of {FLOAT_DTYPES}, got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{name} is on {x.device} but the module's parameters are on {weight.device}: move one "
                         f"to the other (module.to({name}.device))")
    if x.dtype != weight.dtype and not autocasting(x.device.type):
        raise TypeError(f"{name} has dtype {x.dtype} but the module's parameters are {weight.dtype}: convert the "
                        f"module (module.to({x.dtype})) or the input ({name}.to({weight.dtype}))")
    _check_extent(name, x)


class AnyUp(nn.Module):
    """AnyUp: `forward(image, features, output_size=None)` upsamples features [B, C, h, w] (any C) to
    output_size (default: the image's size) guided by image [B, input_dim, H, W].

    The arguments are the official ones. `use_natten=True` (their NATTEN variant, on other windows) is not
    reproduced; its checkpoints are the dense model's, which this module loads. `kernel_size` is the image
    encoder's first conv, `kernel_size_lfu` (odd) the feature unification's, `lfu_dim` its channel count
    (qk_dim by default); qk_dim and lfu_dim are multiples of 8 (the GroupNorm groups), qk_dim of num_heads.
    `window_ratio` r: output pixel (Y, X) of an (Ho, Wo) output sees the feature rows
    [floor((Y+.5)/Ho - r) * h, ceil((Y+.5)/Ho + r) * h) (clamped to [0, 1] before scaling), columns alike;
    r <= 0 sees the whole map. Other keyword arguments are accepted and ignored, as the original does.
    """

    def __init__(self, input_dim: int = 3, qk_dim: int = 128, kernel_size: int = 1, kernel_size_lfu: int = 5,
                 window_ratio: float = 0.1, num_heads: int = 4, init_gaussian_derivatives: bool = False,
                 use_natten: bool = False, lfu_dim=None, *, backend: str = "auto", **kwargs):
        super().__init__()
        input_dim = _positive_int("input_dim", input_dim)
        qk_dim = _positive_int("qk_dim", qk_dim)
        kernel_size = _positive_int("kernel_size", kernel_size)
        kernel_size_lfu = _positive_int("kernel_size_lfu", kernel_size_lfu)
        num_heads = _positive_int("num_heads", num_heads)
        lfu_dim = qk_dim if lfu_dim is None else _positive_int("lfu_dim", lfu_dim)
        if qk_dim % 8 or qk_dim % num_heads:
            raise ValueError(f"qk_dim must be a multiple of 8 (GroupNorm's groups) and of num_heads={num_heads}, "
                             f"got {qk_dim}")
        if lfu_dim % 8:
            raise ValueError(f"lfu_dim must be a multiple of 8 (GroupNorm's groups), got {lfu_dim}")
        if kernel_size_lfu % 2 == 0:
            raise ValueError(f"kernel_size_lfu must be odd, got {kernel_size_lfu}")
        if isinstance(window_ratio, bool) or not isinstance(window_ratio, numbers.Real) \
                or not math.isfinite(window_ratio):
            raise ValueError(f"window_ratio must be a finite float (<= 0: no window), got {window_ratio!r}")
        for name, flag in (("init_gaussian_derivatives", init_gaussian_derivatives), ("use_natten", use_natten)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        if init_gaussian_derivatives and kernel_size_lfu < 3:
            raise ValueError(f"init_gaussian_derivatives needs kernel_size_lfu >= 3, got {kernel_size_lfu}")
        if use_natten:
            raise NotImplementedError("use_natten=True (the NATTEN variant, on other windows) is not reproduced; "
                                      "its checkpoints are the dense model's: load them with use_natten=False")
        check_backend(backend)
        self.qk_dim, self.lfu_dim, self.num_heads = qk_dim, lfu_dim, num_heads
        self.window_ratio = float(window_ratio)
        self.backend = backend

        self.image_encoder = self._encoder(nn.Conv2d(input_dim, qk_dim, kernel_size, padding=kernel_size // 2,
                                                     padding_mode="reflect", bias=False))
        self.key_encoder = self._encoder(nn.Conv2d(qk_dim, qk_dim, 1, bias=False))
        self.query_encoder = self._encoder(nn.Conv2d(qk_dim, qk_dim, 1, bias=False))
        self.key_features_encoder = self._encoder(
            LearnedFeatureUnification(lfu_dim, kernel_size_lfu, init_gaussian_derivatives), lfu_dim)
        self.cross_decode = CrossAttentionBlock(qk_dim, num_heads, self.window_ratio)
        self.aggregation = self._encoder(nn.Conv2d(2 * qk_dim, qk_dim, 3, padding=1, padding_mode="reflect",
                                                   bias=False))
        self.rope = RoPE(qk_dim)

    def _encoder(self, first: nn.Module, channels=None) -> nn.Sequential:
        return nn.Sequential(first, ResBlock(channels or self.qk_dim, self.qk_dim), ResBlock(self.qk_dim, self.qk_dim))

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size=None) -> torch.Tensor:
        weight = self.rope.freqs
        _check_map("image", image, self.image_encoder[0].in_channels, weight)
        _check_map("features", features, None, weight)
        if image.shape[0] != features.shape[0]:
            raise ValueError(f"image has batch size {image.shape[0]} but features has {features.shape[0]}")
        size = tuple(image.shape[-2:]) if output_size is None else _output_size(output_size)
        if image.shape[0] == 0:
            return empty_output((0, features.shape[1], *size), features, image, *self.parameters())
        enc = self.rope(self.image_encoder(image))
        q = F.adaptive_avg_pool2d(self.query_encoder(enc), size)
        k = F.adaptive_avg_pool2d(self.key_encoder(enc), features.shape[-2:])
        k = self.aggregation(torch.cat([k, self.key_features_encoder(F.normalize(features, dim=1))], 1))
        return self.cross_decode(q, k, features, self.backend)

    __prepare_scriptable__ = not_scriptable

    def extra_repr(self) -> str:
        return (f"qk_dim={self.qk_dim}, lfu_dim={self.lfu_dim}, num_heads={self.num_heads}, "
                f"window_ratio={self.window_ratio}, backend={self.backend!r}")
