"""The necks of the released upsampler detectors, under their official names, keys and initialisation:
`FPN_LAU` (duzw9311/LDA-AQU's Faster R-CNN; the topology of mmdet's FPN_CARAFE, whose checkpoints load
too) and `FPN_UPSAMPLE` (tiny-smart/detection-with-upsamplers: mmdet's FPN with one upsampler per
top-down step), with the learned upsamplers and interpolation on this library's op; and
`neck_state_dict`, which takes the neck's weights out of a detector checkpoint."""
from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .args import _positive_int
from .carafe import CARAFE
from .fpn import (TopDown, _ConvModule, build_learned, build_resize, check_keys, check_pyramid, xavier_init)
from .guided import FADE, SAPA, SAPADeform
from .module import LDAAQU

XAVIER = dict(type="Xavier", layer="Conv2d", distribution="uniform")  # FPN_UPSAMPLE's init_cfg


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


def _mmcv_layer(kind, cfg, C, backend, arg) -> nn.Module:
    """mmcv's build_upsample_layer at 2x: "deconv" (padding and output_padding (k-1)//2) and
    "pixel_shuffle", both of kernel `upsample_kernel`."""
    k = _positive_int(f"{arg}'s upsample_kernel",
                      check_keys(arg, kind, cfg, ("upsample_kernel",), ("upsample_kernel",))["upsample_kernel"])
    if kind == "pixel_shuffle":
        return PixelShufflePack(C, C, 2, k)
    if k > 4:  # output_padding (k-1)//2 must stay below the stride
        raise ValueError(f"{arg}'s upsample_kernel must be at most 4 for 'deconv', got {k}")
    return nn.ConvTranspose2d(C, C, k, stride=2, padding=(k - 1) // 2, output_padding=(k - 1) // 2)


def _torch_layer(kind, cfg, C, backend, arg) -> nn.Module:
    """detection-with-upsamplers' "deconv" (nn.ConvTranspose2d) and "pixelshuffle" (nn.Sequential(conv to
    4*C channels, nn.PixelShuffle(2))), their torch arguments defaulting to an exact 2x."""
    if kind == "deconv":
        k = dict(dict(kernel_size=3, stride=2, padding=1, output_padding=1),
                 **check_keys(arg, kind, cfg, ("kernel_size", "stride", "padding", "output_padding")))
        return nn.ConvTranspose2d(C, C, **k)
    k = dict(dict(kernel_size=3, padding=1), **check_keys(arg, kind, cfg, ("kernel_size", "padding")))
    return nn.Sequential(nn.Conv2d(C, 4 * C, **k), nn.PixelShuffle(2))


# detection-with-upsamplers' build_upsampler: the keys it reads for each guided type (their defaults the modules')
GUIDED = {"sapa": (SAPA, ("up_kernel_size", "embedding_dim", "qkv_bias", "norm")),
          "sapadeform": (SAPADeform, ("num_point", "groups", "embedding_dim", "qkv_bias", "high_offset", "norm")),
          "fade": (FADE, ("up_kernel_size", "gating"))}


def _guided(kind, cfg, C, backend, arg) -> nn.Module:
    cls, keys = GUIDED[kind]
    return cls(C, scale_factor=2, backend=backend, **check_keys(arg, kind, cfg, keys))


def _none_cfgs(**cfgs):
    """ConvModule's conv/norm/act configs (and FPN_LAU's init_cfg): None only, as the released models."""
    for name, cfg in cfgs.items():
        if cfg is not None:
            raise ValueError(f"{name} must be None (bare convs, as in the released models), got {cfg!r}")


class FPN_LAU(TopDown):
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

    size_rule = "crop"
    builders = {"lda_aqu": build_learned, "carafe": build_learned,
                "nearest": functools.partial(build_resize, align_corners=False),
                "bilinear": functools.partial(build_resize, align_corners=False),
                "deconv": _mmcv_layer, "pixel_shuffle": _mmcv_layer}

    def __init__(self, in_channels, out_channels: int, num_outs: int, start_level: int = 0, end_level: int = -1,
                 norm_cfg=None, act_cfg=None, order=("conv", "norm", "act"), upsample_cfg=None, init_cfg=None,
                 backend: str = "auto"):
        if upsample_cfg is None:  # the official default
            upsample_cfg = dict(type="carafe", up_kernel=5, up_group=1, encoder_kernel=3, encoder_dilation=1)
        super().__init__(in_channels, out_channels, num_outs, start_level, end_level, backend, upsample_cfg)
        _none_cfgs(norm_cfg=norm_cfg, act_cfg=act_cfg, init_cfg=init_cfg)
        if not isinstance(order, (tuple, list)) or tuple(order) not in (("conv", "norm", "act"),
                                                                         ("act", "conv", "norm")):
            raise ValueError(f"order must be ('conv', 'norm', 'act') or ('act', 'conv', 'norm'), got {order!r}")
        C, n_extra = self.out_channels, self.num_outs - (self.backbone_end_level - self.start_level)
        used = self.in_channels[self.start_level:self.backbone_end_level]
        self.lateral_convs = nn.ModuleList([_ConvModule(c, C, 1) for c in used] +
                                           [_ConvModule(used[-1] if i == 0 else C, C, 3, 2) for i in range(n_extra)])
        self.fpn_convs = nn.ModuleList(_ConvModule(C, C, 3) for _ in range(self.num_outs))
        self.upsample_modules = nn.ModuleList(self.make_upsampler() for _ in range(self.num_outs - 1))
        self.init_weights()

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
        return tuple(conv(x) for conv, x in zip(self.fpn_convs, self.top_down(laterals)))


class FPN_UPSAMPLE(TopDown):
    """tiny-smart/detection-with-upsamplers' FPN_UPSAMPLE: mmdet's FPN (lateral 1x1 convs, top-down sums,
    3x3 output convs; extra levels by max-pooling the last output, or with add_extra_convs by 3x3 stride-2
    convs of the last input ("on_input", True), lateral ("on_lateral") or output ("on_output"), ReLU
    before all but the first with relu_before_extra_convs) whose top-down step i upsamples with
    `upsample_modules[i-1]`, exactly 2x: every level must be twice the size of the one above (images
    padded to a multiple of the largest stride, as the official pipelines do).

    upsample_cfg type, with `guided` False (or absent): "nearest", "bilinear" (align_corners, default False),
    "deconv" (nn.ConvTranspose2d: kernel_size 3, stride 2, padding 1, output_padding 1 by default),
    "pixelshuffle" (nn.Sequential(conv to 4*C channels: kernel_size 3, padding 1; nn.PixelShuffle(2))),
    "carafe" (CARAFEPack's arguments) and "dysample" (style "lp", groups 4, dyscope False; its `scope`
    conv with a bias, as in that repository); with `guided` True: "sapa" (up_kernel_size 5, embedding_dim 32,
    qkv_bias, norm), "sapadeform" (num_point 9, groups 4, embedding_dim 32, qkv_bias, high_offset, norm
    False) and "fade" (up_kernel_size 5, gating False), each step then
    `laterals[i-1] + upsample_modules[i-1](laterals[i-1], laterals[i])`, guided by the level's own lateral
    before it receives the sum. As there, an upsampler is also built for each extra conv
    level (unused, but in the checkpoints). Keys are the official; `init_weights` (run at
    construction) does what the official init_cfg does under mmengine: xavier-uniform with zero bias on
    every nn.Conv2d of the neck, the upsamplers' included, deconvs left at PyTorch's default.
    """

    size_rule = "2x"
    builders = {"nearest": build_resize, "bilinear": build_resize, "deconv": _torch_layer,
                "pixelshuffle": _torch_layer, "carafe": build_learned,
                "dysample": functools.partial(build_learned, scope_bias=True), **dict.fromkeys(GUIDED, _guided)}

    def __init__(self, in_channels, out_channels: int, num_outs: int, start_level: int = 0, end_level: int = -1,
                 add_extra_convs=False, relu_before_extra_convs: bool = False, no_norm_on_lateral: bool = False,
                 conv_cfg=None, norm_cfg=None, act_cfg=None, upsample_cfg=None, init_cfg=XAVIER,
                 backend: str = "auto"):
        upsample_cfg = dict(type="nearest") if upsample_cfg is None else upsample_cfg
        guided = False
        if isinstance(upsample_cfg, Mapping):
            upsample_cfg = dict(upsample_cfg)
            guided, want = upsample_cfg.pop("guided", False), upsample_cfg.get("type") in GUIDED
            if guided is not want:
                raise ValueError(f"upsample_cfg guided must be {want} for type {upsample_cfg.get('type')!r} "
                                 f"(True for {tuple(GUIDED)}, False or absent for the others), got {guided!r}")
        super().__init__(in_channels, out_channels, num_outs, start_level, end_level, backend, upsample_cfg)
        self.guided = guided
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
        C, n = self.out_channels, self.backbone_end_level - self.start_level
        n_extra = self.num_outs - n if add_extra_convs else 0
        self.upsample_modules = nn.ModuleList(self.make_upsampler() for _ in range(n - 1 + n_extra))
        self.lateral_convs = nn.ModuleList(_ConvModule(c, C, 1) for c in
                                           self.in_channels[self.start_level:self.backbone_end_level])
        c_extra = self.in_channels[self.backbone_end_level - 1] if add_extra_convs == "on_input" else C
        self.fpn_convs = nn.ModuleList([_ConvModule(C, C, 3) for _ in range(n)] +
                                       [_ConvModule(c_extra if i == 0 else C, C, 3, 2) for i in range(n_extra)])
        self.init_weights()

    def init_weights(self):
        xavier_init(self.modules(), nn.Conv2d)

    def forward(self, inputs) -> tuple[torch.Tensor, ...]:
        check_pyramid(inputs, self.in_channels, self.lateral_convs[0].conv.weight)
        laterals = [conv(inputs[self.start_level + i]) for i, conv in enumerate(self.lateral_convs)]
        laterals = self.top_down(laterals)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        if self.add_extra_convs and self.num_outs > len(outs):
            source = {"on_input": inputs[self.backbone_end_level - 1], "on_lateral": laterals[-1],
                      "on_output": outs[-1]}[self.add_extra_convs]
            outs.append(self.fpn_convs[len(outs)](source))
            while len(outs) < self.num_outs:
                x = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                outs.append(self.fpn_convs[len(outs)](x))
        return self.max_pool_levels(outs)


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
