"""DySample ("Learning to Upsample by Learning to Sample", ICCV 2023) with the official parameters and
buffers, through `local_upsample`: one bilinear sample per output pixel and channel group, at a learned
offset from its half-pixel position, border padding."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import _check_input, _empty_batch, _positive_int, _same_size, _size_arg
from .dispatch import autocasting, check_backend, choose
from .functional import local_upsample, not_scriptable
from .torch_path import one_sample

STYLES = ("lp", "pl")


class DySample(nn.Module):
    """Output pixel (h*s + i, w*s + j) of group g reads the input bilinearly at (w + ox, h + oy) in input
    pixels, clipped to the map, where (ox, oy) = init_pos(i, j) + a learned offset predicted per input
    pixel and sub-pixel: 0.25 * conv(x), or 0.5 * conv(x) * sigmoid(scope(x)) with `dyscope`. Style "lp"
    predicts from x (2*groups*s*s channels), "pl" from pixel_shuffle(x) (2*groups channels at output
    resolution). [B, C, H, W] -> [B, C, s*H, s*W].

    `forward(x, size=(h, w))`: base positions by the half-pixel rule for that size (where init_pos put
    them at the default size: F.interpolate(mode="bilinear", align_corners=False)'s source points), each
    output pixel taking the learned offset of the sub-pixel the nearest rule maps it to.

    Parameter and buffer names are the official ones (`offset`, `scope`, `init_pos`), so official state
    dicts load with strict=True. `init_pos` is kept for them only: the op computes h + init_pos as its
    half-pixel rule, in fp32 whatever the dtype. The standalone tiny-smart/dysample has no bias on
    `scope`; tiny-smart/detection-with-upsamplers' copy has one (`scope_bias=True` loads its
    checkpoints) and names the scale `scale_factor`, accepted here as an alias of `scale`.
    """

    def __init__(self, in_channels: int, scale: int = 2, style: str = "lp", groups: int = 4, dyscope: bool = False,
                 backend: str = "auto", *, scale_factor=None, scope_bias: bool = False):
        super().__init__()
        C = _positive_int("in_channels", in_channels)
        if scale_factor is not None:
            if scale not in (2, scale_factor):  # 2: the default, not a choice
                raise ValueError(f"give scale or scale_factor (its alias), not both: scale={scale!r}, "
                                 f"scale_factor={scale_factor!r}")
            scale = scale_factor
        s = _positive_int("scale_factor" if scale_factor is not None else "scale", scale)
        G = _positive_int("groups", groups)
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        if C % G:
            raise ValueError(f"groups={G} must divide in_channels={C}")
        if style == "pl" and C % (s * s):
            raise ValueError(f"style='pl' needs scale**2 = {s * s} to divide in_channels={C}")
        if not isinstance(dyscope, bool):
            raise ValueError(f"dyscope must be a bool, got {dyscope!r}")
        if not isinstance(scope_bias, bool) or (scope_bias and not dyscope):
            raise ValueError(f"scope_bias must be a bool, True only with dyscope=True, got {scope_bias!r}")
        check_backend(backend)
        self.in_channels, self.scale, self.style, self.groups, self.dyscope = C, s, style, G, dyscope
        self.backend = backend
        c_in, c_out = (C // (s * s), 2 * G) if style == "pl" else (C, 2 * G * s * s)
        self.offset = nn.Conv2d(c_in, c_out, 1)
        if dyscope:
            self.scope = nn.Conv2d(c_in, c_out, 1, bias=scope_bias)
        # channels (x then y, group, i, j): sub-pixel (i, j) sits at ((j, i) - (s-1)/2) / s of its input pixel
        r = (torch.arange(s, dtype=torch.float32) - (s - 1) / 2) / s
        pos = torch.stack(torch.meshgrid(r, r, indexing="xy"))
        self.register_buffer("init_pos", pos[:, None].expand(2, G, s, s).reshape(1, -1, 1, 1).clone())
        self.init_weights()

    def init_weights(self):
        """The official: offset conv N(0, 0.001) with zero bias, scope conv zero (bias too)."""
        nn.init.normal_(self.offset.weight, std=0.001)
        nn.init.zeros_(self.offset.bias)
        if self.dyscope:
            nn.init.zeros_(self.scope.weight)
            if self.scope.bias is not None:
                nn.init.zeros_(self.scope.bias)

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        _check_input(x, self.in_channels, self.offset.weight)
        B, C, H, W = x.shape
        s, G = self.scale, self.groups
        size = _size_arg(size, (H * s, W * s))
        if B == 0:
            return _empty_batch(self, x, size)
        feat = x if self.style == "lp" else F.pixel_shuffle(x, s)
        off = self.offset(feat)
        if self.dyscope:
            off = off * self.scope(feat).sigmoid()
        gain = 0.5 if self.dyscope else 0.25
        # the plain graph's one-sample form, without the op's checks (x is checked, the offsets are ours), on
        # the official layout (no reordering pass), the gain taken with the unit: on a small map an op costs
        # more than its pass. Not under autocast, whose cast the op makes.
        own = choose(self.backend, x, single=True).backend == "plain" and not autocasting(x.device.type)
        if not own:
            off = off * gain
        if self.style == "lp":  # channel (xy*G + g)*s*s + i*s + j is sub-pixel (i, j): pixel_shuffle lays it out
            off = F.pixel_shuffle(off, s)
        if not _same_size(size, (H * s, W * s)):
            off = F.interpolate(off, size=size, mode="nearest")
        if own:
            return one_sample(x, size, off.view(B, 2, G, *size).permute(0, 2, 3, 4, 1), "border", gain)
        # [B, (x|y, G), h, w] -> the op's [B, (G, y|x), h, w]
        off = torch.stack((off[:, G:], off[:, :G]), 2).reshape(B, 2 * G, *size)
        return local_upsample(x, size, offset=off, num_groups=G, coords="half_pixel", padding="border",
                              backend=self.backend)

    __prepare_scriptable__ = not_scriptable

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, scale={self.scale}, style={self.style!r}, groups={self.groups}, "
                f"dyscope={self.dyscope}, backend={self.backend!r}")
