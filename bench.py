"""Throughput of LDA-AQU against kernel size and scale: the fused Triton op, the eager reference,
torch.compile of the reference, and the whole module against the official-style module; CARAFE and
DySample against their plain-PyTorch forms (unfold, grid_sample).

    python bench.py [--quick] [--out DIR] [--dtype fp32 bf16] [--threads N]
                    [--shape B C H W] [--kernel-sizes ..] [--scales ..] [--list]

Writes bench.csv (one row per case, keyed by device, versions and date) and PNG plots into DIR
(default results/<gpu name>/, results/cpu/ without a GPU) and prints a table. Without a GPU it times
the CPU path (backend="torch") on the issue's workload, LDAAQU(256) on 1x256x50x84 at x2, against the
official-style module and torch.compile of it, with N threads (default 2): the minimum of several
runs and their spread, what autograd keeps for the backward, and each case's RSS high-water mark
measured in a fresh subprocess; and CARAFE and DySample (the torch path) against their plain forms.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import os
import re
import subprocess
import sys
import time

import torch

GPU = torch.cuda.is_available()

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import triton  # noqa: E402

from upsampler import CARAFE, LDAAQU, DySample, deformable_local_attention  # noqa: E402
from upsampler.naive import deformable_local_attention_ref  # noqa: E402
from upsampler.official import official_forward  # noqa: E402
from upsampler.plain import carafe_forward, dysample_forward  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the baseline each case's speed-up is measured against
BASELINES = {"op": "eager", "module": "official-style", "carafe": "unfold", "dysample": "grid_sample"}
# memory: what autograd keeps for the backward (any device), and the CUDA peak of a whole step
FIELDS = ["device", "torch", "triton", "date", "case", "backend", "direction", "dtype", "k_u", "scale", "B", "C",
          "H", "W", "ms", "mpix_per_s", "gb_per_s", "floor_bytes", "saved_for_backward_bytes", "peak_cuda_bytes",
          "status", "reps", "ms_median", "ms_max", "peak_rss_bytes", "rel_err"]


def device_name() -> str:
    return torch.cuda.get_device_name() if GPU else f"CPU, {torch.get_num_threads()} threads"


def device_slug() -> str:
    """results/<slug>: the GPU's name; "cpu" (git-ignored) otherwise."""
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-") if GPU else "cpu"


