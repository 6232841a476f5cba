"""Throughput of LDA-AQU against kernel size and scale, and of CARAFE, DySample, SAPA, SAPADeform and FADE
beside their plain PyTorch forms, forward and forward+backward:

    python bench.py [--quick] [--out DIR] [--shape B C H W [--shape ...]] [--kernel-sizes ..] [--scales ..]
                    [--cases module carafe dysample sapa sapadeform fade] [--threads N] [--budget-gib G] [--list]
                    [--torch-compile after|skip|only]
    python bench.py --sizes [SIDE ...] [--shape 1 C 1 1] [--threads N] [--budget-gib G]
    python bench.py --cases anyup naf [--foundation IMAGE FEAT C] [--ratios R ..] [--foundation-extra [OUT FEAT ..]]
                    [--threads N] [--budget-gib G] [--list]

On a CPU: the LDAAQU module (the torch path) against the official-style module (same weights) at every
k_u x scale x shape, CARAFE (each odd up_kernel among the kernel sizes, integer scales) against the
unfold form, DySample (the integer scales) against grid_sample, and the guided upsamplers (guide s times
the map, integer scales: SAPA and gated FADE with each odd window against unfold, SAPADeform with k_u**2
points against grid_sample, as their original projects' pure-PyTorch forms) at --upsampler-shape; compared
implementations interleaved after one warm-up, min, median and max of at least 3 runs, the 1-minute
load average before and after each case; what autograd keeps for the backward (traced on fake
tensors, so no memory is spent on it), also at narrow maps and for the Triton backend; the FLOPs of
each point (FlopCounterMode with the op's registered formula) over a torch.matmul probe's fp32 rate.
A baseline whose estimated memory would not fit (half the memory, or --budget-gib) is refused with its
estimate. On a GPU: also the Triton op against the eager reference and torch.compile of it, with GB/s
on the op's byte floor.

--sizes: the cost against size instead, LDAAQU (C = 64 unless --shape gives another C) at k_u=3, s=2
to square outputs of each SIDE (default 128 256 512 1024 2048), forward, and forward+backward up to
SIZES_BWD_MAX, beside the official-style module where its estimate fits (cost_vs_size.png).

--cases anyup naf: AnyUp and NAF (default constructors) against their official forms on the same weights
(AnyUp's dense masked attention, NAF's k and v copied to the output then neighbourhood attention) at a
448x448 image with 28x28x384 features, outputs 28 x each ratio (2 to 64) and 2048x2048 from 32x32
(inference): ns per output pixel (min of interleaved steps) and each step's peak memory (peak RSS growth
in a fresh process per point; CUDA: max_memory_allocated), an official point refused when its estimate
exceeds the budget; foundation.csv, foundation.md (the goals' verdicts), foundation.png.

Writes bench.csv into DIR (default results/<gpu name>/, results/cpu/ without a GPU), each row as it is
measured (a run cut short keeps its rows), then the figures of bench_plots.py from it, and targets.md
(the CPU targets, pass or miss per point). On a GPU the op's torch.compile rows come after all others
(--torch-compile after|skip|only: scripts/gpu.sh gives them a stage of their own, last).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import functools
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
import weakref

import torch

GPU = torch.cuda.is_available()
if not GPU:
    # the memory rows trace the Triton backend's autograd formula on fake tensors (its fake kernels),
    # and its backend check on CPU tensors needs the interpreter flag before lda-aqu is imported; no
    # kernel runs on the CPU here
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

import bench_plots  # noqa: E402
from lda_aqu.autotune.device import device_slug  # noqa: E402
from lda_aqu.kernels.layout import DTYPES as ALL_DTYPES  # noqa: E402
from lda_aqu.upsampler import CARAFE, FADE, LDAAQU, SAPA, DySample, SAPADeform, deformable_local_attention  # noqa: E402
from lda_aqu.upsampler import cpu_cache  # noqa: E402
from lda_aqu.upsampler.flops import count_flops  # noqa: E402
from lda_aqu.upsampler.naive import deformable_local_attention_ref  # noqa: E402
from lda_aqu.upsampler.official import official_forward  # noqa: E402
from lda_aqu.upsampler.plain import (carafe_forward, dysample_forward, fade_forward, sapa_forward,  # noqa: E402
                             sapadeform_forward)

DTYPES = {n: ALL_DTYPES[n] for n in ("fp32", "bf16", "fp16")}
BASELINES = bench_plots.BASELINES
GUIDED = ("sapa", "sapadeform", "fade")
FIELDS = ["device", "torch", "triton", "date", "threads", "cores", "malloc", "cpu_cache_gib", "case", "backend",
          "direction", "dtype", "k_u", "scale", "B", "C", "H", "W", "ms", "ms_median", "ms_max", "reps", "mpix_per_s",
          "gb_per_s", "floor_bytes", "saved_for_backward_bytes", "peak_cuda_bytes", "gflops", "matmul_gflops_per_s",
          "limit_ms", "limit_fraction", "load_before", "load_after", "rel_err", "dynamo", "status"]
G, NH, R = 2, 1, 4  # LDAAQU's groups, heads and channel reduction (the official defaults)
WORKLOAD, TARGET_MAP = (1, 256, 50, 84), (1, 128, 40, 60)
TARGET_POINTS = {(k, s) for k in (3, 5, 7) for s in (2, 3, 4)}
SIZES, SIZES_BWD_MAX = (128, 256, 512, 1024, 2048), 1024  # --sizes: output sides; fwd+bwd up to this side
TARGETS = {"fwd": 5.0, "fwd+bwd": 4.0, "memory": 0.2}  # speed-ups over, and memory share of, the official-style
# a CPU case whose estimated peak exceeds half the machine's memory is refused, not swapped
BUDGET = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2 if hasattr(os, "sysconf") else 6 * 2 ** 30
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def device_name() -> str:
    if GPU:
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "unknown model") if os.path.exists("/proc/cpuinfo") else "unknown model"
    return f"CPU ({model}), {CORES} cores"


def meta() -> dict:
    return dict(device=device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat(), threads=torch.get_num_threads(), cores=CORES,
                # glibc's tunables and the library's CPU cache decide the CPU's page faults on large maps
                malloc=os.environ.get("GLIBC_TUNABLES", ""), cpu_cache_gib=_g(cpu_cache.limit() / 2 ** 30, 3))


_leaves = weakref.WeakKeyDictionary()  # fn -> the leaves its graph reaches, found on its first step


def graph_leaves(out: torch.Tensor) -> tuple:
    """The leaf tensors (inputs, parameters) whose gradients a backward from `out` computes."""
    found, todo, seen = [], [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad
            found.append(node.variable)
        todo += [n for n, _ in node.next_functions]
    return tuple(found)


def step(fn, backward):
    """One forward (or forward and backward) of fn. The backward returns its gradients instead of
    accumulating them into .grad, so repeated steps time the same work and hold the same memory."""
    if not backward:
        with torch.no_grad():
            return fn()
    out = fn()
    if fn not in _leaves:
        _leaves[fn] = graph_leaves(out)
    torch.autograd.grad(out.float().sum(), _leaves[fn])
    return out


def kept_for_backward(fn) -> int:
    """Bytes of the distinct storages autograd keeps from fn()'s forward (views and expanded indices
    hold no memory of their own; what a backward recomputes is not kept)."""
    storages = {}

    def pack(x):
        st = x.untyped_storage()
        storages[st._cdata] = st.nbytes()
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(storages.values())


def traced(build, grad, what):
    """what(fns) with fns = build(fp32, grad, mode)[0] run on fake tensors: the modules' real weights, a
    fake input, the custom ops' fake kernels; no arithmetic and no memory spent (the fake kernels'
    layouts match the real ones', which tests/test_bench.py checks)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fns = build(torch.float32, grad, mode)[0]
    with mode:
        return what(fns)


# ---- the comparisons: (case, k_u, scale, shape, build) with build(dtype, grad) -> ({backend: fn}, x) ----

