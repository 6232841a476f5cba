"""CARAFE (Content-Aware ReAssembly of FEatures, ICCV 2019) with mmcv's CARAFEPack parameters, through
`local_upsample`: no compiled mmcv op, any device, exportable."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .functional import check_backend, local_upsample, not_scriptable
from .args import _check_input, _empty_batch, _odd_int, _positive_int, _same_size, _size_arg


class CARAFE(nn.Module):
    """Predicts a k x k reassembly kernel per output pixel (and group) from the input, softmax-normalised,
    and sums the k x k neighbourhood of the output pixel's source pixel (Y//s, X//s) with it, zeros
    outside the map; channel c uses group c // (C / up_group). [B, C, H, W] -> [B, C, s*H, s*W], or
    [B, C, *size] for `forward(x, size=(h, w))`: source pixels and kernels both by the nearest rule
    (floor(Y * H/h), as F.interpolate(mode="nearest")), which for h = s*H - 1 is exactly the crop an
    FPN would otherwise make.

    Parameters and initialisation are mmcv's CARAFEPack's (`channel_compressor`, `content_encoder`), so
    its state dicts load with strict=True.
    """

    def __init__(self, channels: int, scale_factor: int, up_kernel: int = 5, up_group: int = 1,
                 encoder_kernel: int = 3, encoder_dilation: int = 1, compressed_channels: int = 64,
                 backend: str = "auto"):
        super().__init__()
        C = _positive_int("channels", channels)
        s = _positive_int("scale_factor", scale_factor)
        G = _positive_int("up_group", up_group)
        _odd_int("up_kernel", up_kernel)
        _odd_int("encoder_kernel", encoder_kernel)
        _positive_int("encoder_dilation", encoder_dilation)
        _positive_int("compressed_channels", compressed_channels)
        if C % G:
            raise ValueError(f"up_group={G} must divide channels={C}")
        check_backend(backend)
        self.channels, self.scale_factor, self.up_kernel, self.up_group = C, s, up_kernel, G
        self.encoder_kernel, self.encoder_dilation = encoder_kernel, encoder_dilation
        self.compressed_channels, self.backend = compressed_channels, backend
        self.channel_compressor = nn.Conv2d(C, compressed_channels, 1)
        self.content_encoder = nn.Conv2d(compressed_channels, up_kernel * up_kernel * G * s * s, encoder_kernel,
                                         padding=(encoder_kernel - 1) * encoder_dilation // 2,
                                         dilation=encoder_dilation)
        self.init_weights()

    def init_weights(self):
        """mmcv's: xavier-uniform convs, then the content encoder N(0, 0.001); zero biases."""
        for m in (self.channel_compressor, self.content_encoder):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.content_encoder.weight, std=0.001)

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        _check_input(x, self.channels, self.channel_compressor.weight)
        B, _, H, W = x.shape
        s, k = self.scale_factor, self.up_kernel
        size = _size_arg(size, (H * s, W * s))
        if B == 0:
            return _empty_batch(self, x, size)
        # channel (g*k*k + n)*s*s + i*s + j is neighbour n of sub-pixel (i, j): pixel_shuffle lays it out
        logits = F.pixel_shuffle(self.content_encoder(self.channel_compressor(x)), s)
        if not _same_size(size, (H * s, W * s)):
            logits = F.interpolate(logits, size=size, mode="nearest")
        # the op normalises the logits (softmax over the k*k neighbours of each group) on the fly
        return local_upsample(x, size, logits=logits.view(B, self.up_group, k * k, *size), kernel_size=k,
                              coords="nearest", padding="zeros", backend=self.backend)

    __prepare_scriptable__ = not_scriptable

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, scale_factor={self.scale_factor}, up_kernel={self.up_kernel}, "
                f"up_group={self.up_group}, backend={self.backend!r}")
