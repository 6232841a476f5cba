"""An mmdet-style FPN neck whose top-down upsampler is chosen by name."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .carafe import CARAFE
from .dysample import DySample
from .interpolation import interpolate
from .functional import not_scriptable
from .guided import FADE, SAPA
from .module import LDAAQU, _check_input, _positive_int

LEARNED = {"carafe": (CARAFE, "scale_factor"), "dysample": (DySample, "scale"), "lda_aqu": (LDAAQU, "scale_factor"),
           "sapa": (SAPA, "scale_factor"), "fade": (FADE, "scale_factor")}
GUIDED = ("sapa", "fade")  # called as module(the level below's lateral, the level), which must be half its size
UPSAMPLERS = ("nearest", "bilinear", *LEARNED)


class _ConvModule(nn.Module):
    """A bare conv under mmcv ConvModule's key (`.conv.`), so mmdet FPN checkpoints load."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, padding=k // 2)

    def forward(self, x):
        return self.conv(x)


def xavier_init(modules, types):
    """mmcv's xavier_init(distribution="uniform") on the modules of `types`: gain 1, zero bias."""
    for m in modules:
        if isinstance(m, types):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def check_pyramid(inputs, in_channels, weight: torch.Tensor):
    """inputs: a list or tuple of (B, in_channels[i], H_i, W_i) maps, one per level, on the device and in
    the dtype of the neck's parameters (`weight`)."""
    if not isinstance(inputs, (list, tuple)) or len(inputs) != len(in_channels):
        raise ValueError(f"inputs must be a list or tuple of {len(in_channels)} maps, one per in_channels")
    for i, (x, c) in enumerate(zip(inputs, in_channels)):
        _check_input(x, c, weight, f"inputs[{i}]")


def check_channels(in_channels, out_channels) -> tuple[list, int]:
    if not isinstance(in_channels, (list, tuple)) or not in_channels:
        raise ValueError(f"in_channels must be a non-empty list of ints, got {in_channels!r}")
    return [_positive_int("in_channels", c) for c in in_channels], _positive_int("out_channels", out_channels)


class FPN(nn.Module):
    """Feature pyramid: lateral 1x1 convs, a top-down path that upsamples each level onto the exact
    size of the one below and adds it, 3x3 output convs, and `num_outs - len(in_channels)` extra levels by
    max-pooling (1x1, stride 2) the last output, as mmdet's FPN (same state-dict keys for the convs).

    upsampler: "nearest" or "bilinear" (`interpolate`; upsampler_cfg may hold `align_corners` and
    `backend`), or "carafe", "dysample", "lda_aqu", "sapa", "fade" (one module per top-down step, built with
    `out_channels`, scale 2 and upsampler_cfg as keyword arguments). Inputs [B, in_channels[i], H_i, W_i],
    finest first, any sizes; returns a tuple of num_outs maps [B, out_channels, H_i, W_i]. The guided
    upsamplers (SAPA, FADE) take level i-1's lateral as their guide, before it receives the sum, and need
    every level exactly twice the size of the one above.
    """

    def __init__(self, in_channels, out_channels: int, upsampler: str = "nearest", num_outs=None,
                 upsampler_cfg=None):
        super().__init__()
        in_channels, out_channels = check_channels(in_channels, out_channels)
        num_outs = len(in_channels) if num_outs is None else _positive_int("num_outs", num_outs)
        if num_outs < len(in_channels):
            raise ValueError(f"num_outs={num_outs} must be at least len(in_channels)={len(in_channels)}")
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        if upsampler_cfg is not None and not isinstance(upsampler_cfg, dict):
            raise ValueError(f"upsampler_cfg must be a dict or None, got {upsampler_cfg!r}")
        cfg = dict(upsampler_cfg or {})
        self.in_channels, self.out_channels, self.num_outs, self.upsampler = in_channels, out_channels, num_outs, \
            upsampler
        self.lateral_convs = nn.ModuleList(_ConvModule(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(_ConvModule(out_channels, out_channels, 3) for _ in in_channels)
        xavier_init(self.modules(), nn.Conv2d)  # before the upsamplers: they keep their own initialisation
        if upsampler in LEARNED:
            cls, scale = LEARNED[upsampler]
            cfg.setdefault(scale, 2)
            self.upsample_modules = nn.ModuleList(cls(out_channels, **cfg) for _ in in_channels[1:])
        else:
            unknown = set(cfg) - {"align_corners", "backend"}
            if unknown or (upsampler == "nearest" and "align_corners" in cfg):
                raise ValueError(f"upsampler_cfg for {upsampler!r} takes align_corners (bilinear) and backend, "
                                 f"got {sorted(cfg)}")
            self.interpolate_cfg = dict(cfg, mode=upsampler)

    def forward(self, inputs) -> tuple[torch.Tensor, ...]:
        check_pyramid(inputs, self.in_channels, self.lateral_convs[0].conv.weight)
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            size = tuple(laterals[i - 1].shape[-2:])
            if self.upsampler in GUIDED:
                up = self.upsample_modules[i - 1](laterals[i - 1], laterals[i])
            elif self.upsampler in LEARNED:
                up = self.upsample_modules[i - 1](laterals[i], size=size)
            else:
                up = interpolate(laterals[i], size, **self.interpolate_cfg)
            laterals[i - 1] = laterals[i - 1] + up
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)

    __prepare_scriptable__ = not_scriptable

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, num_outs={self.num_outs}, " \
               f"upsampler={self.upsampler!r}"
