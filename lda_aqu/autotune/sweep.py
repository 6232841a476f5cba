"""Offline sweeps: for each kernel variant and shape bucket, time every spill-free candidate with
do_bench (median) on fresh random inputs and keep the fastest whose error against the float64
reference is within a bound of the default configuration's; where none of the fastest is, the
default itself (what must hold on any compiler: a variant is never left without a configuration).

The variants tuned are those LDA-AQU's module runs (offsets and rpb, align-corners positions, zero
padding): by default the inference forward and a training step's two launches, the forward that
stores the softmax weights and the atomic backward; the deterministic backward on request."""
from __future__ import annotations

import itertools
import sys
import time
from typing import Iterable, NamedTuple, Optional

import torch
from triton.runtime.errors import OutOfResources

from ..kernels.launchers import INTERPRET, Config, Problem, Spec, default_config, upsample_bwd, upsample_fwd
from ..kernels.layout import DTYPES as ALL_DTYPES
from ..upsampler.naive import deformable_local_attention_ref

from . import cache
from .resources import MissingTritonInternal
from .space import candidates, spill_free

DTYPES = {n: ALL_DTYPES[n] for n in ("fp32", "bf16", "fp16")}  # the tuned ones (fp64 runs untuned)
# FPN levels of an 800x1216 image, C=256, upsampled x2 into the next level
FPN = [(100, 152), (50, 76), (25, 38), (13, 19)]
MARGIN = 4.0  # see bound()
# past these the default's own error against float64 is a bug, not rounding: fp32 reaches ~1e-3 in
# d(offset) on a 200x304 map (samples within rounding of a cell edge land in the other cell), bf16
# ~4e-3 everywhere (its 8-bit mantissa)
CAP = {torch.float32: 1e-2, torch.float16: 5e-2, torch.bfloat16: 5e-2}
CHECKED = 3  # ranked configurations checked before the default is kept
VARIANTS = ("fwd", "fwd-train", "bwd")  # what inference and a training step run; "bwd-det" on request


class Row(NamedTuple):
    kernel: str
    bucket: str
    tried: int
    best_ms: float
    default_ms: float
    config: Optional[Config]
    rel_err: float
    status: str  # "ok", "ok: the default (...)" where the fastest fail the check, or why nothing was kept


def problems(kernel_sizes: Iterable[int], scales: Iterable[float], layouts: Iterable[tuple[int, int]],
             quick: bool) -> list[Problem]:
    """Shape buckets: FPN levels x k_u x scale x (groups, heads)."""
    # plumbing only on the interpreter: tiny maps it runs in seconds
    B, D, C, levels = (1, 4, 16, [(4, 4)]) if INTERPRET else (2, 64, 256, FPN[:2] if quick else FPN)
    layouts = list(layouts)
    for G, nh in layouts:
        if D % G or C % G or D % nh or C % nh:
            raise ValueError(f"groups ({G}) and heads ({nh}) must divide the sweep's D={D} and C={C}")
    return [Problem(B, D, C, H, W, int(H * s), int(W * s), G, nh, k * k)
            for (H, W), k, s, (G, nh) in itertools.product(levels, kernel_sizes, scales, layouts)]


