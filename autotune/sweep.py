"""Offline sweeps: for each shape bucket, time every spill-free candidate with do_bench (median)
on fresh random inputs, check the fastest against the eager reference, keep it."""
from __future__ import annotations

import itertools
import sys
import time
from typing import Iterable, NamedTuple, Optional

import torch
from triton.runtime.errors import OutOfResources

from kernels.launchers import INTERPRET, Config, Problem, Spec, default_config, upsample_bwd, upsample_fwd
from kernels.layout import DTYPES as ALL_DTYPES, acc_dtype
from upsampler.naive import deformable_local_attention_ref

from . import cache
from .space import candidates, spill_free

DTYPES = {n: ALL_DTYPES[n] for n in ("fp32", "bf16", "fp16")}  # the tuned ones (fp64 runs untuned)
# FPN levels of an 800x1216 image, C=256, upsampled x2 into the next level
FPN = [(100, 152), (50, 76), (25, 38), (13, 19)]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
CHECKED = 3  # ranked configurations checked before a bucket is given up as broken


class Row(NamedTuple):
    kernel: str
    bucket: str
    tried: int
    best_ms: float
    default_ms: float
    config: Optional[Config]
    rel_err: float
    status: str  # "ok", or why nothing was kept


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


def _runner(pb: Problem, cfg: Config, x, backward: bool, dout=None):
    """The launch to time (or check): forward, or backward from a saved attention; results in the
    order of x (q, k, v, offset, rpb)."""
    q, k, v, off, rpb = x
    size, spec = (pb.Ho, pb.Wo), Spec(pb.G, pb.NH, pb.K, scale=(pb.D // pb.NH) ** -0.5)
    if not backward:
        return lambda: (upsample_fwd(v, size, spec, off, q, k, rpb, config=cfg, need_attn=False)[0],)
    _, attn = upsample_fwd(v, size, spec, off, q, k, rpb)
    if dout is None:
        dout = torch.randn(pb.B, pb.C, pb.Ho, pb.Wo, device=v.device).to(v.dtype)

    def run():
        dv, doff, dq, dk, drpb, _ = upsample_bwd(dout, v, size, spec, off, q, k, rpb, attn=attn, config=cfg)
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
    """The eager op's output (or gradients) on the same inputs, in the kernels' accumulation dtype:
    fp32 positions floor exactly as the kernel's do, where an fp64 reference alone differs by 1e-5
    on a 200x304 map (and by 1e-3 in d(offset), samples flipping across cell edges). One batch
    element at a time: the eager op keeps K sampled copies of k and v."""
    acc = acc_dtype(x[0].dtype)
    parts = []
    for b in range(pb.B):
        xb = [t.detach()[b:b + 1].to(acc).requires_grad_(backward) for t in x[:4]]
        xb.append(x[4].detach().to(acc).requires_grad_(backward))
        out = deformable_local_attention_ref(*xb, num_heads=pb.NH, num_groups=pb.G, scale=(pb.D // pb.NH) ** -0.5)
        parts.append(torch.autograd.grad(out, xb, dout[b:b + 1].to(acc)) if backward else (out,))
    # rpb is shared by the batch: its gradient sums over it
    return [torch.stack(p).sum(0) if i == 4 else torch.cat(p) for i, p in enumerate(zip(*parts))]


def check(pb: Problem, cfg: Config, x, backward: bool) -> float:
    """Largest relative error of the output (or of any gradient) against the eager reference."""
    dout = torch.randn(pb.B, pb.C, pb.Ho, pb.Wo, device=x[0].device).to(x[0].dtype)
    got = _runner(pb, cfg, x, backward, dout)()
    refs = _reference(pb, x, dout, backward)
    errs = []
    for a, b in zip(got, refs):
        # absolute where the reference is zero (k_u=1: the softmax is constant, q and k get no gradient)
        denom = b.double().norm().item() or 1.0
        err = (a.double() - b.double()).norm().item() / denom
        errs.append(err if err == err else float("inf"))
    return max(errs)


def _space(pb: Problem, backward: bool, dtype: str, quick: bool, cc: int) -> tuple[Config, ...]:
    """What gets timed: spill-free candidates, compiled as the JIT specialises them at this problem
    (its sizes decide divisibility, so vector widths and registers)."""
    if INTERPRET:  # compiled spill reports mean nothing to the interpreter: the widest pixel tile only
        return (max(candidates(pb, backward, quick=True), key=lambda c: c.block_p),)
    found = candidates(pb, backward, quick)
    print(f"    compiling {len(found)} {'bwd' if backward else 'fwd'} candidates for sm_{cc} to drop what spills",
          file=sys.stderr, flush=True)
    return tuple(spill_free(pb, found, backward, dtype, cc))


def tune(pb: Problem, dtype: str, backward: bool, quick: bool, cc: int, seed: int, log=sys.stderr) -> Row:
    """Time the default and every candidate of one bucket, and check the fastest against the reference."""
    dt = DTYPES[dtype]
    key = cache.bucket(pb, dt, backward)
    kernel = "bwd" if backward else "fwd"
    default = default_config(pb, backward)
    space = _space(pb, backward, dtype, quick, cc)
    x = inputs(pb, dt, "cpu" if INTERPRET else "cuda", seed)
    times = {}
    for cfg in dict.fromkeys((default,) + space):
        try:
            times[cfg] = _time(_runner(pb, cfg, x, backward))
        except (OutOfResources, torch.cuda.OutOfMemoryError) as e:  # not a candidate on this device
            print(f"    skipped {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", file=log)
    if not times:
        return Row(kernel, key, 0, float("nan"), float("nan"), None, float("nan"), "nothing launched")
    err = float("nan")
    for cfg in sorted(times, key=times.get)[:CHECKED]:
        try:
            err = check(pb, cfg, x, backward)
        except torch.cuda.OutOfMemoryError:
            return Row(kernel, key, len(times), times[cfg], times.get(default, float("nan")), cfg, err,
                       "reference out of memory: not verified, not kept")
        if err < TOL[dt]:
            return Row(kernel, key, len(times), times[cfg], times.get(default, float("nan")), cfg, err, "ok")
    return Row(kernel, key, len(times), float("nan"), times.get(default, float("nan")), None, err,
               f"the {CHECKED} fastest disagree with the reference")


def sweep(pbs: list[Problem], dtypes: list[str], backward: bool, quick: bool, log=sys.stderr) -> list[Row]:
    """Tune every bucket, storing each verified winner as soon as it is found (a long sweep that is
    interrupted keeps what it did)."""
    cc = 90 if INTERPRET else 10 * torch.cuda.get_device_capability()[0] + torch.cuda.get_device_capability()[1]
    # problem by problem (the first FPN level first): a sweep cut short keeps whole levels
    jobs = [(bwd, pb, dt) for pb in pbs for dt in dtypes for bwd in ((False, True) if backward else (False,))]
    rows = []
    for i, (bwd, pb, dt) in enumerate(jobs, 1):
        t = time.perf_counter()
        row = tune(pb, dt, bwd, quick, cc, seed=i, log=log)
        if row.status == "ok":
            cache.store({row.bucket: row.config},
                        {row.bucket: {"ms": row.best_ms, "default_ms": row.default_ms, "rel_err": row.rel_err}})
        rows.append(row)
        print(f"[{i}/{len(jobs)}] {row.bucket}: {row.tried} configs, best {row.best_ms:.3f} ms (default "
              f"{row.default_ms:.3f} ms), rel err {row.rel_err:.1e}, {row.status} [{time.perf_counter() - t:.0f} s]",
              file=log, flush=True)
    return rows
