"""NAF (valeoai/NAF, "Neighborhood Attention Filtering") with the official parameter and buffer names,
its attention through `local_upsample`: the queries are an encoding of the image at the output size,
the keys that encoding pooled to the features' size, the values the features; each output pixel
attends to the kernel_size x kernel_size keys around its source pixel, the window clamped into the map."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .args import _check_input, _odd_int, _output_size, _positive_int
from .dispatch import FLOAT_DTYPES, check_backend
from .functional import empty_output, local_upsample, not_scriptable


class _EncBlock(nn.Module):
    """norm, SiLU, conv, norm, SiLU, conv: the official EncBlock as NAF builds it (in = out channels, no
    residual, so no shortcut)."""

    def __init__(self, channels: int, kernel_size: int, num_groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="reflect")
        self.norm2 = nn.GroupNorm(num_groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="reflect")

    def forward(self, x):
        x = self.conv1(F.silu(self.norm1(x)))
        return self.conv2(F.silu(self.norm2(x)))


def _encoder(in_channels: int, channels: int, kernel_size: int, num_layers: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="reflect"),
        *[_EncBlock(channels, kernel_size) for _ in range(num_layers)])


class _RoPE(nn.Module):
    """Axial rotary embedding over `num_heads` heads of D_head channels: per head, channel i < D_head/2
    pairs with i + D_head/2 and turns by 2 pi c / periods[i mod D_head/4], c the pixel's row coordinate for
    the first D_head/4 pairs, its column coordinate for the next, coordinates of pixel centres in [-1, 1].
    Training multiplies the coordinates by a log-uniform factor in [1/rescale, rescale]."""

    def __init__(self, dim: int, num_heads: int, base: float, rescale=None):
        super().__init__()
        self.num_heads, self.rescale = num_heads, rescale
        d_head = dim // num_heads
        # the official computes its periods in the default dtype and keeps them in state dicts
        self.register_buffer("periods", base ** (2 * torch.arange(d_head // 4) / (d_head // 2)))

    def forward(self, x):
        B, C, H, W = x.shape
        # the official makes the coordinates in the default dtype whatever the periods' dtype
        ch = torch.arange(0.5, H, device=x.device) / H * 2 - 1
        cw = torch.arange(0.5, W, device=x.device) / W * 2 - 1
        coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), -1).flatten(0, 1)  # [HW, 2]
        if self.training and self.rescale is not None:
            bound = math.log(self.rescale)
            coords = coords * torch.empty(1, device=x.device).uniform_(-bound, bound).exp()
        angles = (2 * math.pi * coords[:, :, None] / self.periods).flatten(1).tile(2)  # [HW, D_head]
        x = x.reshape(B, self.num_heads, -1, H * W).transpose(-1, -2)  # [B, n, HW, D_head]
        x1, x2 = x.chunk(2, -1)
        x = x * angles.cos() + torch.cat((-x2, x1), -1) * angles.sin()
        return x.transpose(-1, -2).reshape(B, C, H, W)


class _ImageEncoder(nn.Module):
    def __init__(self, dim: int, heads_rope: int, rope_base: float, rope_rescale, img_layers: int):
        super().__init__()
        self.encoder = _encoder(3, dim // 2, 1, img_layers)
        self.sem_encoder = _encoder(3, dim // 2, 3, img_layers)
        self.rope = _RoPE(dim, heads_rope, rope_base, rope_rescale)

    def forward(self, image, size):
        Ho, Wo = size
        H, W = image.shape[-2:]
        if H > 4 * Ho or W > 4 * Wo:  # the official's bound: each side at most 4x the smaller output side
            image = F.interpolate(image, size=(min(H, 4 * Ho, 4 * Wo), min(W, 4 * Wo, 4 * Ho)), mode="bilinear",
                                  align_corners=False)
        x = torch.cat((self.encoder(image), self.sem_encoder(image)), 1)
        return self.rope(F.adaptive_avg_pool2d(x, size))


class _NeighborhoodAttention(nn.Module):
    """The official CrossAttention (no parameters): per head, softmax(scale * q . k) over the window of
    local_upsample's window="clamped", applied to v."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int, backend: str):
        super().__init__()
        self.num_heads, self.kernel_size, self.backend = num_heads, kernel_size, backend
        self.scale = (dim // num_heads) ** -0.5

    def forward(self, q, k, v):
        return local_upsample(v.to(q.dtype), q.shape[-2:], q=q, k=k, num_heads=self.num_heads, scale=self.scale,
                              kernel_size=self.kernel_size, coords="nearest", window="clamped", backend=self.backend)


class NAF(nn.Module):
    """Upsamples features [B, C, h, w] to output_size (Ho, Wo), guided by the image [B, 3, H, W]:

        x = RoPE(adaptive_avg_pool((encoder(image), sem_encoder(image)), (Ho, Wo)))   # dim channels
        out[:, head, Y, X] = sum_n softmax_n(scale * x_head[Y, X] . k_head[n]) features_head[n]

    with k = adaptive_avg_pool(x, (h, w)), heads_attn heads (q/k channels head*dim/heads_attn..,
    feature channels head*C/heads_attn..), scale = (dim // heads_attn) ** -0.5, and n over the
    kernel_size x kernel_size feature pixels around output pixel (Y, X)'s nearest source pixel, the window
    shifted to lie inside the map. An image more than 4x the output on a side is first resized (bilinear)
    to at most 4x the smaller output side.

    The official copies k and v to the output size (nearest-exact) and runs NATTEN with dilation
    (Ho // h, Wo // w) on the copies; where Ho and Wo are multiples of h and w this is the same attention,
    which `local_upsample` computes reading k and v at their own size. At other sizes the window centres
    differ (nearest here, NATTEN's dilation groups there).

    Parameter and buffer names are the official ones (image_encoder.encoder, image_encoder.sem_encoder,
    image_encoder.rope.periods; the attention has none), so official state dicts load with strict=True.
    Extra keyword arguments are ignored, as the official does. The coordinate rescaling of training is drawn
    anew at every forward.
    """

    def __init__(self, dim: int = 256, heads_attn: int = 4, heads_rope: int = 4, kernel_size: int = 9,
                 use_encoder: bool = True, rope_base: float = 100.0, rope_rescale=2.0, img_layers: int = 2,
                 backend: str = "auto", **kwargs):
        super().__init__()
        dim = _positive_int("dim", dim)
        heads_attn = _positive_int("heads_attn", heads_attn)
        heads_rope = _positive_int("heads_rope", heads_rope)
        _odd_int("kernel_size", kernel_size)
        if isinstance(img_layers, bool) or not isinstance(img_layers, int) or img_layers < 0:
            raise ValueError(f"img_layers must be a non-negative int, got {img_layers!r}")
        if dim % heads_attn:
            raise ValueError(f"heads_attn={heads_attn} must divide dim={dim}")
        if dim % (4 * heads_rope):
            raise ValueError(f"4 * heads_rope = {4 * heads_rope} must divide dim={dim} (RoPE turns pairs of "
                             f"channels by row and column)")
        if dim % 16:
            raise ValueError(f"dim={dim} must be a multiple of 16 (each encoder's dim/2 channels in 8 groups)")
        if use_encoder is not True:
            # without the encoders the image's 3 channels reach RoPE, which rotates dim channels: the official
            # fails there for every dim
            raise ValueError(f"use_encoder must be True (the queries need dim channels), got {use_encoder!r}")
        if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or not 0 < rope_base < math.inf:
            raise ValueError(f"rope_base must be a positive number, got {rope_base!r}")
        if rope_rescale is not None and (isinstance(rope_rescale, bool) or not isinstance(rope_rescale, (int, float))
                                         or not 1 <= rope_rescale < math.inf):
            raise ValueError(f"rope_rescale must be None or a number >= 1, got {rope_rescale!r}")
        check_backend(backend)
        self.dim, self.heads_attn, self.heads_rope, self.kernel_size = dim, heads_attn, heads_rope, kernel_size
        self.image_encoder = _ImageEncoder(dim, heads_rope, float(rope_base), rope_rescale, img_layers)
        self.upsampler = _NeighborhoodAttention(dim, heads_attn, kernel_size, backend)

    @property
    def backend(self) -> str:
        return self.upsampler.backend

    @backend.setter
    def backend(self, value: str):
        self.upsampler.backend = check_backend(value)

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        weight = self.image_encoder.encoder[0].weight
        _check_input(image, 3, weight, "image")
        size = _output_size(output_size)
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if features.dim() != 4 or features.shape[0] != image.shape[0]:
            raise ValueError(f"features must be (B, C, h, w) with the image's batch {image.shape[0]}, got "
                             f"{tuple(features.shape)}")
        if features.dtype not in FLOAT_DTYPES:
            raise TypeError(f"features must be a floating-point tensor, one of {FLOAT_DTYPES}, got {features.dtype}")
        if features.device != image.device:
            raise ValueError(f"features are on {features.device} but the image on {image.device}")
        C, h, w = features.shape[1:]
        if C == 0 or C % self.heads_attn:
            raise ValueError(f"heads_attn={self.heads_attn} must divide the features' channels, got {C}")
        if self.kernel_size > h or self.kernel_size > w:
            raise ValueError(f"kernel_size={self.kernel_size} exceeds the features' map {h}x{w}: every query "
                             f"attends to kernel_size x kernel_size feature pixels")
        if image.shape[-2] < 2 or image.shape[-1] < 2:
            raise ValueError(f"image must be at least 2x2 (the encoders pad by reflection), got {tuple(image.shape)}")
        if image.shape[0] == 0:
            return empty_output((0, C, *size), image, features, *self.parameters())
        x = self.image_encoder(image, size)
        return self.upsampler(x, F.adaptive_avg_pool2d(x, (h, w)), features)

    __prepare_scriptable__ = not_scriptable

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads_attn={self.heads_attn}, heads_rope={self.heads_rope}, "
                f"kernel_size={self.kernel_size}, backend={self.backend!r}")
