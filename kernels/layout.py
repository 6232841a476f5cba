"""The op's conventions that the kernels, the torch path, the checks, autotune and bench share: the
accumulation dtype, the channel runs of one group and one head, the neighbour count K, the dtype names.
Plain torch, no Triton: `import upsampler` stays free of it."""
from __future__ import annotations

import torch

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


def neighbours(offset, rpb, logits, weights, kernel_size, G: int) -> int:
    """K of checked arguments (tensors or their shapes): the weights' [B, nh, K, ...], rpb's [nh, K, d],
    offset's [B, G*2K, ...], else kernel_size**2, else 1."""
    shape = [getattr(t, "shape", t) for t in (logits if logits is not None else weights, rpb, offset)]
    if shape[0] is not None:
        return shape[0][2]
    if shape[1] is not None:
        return shape[1][1]
    if shape[2] is not None:
        return shape[2][1] // (2 * G)
    return kernel_size * kernel_size if kernel_size else 1
