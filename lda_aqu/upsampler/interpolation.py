"""Nearest and bilinear interpolation as cases of `local_upsample` (one sample of weight 1 per pixel)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .functional import local_upsample

MODES = ("nearest", "bilinear")


def interpolate(x: torch.Tensor, size=None, mode: str = "nearest", align_corners: Optional[bool] = None,
                backend: str = "auto", *, scale_factor=None) -> torch.Tensor:
    """F.interpolate(x, size=size, mode=mode, align_corners=align_corners) for "nearest" (the source
    pixel floor(Y * H/Ho), the ratio in fp32 as PyTorch rounds it) and "bilinear" (align_corners True:
    Y * (H-1)/(Ho-1); False or None: (Y + 0.5) * H/Ho - 0.5 clipped to the map).

    Args:
        x: [B, C, H, W].
        size: (Ho, Wo), any size, up or down; or None with scale_factor.
        backend: as `local_upsample`.
        scale_factor: a number or a pair, instead of size: (floor(H * s), floor(W * s)) as F.interpolate
            computes it, positions then by that size (F.interpolate's recompute_scale_factor=True; the
            same positions for integer factors).

    Returns:
        [B, C, Ho, Wo].
    """
    if (size is None) == (scale_factor is None):
        raise ValueError("pass exactly one of size and scale_factor (as F.interpolate)")
    if scale_factor is not None:
        size = _scaled_size(x, scale_factor)
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


def _scaled_size(x, scale_factor) -> tuple:
    factors = tuple(scale_factor) if isinstance(scale_factor, (tuple, list)) else (scale_factor, scale_factor)
    if len(factors) != 2 or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < math.inf
                                for f in factors):
        raise ValueError(f"scale_factor must be a positive finite number or a pair of them, got {scale_factor!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    return tuple(math.floor(n * f) for n, f in zip(x.shape[2:], factors))
