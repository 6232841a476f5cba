"""Nearest and bilinear interpolation as cases of `local_upsample` (one sample of weight 1 per pixel)."""
from __future__ import annotations

from typing import Optional

import torch

from .functional import local_upsample

MODES = ("nearest", "bilinear")


def interpolate(x: torch.Tensor, size, mode: str = "nearest", align_corners: Optional[bool] = None,
                backend: str = "auto") -> torch.Tensor:
    """F.interpolate(x, size=size, mode=mode, align_corners=align_corners) for "nearest" (the source
    pixel floor(Y * H/Ho), the ratio in fp32 as PyTorch rounds it) and "bilinear" (align_corners True:
    Y * (H-1)/(Ho-1); False or None: (Y + 0.5) * H/Ho - 0.5 clipped to the map).

    Args:
        x: [B, C, H, W].
        size: (Ho, Wo), any size, up or down.
        backend: as `local_upsample`.

    Returns:
        [B, C, Ho, Wo].
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "nearest":
        if align_corners is not None:
            raise ValueError("align_corners applies to mode='bilinear' only (as in F.interpolate)")
        return local_upsample(x, size, coords="nearest", backend=backend)
    if align_corners not in (None, True, False):
        raise ValueError(f"align_corners must be a bool or None, got {align_corners!r}")
    if align_corners:
        return local_upsample(x, size, coords="align_corners", backend=backend)
    return local_upsample(x, size, coords="half_pixel", padding="border", backend=backend)
