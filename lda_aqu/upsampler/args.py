"""The argument checks every module shares: constructor ints, the input map, the output size, the empty
batch."""
from __future__ import annotations

import numbers

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .dispatch import FLOAT_DTYPES, autocasting, refuse_jit
from .functional import _check_extent, empty_output


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _odd_int(name: str, value) -> int:
    if _positive_int(name, value) % 2 == 0:
        raise ValueError(f"{name} must be odd (a centred window), got {value}")
    return int(value)


def _check_input(x, channels: int, weight: torch.Tensor, name: str = "x"):
    """x of a module whose parameters are like `weight`: a floating (B, channels, H, W) map on the
    parameters' device, in their dtype unless autocast casts it. H and W must be positive; B may be 0."""
    refuse_jit()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must be (B, {channels}, H, W), got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, one of {FLOAT_DTYPES}, got {x.dtype}: convert it, "
                        f"e.g. {name}.float()")
    if x.device != weight.device:
        raise ValueError(f"{name} is on {x.device} but the module's parameters are on {weight.device}: move one "
                         f"to the other (module.to({name}.device))")
    if x.dtype != weight.dtype and not autocasting(x.device.type):
        raise TypeError(f"{name} has dtype {x.dtype} but the module's parameters are {weight.dtype}: convert the "
                        f"module (module.to({x.dtype})) or the input ({name}.to({weight.dtype})), or for mixed "
                        f"precision run under torch.autocast(\"{x.device.type}\", dtype=torch.bfloat16 or float16)")
    _check_extent(name, x)


def _empty_batch(module: nn.Module, x: torch.Tensor, size) -> torch.Tensor:
    """A module's output for an empty batch, [0, C, *size], on the graph of x and every parameter (so
    they get gradients, empty or zero, as a convolution's would); no layer runs, as some (pixel_shuffle's
    backward) fail on an empty batch."""
    return empty_output((0, x.shape[1], *size), x, *module.parameters())


def _size_arg(size, default):
    """A module's output size: `default` when size is None, else size checked as a pair of positive ints."""
    if size is None:
        return default
    if not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2 \
            or not all(isinstance(n, (int, torch.SymInt)) and not isinstance(n, bool) for n in size):
        raise TypeError(f"size must be None or a pair of ints (h, w), got {size!r}")
    if size[0] < 1:
        raise ValueError(f"size must be positive, got height {size[0]}")
    if size[1] < 1:
        raise ValueError(f"size must be positive, got width {size[1]}")
    return tuple(size)


def _same_size(size, other) -> bool:
    """size == other, without a guard where a size is symbolic (torch.export would otherwise tie the FPN
    level sizes to each other): what is not known to be equal counts as different, and the callers'
    path for a different size is exact for an equal one too."""
    return all(statically_known_true(a == b) for a, b in zip(size, other))


def _output_size(size) -> tuple:
    """A module's output_size: a pair of positive ints (h, w)."""
    if not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2 \
            or not all(isinstance(n, (int, torch.SymInt)) and not isinstance(n, bool) for n in size):
        raise TypeError(f"output_size must be a pair of ints (h, w), got {size!r}")
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"output_size must be positive, got {tuple(size)}")
    return tuple(size)
