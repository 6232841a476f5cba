"""The feature pyramid core that FPN, FPN_LAU and FPN_UPSAMPLE share (mmdet's FPN: lateral 1x1 convs, a
top-down sum, 3x3 output convs), the upsampler builders they choose from, and `FPN`, whose top-down
upsampler is chosen by name and lands on the exact size of the level below."""
from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .args import _check_input, _positive_int
from .carafe import CARAFE
from .dysample import DySample
from .functional import check_backend, not_scriptable
from .interpolation import interpolate
from .guided import FADE, SAPA
from .module import LDAAQU

# the learned upsamplers: class and the name of its scale argument
LEARNED = {"carafe": (CARAFE, "scale_factor"), "dysample": (DySample, "scale"), "lda_aqu": (LDAAQU, "scale_factor"),
           "sapa": (SAPA, "scale_factor"), "fade": (FADE, "scale_factor")}
GUIDED = ("sapa", "fade")  # called as up(guide, x)
UPSAMPLERS = ("nearest", "bilinear", *LEARNED)  # FPN's choices
SIZE_RULES = ("exact", "crop", "2x")


class _ConvModule(nn.Module):
    """A bare conv under mmcv ConvModule's key (`.conv.`), so mmdet FPN checkpoints load."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, padding=k // 2)

    def forward(self, x):
        return self.conv(x)


class Resize(nn.Module):
    """`interpolate` onto `size`, by default twice the input (nn.Upsample(scale_factor=2)); no parameters."""

    def __init__(self, mode: str, align_corners=None, backend: str = "auto"):
        super().__init__()
        self.mode, self.align_corners, self.backend = mode, align_corners, backend

    def forward(self, x, size=None):
        size = (2 * x.shape[-2], 2 * x.shape[-1]) if size is None else size
        return interpolate(x, size, self.mode, self.align_corners, self.backend)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, align_corners={self.align_corners}, backend={self.backend!r}"


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


def check_levels(num_ins: int, num_outs, start_level, end_level) -> tuple[int, int]:
    """(num_outs, backbone_end_level) as mmdet's FPN: end_level -1 (or the last index) uses every input
    from start_level and allows extra levels; another end_level (inclusive) allows none."""
    num_outs = _positive_int("num_outs", num_outs)
    if isinstance(start_level, bool) or not isinstance(start_level, int) or not 0 <= start_level < num_ins:
        raise ValueError(f"start_level must be an int in [0, {num_ins - 1}], got {start_level!r}")
    if end_level in (-1, num_ins - 1) and not isinstance(end_level, bool):
        if num_outs < num_ins - start_level:
            raise ValueError(f"num_outs={num_outs} must be at least len(in_channels) - start_level = "
                             f"{num_ins - start_level}")
        return num_outs, num_ins
    if isinstance(end_level, bool) or not isinstance(end_level, int) or not start_level <= end_level < num_ins:
        raise ValueError(f"end_level must be -1 or an int in [start_level, {num_ins - 1}], got {end_level!r}")
    if num_outs != end_level - start_level + 1:
        raise ValueError(f"num_outs={num_outs} must be end_level - start_level + 1 = {end_level - start_level + 1} "
                         f"(no extra levels unless end_level is -1)")
    return num_outs, end_level + 1


# ---- the upsampler builders: (kind, cfg without its type, channels, backend, arg) -> one module -----------

def split_cfg(upsample_cfg, types, arg: str = "upsample_cfg") -> tuple[str, dict]:
    """(type, the other keys) of an mmdet-style upsampler config whose type is one of `types`."""
    if not isinstance(upsample_cfg, Mapping):
        raise ValueError(f"{arg} must be a dict, got {upsample_cfg!r}")
    cfg = dict(upsample_cfg)
    kind = cfg.pop("type", None)
    if kind not in types:
        raise ValueError(f"{arg} type must be one of {tuple(types)}, got {kind!r}")
    return kind, cfg


def check_keys(arg: str, kind: str, cfg: dict, allowed, required=()) -> dict:
    unknown, missing = sorted(set(cfg) - set(allowed)), sorted(set(required) - set(cfg))
    if unknown or missing:
        raise ValueError(f"{arg} of type {kind!r} takes {sorted(allowed) or 'no other keys'}"
                         f"{f', requires {missing}' if missing else ''}; got {sorted(cfg)}")
    return cfg


def build_resize(kind, cfg, C, backend, arg, align_corners: bool = True) -> Resize:
    """"nearest" or "bilinear" (align_corners, default False, where the neck lets it be chosen)."""
    cfg = check_keys(arg, kind, cfg, ("align_corners",) if align_corners and kind == "bilinear" else ())
    return Resize(kind, None if kind == "nearest" else cfg.get("align_corners", False), backend)


def build_learned(kind, cfg, C, backend, arg, free_scale: bool = False, scope_bias: bool = False) -> nn.Module:
    """One of LEARNED at scale 2 with the neck's channels and backend, cfg its other keyword arguments
    (the scale too where `free_scale`). scope_bias: detection-with-upsamplers' DySample, whose `scope`
    conv has a bias when dyscope is on."""
    cls, scale = LEARNED[kind]
    names = list(inspect.signature(cls).parameters)
    fixed = {names[0], "backend", *(() if free_scale else (scale, "scale_factor")), *(("scope_bias",) * scope_bias)}
    cfg = {scale: 2, **check_keys(arg, kind, cfg, [n for n in names if n not in fixed])}
    if scope_bias:
        cfg["scope_bias"] = cfg.get("dyscope", False) is True
    return cls(C, backend=backend, **cfg)


class TopDown(nn.Module):
    """The core of the three necks: the pyramid's arguments as mmdet checks them, the upsampler factory
    (`builders`: type -> builder, one config dialect: {"type": ..., other keyword arguments}), and the
    top-down sum under one of three size rules for the upsampled map against the lateral below it:
    "exact" (the upsampler is asked for that size), "crop" (2x, cropped to it, never padded) and "2x"
    (must be it). A guided upsampler (`guided = True`) is called as up(guide, x) with the guide the
    lower level's own lateral, before it receives the sum."""

    size_rule = "exact"
    guided = False
    builders: Mapping = {}
    cfg_arg = "upsample_cfg"

    def __init__(self, in_channels, out_channels, num_outs, start_level, end_level, backend, upsample_cfg):
        super().__init__()
        self.in_channels, self.out_channels = check_channels(in_channels, out_channels)
        self.num_outs, self.backbone_end_level = check_levels(len(self.in_channels), num_outs, start_level,
                                                              end_level)
        self.start_level, self.end_level, self.backend = start_level, end_level, check_backend(backend)
        self.upsample, self.upsample_options = split_cfg(upsample_cfg, self.builders, self.cfg_arg)
        with torch.device("meta"):  # checks the config before any conv is built, drawing no random numbers
            self.make_upsampler()

    def make_upsampler(self) -> nn.Module:
        return self.builders[self.upsample](self.upsample, dict(self.upsample_options), self.out_channels,
                                            self.backend, self.cfg_arg)

    def top_down(self, laterals: list) -> list:
        """laterals[i-1] += upsample_modules[i-1](laterals[i]) from the top, under the size rule."""
        for i in range(len(laterals) - 1, 0, -1):
            up, guide, x = self.upsample_modules[i - 1], laterals[i - 1], laterals[i]
            h, w = guide.shape[-2:]
            args = (guide, x) if self.guided else (x,)
            if self.size_rule == "exact":
                laterals[i - 1] = guide + up(*args, size=(h, w))
                continue
            y, crop = up(*args), self.size_rule == "crop"
            if y.shape[-2:] != (h, w) and not (crop and y.shape[-2] >= h and y.shape[-1] >= w):
                rule = "crops the upsampled map, never pads it" if crop else "adds the upsampled map as it is"
                raise ValueError(f"level {i} upsampled to {tuple(y.shape[-2:])}, level {i - 1} is {(h, w)}: "
                                 f"{type(self).__name__} {rule}, as the official; pad the image to a multiple "
                                 f"of the largest stride")
            laterals[i - 1] = guide + y[..., :h, :w]
        return laterals

    def max_pool_levels(self, outs: list) -> tuple[torch.Tensor, ...]:
        """mmdet's extra levels without extra convs: max_pool2d(kernel 1, stride 2) of the last output."""
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)

    __prepare_scriptable__ = not_scriptable

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, num_outs={self.num_outs}, "
                f"start_level={self.start_level}, end_level={self.end_level}, upsample={self.upsample!r}, "
                f"backend={self.backend!r}")


