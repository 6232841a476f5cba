"""The necks of the released upsampler detectors, under their official names, keys and initialisation:
`FPN_LAU` (duzw9311/LDA-AQU's Faster R-CNN; the topology of mmdet's FPN_CARAFE, whose checkpoints load
too) and `FPN_UPSAMPLE` (tiny-smart/detection-with-upsamplers: mmdet's FPN with one upsampler per
top-down step), with the learned upsamplers and interpolation on this library's op; and
`neck_state_dict`, which takes the neck's weights out of a detector checkpoint."""
from __future__ import annotations

import inspect
import os
import pickle
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .carafe import CARAFE
from .dysample import DySample
from .fpn import _ConvModule, check_channels, check_pyramid, xavier_init
from .functional import check_backend
from .interpolation import interpolate
from .module import LDAAQU, _positive_int

LAU_TYPES = ("lda_aqu", "carafe", "nearest", "bilinear", "deconv", "pixel_shuffle")
UPSAMPLE_TYPES = ("nearest", "bilinear", "deconv", "pixelshuffle", "carafe", "dysample")
XAVIER = dict(type="Xavier", layer="Conv2d", distribution="uniform")  # FPN_UPSAMPLE's init_cfg


class Upsample2x(nn.Module):
    """nn.Upsample(scale_factor=2, mode=mode, align_corners=align_corners) through `interpolate`."""

    def __init__(self, mode: str, align_corners=None, backend: str = "auto"):
        super().__init__()
        self.mode, self.align_corners, self.backend = mode, align_corners, backend

    def forward(self, x):
        return interpolate(x, (2 * x.shape[-2], 2 * x.shape[-1]), self.mode, self.align_corners, self.backend)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, align_corners={self.align_corners}, backend={self.backend!r}"


class PixelShufflePack(nn.Module):
    """mmcv's `pixel_shuffle` upsample layer: a conv to out_channels * s * s channels (`upsample_conv`,
    padding (k-1)//2), then pixel_shuffle."""

    def __init__(self, in_channels: int, out_channels: int, scale_factor: int, upsample_kernel: int):
        super().__init__()
        self.scale_factor = scale_factor
        self.upsample_conv = nn.Conv2d(in_channels, out_channels * scale_factor ** 2, upsample_kernel,
                                       padding=(upsample_kernel - 1) // 2)

    def forward(self, x):
        return F.pixel_shuffle(self.upsample_conv(x), self.scale_factor)


def _split_cfg(upsample_cfg, types):
    """(type, the other keys) of an upsample_cfg mapping whose type is one of `types`."""
    if not isinstance(upsample_cfg, Mapping):
        raise ValueError(f"upsample_cfg must be a dict, got {upsample_cfg!r}")
    cfg = dict(upsample_cfg)
    kind = cfg.pop("type", None)
    if kind not in types:
        raise ValueError(f"upsample_cfg type must be one of {types}, got {kind!r}")
    return kind, cfg


def _keys(kind: str, cfg: dict, allowed, required=()) -> dict:
    unknown, missing = sorted(set(cfg) - set(allowed)), sorted(set(required) - set(cfg))
    if unknown or missing:
        raise ValueError(f"upsample_cfg of type {kind!r} takes {sorted(allowed) or 'no other keys'}"
                         f"{f', requires {missing}' if missing else ''}; got {sorted(cfg)}")
    return cfg


def _options(cls, *fixed) -> list:
    """A module's keyword arguments, less those the neck sets."""
    return [n for n in inspect.signature(cls).parameters if n not in fixed]


def _none_cfgs(**cfgs):
    """ConvModule's conv/norm/act configs (and FPN_LAU's init_cfg): None only, as the released models."""
    for name, cfg in cfgs.items():
        if cfg is not None:
            raise ValueError(f"{name} must be None (bare convs, as in the released models), got {cfg!r}")


def _levels(num_ins: int, num_outs, start_level, end_level) -> tuple[int, int]:
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


class _Pyramid(nn.Module):
    """What both necks share: the pyramid's arguments as mmdet checks them, and the top-down sum."""

    def __init__(self, in_channels, out_channels, num_outs, start_level, end_level, backend):
        super().__init__()
        self.in_channels, self.out_channels = check_channels(in_channels, out_channels)
        self.num_outs, self.backbone_end_level = _levels(len(self.in_channels), num_outs, start_level, end_level)
        self.start_level, self.end_level, self.backend = start_level, end_level, check_backend(backend)

    def _top_down(self, laterals: list, crop: bool) -> list:
        """laterals[i-1] += upsample_modules[i-1](laterals[i]) from the top, cropped to the lateral (FPN_LAU's
        slice_as) or exactly its size (FPN_UPSAMPLE)."""
        for i in range(len(laterals) - 1, 0, -1):
            up, (h, w) = self.upsample_modules[i - 1](laterals[i]), laterals[i - 1].shape[-2:]
            if up.shape[-2:] != (h, w) and not (crop and up.shape[-2] >= h and up.shape[-1] >= w):
                rule = "crops the upsampled map, never pads it" if crop else "adds the upsampled map as it is"
                raise ValueError(f"level {i} upsampled to {tuple(up.shape[-2:])}, level {i - 1} is {(h, w)}: "
                                 f"{type(self).__name__} {rule}, as the official; pad the image to a multiple "
                                 f"of the largest stride")
            laterals[i - 1] = laterals[i - 1] + up[..., :h, :w]
        return laterals

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, num_outs={self.num_outs}, "
                f"start_level={self.start_level}, end_level={self.end_level}, upsample={self.upsample!r}, "
                f"backend={self.backend!r}")


