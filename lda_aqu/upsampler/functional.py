"""The public core op: argument checks, autocast, then the backend `dispatch.choose` picks."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..kernels.layout import Spec, ratio_box, weight_mode
from .dispatch import (BACKENDS, FLOAT_DTYPES, TRITON_DTYPES, autocasting, can_run_triton,  # noqa: F401
                       check_backend, choose)
from .naive import COORDS, PADDINGS, WINDOWS, local_upsample_ref
from .torch_path import averages_heads, local_upsample_torch


def not_scriptable(module):
    """`__prepare_scriptable__` of the modules: torch.jit.script calls it first."""
    raise RuntimeError(f"torch.jit.script is not supported for {type(module).__name__}; use torch.compile, "
                       f"torch.export (then AOTInductor for C++ deployment) or torch.onnx.export")


def select_backend(backend: str, *tensors: torch.Tensor) -> str:
    """The public backend ("triton", "torch" or "reference") that runs these tensors: `dispatch.choose`'s,
    which sees this module's can_run_triton (tools replace it)."""
    return choose(backend, *tensors).family


def _infer_groups(n_offset: int, D: int, C: int, num_groups: Optional[int]) -> int:
    """G from offset's G*2K channels, K = k_u**2 with k_u odd, G dividing D and C."""
    if num_groups is not None:
        candidates = [num_groups]
    else:
        candidates = [g for g in range(1, n_offset // 2 + 1) if n_offset % (2 * g) == 0]
    found = []
    for g in candidates:
        K = n_offset // (2 * g) if n_offset % (2 * g) == 0 else 0
        k_u = math.isqrt(K)
        if K and k_u * k_u == K and k_u % 2 == 1 and D % g == 0 and C % g == 0:
            found.append(g)
    if len(found) != 1:
        why = "no" if not found else f"several ({found})"
        raise ValueError(f"offset has {n_offset} channels: {why} way to read them as G*2*k_u**2 with odd k_u and "
                         f"G dividing q's {D} and v's {C} channels; pass num_groups")
    return found[0]


def _floating(name: str, t, dim: int = 4):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D{' (B, C, H, W)' if dim == 4 else ''}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_extent(name: str, t: torch.Tensor):
    """A zero height or width is an error (an empty batch is not). Separate comparisons: min() over
    symbolic sizes would make torch.export relate sizes that have nothing to do with each other."""
    if t.shape[-2] == 0:
        raise ValueError(f"{name} has height 0: shape {tuple(t.shape)}")
    if t.shape[-1] == 0:
        raise ValueError(f"{name} has width 0: shape {tuple(t.shape)}")


def _is_int(x) -> bool:
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def _check_general(v, size, offset, q, k, rpb, logits, weights, kernel_size, num_groups, num_heads, coords,
                   padding, first: str = "v", average_heads: bool = False):
    """(G, nh, K) of a local_upsample call, or a ValueError/TypeError naming the argument. `first`: the
    argument whose device and dtype the others must have (the caller's first tensor)."""
    _check_map(v, size, coords, padding)
    named = {n: t for n, t in dict(v=v, offset=offset, q=q, k=k, rpb=rpb, logits=logits, weights=weights).items()
             if t is not None}
    _check_tensors(named, first)
    _check_weighting(q, k, rpb, logits, weights, kernel_size, num_heads, num_groups)
    nh, K = _heads_and_neighbours(v, size, q, k, rpb, logits, weights, kernel_size, num_heads, average_heads)
    return _groups_and_neighbours(v, size, offset, q, rpb, K, nh, kernel_size, num_groups)


def _check_map(v, size, coords, padding):
    """v, the output size and the sampling rule."""
    _floating("v", v)
    if not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2 or not all(_is_int(s) for s in size):
        raise TypeError(f"size must be a pair of ints (Ho, Wo), got {size!r}")
    C, Ho, Wo = v.shape[1], *size
    if C == 0:
        raise ValueError(f"v has no channels: shape {tuple(v.shape)}")
    _check_extent("v", v)
    if Ho < 1:
        raise ValueError(f"size must be positive, got height {Ho}")
    if Wo < 1:
        raise ValueError(f"size must be positive, got width {Wo}")
    if coords not in COORDS:
        raise ValueError(f"coords must be one of {COORDS}, got {coords!r}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")


def _check_tensors(named: dict, first: str):
    """Every given tensor a tensor, on `first`'s device and of its dtype, of its rank, of v's batch."""
    B = named["v"].shape[0]
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    ref = named[first]
    for name, t in named.items():
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {ref.device}")
        if t.dtype != ref.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {first} has {ref.dtype}")
        want = {"rpb": 3, "logits": 5, "weights": 5}.get(name, 4)
        if t.dim() != want:
            raise ValueError(f"{name} must be {want}-D, got shape {tuple(t.shape)}")
    batched = {n: t.shape[0] for n, t in named.items() if n != "rpb"}
    if any(b != B for b in batched.values()):
        raise ValueError(f"batch sizes differ: {', '.join(f'{n} {b}' for n, b in batched.items())}")


def _check_weighting(q, k, rpb, logits, weights, kernel_size, num_heads, num_groups):
    """One way of weighting the samples, and the counts' types."""
    if (q is None) != (k is None):
        raise ValueError("q and k go together: pass both (attention weights) or neither")
    if rpb is not None and q is None:
        raise ValueError("rpb is a bias of the attention logits: it needs q and k")
    given = [n for n, t in (("q/k", q), ("logits", logits), ("weights", weights)) if t is not None]
    if len(given) > 1:
        raise ValueError(f"pass at most one way of weighting the samples, got {' and '.join(given)}")
    if kernel_size is not None and (not _is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0):
        raise ValueError(f"kernel_size must be None or a positive odd int, got {kernel_size!r}")
    if not _is_int(num_heads) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if num_groups is not None and (not _is_int(num_groups) or num_groups < 1):
        raise ValueError(f"num_groups must be a positive int or None, got {num_groups!r}")


def _heads_and_neighbours(v, size, q, k, rpb, logits, weights, kernel_size, num_heads, average_heads):
    """(nh, K or None): the heads and neighbours of whichever arguments carry them, which must agree."""
    (C, H, W), (Ho, Wo) = v.shape[1:], size
    Ks = {}
    if kernel_size is not None:
        Ks["kernel_size**2"] = kernel_size * kernel_size
    nh = num_heads
    for name, t in (("logits", logits), ("weights", weights)):
        if t is not None:
            if tuple(t.shape[3:]) != (Ho, Wo):
                raise ValueError(f"{name} is {tuple(t.shape[3:])} in space but size is {(Ho, Wo)}")
            if num_heads not in (1, t.shape[1]):
                raise ValueError(f"{name} has {t.shape[1]} heads but num_heads={num_heads}")
            nh = t.shape[1]
            Ks[name] = t.shape[2]
    if rpb is not None:
        Ks["rpb"] = rpb.shape[1]
    if q is not None:
        D = q.shape[1]
        if tuple(q.shape[2:]) != (Ho, Wo):
            raise ValueError(f"q is {tuple(q.shape[2:])} in space but size is {(Ho, Wo)}")
        if k.shape[1] != D:
            raise ValueError(f"k has {k.shape[1]} channels but q has {D}")
        if tuple(k.shape[2:]) != (H, W):
            raise ValueError(f"k is {tuple(k.shape[2:])} in space but v is {(H, W)}")
        if D == 0:
            raise ValueError(f"q has no channels: shape {tuple(q.shape)}")
        if D % nh:
            raise ValueError(f"num_heads={nh} must divide q's {D} channels")
    if C % nh and not average_heads:  # averaged heads weight every channel alike
        raise ValueError(f"num_heads={nh} must divide v's {C} channels")
    if len(set(Ks.values())) > 1:
        raise ValueError(f"the neighbour count K disagrees between arguments: {Ks}")
    return nh, next(iter(Ks.values()), None)


def _groups_and_neighbours(v, size, offset, q, rpb, K, nh, kernel_size, num_groups):
    """(G, nh, K): the offset groups and the final K, read from offset's channels where it has them."""
    C = v.shape[1]
    Ho, Wo = size
    G = 1
    if offset is not None:
        if tuple(offset.shape[2:]) != (Ho, Wo):
            raise ValueError(f"offset is {tuple(offset.shape[2:])} in space but size is {(Ho, Wo)}")
        n = offset.shape[1]
        if n % 2:
            raise ValueError(f"offset must have G*2*K channels, got {n}")
        D = q.shape[1] if q is not None else C
        if K is not None:
            if num_groups is not None and num_groups * 2 * K != n:
                raise ValueError(f"offset has {n} channels, not num_groups*2*K = {num_groups}*2*{K}")
            G = n // (2 * K) if n % (2 * K) == 0 else 0
            if not G or D % G or C % G:
                raise ValueError(f"offset has {n} channels: not G*2*K for K={K} and a G dividing the "
                                 f"{C} value channels" + (f" and {D} key channels" if q is not None else ""))
        elif num_groups is None and n == 2:
            G = 1
        elif num_groups is not None:  # no window to fix K: any count of points (SAPADeform's), G given
            G = num_groups
            if n % (2 * G) or D % G or C % G:
                raise ValueError(f"offset has {n} channels: not num_groups*2*K for num_groups={G} dividing the "
                                 f"{C} value channels" + (f" and {D} key channels" if q is not None else ""))
        else:
            G = _infer_groups(n, D, C, num_groups)
        K = n // (2 * G)
        if rpb is not None and tuple(rpb.shape) != (nh, K, q.shape[1] // nh):
            raise ValueError(f"rpb must have shape (num_heads, K, D//num_heads) = {(nh, K, q.shape[1] // nh)}, "
                             f"got {tuple(rpb.shape)}")
    elif rpb is not None and tuple(rpb.shape) != (nh, rpb.shape[1], q.shape[1] // nh):
        raise ValueError(f"rpb must have shape (num_heads, K, D//num_heads), got {tuple(rpb.shape)}")
    if K is None:
        K = 1
    if offset is None and K > 1 and kernel_size is None:
        raise ValueError(f"{K} neighbours but neither offset nor kernel_size places them")
    return G, nh, K


def local_upsample(v: torch.Tensor, size, *, offset: Optional[torch.Tensor] = None, q: Optional[torch.Tensor] = None,
                   k: Optional[torch.Tensor] = None, rpb: Optional[torch.Tensor] = None,
                   logits: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
                   kernel_size: Optional[int] = None, num_groups: Optional[int] = None, num_heads: int = 1,
                   scale: Optional[float] = None, coords: str = "align_corners", padding: str = "zeros",
                   window: str = "centered", window_ratio: Optional[float] = None, average_heads: bool = False,
                   backend: str = "auto") -> torch.Tensor:
    """Local sampling upsampler, the family LDA-AQU, CARAFE, DySample and interpolation belong to:

        out[b, c, Y, X] = sum_n w[b, h, n, Y, X] * bilinear(v[b, c], p[b, g, n, Y, X])

    for output pixel (Y, X), channel c in offset group g = c // (C/G) and head h = c // (C/nh).

    Positions p (in input pixels) by `coords`, with d = base grid (kernel_size) + offset:
        "align_corners": ((Y + dy) * (H-1)/(Ho-1), (X + dx) * (W-1)/(Wo-1)): offsets in output pixels,
                         ratio 0 for a one-pixel output (LDA-AQU; F.interpolate bilinear, align_corners=True);
        "half_pixel":    ((Y + 0.5) * H/Ho - 0.5 + dy, ...): offsets in input pixels (DySample;
                         F.interpolate bilinear, align_corners=False);
        "nearest":       (floor(Y * H/Ho) + dy, ...): the source pixel F.interpolate(mode="nearest") picks,
                         offsets in input pixels (CARAFE).
    `padding`: "zeros" reads 0 outside the map, "border" clips the position to it (grid_sample's modes).

    `window` places the k x k neighbours: "centered" adds (i - k//2, j - k//2) to the position above;
    "clamped" (NATTEN's neighbourhood, NAF) takes the k rows clamp(floor(Y * H/Ho) - k//2, 0, H - k) + i
    and the columns likewise, so that every pixel sees k*k real pixels (coords="nearest", no offset,
    k <= H and W). `window_ratio=r` (AnyUp) takes the rows floor(clip((Y + 0.5)/Ho - r, 0, 1) * H) up to
    ceil(clip((Y + 0.5)/Ho + r, 0, 1) * H) (in float32) and the columns likewise: a rectangle whose size
    varies, outside of which no key takes part in the softmax (attention only, no offset or rpb).
    `average_heads`: the heads' attention weights averaged and applied to all C channels of v
    (nn.MultiheadAttention's average_attn_weights=True), instead of each head weighting its C/nh.

    Weights w, one of: softmax_n(scale * q . (k_n + rpb_n)) per head (q and k given: LDA-AQU),
    softmax_n(logits) (CARAFE's kernels), the given weights, or 1 for every sample (DySample,
    interpolation).

    Args:
        v: [B, C, H, W] values.
        size: (Ho, Wo).
        offset: [B, G*2*K, Ho, Wo] or None; channel g*2K + 2n is the y and +1 the x displacement of
            neighbour n of group g.
        q: [B, D, Ho, Wo] and k: [B, D, H, W]; rpb: [nh, K, D//nh] added to the sampled keys.
        logits, weights: [B, nh, K, Ho, Wo].
        kernel_size: k adds the k x k window (i - k//2, j - k//2) to neighbour n = i*k + j; None adds nothing.
        num_groups: G, read from offset when None. num_heads: nh (logits and weights carry their own).
        scale: logit scale, (D//nh) ** -0.5 by default.
        backend: "auto" (Triton on CUDA, else the torch path), "triton", "torch" or "reference".

    Returns:
        [B, C, Ho, Wo] in v's dtype (the autocast dtype under autocast).
    """
    return _local_upsample("v", v, size, offset, q, k, rpb, logits, weights, kernel_size, num_groups, num_heads,
                           scale, coords, padding, backend, window, window_ratio, average_heads)


def _check_window(v, size, offset, q, rpb, kernel_size, coords, window, window_ratio, average_heads):
    """(window, ratio, kernel_size) for the backends: a "ratio" window's kernel_size is its box."""
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    if not isinstance(average_heads, bool):
        raise TypeError(f"average_heads must be a bool, got {type(average_heads).__name__}")
    if average_heads and q is None:
        raise ValueError("average_heads averages attention weights: it needs q and k")
    H, W = v.shape[-2:]
    if window_ratio is not None:
        if window not in ("centered", "ratio"):
            raise ValueError(f"window_ratio sets window='ratio', not {window!r}")
        if isinstance(window_ratio, bool) or not isinstance(window_ratio, (int, float)) or \
                not 0 < window_ratio < math.inf:
            raise ValueError(f"window_ratio must be a positive finite number, got {window_ratio!r}")
        for name, t in (("offset", offset), ("rpb", rpb), ("kernel_size", kernel_size)):
            if t is not None:
                raise ValueError(f"a window_ratio window takes no {name}: its size varies by pixel")
        if q is None:
            raise ValueError("a window_ratio window masks attention logits: it needs q and k")
        return "ratio", float(window_ratio), max(ratio_box(H, window_ratio), ratio_box(W, window_ratio))
    if window == "ratio":
        raise ValueError("window='ratio' needs window_ratio")
    if window == "clamped":
        if coords != "nearest":
            raise ValueError(f"window='clamped' is centred on the nearest source pixel: coords must be 'nearest', "
                             f"got {coords!r}")
        if offset is not None:
            raise ValueError("window='clamped' takes no offset: the window itself is kept on the map")
        if kernel_size is None:
            raise ValueError("window='clamped' needs kernel_size")
        if kernel_size > H or kernel_size > W:
            raise ValueError(f"window='clamped' needs kernel_size <= the map's height and width, got kernel_size="
                             f"{kernel_size} for {H}x{W}")
    return window, 0.0, kernel_size


def _local_upsample(first, v, size, offset, q, k, rpb, logits, weights, kernel_size, num_groups, num_heads, scale,
                    coords, padding, backend, window="centered", window_ratio=None, average_heads=False):
    """local_upsample, its arguments' devices and dtypes those of the argument `first`."""
    if isinstance(v, torch.Tensor) and autocasting(v.device.type):
        dt = torch.get_autocast_dtype(v.device.type)
        v, offset, q, k, rpb, logits, weights = (
            t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in (v, offset, q, k, rpb, logits, weights))
    G, nh, K = _check_general(v, size, offset, q, k, rpb, logits, weights, kernel_size, num_groups, num_heads,
                              coords, padding, first, average_heads is True)
    window, ratio, box = _check_window(v, size, offset, q, rpb, kernel_size, coords, window, window_ratio,
                                       average_heads)
    if window != "centered":  # a window's positions are input pixels, whole ones
        coords = "nearest"
    if q is None:
        scale = 1.0
    elif scale is None:
        scale = (q.shape[1] // nh) ** -0.5
    _check_scale(scale)
    if v.shape[0] == 0:
        return empty_output((0, v.shape[1], *size), v, offset, q, k, rpb, logits, weights)
    spec = Spec(G, nh, box * box if window == "ratio" else K, weight_mode(q, logits, weights), coords, padding,
                box or 0, float(scale), window, ratio)
    size = tuple(size)
    chosen = select_backend(backend, v)
    if average_heads and nh > 1 and chosen != "reference" and not (chosen == "torch" and averages_heads(v, q, k)):
        # the mean of the heads' weighted sums, each head over all of v: the heads' weights averaged
        out = None
        for h, (qh, kh) in enumerate(zip(q.chunk(nh, 1), k.chunk(nh, 1))):
            term = _run(chosen, v, size, spec._replace(NH=1), offset, qh, kh, None if rpb is None else rpb[h:h + 1],
                        logits, weights, False)
            out = term if out is None else out.add_(term) if _inference(out) else out + term
        return out.div_(nh) if _inference(out) else out / nh
    return _run(chosen, v, size, spec, offset, q, k, rpb, logits, weights, average_heads and nh > 1)


def _inference(t: torch.Tensor) -> bool:
    # adding in place into the running sum keeps one output alive, not two; autograd needs the copies
    return not t.requires_grad


def _check_scale(scale):
    # abs(scale) < inf rather than math.isfinite: torch.compile(dynamic=True) passes a module's float
    # attribute as a symbolic float, which compares but has no math.isfinite
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not abs(scale) < math.inf:
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")


def empty_output(shape, *inputs) -> torch.Tensor:
    """The output of an empty batch: an empty tensor of `shape`, on the autograd graph of every input
    (so that each gets a gradient, empty or zero, as from a convolution) without running a kernel."""
    tied = sum(t.sum() for t in inputs if t is not None) * 0
    return tied.to(inputs[0].dtype).expand(shape).contiguous()


def _run(chosen, v, size, spec: Spec, offset, q, k, rpb, logits, weights, average_heads):
    """The output of the backend select_backend chose, for a resolved call (the reference derives its own
    geometry)."""
    if chosen == "reference":
        return local_upsample_ref(v, size, offset=offset, q=q, k=k, rpb=rpb, logits=logits, weights=weights,
                                  kernel_size=None if spec.window == "ratio" else spec.grid or None, num_groups=spec.G,
                                  num_heads=spec.NH, scale=spec.scale, coords=spec.coords, padding=spec.padding,
                                  window=spec.window, window_ratio=spec.ratio, average_heads=average_heads)
    if chosen == "torch":
        return local_upsample_torch(v, size, spec, offset=offset, q=q, k=k, rpb=rpb, logits=logits, weights=weights,
                                    average_heads=average_heads)
    from .function import local_upsample_triton
    return local_upsample_triton(v, size, spec, offset=offset, q=q, k=k, rpb=rpb, logits=logits, weights=weights)


def deformable_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: torch.Tensor,
                               rpb: Optional[torch.Tensor] = None, *, num_heads: int = 1,
                               num_groups: Optional[int] = None, scale: Optional[float] = None,
                               backend: str = "auto") -> torch.Tensor:
    """Offset-sampled neighbour gathering and softmax aggregation (LDA-AQU steps 4-5): `local_upsample`
    with attention weights, align-corners positions and zero padding, through the same checks (the
    devices and dtypes of the others must be q's).

    Args:
        q: [B, D, Ho, Wo] queries at output resolution.
        k: [B, D, H, W] keys; v: [B, C, H, W] values, at input resolution.
        offset: [B, G*2*K, Ho, Wo] sample positions in output pixels, base grid included; channel
            g*2K + 2n is the y and g*2K + 2n + 1 the x offset of neighbour n of group g.
        rpb: [nh, K, D//nh] bias added to the sampled keys, or None.
        num_heads: nh; must divide D and C.
        num_groups: G; inferred from offset (and rpb) when None, with an error if ambiguous.
        scale: logit scale, (D//nh) ** -0.5 by default.
        backend: "auto" (Triton for CUDA tensors, else the torch path), "triton", "torch", "reference".

    Returns:
        [B, C, Ho, Wo] in the inputs' dtype (the autocast dtype under autocast).
    """
    for name, t in (("q", q), ("k", k), ("offset", offset)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return _local_upsample("q", v, tuple(q.shape[-2:]), offset, q, k, rpb, None, None, None, num_groups, num_heads,
                           scale, "align_corners", "zeros", backend)