def inputs(pb: Problem, dtype: torch.dtype, device: str, seed: int = 0):
    """Random q, k, v, offsets (N(0, 3) output pixels around each pixel) and rpb; never zeros."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, device=device) * s).to(dtype)
    return (randn(pb.B, pb.D, pb.Ho, pb.Wo), randn(pb.B, pb.D, pb.H, pb.W), randn(pb.B, pb.C, pb.H, pb.W),
            randn(pb.B, 2 * pb.G * pb.K, pb.Ho, pb.Wo, s=3.0), randn(pb.NH, pb.K, pb.D // pb.NH, s=0.5))


def variant(kernel: str) -> cache.Variant:
    """The cache's name of what the sweep launches: the module's call of the kernel (see `_runner`)."""
    return cache.Variant(kernel)


def plan(pbs: list[Problem], dtypes: list[str], kernels: Iterable[str] = VARIANTS) -> list[tuple[str, Problem, str]]:
    """(kernel, problem, dtype) of every bucket to tune, problem by problem (the first FPN level
    first): a sweep cut short keeps whole levels."""
    kernels = list(kernels)
    for kernel in kernels:
        if kernel not in cache.KERNELS:
            raise ValueError(f"kernel variants are {cache.KERNELS}, got {kernel!r}")
    return [(kernel, pb, dt) for pb in pbs for dt in dtypes for kernel in kernels]


def _runner(pb: Problem, cfg: Config, x, kernel: str, dout=None):
    """The launch of `kernel` to time (or check): the inference forward, the training forward that
    stores the softmax weights, or a backward from them; results in the order of x (q, k, v,
    offset, rpb)."""
    q, k, v, off, rpb = x
    size, spec = (pb.Ho, pb.Wo), Spec(pb.G, pb.NH, pb.K, scale=(pb.D // pb.NH) ** -0.5)
    if kernel in ("fwd", "fwd-train"):
        return lambda: (upsample_fwd(v, size, spec, off, q, k, rpb, config=cfg, need_attn=kernel == "fwd-train")[0],)
    _, attn = upsample_fwd(v, size, spec, off, q, k, rpb)
    if dout is None:
        dout = torch.randn(pb.B, pb.C, pb.Ho, pb.Wo, device=v.device).to(v.dtype)

    def run():
        dv, doff, dq, dk, drpb, _ = upsample_bwd(dout, v, size, spec, off, q, k, rpb, attn=attn, config=cfg,
                                                 deterministic=kernel == "bwd-det")
        return dq, dk, dv, doff, drpb
    return run


def _time(fn) -> float:
    if INTERPRET:  # no device to time: one run proves the configuration launches
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _reference(pb: Problem, x, dout, backward: bool) -> list[torch.Tensor]:
    """The eager op's output (or gradients) in float64 on the same inputs: what every configuration
    on every compiler approximates. One batch element at a time: the eager op keeps K sampled copies
    of k and v."""
    parts = []
    for b in range(pb.B):
        xb = [t.detach()[b:b + 1].double().requires_grad_(backward) for t in x[:4]]
        xb.append(x[4].detach().double().requires_grad_(backward))
        out = deformable_local_attention_ref(*xb, num_heads=pb.NH, num_groups=pb.G, scale=(pb.D // pb.NH) ** -0.5)
        parts.append(torch.autograd.grad(out, xb, dout[b:b + 1].double()) if backward else (out,))
    # rpb is shared by the batch: its gradient sums over it
    return [torch.stack(p).sum(0) if i == 4 else torch.cat(p) for i, p in enumerate(zip(*parts))]


def check(pb: Problem, cfg: Config, x, kernel: str, dout=None, refs=None) -> float:
    """Largest relative error of the output (or of any gradient) against the float64 reference
    (`refs`, computed here when not given, from `dout`)."""
    if dout is None:
        dout = torch.randn(pb.B, pb.C, pb.Ho, pb.Wo, device=x[0].device).to(x[0].dtype)
    got = _runner(pb, cfg, x, kernel, dout)()
    refs = _reference(pb, x, dout, kernel.startswith("bwd")) if refs is None else refs
    errs = []
    for a, b in zip(got, refs):
        # absolute where the reference is zero (k_u=1: the softmax is constant, q and k get no gradient)
        err = (a.double() - b).norm().item() / (b.norm().item() or 1.0)
        errs.append(err if err == err else float("inf"))
    return max(errs)


def bound(default_err: float, dtype: torch.dtype) -> float:
    """The error a configuration may reach against float64: MARGIN times the default's on the same
    inputs (a correct configuration differs only in summation order and the compiler's contractions:
    through the interpreter, another configuration's error is 0.84x to 1.22x the default's over 20
    seeds, docs/benchmarks.md), and never below the precision's unit roundoff."""
    return max(MARGIN * default_err, torch.finfo(dtype).eps / 2)


def _space(pb: Problem, kernel: str, dtype: str, quick: bool, cc: int) -> tuple[Config, ...]:
    """What gets timed: spill-free candidates, compiled as the JIT specialises them at this problem
    (its sizes decide divisibility, so vector widths and registers). The inference and training
    forwards are compiled together (one report each), once for both variants. Where this Triton lacks
    an internal that the compile harness needs, nothing: the sweep times the default alone."""
    backward = kernel.startswith("bwd")
    if INTERPRET:  # compiled spill reports mean nothing to the interpreter: the widest pixel tile only
        return (max(candidates(pb, backward, quick=True), key=lambda c: c.block_p),)
    key = (pb, dtype, "bwd" if backward else "fwd", kernel == "bwd-det", quick, cc)
    if key not in _SPACES:
        found = candidates(pb, backward, quick)
        print(f"    compiling {len(found)} {key[2]} candidates for sm_{cc} to drop what spills", file=sys.stderr,
              flush=True)
        try:
            _SPACES[key] = tuple(spill_free(pb, found, backward, dtype, cc, deterministic=kernel == "bwd-det"))
        except MissingTritonInternal as e:
            print(f"    {e}; timing the default configuration only", file=sys.stderr, flush=True)
            _SPACES[key] = ()
    return _SPACES[key]