def ldaaqu(C, k_u, s, backend="torch", dev="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    m = LDAAQU(C, scale_factor=s, reduction_factor=R, k_u=k_u, n_groups=G, num_heads=NH, backend=backend)
    with torch.no_grad():  # trained-like offsets, not the zero-initialised plain grid
        m.conv_offset[-1].weight.normal_(0, 0.05)
    return m.to(dev, dtype)


def _input(shape, dtype, grad, mode=None):
    torch.manual_seed(1)
    with mode or contextlib.nullcontext():
        return torch.randn(*shape, device="cuda" if GPU else "cpu", dtype=dtype, requires_grad=grad)


def module_build(shape, k_u, s, backends=("triton",) if GPU else ("torch",)):
    """LDAAQU (each backend) and the official-style forward, one set of official-keyed weights."""
    def build(dtype=torch.float32, grad=False, mode=None):
        m = ldaaqu(shape[1], k_u, s, dev="cuda" if GPU else "cpu", dtype=dtype)
        x = _input(shape, dtype, grad, mode)
        sd = dict(m.named_parameters())
        kw = dict(scale_factor=s, n_groups=G, num_heads=NH, k_u=k_u, dtype=dtype)
        fns = {}
        for b in backends:
            mb = ldaaqu(shape[1], k_u, s, b, x.device, dtype) if b != backends[0] else m
            mb.backend = b
            fns["LDAAQU" if len(backends) == 1 else f"LDAAQU/{b}"] = (lambda mb=mb: mb(x))
        fns["official-style"] = lambda: official_forward(sd, x, **kw)
        return fns, x
    return build


def carafe_build(shape, k, s):
    def build(dtype=torch.float32, grad=False, mode=None):
        m = CARAFE(shape[1], s, up_kernel=k, compressed_channels=64).to(dtype=dtype, device="cuda" if GPU else "cpu")
        x, sd = _input(shape, dtype, grad, mode), m.state_dict(keep_vars=True)
        return {"CARAFE": lambda: m(x), "unfold": lambda: carafe_forward(sd, x, scale_factor=s, up_kernel=k)}, x
    return build


def dysample_build(shape, s):
    def build(dtype=torch.float32, grad=False, mode=None):
        m = DySample(shape[1], s).to(dtype=dtype, device="cuda" if GPU else "cpu")
        x, sd = _input(shape, dtype, grad, mode), m.state_dict(keep_vars=True)
        return {"DySample": lambda: m(x), "grid_sample": lambda: dysample_forward(sd, x, scale=s)}, x
    return build


def guided_build(case, shape, k, s):
    """SAPA (k x k window), SAPADeform (k*k points, 4 groups) or FADE (k x k window, gated) on the map and a
    guide s times it, against the plain forward (unfold or grid_sample) with the same weights."""
    B, C, H, W = shape

    def build(dtype=torch.float32, grad=False, mode=None):
        dev = "cuda" if GPU else "cpu"
        torch.manual_seed(0)
        if case == "sapa":
            m = SAPA(C, scale_factor=s, up_kernel_size=k, norm_groups=8)
            plain = functools.partial(sapa_forward, scale_factor=s, up_kernel_size=k, norm_groups=8)
        elif case == "sapadeform":
            m = SAPADeform(C, scale_factor=s, num_point=k * k)
            plain = functools.partial(sapadeform_forward, scale_factor=s, num_point=k * k)
        else:
            m = FADE(C, scale_factor=s, up_kernel_size=k, gating=True)
            plain = functools.partial(fade_forward, scale_factor=s, up_kernel_size=k)
        with torch.no_grad():  # trained-like weights: uneven softmaxes, offsets of a pixel or so
            for p in m.parameters():
                p.normal_(0, 0.3 if p.dim() == 1 else p[0].numel() ** -0.5)
        m = m.to(dev, dtype)
        y, x = _input((B, C, s * H, s * W), dtype, grad, mode), _input(shape, dtype, grad, mode)
        sd = m.state_dict(keep_vars=True)
        return {type(m).__name__: lambda: m(y, x), BASELINES[case]: lambda: plain(sd, y, x)}, x
    return build


def comparisons(cases, shapes, kernel_sizes, scales, up_shape):
    out = []
    for shape in shapes if "module" in cases else []:
        out += [("module", k, s, shape, module_build(shape, k, s)) for k in kernel_sizes for s in scales]
    int_scales = [int(s) for s in scales if s == int(s)]
    if "size" in cases:  # shapes are the inputs of the output sides, at one k_u and scale
        out += [("size", kernel_sizes[0], scales[0], shape, module_build(shape, kernel_sizes[0], scales[0]))
                for shape in shapes]
    if "carafe" in cases:
        out += [("carafe", k, s, up_shape, carafe_build(up_shape, k, s)) for k in kernel_sizes for s in int_scales]
    if "dysample" in cases:
        out += [("dysample", 1, s, up_shape, dysample_build(up_shape, s)) for s in int_scales]
    out += [(case, k, s, up_shape, guided_build(case, up_shape, k, int(s))) for case in GUIDED if case in cases
            for k in kernel_sizes for s in int_scales]
    return out


def refusals(build) -> dict:
    """{backend: why} for the implementations whose estimated peak would exceed BUDGET: twice what
    they keep for backward (the backward holds gradients as large as what it reads)."""
    kept = traced(build, True, lambda fns: {b: kept_for_backward(f) for b, f in fns.items()})
    return {b: f"refused: needs ~{2 * n / 2 ** 30:.1f} GiB (twice the {n / 2 ** 30:.1f} GiB it keeps for backward, "
               f"traced), over the {BUDGET / 2 ** 30:.3g} GiB budget" for b, n in kept.items() if 2 * n > BUDGET}


def matmul_rate(n=1024, reps=10) -> float:
    """This machine's fp32 matmul rate in GFLOP/s at the run's threads: min time of reps n x n products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def interleaved(fns, backward, budget_s, min_reps=3, max_reps=15):
    """{backend: sorted ms} with the implementations alternating run by run after one warm-up each, so
    that a change of load hits them alike; at least min_reps runs, more while under budget_s; and the
    last output of each."""
    outs = {b: step(f, backward) for b, f in fns.items()}
    times = {b: [] for b in fns}
    start = time.perf_counter()
    while True:
        for b, f in fns.items():
            t = time.perf_counter()
            outs[b] = step(f, backward)
            times[b].append((time.perf_counter() - t) * 1e3)
        n = len(times[b])
        if n >= max_reps or (n >= min_reps and time.perf_counter() - start > budget_s):
            return {b: sorted(v) for b, v in times.items()}, outs


def _g(x, digits=4):
    return float(f"{x:.{digits}g}")


class Rows(list):
    """The rows measured so far, each written to the CSV and flushed as it is appended (the header
    first): a run cut short by a time limit or a kill keeps every row it measured."""

    def __init__(self, path, fields=None):
        super().__init__()
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=fields or FIELDS)
        self.writer.writeheader()
        self.file.flush()

    def append(self, row):
        super().append(row)
        self.writer.writerow(row)
        self.file.flush()

    def close(self):
        self.file.close()


def run_cpu(comps, rate, budget_s, rows):
    start = time.perf_counter()
    for case, k_u, s, shape, build in comps:
        B, C, H, W = shape
        px = B * int(H * s) * int(W * s)
        refused = refusals(build)
        ours = next(b for b in build()[0] if b != BASELINES[case])
        for backward in (False, True):
            if backward and case == "size" and px > SIZES_BWD_MAX ** 2:
                continue
            d = "fwd+bwd" if backward else "fwd"
            base = dict(meta(), case=case, direction=d, dtype="fp32", k_u=k_u, scale=s, B=B, C=C, H=H, W=W,
                        matmul_gflops_per_s=_g(rate))
            flops, kept = traced(build, backward, lambda fns: (
                count_flops(fns[ours], backward=backward),
                {b: kept_for_backward(f) for b, f in fns.items()} if backward else {}))
            base.update(gflops=_g(flops / 1e9), limit_ms=_g(flops / rate / 1e6))
            load_before = os.getloadavg()[0]
            fns, _ = build(torch.float32, backward)
            timed = {b: f for b, f in fns.items() if b not in refused}
            try:
                times, outs = interleaved(timed, backward, budget_s)
                status = {}
            except Exception as e:  # noqa: BLE001 - a failure is a result
                times, outs, status = {}, {}, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            load_after = os.getloadavg()[0]
            del fns, timed
            err = ""
            if not backward and BASELINES[case] in outs and ours in outs:
                ref = outs[BASELINES[case]].double()
                err = f"{((outs[ours].double() - ref).norm() / ref.norm()).item():.2e}"
            for b in (ours, BASELINES[case]):
                row = dict(base, backend=b, load_before=load_before, load_after=load_after,
                           saved_for_backward_bytes=kept.get(b, ""), rel_err=err if b == ours else "")
                if b in refused:
                    row["status"] = refused[b]
                elif b not in times:
                    row["status"] = status or "not run"
                else:
                    t = times[b]
                    row.update(ms=_g(t[0]), ms_median=_g(t[len(t) // 2]), ms_max=_g(t[-1]), reps=len(t),
                               mpix_per_s=_g(px / t[0] / 1e3), limit_fraction=_g(base["limit_ms"] / t[0], 3),
                               status="ok")
                rows.append(row)
            print(f"{summary(rows[-2], rows[-1])} [{time.perf_counter() - start:.0f} s]", flush=True)
    return rows


def summary(ours, base) -> str:
    """One line per case; every comparison word follows from the numbers."""
    head = (f"{ours['case']:8} {ours['B']}x{ours['C']}x{ours['H']}x{ours['W']} k_u={ours['k_u']} s={ours['scale']:g} "
            f"{ours['direction']:7}")
    if ours["status"] != "ok":
        return f"{head} {ours['backend']}: {ours['status']}"
    line = f"{head} {ours['backend']} {ours['ms']} ms (median {ours['ms_median']}, max {ours['ms_max']}, " \
           f"{ours['reps']} runs)"
    if base["status"] == "ok":
        ratio = base["ms"] / ours["ms"]
        line += f"; {BASELINES[ours['case']]} {base['ms']} ms: {max(ratio, 1 / ratio):.2f}x " \
                f"{'faster' if ratio >= 1 else 'slower'}"
    else:
        line += f"; {base['backend']} {base['status']}"
    mo, mb = ours.get("saved_for_backward_bytes", ""), base.get("saved_for_backward_bytes", "")
    if mo != "" and mb != "":
        line += "; keeps " + (f"{max(mb / mo, mo / mb):.1f}x {'less' if mo < mb else 'more'}" if abs(mo - mb) > 0.01 * mb
                              else "as much") + " for backward"
    load = max(ours["load_before"], ours["load_after"])
    return line + f"  [load {ours['load_before']:.2f}->{ours['load_after']:.2f}{' LOADED' if load > CORES else ''}]"


def memory_rows(channels, spatial, kernel_sizes, scales, rows):
    """What autograd keeps for backward, LDAAQU with the torch and the Triton backends and the
    official-style module, traced on fake tensors at 1 x C x H x W for each C: no timing."""
    for C in channels:
        for k_u in kernel_sizes:
            for s in scales:
                build = module_build((1, C, *spatial), k_u, s, backends=("torch", "triton"))
                kept = traced(build, True, lambda fns: {b: kept_for_backward(f) for b, f in fns.items()})
                for b, n in kept.items():
                    rows.append(dict(meta(), case="memory", backend=b, direction="fwd+bwd", dtype="fp32", k_u=k_u,
                                     scale=s, B=1, C=C, H=spatial[0], W=spatial[1], saved_for_backward_bytes=n,
                                     status="ok"))
                print(f"memory   1x{C}x{spatial[0]}x{spatial[1]} k_u={k_u} s={s:g} kept for backward: " + ", ".join(
                    f"{b} {n / 2 ** 20:.1f} MiB" + ("" if b == "official-style" else
                                                   f" ({n / kept['official-style']:.3f} of official-style)")
                    for b, n in kept.items()), flush=True)
    return rows


def targets(rows):
    """(markdown table, missed speed points [(shape, k_u, s, direction)]): the CPU targets per point,
    the speed-ups, the memory share, and ours as a fraction of the matmul-rate limit."""
    by = {(r["case"], r["B"], r["C"], r["H"], r["W"], r["k_u"], r["scale"], r["direction"], r["backend"]): r
          for r in rows}
    lines = ["| map | k_u | s | fwd speed-up (>= 5x) | fwd+bwd speed-up (>= 4x) | kept for backward (<= 0.2) | "
             "ours / matmul limit, fwd; fwd+bwd | load before/after |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    misses, missed = 0, []

    def verdict(v, ok):
        nonlocal misses
        misses += not ok
        return f"{v} {'pass' if ok else '**miss**'}"
    for shape in (WORKLOAD, TARGET_MAP):
        for k, s in sorted(TARGET_POINTS):
            cells, loads, limits = [], [], []
            for d in ("fwd", "fwd+bwd"):
                o, b = (by.get(("module", *shape, k, s, d, n)) for n in ("LDAAQU", "official-style"))
                if not o:
                    break
                loads.append(f"{o['load_before']:.1f}/{o['load_after']:.1f}")
                limits.append(f"{100 * o['limit_fraction']:.1f}%" if o.get("limit_fraction", "") != "" else "-")
                if o["status"] == "ok" and b["status"] == "ok":
                    cells.append(verdict(f"{b['ms'] / o['ms']:.1f}x", b["ms"] / o["ms"] >= TARGETS[d]))
                else:
                    misses += 1
                    cells.append(f"**miss** (not timed: {(b if o['status'] == 'ok' else o)['status'][:60]})")
                if not cells[-1].endswith(" pass"):
                    missed.append((shape, k, s, d))
            if len(cells) < 2:
                continue
            mo, mb = o["saved_for_backward_bytes"], b["saved_for_backward_bytes"]
            cells.append(verdict(f"{mo / mb:.3f}", mo / mb <= TARGETS["memory"]))
            lines.append(f"| {'x'.join(map(str, shape))} | {k} | {s} | " + " | ".join(cells) +
                         f" | {'; '.join(limits)} | {'; '.join(loads)} |")
    mem = [r for r in rows if r["case"] == "memory"]
    off = {(r["C"], r["k_u"], r["scale"]): r["saved_for_backward_bytes"] for r in mem if r["backend"] == "official-style"}
    worst = {}
    for r in mem:
        if r["backend"] != "official-style":
            share = r["saved_for_backward_bytes"] / off[(r["C"], r["k_u"], r["scale"])]
            if share > worst.get((r["C"], r["backend"]), (-1,))[0]:
                worst[(r["C"], r["backend"])] = share, r
    if len(lines) == 2:
        lines = []
    if worst:
        lines += ["", "| C (memory only, traced) | backend | worst share of official-style's kept bytes | at |",
                  "| --- | --- | --- | --- |"]
        for (C, b), (share, r) in sorted(worst.items()):
            lines.append(f"| {C} | {b} | {verdict(f'{share:.3f}', share <= TARGETS['memory'])} | "
                         f"k_u={r['k_u']} s={r['scale']:g} |")
    return ("\n".join(lines).strip() + f"\n\n{misses} misses\n" if lines else ""), missed


def profile_points(points, top=8) -> str:
    """torch.profiler of LDAAQU (the torch path) at each (shape, k_u, s, direction): the ops with the
    most self CPU time, after a warm-up."""
    from torch.profiler import ProfilerActivity, profile
    out = []
    for shape, k, s, d in points:
        fns, _ = module_build(shape, k, s)(torch.float32, d == "fwd+bwd")
        step(fns["LDAAQU"], d == "fwd+bwd")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(fns["LDAAQU"], d == "fwd+bwd")
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        out.append(f"{'x'.join(map(str, shape))} k_u={k} s={s} {d}: {total / 1e3:.0f} ms of self CPU time")
        out += [f"  {100 * e.self_cpu_time_total / total:5.1f}%  {e.self_cpu_time_total / 1e3:8.1f} ms  "
                f"{e.count:4d} calls  {e.key}" for e in events[:top]]
    return "\n".join(out) + "\n"


# ---- GPU: the Triton op against the eager reference and torch.compile, and the modules ------------

def inputs(B, C, D, H, W, s, k_u, dtype, dev, grad):
    Ho, Wo, K = int(H * s), int(W * s), k_u * k_u
    base = torch.arange(k_u, dtype=torch.float32) - k_u // 2
    grid = torch.stack(torch.meshgrid(base, base, indexing="ij"), -1).reshape(1, 1, 2 * K, 1, 1)
    off = (grid + 3 * torch.randn(B, G, 2 * K, Ho, Wo)).reshape(B, -1, Ho, Wo)
    t = [torch.randn(B, D, Ho, Wo), torch.randn(B, D, H, W), torch.randn(B, C, H, W), off,
         0.5 * torch.randn(NH, K, D // NH)]
    return [x.to(dev, dtype).requires_grad_(grad) for x in t]


def floor_bytes(tensors, out_numel, itemsize, backward):
    """The op's byte floor: every input read once and the output written once; forward+backward
    adds dout read once and every gradient (the inputs' sizes) written once."""
    ins = sum(t.numel() * t.element_size() for t in tensors)
    return ins + out_numel * itemsize + (out_numel * itemsize + ins if backward else 0)


def op_cases(shapes, kernel_sizes, scales):
    """(case, k_u, scale, shape, build) of the Triton op against the eager reference and torch.compile.
    Each build compiles afresh, Dynamo reset first: every case, dtype and direction gets its own
    compilation instead of recompiles of one, which past Dynamo's recompile limit run eagerly."""
    for B, C, H, W in shapes:
        D = C // R
        for k_u in kernel_sizes:
            for s in scales:
                def build(dtype=torch.float32, grad=False, shape=(B, C, H, W), D=D, k_u=k_u, s=s):
                    t = inputs(*shape[:2], D, *shape[2:], s, k_u, dtype, "cuda", grad)
                    kw = dict(num_heads=NH, num_groups=G, scale=(D // NH) ** -0.5)
                    torch._dynamo.reset()
                    compiled_ref = torch.compile(deformable_local_attention_ref)
                    return {"triton": lambda: deformable_local_attention(*t, backend="triton", **kw),
                            "eager": lambda: deformable_local_attention(*t, backend="reference", **kw),
                            "torch.compile": lambda: compiled_ref(*t, **kw)}, t
                yield "op", k_u, s, (B, C, H, W), build


def dynamo_note(counters) -> tuple[str, bool]:
    """What Dynamo did since `counters` were cleared, and whether the timed function ran eagerly
    (a frame that failed to compile, graph breaks, or the recompile limit reached)."""
    frames = counters["frames"]
    breaks = sum(counters["graph_break"].values())
    limit = torch._dynamo.config.recompile_limit
    note = f"frames {frames['ok']}/{frames['total']} compiled, {breaks} graph breaks"
    eager = frames["ok"] == 0 or frames["total"] > frames["ok"] or frames["total"] >= limit
    if frames["total"] >= limit:
        note += f", recompile limit ({limit}) reached"
    return note, eager or breaks > 0


def run_gpu(comps, dtypes, rows, compiled="after"):
    """Each backend of each comparison timed by triton.testing.do_bench (median), with the CUDA peak.
    The torch.compile rows (`compiled`: "after" every other row, "skip", or "only") compile cold, tens
    of seconds each: after the rest, a run cut short has every Triton and eager row first. A
    torch.compile row whose function fell back to eager (in part or whole) says so in its status,
    so that its number is never read as compiled."""
    passes = {"after": (False, True), "skip": (False,), "only": (True,)}[compiled]
    for compile_pass in passes:
        for case, k_u, s, shape, build in comps:
            for dt in dtypes:
                for backward in (False, True):
                    fns, x = build(DTYPES[dt], backward)
                    fns = {b: f for b, f in fns.items() if (b == "torch.compile") == compile_pass}
                    for b, fn in fns.items():
                        rows.append(time_gpu(case, b, fn, x, dt, k_u, s, shape, backward))
                    del fns, x
    return rows


def time_gpu(case, b, fn, x, dt, k_u, s, shape, backward) -> dict:
    from torch._dynamo.utils import counters
    B, C, H, W = shape
    out_numel = B * C * int(H * s) * int(W * s)
    tensors = x if case == "op" else [x]
    row = dict(meta(), case=case, backend=b, direction="fwd+bwd" if backward else "fwd", dtype=dt,
               k_u=k_u, scale=s, B=B, C=C, H=H, W=W, load_before=os.getloadavg()[0])
    counters.clear()
    try:
        saved = kept_for_backward(fn) if backward else ""
        step(fn, backward)  # the warm-up: compilation, autotuning, the allocator
        torch.cuda.synchronize()
        mem0 = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(fn, backward)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - mem0
        ms = triton.testing.do_bench(lambda: step(fn, backward), warmup=25, rep=100, return_mode="median")
        floor = floor_bytes(tensors, out_numel, tensors[0].element_size(), backward)
        row.update(ms=_g(ms), mpix_per_s=_g(out_numel / C / ms / 1e3),
                   gb_per_s=_g(floor / ms / 1e6) if case == "op" else "",
                   floor_bytes=floor if case == "op" else "", saved_for_backward_bytes=saved,
                   peak_cuda_bytes=peak, status="ok")
        if b == "torch.compile":
            row["dynamo"], eager = dynamo_note(counters)
            if eager:
                row["status"] = f"eager fallback: {row['dynamo']}"
                print(f"warning: {case} {b} {dt} k_u={k_u} s={s:g} ran (partly) eagerly: {row['dynamo']}",
                      flush=True)
    except Exception as e:  # noqa: BLE001 - an OOM or a compiler failure is a result
        row.update(status=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
        torch.cuda.empty_cache()
    row["load_after"] = os.getloadavg()[0]
    print(f"{case:8} {b:15} {row['direction']:7} {dt:4} {B}x{C}x{H}x{W} k_u={k_u} s={s:g}: "
          f"{row.get('ms', '-')} ms  {row.get('mpix_per_s', '-')} Mpx/s  {row.get('gb_per_s') or '-'}"
          f" GB/s  saved {row.get('saved_for_backward_bytes') or '-'} B  {row['status'][:60]}", flush=True)
    return row


# ---- the foundation upsamplers: AnyUp and NAF on a vision encoder's patch grid --------------------------

FOUNDATION = ("anyup", "naf")
FOUNDATION_HARNESS = (448, 28, 384)  # image side, feature side (patch 16), channels: NAF's evaluation
FOUNDATION_RATIOS = (2, 4, 8, 16, 32, 64)
FOUNDATION_EXTRA = ((2048, 32),)  # (output side, feature side): inference only, at the harness's C and patch
FOUNDATION_FIELDS = ["device", "torch", "triton", "date", "threads", "cores", "malloc", "cpu_cache_gib", "case",
                     "backend", "direction", "dtype", "B", "C", "image", "h", "w", "ratio", "out_h", "out_w", "ms",
                     "ms_median", "ms_max", "reps", "ns_per_pixel", "peak_bytes", "peak_total_bytes",
                     "rss_before_bytes", "estimate_bytes", "rel_err", "load_before", "load_after", "status"]
FOUNDATION_GOALS = {"speed": 3.0, "memory": 1 / 3, "flat": 1.5, "extra_gib": 16.0, "train_memory": 0.5}


def foundation_model(model: str, dev: str):
    """The default AnyUp or NAF, seeded, in eval mode in both directions: NAF's training mode redraws
    its RoPE rescaling at every forward, which would make ours and the official compute different
    functions."""
    from lda_aqu.upsampler import NAF, AnyUp
    torch.manual_seed(0)
    return (AnyUp() if model == "anyup" else NAF()).to(dev).eval()


def foundation_fns(model: str, m, image, features, size) -> dict:
    """{"ours": the module, "official": the module's encoders with the official attention}: one set of
    weights, one function."""
    import torch.nn.functional as F
    if model == "anyup":
        from lda_aqu.upsampler.official_anyup import dense_window_attention

        def official():
            enc = m.rope(m.image_encoder(image))
            q = F.adaptive_avg_pool2d(m.query_encoder(enc), size)
            k = F.adaptive_avg_pool2d(m.key_encoder(enc), features.shape[-2:])
            k = m.aggregation(torch.cat([k, m.key_features_encoder(F.normalize(features, dim=1))], 1))
            block = m.cross_decode
            ca = block.cross_attn
            q, k = ca.project(block.conv2d(q), ca.norm_q, 0), ca.project(k, ca.norm_k, 1)
            return dense_window_attention(q, k, features, m.num_heads, block.window_ratio)
    else:
        from lda_aqu.upsampler.official_naf import official_attention

        def official():
            x = m.image_encoder(image, size)
            return official_attention(x, F.adaptive_avg_pool2d(x, features.shape[-2:]), features, m.heads_attn,
                                      m.kernel_size)
    return {"ours": lambda: m(image, features, size), "official": official}


def foundation_estimate(model: str, B: int, C: int, image: int, h: int, w: int, Ho: int, Wo: int,
                        backward: bool) -> int:
    """Bytes the official form's step peaks at (fp32), from its large tensors. AnyUp: the dense
    [B, heads, Ho*Wo, h*w] weights, two alive at once in inference (the logits and their masked or
    softmaxed copy), four in training (the kept softmax, the mean's expanded gradient, the softmax
    backward's product and result), its bool mask and the output. NAF: k and v copied to the output
    size, q scaled, the 81 offsets' logits (the list and its stack) and their softmax, the output's sum
    and temporaries; in training autograd keeps every offset's window of k and of v, and the peak RSS
    measured at x2 to x4 is about 2.8x those windows (the backward's per-offset gradients, the heap's
    retained blocks), so the estimate takes 3x. Both: the encoders' maps, which ours holds too, at the
    image size (128 channels; peak RSS at x2: AnyUp about 6 such maps in inference and 57 in training,
    NAF about 10 and 38, its image resized to at most 4x the output) and at the output size."""
    P, N = B * Ho * Wo, h * w
    if model == "anyup":
        nh, D = 4, 128
        dense = B * nh * Ho * Wo * N * 4
        enc = B * image * image * D * 4 * (60 if backward else 6)
        shared = (10 if backward else 4) * D * P * 4 + (2 if backward else 1) * C * P * 4
        return int((4 if backward else 2) * dense + Ho * Wo * N + shared + enc)
    nh, D, K2 = 4, 256, 81
    side = min(image, 4 * min(Ho, Wo))
    enc = B * side * side * D // 2 * 4 * (40 if backward else 10)
    per_px = 2 * D + C + D + 3 * K2 * nh + 4 * C  # copies of k and v, q scaled, logits twice and softmax, output
    if backward:
        per_px += 3 * K2 * (D + C)
    return int(per_px * P * 4 + (3 if backward else 1) * D * P * 4 + enc)


def foundation_points(harness, ratios, extra, train_max=None):
    """(model, image side, feature side, C, output side, direction) of every point, the extra ones last;
    training up to the ratio train_max (all when None)."""
    image, feat, C = harness
    patch = image // feat
    pts = [(mdl, image, feat, C, feat * r, d) for mdl in FOUNDATION for r in ratios
           for d in ("inference", "training") if d == "inference" or train_max is None or r <= train_max]
    return pts + [(mdl, f * patch, f, C, side, "inference") for side, f in extra for mdl in FOUNDATION]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def foundation_point(spec: dict) -> dict:
    """One point in this (fresh) process: spec["mode"] "memory" measures one step of spec["impls"][0]
    (on CPU the growth of the peak RSS over the RSS before it; on CUDA max_memory_allocated), "time"
    times spec["impls"] interleaved and compares their outputs."""
    dev = "cuda" if GPU else "cpu"
    if not GPU:
        torch.set_num_threads(spec["threads"])
    model, backward, out = spec["model"], spec["direction"] == "training", spec["out"]
    m = foundation_model(model, dev)

    def inputs(side, feat, grad):
        g = torch.Generator().manual_seed(1)
        image = torch.rand(1, 3, side, side, generator=g).to(dev)
        features = torch.randn(1, spec["C"], feat, feat, generator=g).to(dev).requires_grad_(grad)
        return image, features
    # a tiny step first: lazy initialisation (thread pools, native kernels) outside what is measured
    tiny = foundation_fns(model, m, *inputs(20, 10, backward), (20, 20))
    for b in spec["impls"]:
        step(tiny[b], backward)
    del tiny
    fns = foundation_fns(model, m, *inputs(spec["image"], spec["feat"], backward), (out, out))
    gc.collect()
    if spec["mode"] == "memory":
        b = spec["impls"][0]
        if GPU:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base, high = _rss(), _maxrss()
        t = time.perf_counter()
        y = step(fns[b], backward)
        if GPU:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t) * 1e3
        del y
        total = torch.cuda.max_memory_allocated() if GPU else _maxrss()
        # on CPU a step that stays under the process's earlier high-water mark leaves ru_maxrss as it was:
        # its growth is then at most that mark over the RSS before it
        return dict(peak_bytes=total - base, peak_total_bytes=total, rss_before_bytes=base, ms=ms,
                    under_earlier_peak=not GPU and total == high)
    # interleaved, at least 3 runs, more while under budget_s; after a warm-up each unless their steps are
    # long (spec["warm"] false), where one more step would add minutes and what it warms (thread pools, the
    # native kernels) the tiny step above has
    outs = {b: step(fns[b], backward) for b in spec["impls"]} if spec.get("warm", True) else {}
    times = {b: [] for b in spec["impls"]}
    # steps of many seconds: one timed step (the memory child ran one too, whose time its row keeps)
    start, n, least = time.perf_counter(), 0, 3 if spec.get("warm", True) else 1
    while n < least or (n < 15 and time.perf_counter() - start < spec["budget_s"]):
        n += 1
        for b in spec["impls"]:
            outs.pop(b, None)  # at 2048x2048 an output is 6 GiB: never two of one implementation at once
            t = time.perf_counter()
            outs[b] = step(fns[b], backward)
            if GPU:
                torch.cuda.synchronize()
            times[b].append((time.perf_counter() - t) * 1e3)
    times = {b: sorted(v) for b, v in times.items()}
    err = ""
    if len(outs) == 2:  # in float64 a channel block at a time: no float64 copy of a whole large output
        pairs = list(zip(outs["ours"].detach().split(8, 1), outs["official"].detach().split(8, 1)))
        diff = sum((o.double() - r.double()).norm() ** 2 for o, r in pairs)
        err = (diff / sum(r.double().norm() ** 2 for _, r in pairs)).sqrt().item()
    return dict(times=times, rel_err=err)


def _child(spec: dict) -> dict:
    """foundation_point(spec) in a fresh interpreter: its peak RSS is this point's alone."""
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--foundation-point", json.dumps(spec)],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    line = next((ln for ln in reversed(r.stdout.splitlines()) if ln.startswith("{")), None)
    if r.returncode == 0 and line:
        return json.loads(line)
    if r.returncode < 0:
        why = f"killed by signal {-r.returncode}" + (" (out of memory?)" if r.returncode == -9 else "")
    else:
        tail = [ln for ln in r.stderr.splitlines() if ln.strip()]
        why = f"failed (exit {r.returncode}): {tail[-1][:120] if tail else 'no output'}"
    return dict(error=why)


def _gib(n) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if abs(n) >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def run_foundation(points, threads, budget_s, rows):
    """Per point: each implementation's peak in a child process of its own, then both timed interleaved
    in another (without a full-size warm-up step where the peak's step took over 5 s); the official form
    refused where its estimate exceeds BUDGET."""
    start = time.perf_counter()
    for model, image, feat, C, out, d in points:
        backward = d == "training"
        px = out * out
        est = foundation_estimate(model, 1, C, image, feat, feat, out, out, backward)
        refused = est > BUDGET
        base = dict(meta(), threads=threads, case=model, direction=d, dtype="fp32", B=1, C=C, image=image, h=feat,
                    w=feat, ratio=out // feat, out_h=out, out_w=out)
        spec = dict(model=model, image=image, feat=feat, C=C, out=out, direction=d, threads=threads,
                    budget_s=budget_s)
        if refused:
            print(f"{model} {out}x{out} {d}: official refused, needs ~{_gib(est)} (estimate) over the "
                  f"{_gib(BUDGET)} budget", flush=True)
        impls = ["ours"] + ([] if refused else ["official"])
        load_before = os.getloadavg()[0]
        mem = {b: _child(dict(spec, mode="memory", impls=[b])) for b in impls}
        ran = [b for b in impls if "error" not in mem[b]]
        timed = _child(dict(spec, mode="time", impls=ran, warm=max([mem[b]["ms"] for b in ran] or [0]) < 5e3))
        load_after = os.getloadavg()[0]
        for b in ("ours", "official"):
            row = dict(base, backend=b, load_before=load_before, load_after=load_after,
                       estimate_bytes=est if b == "official" else "")
            if b not in impls:
                row["status"] = f"refused: needs ~{est / 2 ** 30:.1f} GiB (estimate) over the " \
                                f"{BUDGET / 2 ** 30:.3g} GiB budget"
            elif "error" in mem[b] or "error" in timed:
                row["status"] = mem[b].get("error") or timed["error"]
            else:
                t = timed["times"][b]
                mb = mem[b]
                row.update(ms=_g(t[0]), ms_median=_g(t[len(t) // 2]), ms_max=_g(t[-1]), reps=len(t),
                           ns_per_pixel=_g(t[0] * 1e6 / px), peak_bytes=mb["peak_bytes"],
                           peak_total_bytes=mb["peak_total_bytes"], rss_before_bytes=mb["rss_before_bytes"],
                           rel_err=f"{timed['rel_err']:.2e}" if timed["rel_err"] != "" else "",
                           status="ok (peak under an earlier high-water mark: an upper bound)"
                           if mb["under_earlier_peak"] else "ok")
            rows.append(row)
        print(f"{foundation_line(rows[-2], rows[-1])} [{time.perf_counter() - start:.0f} s]", flush=True)
    return rows


def _ok_row(r) -> bool:
    return str(r["status"]).startswith("ok")


def foundation_line(ours, off) -> str:
    """One line per point; every comparison word follows from the numbers."""
    head = f"{ours['case']:5} x{ours['ratio']:<2} {ours['out_h']}x{ours['out_w']} from {ours['h']}x{ours['w']} " \
           f"{ours['direction']:9}"
    if not _ok_row(ours):
        return f"{head} ours: {ours['status']}"
    line = f"{head} ours {ours['ns_per_pixel']} ns/px, peak {_gib(ours['peak_bytes'])}"
    if _ok_row(off):
        t, mem = float(off["ms"]) / float(ours["ms"]), ours["peak_bytes"] / max(off["peak_bytes"], 1)
        line += f"; official {off['ns_per_pixel']} ns/px, peak {_gib(off['peak_bytes'])}: ours " \
                f"{max(t, 1 / t):.2f}x {'faster' if t >= 1 else 'slower'}, {mem:.2f} of its peak, rel_err " \
                f"{ours['rel_err']}"
    else:
        line += f"; official {off['status']}"
    load = max(ours["load_before"], ours["load_after"])
    return line + f"  [load {ours['load_before']:.2f}->{ours['load_after']:.2f}{' LOADED' if load > CORES else ''}]"


def foundation_goals(rows, harness_feat) -> str:
    """The goals of the foundation run, each verdict after its numbers."""
    rows = [r for r in rows if r.get("case") in FOUNDATION]
    key = {(r["case"], int(r["h"]), int(r["ratio"]), r["direction"], r["backend"]): r for r in rows}
    gl = FOUNDATION_GOALS
    out = []

    def verdict(ok):
        return "pass" if ok else "**miss**"

    def versus(model, d, ratio, speed_goal, mem_goal):
        o, b = key.get((model, harness_feat, ratio, d, "ours")), key.get((model, harness_feat, ratio, d, "official"))
        if not o:
            return f"{model} x{ratio} {d}: not run"
        if not _ok_row(o):
            return f"{model} x{ratio} {d}: ours {o['status']}: **miss**"
        if b and _ok_row(b):
            t, mem = float(b["ms"]) / float(o["ms"]), o["peak_bytes"] / b["peak_bytes"]
            speed = f"{t:.2f}x faster" if t >= 1 else f"{1 / t:.2f}x slower"
            return (f"{model} x{ratio} {d}: ours {speed} ({o['ns_per_pixel']} vs {b['ns_per_pixel']} ns/px; goal: "
                    f"{speed_goal}x faster): {verdict(t >= speed_goal)}; peak {_gib(o['peak_bytes'])} vs "
                    f"{_gib(b['peak_bytes'])} = {mem:.3f} of the official's (goal <= {mem_goal:.3g}): "
                    f"{verdict(mem <= mem_goal)}")
        est = b.get("estimate_bytes", "") if b else ""
        note = f"{b['status']}" if b else "not run"
        if est != "":
            mem = o["peak_bytes"] / float(est)
            return (f"{model} x{ratio} {d}: official {note}: speed not measured; peak {_gib(o['peak_bytes'])} = "
                    f"{mem:.3f} of the official's estimate (goal <= {mem_goal:.3g}): {verdict(mem <= mem_goal)} "
                    f"against the estimate")
        return f"{model} x{ratio} {d}: official {note}"
    out.append(f"(1) AnyUp at x16: ours >= {gl['speed']:g}x faster than the official and <= 1/3 of its peak memory")
    out += ["    " + versus("anyup", d, 16, gl["speed"], gl["memory"]) for d in ("inference", "training")]
    out.append(f"(2) ours' time per output pixel flat from x4 to x64 (max/min within {gl['flat']:g}x)")
    for model in FOUNDATION:
        for d in ("inference", "training"):
            pts = {int(r["ratio"]): float(r["ns_per_pixel"]) for r in rows if r["case"] == model
                   and int(r["h"]) == harness_feat and r["direction"] == d and r["backend"] == "ours" and _ok_row(r)
                   and 4 <= int(r["ratio"]) <= 64}
            asked = sorted(int(r["ratio"]) for r in rows if r["case"] == model and int(r["h"]) == harness_feat
                           and r["direction"] == d and r["backend"] == "ours" and 4 <= int(r["ratio"]) <= 64)
            if len(pts) < 2:
                out.append(f"    {model} {d}: fewer than two timed ratios in x4..x64: not decided")
                continue
            spread = max(pts.values()) / min(pts.values())
            lo, hi = min(pts, key=pts.get), max(pts, key=pts.get)
            missing = sorted(set(asked) - set(pts))
            out.append(f"    {model} {d}: {pts[lo]:.4g} ns/px at x{lo} to {pts[hi]:.4g} at x{hi}, max/min {spread:.2f} "
                       f"(goal <= {gl['flat']:g}): {verdict(spread <= gl['flat'])}"
                       + (f" (x{', x'.join(map(str, missing))} not timed)" if missing else ""))
    out.append(f"(3) the extra outputs (default 2048x2048 from 32x32, C=384, inference) within {gl['extra_gib']:g} "
               f"GiB peak")
    extra = [r for r in rows if r["backend"] == "ours" and int(r["h"]) != harness_feat]
    for r in extra:
        size = f"{int(r['out_h'])}x{int(r['out_w'])} from {int(r['h'])}x{int(r['w'])}"
        if _ok_row(r):
            total = r.get("peak_total_bytes", "")
            total = f" (process total {_gib(total)})" if total != "" else ""
            out.append(f"    {r['case']} {size}: peak {_gib(r['peak_bytes'])}{total} (goal <= {gl['extra_gib']:g} GiB): "
                       f"{verdict(r['peak_bytes'] <= gl['extra_gib'] * 2 ** 30)}")
        else:
            out.append(f"    {r['case']} {size}: {r['status']}: **miss**")
    if not extra:
        out.append("    not run")
    out.append(f"(4) training at x16: ours <= {gl['train_memory']:g} of the official's peak memory and faster")
    out += ["    " + versus(mdl, "training", 16, 1.0, gl["train_memory"]) for mdl in FOUNDATION]
    return "\n".join(out) + "\n"


def main_foundation(args, out):
    points = foundation_points(args.foundation, args.ratios, args.foundation_extra, args.train_max)
    points = [p for p in points if p[0] in args.cases]
    if args.list:
        for model, image, feat, C, side, d in points:
            est = foundation_estimate(model, 1, C, image, feat, feat, side, side, d == "training")
            why = f"  (refused: needs ~{est / 2 ** 30:.1f} GiB (estimate))" if est > BUDGET else \
                f"  (estimate {est / 2 ** 30:.1f} GiB)"
            print(f"{model} ours official image {image} features {C}x{feat}x{feat} -> {side}x{side} x{side // feat} "
                  f"{d}" + why)
        return []
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "foundation.csv")
    rows = Rows(path, FOUNDATION_FIELDS)
    threads = args.threads or 2
    try:
        image, feat, C = args.foundation
        print(f"{device_name()}, {threads} thread(s), load average {os.getloadavg()[0]:.2f}, budget {_gib(BUDGET)}; "
              f"image {image}, features {C}x{feat}x{feat}; each point in fresh processes", flush=True)
        run_foundation(points, threads, 0.3 if args.quick else 2.0, rows)
    finally:
        rows.close()
    text = foundation_goals(bench_plots.read_rows(rows), args.foundation[1])
    open(os.path.join(out, "foundation.md"), "w").write(text)
    print(text)
    return [path, os.path.join(out, "foundation.md"), bench_plots.foundation(bench_plots.read(path), out)]


# ---- the command line --------------------------------------------------------------------------------

def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="a reduced grid: k_u 3 5, scales 2 3, a 1x64x20x24 map (unless given), no narrow maps")
    ap.add_argument("--out", default=None, help="results folder (default results/<device>)")
    ap.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES),
                    help="default: fp32 bf16 on a GPU; the CPU comparison runs fp32 only")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default 2; CPU runs only)")
    ap.add_argument("--budget-gib", type=float, default=None,
                    help=f"refuse a CPU case whose estimated peak exceeds this (default {BUDGET / 2 ** 30:.0f}, half "
                         "the memory; lower it where freed memory stays in the process, e.g. GLIBC_TUNABLES)")
    ap.add_argument("--shape", type=int, nargs=4, action="append", metavar=("B", "C", "H", "W"),
                    help="an input map of the LDAAQU grid, repeatable (C divisible by 8); default: 1 256 50 84 "
                         "and 1 128 40 60 on a CPU, 2 256 100 152 (FPN P2) on a GPU")
    ap.add_argument("--upsampler-shape", type=int, nargs=4, metavar=("B", "C", "H", "W"),
                    help="the map of the CARAFE and DySample comparisons (default: the first --shape if given, "
                         "else 1 64 32 48 on a CPU, 1 16 12 16 with --quick, 2 256 100 152 on a GPU)")
    ap.add_argument("--kernel-sizes", type=int, nargs="+", metavar="K_U", help="odd k_u (default 3 5 7 9)")
    ap.add_argument("--scales", type=float, nargs="+", metavar="S",
                    help="default 2 3 4; CARAFE and DySample take the integer ones")
    ap.add_argument("--memory-channels", type=int, nargs="*", metavar="C",
                    help="channel counts of the memory-only rows at the first map's size (default: 48 64 and the "
                         "maps' C; --quick: the maps' C)")
    cpu_cases = ["module", "carafe", "dysample", *GUIDED]
    ap.add_argument("--cases", nargs="+", choices=["op"] + cpu_cases + list(FOUNDATION), default=None,
                    help="which comparisons (default: all but anyup and naf; op, the Triton kernels, needs a GPU; "
                         "anyup and naf: the foundation upsamplers against their official forms, foundation.csv)")
    ap.add_argument("--foundation", type=int, nargs=3, metavar=("IMAGE", "FEAT", "C"), default=None,
                    help="anyup/naf: image side, feature side and channels (default %s)"
                         % " ".join(map(str, FOUNDATION_HARNESS)))
    ap.add_argument("--ratios", type=int, nargs="+", metavar="R", default=None,
                    help="anyup/naf: output side over feature side (default %s)"
                         % " ".join(map(str, FOUNDATION_RATIOS)))
    ap.add_argument("--foundation-extra", type=int, nargs="*", metavar="N", default=None,
                    help="anyup/naf: pairs OUT FEAT of extra inference points at the harness's C and patch "
                         "(default %s; none when given empty)" % " ".join(f"{a} {b}" for a, b in FOUNDATION_EXTRA))
    ap.add_argument("--train-max", type=int, metavar="R", default=None,
                    help="anyup/naf: training points only up to this ratio (default: every ratio)")
    ap.add_argument("--foundation-point", metavar="JSON", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs="*", metavar="SIDE", default=None,
                    help=f"the cost against size: square outputs of these sides (default {' '.join(map(str, SIZES))}) "
                         "at k_u=3 (or the first --kernel-sizes), s=2 (or the first --scales), C from --shape (64)")
    ap.add_argument("--torch-compile", choices=["after", "skip", "only"], default=None,
                    help="GPU: the op's torch.compile rows, which compile cold (tens of seconds each): after every "
                         "other row (default), skipped, or alone")
    ap.add_argument("--list", action="store_true", help="print the cases that will run here, and exit")
    args = ap.parse_args(argv)
    for shape in (args.shape or []) + ([args.upsampler_shape] if args.upsampler_shape else []):
        if min(shape) < 1 or shape[1] % (R * G):
            ap.error(f"--shape needs positive sizes and C divisible by 8 (D = C/4 in 2 groups), got {shape}")
    if args.kernel_sizes and any(k < 1 or k % 2 == 0 for k in args.kernel_sizes):
        ap.error(f"--kernel-sizes must be odd and positive, got {args.kernel_sizes}")
    if args.scales and (min(args.scales) <= 0 or not all(math.isfinite(s) for s in args.scales)):
        ap.error(f"--scales must be positive, got {args.scales}")
    if args.memory_channels and any(c < 1 or c % (R * G) for c in args.memory_channels):
        ap.error(f"--memory-channels must be positive multiples of 8, got {args.memory_channels}")
    if GPU:
        if args.threads is not None:
            ap.error("--threads sets the CPU comparison's threads; this machine has a GPU, which runs the GPU grid")
        if args.memory_channels is not None:
            ap.error("--memory-channels: the memory-only rows are a CPU run's (a GPU run measures every case)")
        args.torch_compile = args.torch_compile or "after"
    else:
        if args.dtype and args.dtype != ["fp32"]:
            ap.error(f"--dtype {' '.join(args.dtype)}: the CPU comparison runs fp32 only (the official-style "
                     "module and the torch path have no fast reduced-precision CPU kernels to compare)")
        if args.cases and "op" in args.cases:
            ap.error("--cases op times the Triton kernels, which need a GPU (on a CPU they only run interpreted)")
        if args.torch_compile:
            ap.error("--torch-compile orders the GPU op's torch.compile rows; a CPU run has none")
        if args.threads is not None and args.threads < 1:
            ap.error(f"--threads must be positive, got {args.threads}")
    if args.budget_gib is not None and not args.budget_gib > 0:
        ap.error(f"--budget-gib must be positive, got {args.budget_gib}")
    found = [c for c in args.cases or [] if c in FOUNDATION]
    if found and len(found) != len(args.cases):
        ap.error("--cases anyup/naf is a run of its own (foundation.csv): name no other case beside them")
    if not found and (args.foundation or args.ratios or args.foundation_extra is not None):
        ap.error("--foundation, --ratios and --foundation-extra belong to --cases anyup naf")
    if found:
        args.foundation = tuple(args.foundation or FOUNDATION_HARNESS)
        image, feat, C = args.foundation
        if min(args.foundation) < 1 or image % feat or C % 4:
            ap.error(f"--foundation needs positive sizes, the image a multiple of the features (the patch) and C a "
                     f"multiple of 4 (NAF's heads), got {list(args.foundation)}")
        args.ratios = args.ratios or list(FOUNDATION_RATIOS)
        if min(args.ratios) < 1:
            ap.error(f"--ratios must be positive, got {args.ratios}")
        extra = FOUNDATION_EXTRA if args.foundation_extra is None else args.foundation_extra
        if args.foundation_extra is not None:
            if len(extra) % 2 or any(n < 1 for n in extra):
                ap.error(f"--foundation-extra takes pairs of positive OUT FEAT, got {extra}")
            extra = list(zip(extra[::2], extra[1::2]))
        if feat < 9 or any(f < 9 for _, f in extra):
            ap.error("--foundation's features need at least 9x9 (NAF's default 9x9 window)")
        args.foundation_extra = extra
        if args.dtype and args.dtype != ["fp32"]:
            ap.error(f"--dtype {' '.join(args.dtype)}: anyup and naf run fp32")
        return args
    if args.sizes is not None:
        if GPU or args.cases:
            ap.error("--sizes is a CPU run of its own (no --cases)")
        sides = args.sizes or list(SIZES)
        s = (args.scales or [2.0])[0]
        if s != int(s) or any(n < 1 or n % int(s) for n in sides):
            ap.error(f"--sizes: sides must be positive multiples of the integer scale {s:g}, got {sides}")
        C = args.shape[0][1] if args.shape else 64
        args.cases, args.memory_channels = ["size"], []
        args.kernel_sizes, args.scales = (args.kernel_sizes or [3])[:1], [s]
        args.shape = [[1, C, n // int(s), n // int(s)] for n in sides]
    args.cases = args.cases or (["op"] + cpu_cases if GPU else cpu_cases)
    args.kernel_sizes = args.kernel_sizes or ([3, 5] if args.quick else [3, 5, 7, 9])
    args.scales = args.scales or ([2.0, 3.0] if args.quick else [2.0, 3.0, 4.0])
    given = [tuple(s) for s in args.shape] if args.shape else None
    args.shapes = given or ([(2, 256, 100, 152)] if GPU else [(1, 64, 20, 24)] if args.quick else [WORKLOAD, TARGET_MAP])
    args.upsampler_shape = tuple(args.upsampler_shape) if args.upsampler_shape else given[0] if given else \
        (2, 256, 100, 152) if GPU else (1, 16, 12, 16) if args.quick else (1, 64, 32, 48)
    if args.memory_channels is None:
        args.memory_channels = [] if GPU else sorted({s[1] for s in args.shapes} | (set() if args.quick else {48, 64}))
    if "module" not in args.cases:
        args.memory_channels = []
    if not any(s == int(s) for s in args.scales) and ({"carafe", "dysample", *GUIDED} & set(args.cases)) \
            and "module" not in args.cases:
        ap.error(f"--scales {args.scales}: CARAFE, DySample and the guided upsamplers take integer scales only")
    args.dtypes = args.dtype or (["fp32", "bf16"] if GPU else ["fp32"])
    return args


def main(argv=None):
    global BUDGET
    args = parse(argv)
    if args.budget_gib is not None:
        BUDGET = int(args.budget_gib * 2 ** 30)
    if args.foundation_point:
        print(json.dumps(foundation_point(json.loads(args.foundation_point))), flush=True)
        return
    if args.cases[0] in FOUNDATION:
        for p in main_foundation(args, args.out or os.path.join("results", device_slug())):
            print(f"wrote {p}")
        return
    if not GPU:
        torch.set_num_threads(args.threads or 2)
    comps = comparisons(args.cases, args.shapes, args.kernel_sizes, args.scales, args.upsampler_shape)
    if GPU and "op" in args.cases:
        comps = list(op_cases(args.shapes, args.kernel_sizes, args.scales)) + comps
    dropped = sorted({s for s in args.scales if s != int(s)})
    if dropped and {"carafe", "dysample", *GUIDED} & set(args.cases):
        print(f"note: CARAFE and DySample take integer scales; {dropped} run for LDAAQU only")
    if args.list:
        for case, k_u, s, shape, build in comps:
            why = {} if GPU else refusals(build)
            for b in build()[0]:
                if GPU and args.torch_compile != "after" and (b == "torch.compile") != (args.torch_compile == "only"):
                    continue
                print(f"{case} {b} {'x'.join(map(str, shape))} k_u={k_u} s={s:g} {' '.join(args.dtypes)} fwd fwd+bwd"
                      + (f"  ({why[b]})" if b in why else ""))
        for C in args.memory_channels:
            print(f"memory LDAAQU/torch LDAAQU/triton official-style 1x{C}x{args.shapes[0][2]}x{args.shapes[0][3]} "
                  f"k_u={' '.join(map(str, args.kernel_sizes))} s={' '.join(f'{s:g}' for s in args.scales)} "
                  "(kept for backward, traced)")
        return
    out = args.out or os.path.join("results", device_slug())
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "bench.csv")
    rows = Rows(path)
    try:
        if GPU:
            run_gpu(comps, args.dtypes, rows, args.torch_compile)
        else:
            rate, m = matmul_rate(), meta()
            print(f"{device_name()}, {torch.get_num_threads()} thread(s): fp32 matmul {rate:.1f} GFLOP/s "
                  f"(1024^2, min of 10), load average {os.getloadavg()[0]:.2f}, CPU cache {m['cpu_cache_gib']} GiB"
                  + (f", GLIBC_TUNABLES={m['malloc']}" if m["malloc"] else ""), flush=True)
            run_cpu(comps, rate, 0.3 if args.quick else 2.0, rows)
            memory_rows(args.memory_channels, args.shapes[0][2:], args.kernel_sizes, args.scales, rows)
    finally:
        rows.close()
    table, missed = targets(rows) if not GPU else ("", [])
    if table:
        open(os.path.join(out, "targets.md"), "w").write(table)
        print(table)
    if missed:  # what dominates where a target point misses
        text = profile_points(missed)
        open(os.path.join(out, "profiles.txt"), "w").write(text)
        print(text)
    flag = bench_plots.loaded(rows)
    if flag:
        print(f"warning:{flag}: timings compete with other work; rerun on a quiet machine")
    for p in [path] + bench_plots.plot_all(bench_plots.read(path), out):
        print(f"wrote {p}")
    failed = [r for r in rows if r["status"] not in ("ok",) and not r["status"].startswith("refused")
              and "OutOfMemory" not in r["status"]]
    if failed and not GPU:
        raise SystemExit(f"{len(failed)} cases failed")


if __name__ == "__main__":
    main()
