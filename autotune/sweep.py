"""Offline sweeps: for each shape bucket, time every spill-free candidate with do_bench (median)
on fresh random inputs, check the winner against the eager reference, keep it."""
from __future__ import annotations

import itertools
import sys
import time
from typing import Iterable, NamedTuple

import torch

from kernels.launchers import INTERPRET, Config, Problem, default_config, dla_bwd, dla_fwd
from upsampler.naive import deformable_local_attention_ref

from . import cache
from .space import candidates, spill_free

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# FPN levels of an 800x1216 image, C=256, upsampled x2 into the next level
FPN = [(100, 152), (50, 76), (25, 38), (13, 19)]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


class Row(NamedTuple):
    kernel: str
    bucket: str
    tried: int
    best_ms: float
    default_ms: float
    config: Config
    rel_err: float


def problems(kernel_sizes: Iterable[int], scales: Iterable[float], quick: bool) -> list[Problem]:
    if INTERPRET:  # plumbing only: tiny maps the interpreter runs in seconds
        return [Problem(1, 4, 16, 6, 6, int(6 * s), int(6 * s), 2, 1, k * k) for k in kernel_sizes for s in scales]
    levels = FPN[:2] if quick else FPN
    heads = [(2, 1)] if quick else [(2, 1), (1, 1), (4, 2)]
    return [Problem(2, 64, 256, H, W, int(H * s), int(W * s), G, nh, k * k)
            for (H, W), k, s, (G, nh) in itertools.product(levels, kernel_sizes, scales, heads)]


def inputs(pb: Problem, dtype: torch.dtype, device: str, seed: int = 0):
    """Random q, k, v, offsets (base grid + N(0, 3) pixels) and rpb; never zeros."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, device=device) * s).to(dtype)
    return (randn(pb.B, pb.D, pb.Ho, pb.Wo), randn(pb.B, pb.D, pb.H, pb.W), randn(pb.B, pb.C, pb.H, pb.W),
            randn(pb.B, 2 * pb.G * pb.K, pb.Ho, pb.Wo, s=3.0), randn(pb.NH, pb.K, pb.D // pb.NH, s=0.5))


def _runner(pb: Problem, cfg: Config, x, backward: bool, dout=None):
    """The launch to time (or check): forward, or backward from a saved attention."""
    scale = (pb.D // pb.NH) ** -0.5
    if not backward:
        return lambda: (dla_fwd(*x, pb.NH, pb.G, scale, config=cfg, need_attn=False)[0],)
    _, attn = dla_fwd(*x, pb.NH, pb.G, scale)
    if dout is None:
        dout = torch.randn(pb.B, pb.C, pb.Ho, pb.Wo, device=x[0].device).to(x[0].dtype)
    return lambda: dla_bwd(dout, *x, attn, pb.NH, pb.G, scale, config=cfg)


def _time(fn) -> float:
    if INTERPRET:  # no device to time: one run proves the configuration launches
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _check(pb: Problem, cfg: Config, x, backward: bool) -> float:
    """Largest relative error of the output (or of every gradient) against the float64 reference."""
    x64 = [t.detach().double().requires_grad_(backward) for t in x]
    ref = deformable_local_attention_ref(*x64, num_heads=pb.NH, num_groups=pb.G, scale=(pb.D // pb.NH) ** -0.5)
    dout = torch.randn_like(ref)
    refs = torch.autograd.grad(ref, x64, dout) if backward else (ref,)
    got = _runner(pb, cfg, x, backward, dout.to(x[0].dtype))()
    return max(((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, refs))


def sweep(pbs: list[Problem], dtypes: list[str], backward: bool, quick: bool, log=sys.stderr) -> list[Row]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cc = 90 if device == "cpu" else 10 * torch.cuda.get_device_capability()[0] + torch.cuda.get_device_capability()[1]
    kernels = ["fwd", "bwd"] if backward else ["fwd"]
    jobs = [(kern, pb, dt) for kern in kernels for pb in pbs for dt in dtypes]
    rows, found = [], {}
    for i, (kern, pb, dt) in enumerate(jobs, 1):
        bwd, dtype = kern == "bwd", DTYPES[dt]
        default = default_config(pb, bwd)
        if INTERPRET:  # the compiled space means nothing here: the default and one variant
            space = [default, Config(64, default.block_d, default.block_c)]
        else:
            space = spill_free(pb, candidates(pb, bwd, quick), bwd, dt, cc)
        x = inputs(pb, dtype, device, seed=i)
        times = {cfg: _time(_runner(pb, cfg, x, bwd)) for cfg in space}
        ranked = sorted(times, key=times.get)
        for cfg in ranked:  # the fastest that is right
            err = _check(pb, cfg, x, bwd)
            if err < TOL[dtype]:
                break
        else:
            raise RuntimeError(f"no configuration of {kern} {pb} {dt} matches the reference")
        key = cache.bucket(pb, dtype, bwd)
        found[key] = cfg
        rows.append(Row(kern, key, len(space), times[cfg], times.get(default, float("nan")), cfg, err))
        print(f"[{i}/{len(jobs)}] {key}: {len(space)} configs, best {times[cfg]:.3f} ms "
              f"(default {rows[-1].default_ms:.3f} ms), rel err {err:.1e}", file=log, flush=True)
    cache.store(found)
    return rows