class FPN_LAU(_Pyramid):
    """duzw9311/LDA-AQU's FPN_LAU (mmdet's FPN_CARAFE with an `lda_aqu` upsampler type): lateral 1x1 convs
    of inputs[start_level:backbone_end_level], then each extra level's lateral a 3x3 stride-2 conv (of the
    last used input, then of the previous extra lateral); a top-down path over all of them that upsamples
    each level 2x with its own module (`upsample_modules[i-1]`, the top one too: P6 onto P5) and adds it
    cropped to the level below (`tensor_add`); a 3x3 output conv per level. Inputs
    [B, in_channels[i], H_i, W_i], finest first; returns num_outs maps [B, out_channels, ...].

    upsample_cfg type: "lda_aqu" (LDAAQU's arguments, scale 2), "carafe" (mmcv CARAFEPack's: up_kernel,
    up_group, encoder_kernel, encoder_dilation, compressed_channels), "nearest", "bilinear"
    (align_corners=False), "deconv" (nn.ConvTranspose2d, kernel upsample_kernel, stride 2, padding and
    output_padding (k-1)//2) and "pixel_shuffle" (mmcv's PixelShufflePack, `upsample_conv`), as mmcv's
    build_upsample_layer makes them. Keys and `init_weights` (run at construction) are the official:
    xavier-uniform convs and deconvs with zero bias, then CARAFE's and LDA-AQU's own initialisation.
    `backend` picks the op's backend for the upsamplers that run on it.
    """

    def __init__(self, in_channels, out_channels: int, num_outs: int, start_level: int = 0, end_level: int = -1,
                 norm_cfg=None, act_cfg=None, order=("conv", "norm", "act"), upsample_cfg=None, init_cfg=None,
                 backend: str = "auto"):
        super().__init__(in_channels, out_channels, num_outs, start_level, end_level, backend)
        _none_cfgs(norm_cfg=norm_cfg, act_cfg=act_cfg, init_cfg=init_cfg)
        if not isinstance(order, (tuple, list)) or tuple(order) not in (("conv", "norm", "act"),
                                                                         ("act", "conv", "norm")):
            raise ValueError(f"order must be ('conv', 'norm', 'act') or ('act', 'conv', 'norm'), got {order!r}")
        if upsample_cfg is None:  # the official default
            upsample_cfg = dict(type="carafe", up_kernel=5, up_group=1, encoder_kernel=3, encoder_dilation=1)
        self.upsample, cfg = _split_cfg(upsample_cfg, LAU_TYPES)
        self._make_upsampler(cfg)  # checks cfg before the convs are built
        C, n_extra = self.out_channels, self.num_outs - (self.backbone_end_level - self.start_level)
        used = self.in_channels[self.start_level:self.backbone_end_level]
        self.lateral_convs = nn.ModuleList([_ConvModule(c, C, 1) for c in used] +
                                           [_ConvModule(used[-1] if i == 0 else C, C, 3, 2) for i in range(n_extra)])
        self.fpn_convs = nn.ModuleList(_ConvModule(C, C, 3) for _ in range(self.num_outs))
        self.upsample_modules = nn.ModuleList(self._make_upsampler(cfg) for _ in range(self.num_outs - 1))
        self.init_weights()

    def _make_upsampler(self, cfg: dict) -> nn.Module:
        kind, C, backend = self.upsample, self.out_channels, self.backend
        if kind == "lda_aqu":
            return LDAAQU(C, scale_factor=2, backend=backend, **_keys(kind, cfg, _options(LDAAQU, "in_channels",
                                                                                        "scale_factor", "backend")))
        if kind == "carafe":
            return CARAFE(C, 2, backend=backend, **_keys(kind, cfg, _options(CARAFE, "channels", "scale_factor",
                                                                            "backend")))
        if kind in ("nearest", "bilinear"):
            _keys(kind, cfg, ())
            return Upsample2x(kind, None if kind == "nearest" else False, backend)
        k = _positive_int("upsample_cfg's upsample_kernel", _keys(kind, cfg, ("upsample_kernel",),
                                                                  ("upsample_kernel",))["upsample_kernel"])
        if kind == "pixel_shuffle":
            return PixelShufflePack(C, C, 2, k)
        if k > 4:  # output_padding (k-1)//2 must stay below the stride
            raise ValueError(f"upsample_cfg's upsample_kernel must be at most 4 for 'deconv', got {k}")
        return nn.ConvTranspose2d(C, C, k, stride=2, padding=(k - 1) // 2, output_padding=(k - 1) // 2)

    def init_weights(self):
        xavier_init(self.modules(), (nn.Conv2d, nn.ConvTranspose2d))
        for m in self.upsample_modules:
            if isinstance(m, (CARAFE, LDAAQU)):
                m.init_weights()

    def forward(self, inputs) -> tuple[torch.Tensor, ...]:
        check_pyramid(inputs, self.in_channels, self.lateral_convs[0].conv.weight)
        laterals, n = [], self.backbone_end_level - self.start_level
        for i, conv in enumerate(self.lateral_convs):
            laterals.append(conv(inputs[self.start_level + i] if i < n else
                                 inputs[self.backbone_end_level - 1] if i == n else laterals[-1]))
        return tuple(conv(x) for conv, x in zip(self.fpn_convs, self._top_down(laterals, crop=True)))


class FPN_UPSAMPLE(_Pyramid):
    """tiny-smart/detection-with-upsamplers' FPN_UPSAMPLE: mmdet's FPN (lateral 1x1 convs, top-down sums,
    3x3 output convs; extra levels by max-pooling the last output, or with add_extra_convs by 3x3 stride-2
    convs of the last input ("on_input", True), lateral ("on_lateral") or output ("on_output"), ReLU
    before all but the first with relu_before_extra_convs) whose top-down step i upsamples with
    `upsample_modules[i-1]`, exactly 2x: every level must be twice the size of the one above (images
    padded to a multiple of the largest stride, as the official pipelines do).

    upsample_cfg type (`guided` must be False): "nearest", "bilinear" (align_corners, default False),
    "deconv" (nn.ConvTranspose2d: kernel_size 3, stride 2, padding 1, output_padding 1 by default),
    "pixelshuffle" (nn.Sequential(conv to 4*C channels: kernel_size 3, padding 1; nn.PixelShuffle(2))),
    "carafe" (CARAFEPack's arguments) and "dysample" (style "lp", groups 4, dyscope False; its `scope`
    conv with a bias, as in that repository). As there, an upsampler is also built for each extra conv
    level (unused, but in the checkpoints). Keys are the official; `init_weights` (run at
    construction) does what the official init_cfg does under mmengine: xavier-uniform with zero bias on
    every nn.Conv2d of the neck, the upsamplers' included, deconvs left at PyTorch's default.
    """

    def __init__(self, in_channels, out_channels: int, num_outs: int, start_level: int = 0, end_level: int = -1,
                 add_extra_convs=False, relu_before_extra_convs: bool = False, no_norm_on_lateral: bool = False,
                 conv_cfg=None, norm_cfg=None, act_cfg=None, upsample_cfg=None, init_cfg=XAVIER,
                 backend: str = "auto"):
        super().__init__(in_channels, out_channels, num_outs, start_level, end_level, backend)
        _none_cfgs(conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg)
        if init_cfg != XAVIER:
            raise ValueError(f"init_cfg must be the official {XAVIER}, got {init_cfg!r}")
        for name, flag in (("relu_before_extra_convs", relu_before_extra_convs),
                           ("no_norm_on_lateral", no_norm_on_lateral)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        if add_extra_convs is True:
            add_extra_convs = "on_input"
        if add_extra_convs not in (False, "on_input", "on_lateral", "on_output"):
            raise ValueError(f"add_extra_convs must be a bool or 'on_input', 'on_lateral', 'on_output', "
                             f"got {add_extra_convs!r}")
        self.add_extra_convs, self.relu_before_extra_convs = add_extra_convs, relu_before_extra_convs
        self.upsample, cfg = _split_cfg(dict(type="nearest") if upsample_cfg is None else upsample_cfg,
                                        UPSAMPLE_TYPES)
        if cfg.pop("guided", False) is not False:
            raise ValueError("upsample_cfg guided must be False: the guided upsamplers (FADE, SAPA) are not here")
        self._make_upsampler(cfg)
        C, n = self.out_channels, self.backbone_end_level - self.start_level
        n_extra = self.num_outs - n if add_extra_convs else 0
        self.upsample_modules = nn.ModuleList(self._make_upsampler(cfg) for _ in range(n - 1 + n_extra))
        self.lateral_convs = nn.ModuleList(_ConvModule(c, C, 1) for c in
                                           self.in_channels[self.start_level:self.backbone_end_level])
        c_extra = self.in_channels[self.backbone_end_level - 1] if add_extra_convs == "on_input" else C
        self.fpn_convs = nn.ModuleList([_ConvModule(C, C, 3) for _ in range(n)] +
                                       [_ConvModule(c_extra if i == 0 else C, C, 3, 2) for i in range(n_extra)])
        self.init_weights()

    def _make_upsampler(self, cfg: dict) -> nn.Module:
        kind, C, backend = self.upsample, self.out_channels, self.backend
        if kind == "nearest":
            _keys(kind, cfg, ())
            return Upsample2x("nearest", None, backend)
        if kind == "bilinear":
            return Upsample2x("bilinear", _keys(kind, cfg, ("align_corners",)).get("align_corners", False), backend)
        if kind == "deconv":
            k = dict(dict(kernel_size=3, stride=2, padding=1, output_padding=1),
                     **_keys(kind, cfg, ("kernel_size", "stride", "padding", "output_padding")))
            return nn.ConvTranspose2d(C, C, **k)
        if kind == "pixelshuffle":
            k = dict(dict(kernel_size=3, padding=1), **_keys(kind, cfg, ("kernel_size", "padding")))
            return nn.Sequential(nn.Conv2d(C, 4 * C, **k), nn.PixelShuffle(2))
        if kind == "carafe":
            return CARAFE(C, 2, backend=backend, **_keys(kind, cfg, _options(CARAFE, "channels", "scale_factor",
                                                                            "backend")))
        cfg = dict(dict(style="lp", groups=4, dyscope=False), **_keys(kind, cfg, ("style", "groups", "dyscope")))
        return DySample(C, scale_factor=2, scope_bias=cfg["dyscope"] is True, backend=backend, **cfg)

    def init_weights(self):
        xavier_init(self.modules(), nn.Conv2d)

    def forward(self, inputs) -> tuple[torch.Tensor, ...]:
        check_pyramid(inputs, self.in_channels, self.lateral_convs[0].conv.weight)
        laterals = [conv(inputs[self.start_level + i]) for i, conv in enumerate(self.lateral_convs)]
        laterals = self._top_down(laterals, crop=False)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        if self.add_extra_convs and self.num_outs > len(outs):
            source = {"on_input": inputs[self.backbone_end_level - 1], "on_lateral": laterals[-1],
                      "on_output": outs[-1]}[self.add_extra_convs]
            outs.append(self.fpn_convs[len(outs)](source))
            while len(outs) < self.num_outs:
                x = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                outs.append(self.fpn_convs[len(outs)](x))
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)


def neck_state_dict(checkpoint, prefix: str = "neck.", weights_only: bool = True) -> dict:
    """The state dict of one part of a detector checkpoint, its `prefix` stripped: for the neck,
    `neck.load_state_dict(neck_state_dict(path), strict=True)`.

    checkpoint: a path to a torch.save file, or what it holds: an mmdet 2 or 3 (mmcv or mmengine)
    checkpoint {"meta": ..., "state_dict": {...}, ...} or a bare state dict; keys under a DataParallel
    "module." are found too. weights_only is torch.load's: a file whose "meta" holds other objects than
    tensors and plain containers needs weights_only=False (only for a file you trust).
    """
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix must be a non-empty str, got {prefix!r}")
    if isinstance(checkpoint, (str, os.PathLike)):
        try:
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=weights_only)
        except pickle.UnpicklingError as e:
            raise ValueError(f"torch.load(weights_only=True) refused {os.fspath(checkpoint)!r}: it holds other "
                             f"objects than tensors; pass weights_only=False if you trust the file") from e
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a path or a dict, got {type(checkpoint).__name__}")
    sd = checkpoint.get("state_dict", checkpoint)
    if not isinstance(sd, Mapping):
        raise ValueError(f"checkpoint['state_dict'] must be a dict, got {type(sd).__name__}")
    for p in (prefix, "module." + prefix):
        part = {k[len(p):]: v for k, v in sd.items() if isinstance(k, str) and k.startswith(p)}
        if part:
            return part
    heads = sorted({k.split(".", 1)[0] for k in sd if isinstance(k, str)})
    raise ValueError(f"no key of the checkpoint starts with {prefix!r}; its top-level names: {heads}")