class FPN(TopDown):
    """Feature pyramid: lateral 1x1 convs, a top-down path that upsamples each level onto the exact
    size of the one below and adds it, 3x3 output convs, and `num_outs - len(in_channels)` extra levels by
    max-pooling (1x1, stride 2) the last output, as mmdet's FPN (same state-dict keys for the convs).

    upsampler: "nearest" or "bilinear" (`interpolate`; upsampler_cfg may hold `align_corners` for
    bilinear, and `backend`), or "carafe", "dysample", "lda_aqu", "sapa", "fade" (one module per top-down
    step, built with `out_channels`, scale 2 and upsampler_cfg as keyword arguments). Inputs
    [B, in_channels[i], H_i, W_i], finest first, any sizes; returns a tuple of num_outs maps
    [B, out_channels, H_i, W_i]. The guided upsamplers (SAPA, FADE) take the level below's lateral as their
    guide and need every level exactly twice the size of the one above.
    """

    builders = {"nearest": build_resize, "bilinear": build_resize,
                **{kind: functools.partial(build_learned, free_scale=True) for kind in LEARNED}}
    cfg_arg = "upsampler_cfg"

    def __init__(self, in_channels, out_channels: int, upsampler: str = "nearest", num_outs=None,
                 upsampler_cfg=None):
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        if upsampler_cfg is not None and not isinstance(upsampler_cfg, dict):
            raise ValueError(f"upsampler_cfg must be a dict or None, got {upsampler_cfg!r}")
        cfg = dict(upsampler_cfg or {})
        backend = cfg.pop("backend", "auto")
        n = len(in_channels) if isinstance(in_channels, (list, tuple)) else 0
        super().__init__(in_channels, out_channels, n if num_outs is None else num_outs, 0, -1, backend,
                         dict(cfg, type=upsampler))
        self.upsampler = upsampler
        if upsampler in GUIDED:
            self.guided, self.size_rule = True, "2x"
        C = self.out_channels
        self.lateral_convs = nn.ModuleList(_ConvModule(c, C, 1) for c in self.in_channels)
        self.fpn_convs = nn.ModuleList(_ConvModule(C, C, 3) for _ in self.in_channels)
        xavier_init(self.modules(), nn.Conv2d)  # before the upsamplers: they keep their own initialisation
        self.upsample_modules = nn.ModuleList(self.make_upsampler() for _ in self.in_channels[1:])

    def forward(self, inputs) -> tuple[torch.Tensor, ...]:
        check_pyramid(inputs, self.in_channels, self.lateral_convs[0].conv.weight)
        laterals = self.top_down([conv(x) for conv, x in zip(self.lateral_convs, inputs)])
        return self.max_pool_levels([conv(x) for conv, x in zip(self.fpn_convs, laterals)])

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, num_outs={self.num_outs}, " \
               f"upsampler={self.upsampler!r}"
