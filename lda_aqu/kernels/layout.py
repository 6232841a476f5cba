"""The op's conventions that the kernels, the torch path, the checks, autotune and bench share: the
resolved call (Spec), the mode and window names, the accumulation dtype, the channel runs of one group
and one head, the dtype names, the runtime's sample geometry. Plain torch, no Triton: `import
lda_aqu.upsampler` stays free of it."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

# how the samples are weighted, by one name and one number in every backend: the Triton kernels'
# WEIGHTS constexpr and the C++ kernels' Problem.mode
WEIGHT_MODES = {"unit": 0, "weights": 1, "logits": 2, "attention": 3}
# where an output pixel's window lies, by one name and one number in every backend: "centered" on the
# sample origin (plus offsets), "clamped" (NATTEN's neighbourhood: the k x k window around the nearest
# source pixel, shifted to stay on the map), "ratio" (AnyUp's: the rows and columns whose cells lie
# within a ratio of the map around the pixel centre, clamped at the borders, so its size varies)
WINDOWS = {"centered": 0, "clamped": 1, "ratio": 2}
# (pixel, corner) pairs per chunk of output rows in the torch path and per scatter pass of the native
# backward: every per-pair intermediate stays cache-sized, so the cost per output pixel does not grow
# with the map (tests shrink it to cross chunk edges on tiny maps)
CHUNK_PAIRS = 1 << 18


class Spec(NamedTuple):
    """A call of the op resolved once where `upsampler.local_upsample` checks it, and handed to every
    backend but the reference (which derives its own): how positions and weights are formed, beyond the
    tensors and sizes. The custom ops take its fields in this order."""
    G: int
    NH: int
    K: int  # neighbours per group: grid**2 for a window, offsets' count otherwise
    weights: str = "attention"  # a WEIGHT_MODES name
    coords: str = "align_corners"
    padding: str = "zeros"
    grid: int = 0  # the window's side (a "ratio" window's widest), 0 for none
    scale: float = 1.0
    window: str = "centered"  # a WINDOWS name
    ratio: float = 0.0  # a "ratio" window's ratio


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    """"fp32" for torch.float32 (DTYPES' names), str(dtype) for others."""
    return next((n for n, d in DTYPES.items() if d == dtype), str(dtype))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums and softmax weights in fp32 for the half types and fp32, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def segments(channels: int, G: int, NH: int) -> list[tuple[int, int, int, int]]:
    """(group, head, first, end) of each channel run with one group and one head."""
    cuts = sorted({i * channels // G for i in range(G + 1)} | {i * channels // NH for i in range(NH + 1)})
    return [(lo * G // channels, lo * NH // channels, lo, hi) for lo, hi in zip(cuts, cuts[1:])]


def weight_mode(q, logits, weights) -> str:
    """The WEIGHT_MODES name of checked arguments: q (with k) attention, else logits, given weights, or unit."""
    return "attention" if q is not None else "logits" if logits is not None else \
        "weights" if weights is not None else "unit"


# Sample geometry of the runtime paths (the torch path, the module's q upsampling). The eager reference
# (lda_aqu/upsampler/naive.py) derives its own, so that a slip here fails the tests instead of passing both.

def unit_align_corners(n_in, n_out):
    """Input pixels per output pixel under align_corners=True; 0 for a one-pixel output."""
    if isinstance(n_out, int):
        return 0.0 if n_out == 1 else (n_in - 1) / (n_out - 1)
    # a symbolic size (export): min/max instead of a branch, whose guard n_out > 1 would bind the size
    return (n_in - 1) * torch.sym_min(n_out - 1, 1) / torch.sym_max(n_out - 1, 1)


def sample_origins(n_in: int, n_out: int, coords: str, dtype, device) -> tuple[torch.Tensor, float]:
    """Each output row's (or column's) position in input pixels before its offset, and the input pixels
    one offset unit spans (offsets are in output pixels under align_corners, input pixels otherwise)."""
    o = torch.arange(n_out, device=device)
    if coords == "half_pixel":
        return (o.to(dtype) + 0.5) * (n_in / n_out) - 0.5, 1.0
    if coords == "nearest":  # F.interpolate(mode="nearest"): a float32 ratio, floored, kept on the map
        src = o.float() * (torch.tensor(n_in, dtype=torch.float32) / n_out)
        return src.floor().clamp(max=n_in - 1).to(dtype), 1.0
    return o.to(dtype), unit_align_corners(n_in, n_out)


def window_offsets(kernel_size, dtype, device=None) -> torch.Tensor:
    """[K, 2]: (dy, dx) = (i - k//2, j - k//2) of neighbour n = i*k + j of a k x k window; [[0, 0]] for none."""
    if kernel_size is None:
        return torch.zeros(1, 2, dtype=dtype, device=device)
    n = torch.arange(kernel_size * kernel_size, device=device)
    return torch.stack((n // kernel_size, n % kernel_size), -1).to(dtype) - kernel_size // 2


def ratio_box(n_in: int, ratio: float) -> int:
    """The most rows (or columns) a "ratio" window spans: hi - lo < 2 * ratio * n_in + 2."""
    return min(n_in, math.ceil(2 * ratio * n_in) + 1)


def window_bounds(n_in, n_out, window: str, kernel_size, ratio: float, device=None):
    """[lo, hi) of each output row's (or column's) window in input rows, int64 [n_out] each."""
    if window == "clamped":
        src = sample_origins(n_in, n_out, "nearest", torch.float32, device)[0].long()
        lo = (src - kernel_size // 2).clamp(0, n_in - kernel_size)
        return lo, lo + kernel_size
    # AnyUp's rule, in float32 as its masks are made: centres (o + 0.5) / n_out, +- ratio, clipped to
    # [0, 1], scaled to the input rows, floor for the first and ceil for the end
    centre = (torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) / n_out
    lo = ((centre - ratio).clamp(0.0, 1.0) * n_in).floor().long()
    hi = ((centre + ratio).clamp(0.0, 1.0) * n_in).ceil().long()
    return lo, hi


def window_origins(n_in, n_out, coords: str, window: str, kernel_size, ratio: float, dtype, device=None):
    """sample_origins for every window: a "clamped" or "ratio" window of `kernel_size` (its box) rows is
    the centered one around lo + kernel_size // 2, in input pixels (unit 1)."""
    if window == "centered":
        return sample_origins(n_in, n_out, coords, dtype, device)
    lo = window_bounds(n_in, n_out, window, kernel_size, ratio, device)[0]
    return (lo + kernel_size // 2).to(dtype), 1.0


def window_extents(n_in, n_out, ratio: float, device=None) -> torch.Tensor:
    """int32 [n_out]: the rows (or columns) of each "ratio" window; box positions past it take no part."""
    lo, hi = window_bounds(n_in, n_out, "ratio", None, ratio, device)
    return (hi - lo).to(torch.int32)


def window_valid(size, in_size, kernel_size, ratio: float, device=None) -> torch.Tensor:
    """bool [Ho, Wo, K] for a "ratio" window: neighbour n = i * kernel_size + j of pixel (Y, X) takes part
    when i < its rows and j < its columns."""
    (Ho, Wo), (H, W) = size, in_size
    ey, ex = window_extents(H, Ho, ratio, device), window_extents(W, Wo, ratio, device)
    i = torch.arange(kernel_size, device=device)
    rows = i[None, :] < ey[:, None]  # [Ho, k]
    cols = i[None, :] < ex[:, None]  # [Wo, k]
    return (rows[:, None, :, None] & cols[None, :, None, :]).flatten(2)