def inputs(B, C, D, H, W, s, G, nh, k_u, dtype, dev, grad):
    Ho, Wo, K = int(H * s), int(W * s), k_u * k_u
    base = torch.arange(k_u, dtype=torch.float32) - k_u // 2
    grid = torch.stack(torch.meshgrid(base, base, indexing="ij"), -1).reshape(1, 1, 2 * K, 1, 1)
    off = (grid + 3 * torch.randn(B, G, 2 * K, Ho, Wo)).reshape(B, -1, Ho, Wo)
    t = [torch.randn(B, D, Ho, Wo), torch.randn(B, D, H, W), torch.randn(B, C, H, W), off,
         0.5 * torch.randn(nh, K, D // nh)]
    return [x.to(dev, dtype).requires_grad_(grad) for x in t]


def floor_bytes(tensors, out_numel, itemsize, backward):
    """The op's byte floor: every input read once and the output written once; forward+backward
    adds dout read once and every gradient (the inputs' sizes) written once."""
    ins = sum(t.numel() * t.element_size() for t in tensors)
    return ins + out_numel * itemsize + (out_numel * itemsize + ins if backward else 0)


def measure(fn, backward):
    """(median ms, bytes autograd saves for the backward, CUDA peak bytes) of fn(), followed by
    .sum().backward() when backward."""
    def run():
        if not backward:
            with torch.no_grad():
                return fn()
        out = fn()
        out.float().sum().backward()
        return out
    storages = {}

    def pack(x):  # one count per storage: views and expanded indices hold no memory of their own
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        run()  # also the warm-up: compilation, autotuning, the allocator
    saved = sum(storages.values()) if backward else ""
    if GPU:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median"), saved, peak
    times = []
    start = time.perf_counter()
    while not times or (len(times) < 25 and time.perf_counter() - start < 0.3):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2], saved, ""


def cases(quick, shape=None, kernel_sizes=None, scales=None):
    """(case, backend, k_u, scale, make) where make(dtype, grad) -> (fn, tensors, out_numel): the GPU grid."""
    B, C, H, W = shape or (2, 256, 100, 152)
    G, nh, r = 2, 1, 4
    D = C // r
    kus, default_scales = ([3, 5], [2, 3]) if quick else ([3, 5, 7, 9], [2, 3, 4])
    kus, scales = kernel_sizes or kus, scales or default_scales
    compiled_ref = torch.compile(deformable_local_attention_ref)
    for k_u in kus:
        for s in scales:
            def op(backend, k_u=k_u, s=s):
                def make(dtype, grad):
                    t = inputs(B, C, D, H, W, s, G, nh, k_u, dtype, "cuda" if GPU else "cpu", grad)
                    kw = dict(num_heads=nh, num_groups=G, scale=(D // nh) ** -0.5)
                    if backend == "compile":
                        return (lambda: compiled_ref(*t, **kw)), t, B * C * int(H * s) * int(W * s)
                    return (lambda: deformable_local_attention(*t, backend=backend, **kw)), t, \
                        B * C * int(H * s) * int(W * s)
                return make

            def module(official, k_u=k_u, s=s):
                def make(dtype, grad):
                    m = LDAAQU(C, scale_factor=s, reduction_factor=r, k_u=k_u, n_groups=G, num_heads=nh)
                    with torch.no_grad():
                        m.conv_offset[-1].weight.normal_(0, 0.05)
                    m = m.to("cuda" if GPU else "cpu", dtype)
                    x = torch.randn(B, C, H, W, device="cuda" if GPU else "cpu", dtype=dtype, requires_grad=grad)
                    if official:
                        kw = dict(scale_factor=s, n_groups=G, num_heads=nh, k_u=k_u, dtype=dtype)
                        return (lambda: official_forward(dict(m.named_parameters()), x, **kw)), [x], \
                            B * C * int(H * s) * int(W * s)
                    return (lambda: m(x)), [x], B * C * int(H * s) * int(W * s)
                return make
            yield "op", "triton", k_u, s, op("triton")
            yield "op", "eager", k_u, s, op("reference")
            yield "op", "torch.compile", k_u, s, op("compile")
            yield "module", "LDAAQU", k_u, s, module(False)
            yield "module", "official-style", k_u, s, module(True)


def upsampler_cases(quick, shape=None, scales=None):
    """CARAFE and DySample modules against their plain-PyTorch forms (upsampler/plain.py), the same
    weights: (case, backend, k_u, scale, make) as cases(); k_u is CARAFE's up_kernel, 1 for DySample."""
    B, C, H, W = shape or ((2, 256, 100, 152) if GPU else (1, 16, 5, 6) if quick else (1, 64, 50, 84))
    dev = "cuda" if GPU else "cpu"
    scales = [int(x) for x in scales or ([2] if quick else [2, 3]) if x == int(x)]

    def make_with(build, plain, s):
        def make(dtype, grad):
            m = build().to(dev, dtype)
            x = torch.randn(B, C, H, W, device=dev, dtype=dtype, requires_grad=grad)
            sd = m.state_dict(keep_vars=True)
            return (lambda: plain(sd, x)) if plain else (lambda: m(x)), [x], B * C * H * s * W * s
        return make
    for s in scales:
        for k in ([5] if quick else [3, 5, 7]):  # mmdet's FPN_CARAFE uses 5
            def build(k=k, s=s):
                return CARAFE(C, s, up_kernel=k, compressed_channels=64 if GPU else 8)
            yield "carafe", "CARAFE", k, s, make_with(build, None, s)
            yield "carafe", "unfold", k, s, make_with(
                build, lambda sd, x, k=k, s=s: carafe_forward(sd, x, scale_factor=s, up_kernel=k), s)
        yield "dysample", "DySample", 1, s, make_with(lambda s=s: DySample(C, s), None, s)
        yield "dysample", "grid_sample", 1, s, make_with(
            lambda s=s: DySample(C, s), lambda sd, x, s=s: dysample_forward(sd, x, scale=s), s)


# ---- CPU: the torch path on the workload, against the official-style module --------------

def cpu_cases(quick):
    """(backend, make) where make(grad) -> (fn, x, module); one shared set of official-keyed weights."""
    C, H, W = (64, 20, 24) if quick else (256, 50, 84)
    kw = dict(scale_factor=2, n_groups=2, num_heads=1, k_u=3)

    def module():
        torch.manual_seed(0)
        m = LDAAQU(C, reduction_factor=4, backend="torch", **kw)
        with torch.no_grad():  # trained-like offsets, not the zero-initialised plain grid
            m.conv_offset[-1].weight.normal_(0, 0.05)
        return m

    def make(which):
        def build(grad):
            m = module()
            x = torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(1), requires_grad=grad)
            if which == "LDAAQU":
                return (lambda: m(x)), x, m
            sd = dict(m.named_parameters())
            f = official_forward if which == "official-style" else compiled_official()
            return (lambda: f(sd, x, dtype=torch.float32, **kw)), x, m
        return build
    yield "LDAAQU", make("LDAAQU")
    yield "official-style", make("official-style")
    if not quick:  # inductor compiles C++ for minutes on 2 cores
        yield "official-style+compile", make("compile")


_COMPILED = []


def compiled_official():
    if not _COMPILED:
        _COMPILED.append(torch.compile(official_forward))
    return _COMPILED[0]


def step(fn, backward):
    if not backward:
        with torch.no_grad():
            return fn()
    out = fn()
    out.sum().backward()
    return out


def measure_cpu(fn, backward, reps):
    """(ms min, median, max over reps after a warm-up; bytes autograd keeps for the backward)."""
    storages = {}

    def pack(x):  # one count per storage: views and expanded indices hold no memory of their own
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        step(fn, backward)  # also the warm-up: compilation, the allocator
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step(fn, backward)
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[0], times[len(times) // 2], times[-1], (sum(storages.values()) if backward else "")


def rss_peak(backend, backward, quick, threads):
    """RSS high-water mark of one step, in a fresh process: VmHWM after the step minus VmRSS before it."""
    cmd = [sys.executable, __file__, "--rss-of", backend, "--threads", str(threads)] + \
        (["--backward"] if backward else []) + (["--quick"] if quick else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    return json.loads(r.stdout.strip().splitlines()[-1])["peak"] if r.returncode == 0 else ""


def _rss_child(backend, backward, quick):
    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
    fn, _, _ = dict(cpu_cases(quick))[backend](backward)
    before = status("VmRSS:")
    step(fn, backward)
    print(json.dumps({"peak": status("VmHWM:") - before}))


def run_cpu(quick, threads):
    meta = dict(device=device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat())
    reps = 3 if quick else 7
    rows, outputs = [], {}
    for backend, make in cpu_cases(quick):
        for backward in (False, True):
            row = dict(meta, case="module", backend=backend, direction="fwd+bwd" if backward else "fwd", dtype="fp32",
                       k_u=3, scale=2)
            try:
                fn, x, m = make(backward)
                row.update(B=x.shape[0], C=x.shape[1], H=x.shape[2], W=x.shape[3])
                ms, med, worst, saved = measure_cpu(fn, backward, reps)
                px = x.shape[0] * 4 * x.shape[2] * x.shape[3]
                with torch.no_grad():
                    outputs[backend] = fn().detach()
                    m.backend = "reference"  # the eager reference, same weights and precision
                    ref = m(x.detach())
                err = (outputs[backend].double() - ref).norm() / ref.norm()
                peak = rss_peak(backend, backward, quick, threads) if "compile" not in backend else ""
                row.update(ms=float(f"{ms:.4g}"), ms_median=float(f"{med:.4g}"), ms_max=float(f"{worst:.4g}"), reps=reps,
                           mpix_per_s=float(f"{px / ms / 1e3:.4g}"), saved_for_backward_bytes=saved,
                           peak_cuda_bytes="", peak_rss_bytes=peak, rel_err=f"{err:.2e}", status="ok")
            except Exception as e:  # noqa: BLE001 - a compiler failure is a result
                row.update(status=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
            rows.append(row)
            print(f"{backend:22} {row['direction']:7} min {row.get('ms', '-')} ms (median {row.get('ms_median', '-')}, "
                  f"max {row.get('ms_max', '-')}, {reps} runs)  saved {row.get('saved_for_backward_bytes') or '-'} B  "
                  f"RSS peak {row.get('peak_rss_bytes') or '-'} B  rel err {row.get('rel_err', '-')}  "
                  f"{row['status'][:60]}", flush=True)
    by = {(r["backend"], r["direction"]): r for r in rows if r["status"] == "ok"}
    for d in ("fwd", "fwd+bwd"):
        ours, base = by.get(("LDAAQU", d)), by.get(("official-style", d))
        if ours and base:
            line = f"{d}: LDAAQU is {base['ms'] / ours['ms']:.2f}x faster than official-style (min of {reps})"
            if d == "fwd+bwd":
                line += f"; keeps {base['saved_for_backward_bytes'] / ours['saved_for_backward_bytes']:.1f}x less" \
                    " for the backward"
            if ours["peak_rss_bytes"] and base["peak_rss_bytes"]:
                line += f"; RSS peak {base['peak_rss_bytes'] / ours['peak_rss_bytes']:.1f}x lower"
            print(line)
    return rows


def run(groups, dtypes):
    """Time each (case, backend, k_u, scale, make) of `groups` in each dtype, forward and forward+backward."""
    meta = dict(device=device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat())
    rows = []
    for case, backend, k_u, s, make in groups:
        for dt in dtypes:
            for backward in (False, True):
                row = dict(meta, case=case, backend=backend, direction="fwd+bwd" if backward else "fwd", dtype=dt,
                           k_u=k_u, scale=s)
                try:
                    fn, tensors, out_numel = make(DTYPES[dt], backward)
                    x = tensors[2 if case == "op" else -1]
                    row.update(B=x.shape[0], C=x.shape[1], H=x.shape[2], W=x.shape[3])
                    ms, saved, peak = measure(fn, backward)
                    px = out_numel / row["C"]
                    floor = floor_bytes(tensors, out_numel, tensors[0].element_size(), backward)
                    row.update(ms=float(f"{ms:.4g}"), mpix_per_s=float(f"{px / ms / 1e3:.4g}"),
                               gb_per_s=float(f"{floor / ms / 1e6:.4g}") if case == "op" else "",
                               floor_bytes=floor if case == "op" else "", saved_for_backward_bytes=saved,
                               peak_cuda_bytes=peak, status="ok")
                except Exception as e:  # noqa: BLE001 - an OOM or a compiler failure is a result
                    row.update(status=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    if GPU:
                        torch.cuda.empty_cache()
                rows.append(row)
                print(f"{case:6} {backend:15} {row['direction']:7} {dt:4} k_u={k_u} s={s}: "
                      f"{row.get('ms', '-')} ms  {row.get('mpix_per_s', '-')} Mpx/s  "
                      f"{row.get('gb_per_s') or '-'} GB/s  saved {row.get('saved_for_backward_bytes') or '-'} B  "
                      f"peak {row.get('peak_cuda_bytes') or '-'} B  {row['status'][:60]}",
                      flush=True)
    return rows


def plot(rows, out, label):
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return []
    paths = []
    dirs = sorted({r["direction"] for r in ok})
    dts = sorted({r["dtype"] for r in ok})
    # throughput vs k_u, one line per scale and backend
    fig, axes = plt.subplots(len(dts), len(dirs), figsize=(6 * len(dirs), 4 * len(dts)), squeeze=False)
    for i, dt in enumerate(dts):
        for j, d in enumerate(dirs):
            ax = axes[i][j]
            sel = [r for r in ok if r["dtype"] == dt and r["direction"] == d]
            for key in sorted({(r["case"], r["backend"], r["scale"]) for r in sel}):
                pts = sorted((r["k_u"], r["mpix_per_s"]) for r in sel if (r["case"], r["backend"], r["scale"]) == key)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]}/{key[1]} s={key[2]:g}")
            ax.set(xlabel="k_u", ylabel="output Mpx/s", yscale="log", title=f"{label}: {d}, {dt}",
                   xticks=sorted({r["k_u"] for r in sel}))
            ax.legend(fontsize=7)
    paths.append(_save(fig, out, "throughput_vs_k_u.png"))
    # speed-up of each backend over the eager baseline of its case
    base = set(BASELINES.items())
    fig, axes = plt.subplots(1, len(dirs), figsize=(7 * len(dirs), 4), squeeze=False)
    for j, d in enumerate(dirs):
        ax = axes[0][j]
        groups = sorted({(r["k_u"], r["scale"], r["dtype"]) for r in ok if r["direction"] == d})
        others = sorted({(r["case"], r["backend"]) for r in ok if (r["case"], r["backend"]) not in base})
        for n, (case, backend) in enumerate(others):
            ys = []
            for g in groups:
                t = {r["backend"]: r["ms"] for r in ok if r["direction"] == d and r["case"] == case
                     and (r["k_u"], r["scale"], r["dtype"]) == g}
                ref = t.get(BASELINES[case])
                ys.append(ref / t[backend] if ref and backend in t else 0)
            ax.bar([x + n * 0.8 / len(others) for x in range(len(groups))], ys, width=0.8 / len(others),
                   label=f"{case}/{backend}")
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xticks(range(len(groups)), [f"k{k} s{s:g} {dt}" for k, s, dt in groups], rotation=45, fontsize=7)
        ax.set(ylabel="speed-up over eager", title=f"{label}: {d}")
        ax.legend(fontsize=7)
    paths.append(_save(fig, out, "speedup.png"))
    # memory of a training step: what autograd keeps, and (on a GPU) the peak
    sel = [r for r in ok if r["direction"] == "fwd+bwd"]
    columns = [c for c in ("saved_for_backward_bytes", "peak_cuda_bytes", "peak_rss_bytes")
               if any(r.get(c, "") != "" for r in sel)]
    if columns:
        fig, axes = plt.subplots(1, len(columns), figsize=(8 * len(columns), 4), squeeze=False)
        keys = sorted({(r["case"], r["backend"]) for r in sel})
        groups = sorted({(r["k_u"], r["scale"], r["dtype"]) for r in sel})
        for ax, column in zip(axes[0], columns):
            for n, key in enumerate(keys):
                ys = [next((int(r.get(column) or 0) / 2**20 for r in sel if (r["case"], r["backend"]) == key
                            and (r["k_u"], r["scale"], r["dtype"]) == g), 0) for g in groups]
                ax.bar([x + n * 0.8 / len(keys) for x in range(len(groups))], ys, width=0.8 / len(keys),
                       label=f"{key[0]}/{key[1]}")
            ax.set_xticks(range(len(groups)), [f"k{k} s{s:g} {dt}" for k, s, dt in groups], rotation=45, fontsize=7)
            ax.set(ylabel=f"MiB, {column.removesuffix('_bytes').replace('_', ' ')}", yscale="log",
                   title=f"{label}: memory, fwd+bwd")
            ax.legend(fontsize=7)
        paths.append(_save(fig, out, "memory.png"))
    return paths


def _save(fig, out, name):
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a reduced grid")
    ap.add_argument("--out", default=None, help="results folder (default results/<device>)")
    ap.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES),
                    help="default: fp32 bf16 on a GPU, fp32 on the CPU")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (the CPU comparison only)")
    ap.add_argument("--shape", type=int, nargs=4, metavar=("B", "C", "H", "W"),
                    help="the input map of the GPU grid (C divisible by 8); default 2 256 100 152 (FPN P2)")
    ap.add_argument("--kernel-sizes", type=int, nargs="+", metavar="K_U")
    ap.add_argument("--scales", type=float, nargs="+", metavar="S")
    ap.add_argument("--cases", nargs="+", choices=list(BASELINES), default=list(BASELINES),
                    help="which comparisons (default: all; the CPU runs module, carafe and dysample)")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("--rss-of", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--backward", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.shape and (min(args.shape) < 1 or args.shape[1] % 8):
        ap.error(f"--shape needs positive sizes and C divisible by 8 (D = C/4 in 2 groups), got {args.shape}")
    if args.kernel_sizes and any(k < 1 or k % 2 == 0 for k in args.kernel_sizes):
        ap.error(f"--kernel-sizes must be odd and positive, got {args.kernel_sizes}")
    if args.scales and min(args.scales) <= 0:
        ap.error(f"--scales must be positive, got {args.scales}")
    if not GPU:
        torch.set_num_threads(args.threads)
    if args.rss_of:
        return _rss_child(args.rss_of, args.backward, args.quick)
    dtypes = args.dtype or (["fp32", "bf16"] if GPU else ["fp32"])
    grid = dict(shape=args.shape, kernel_sizes=args.kernel_sizes, scales=args.scales)
    chosen = [c for c in itertools.chain(cases(args.quick, **grid), upsampler_cases(args.quick, args.shape, args.scales))
              if c[0] in args.cases]
    if args.list:
        for case, backend, k_u, s, _ in chosen:
            print(f"{case} {backend} k_u={k_u} s={s:g} {' '.join(dtypes)} fwd fwd+bwd")
        return
    out = args.out or os.path.join("results", device_slug())
    os.makedirs(out, exist_ok=True)
    if GPU:
        rows = run(chosen, dtypes)
    else:  # the CPU path's module comparison, and the other upsamplers through it
        rows = (run_cpu(args.quick, args.threads) if "module" in args.cases else []) + \
            run([c for c in chosen if c[0] in ("carafe", "dysample")], dtypes)
    with open(os.path.join(out, "bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    label = device_name()
    for p in [os.path.join(out, "bench.csv")] + plot(rows, out, label):
        print(f"wrote {p}")
    failed = [r for r in rows if r["status"] != "ok" and "OutOfMemory" not in r["status"]]
    if failed and not GPU:
        raise SystemExit(f"{len(failed)} cases failed")


if __name__ == "__main__":
    main()