_SPACES: dict = {}  # (problem, dtype, direction, deterministic, quick, cc) -> the spill-free candidates


def tune(pb: Problem, dtype: str, kernel: str, quick: bool, cc: int, seed: int, log=sys.stderr) -> Row:
    """Time the default and every candidate of one variant's bucket, and keep the fastest whose error
    against the float64 reference is within bound() of the default's; else the default itself."""
    dt = DTYPES[dtype]
    key = cache.bucket(pb, dt, variant(kernel))
    default = default_config(pb, kernel.startswith("bwd"))
    space = _space(pb, kernel, dtype, quick, cc)
    x = inputs(pb, dt, "cpu" if INTERPRET else "cuda", seed)
    times = {}
    for cfg in dict.fromkeys((default,) + space):
        try:
            times[cfg] = _time(_runner(pb, cfg, x, kernel))
        except (OutOfResources, torch.cuda.OutOfMemoryError) as e:  # not a candidate on this device
            print(f"    skipped {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", file=log)
    default_ms = times.get(default, float("nan"))
    if not times:
        return Row(kernel, key, 0, float("nan"), default_ms, None, float("nan"), "nothing launched")
    dout = torch.randn(pb.B, pb.C, pb.Ho, pb.Wo, device=x[0].device).to(dt)
    try:
        refs = _reference(pb, x, dout, kernel.startswith("bwd"))
        default_err = check(pb, default, x, kernel, dout, refs)
    except torch.cuda.OutOfMemoryError:
        return Row(kernel, key, len(times), float("nan"), default_ms, None, float("nan"),
                   "reference out of memory: not verified, not kept")
    if not default_err <= CAP[dt]:
        return Row(kernel, key, len(times), float("nan"), default_ms, None, default_err,
                   f"the default configuration's error exceeds {CAP[dt]:.0e}: a kernel bug, not kept")
    limit = bound(default_err, dt)
    for cfg in sorted(times, key=times.get)[:CHECKED]:
        err = default_err if cfg == default else check(pb, cfg, x, kernel, dout, refs)
        if err <= limit:
            return Row(kernel, key, len(times), times[cfg], default_ms, cfg, err, "ok")
        print(f"    rejected {cfg}: error {err:.2e} against float64, over {limit:.2e} ({MARGIN:g}x the "
              f"default's {default_err:.2e})", file=log)
    return Row(kernel, key, len(times), default_ms, default_ms, default, default_err,
               f"ok: the default (the {CHECKED} fastest exceed {limit:.1e})")


def sweep(pbs: list[Problem], dtypes: list[str], kernels: Iterable[str] = VARIANTS, quick: bool = False,
          log=sys.stderr) -> list[Row]:
    """Tune every bucket of plan(), storing each verified winner as soon as it is found (a long sweep
    that is interrupted keeps what it did)."""
    cc = 90 if INTERPRET else 10 * torch.cuda.get_device_capability()[0] + torch.cuda.get_device_capability()[1]
    jobs = plan(pbs, dtypes, kernels)
    rows = []
    for i, (kernel, pb, dt) in enumerate(jobs, 1):
        t = time.perf_counter()
        row = tune(pb, dt, kernel, quick, cc, seed=i, log=log)
        if row.status.startswith("ok"):
            cache.store({row.bucket: row.config},
                        {row.bucket: {"ms": row.best_ms, "default_ms": row.default_ms, "rel_err": row.rel_err}})
        rows.append(row)
        print(f"[{i}/{len(jobs)}] {row.bucket}: {row.tried} configs, best {row.best_ms:.3f} ms (default "
              f"{row.default_ms:.3f} ms), rel err {row.rel_err:.1e}, {row.status} [{time.perf_counter() - t:.0f} s]",
              file=log, flush=True)
    return rows
