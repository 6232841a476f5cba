"""Throughput of LDA-AQU against kernel size and scale: the fused Triton op, the eager reference,
torch.compile of the reference, and the whole module against the official-style module.

    python bench.py [--quick] [--out DIR] [--dtype fp32 bf16] [--shape B C H W] [--kernel-sizes ..] [--scales ..]

Writes bench.csv (one row per case, keyed by device, versions and date) and PNG plots into DIR
(default results/<gpu name>/, results/cpu/ without a GPU) and prints a table. Without a GPU it runs a reduced comparison on tiny
maps with the Triton kernels in the interpreter: that proves the command, not any speed.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import re
import time

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import triton  # noqa: E402

from upsampler import LDAAQU, deformable_local_attention  # noqa: E402
from upsampler.naive import deformable_local_attention_ref  # noqa: E402
from upsampler.official import official_forward  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# memory: what autograd keeps for the backward (any device), and the CUDA peak of a whole step
FIELDS = ["device", "torch", "triton", "date", "case", "backend", "direction", "dtype", "k_u", "scale", "B", "C",
          "H", "W", "ms", "mpix_per_s", "gb_per_s", "floor_bytes", "saved_for_backward_bytes", "peak_cuda_bytes",
          "status"]


def device_name() -> str:
    return torch.cuda.get_device_name() if GPU else "CPU (Triton interpreter)"


def device_slug() -> str:
    """results/<slug>: the GPU's name; "cpu" (git-ignored: interpreter timings are not results) otherwise."""
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
    """(case, backend, k_u, scale, make) where make(dtype, grad) -> (fn, tensors, out_numel)."""
    # on the CPU, maps of one 128-pixel program at s=2: the interpreter pays per program
    B, C, H, W = shape or ((2, 256, 100, 152) if GPU else (1, 16, 5, 6))
    G, nh, r = 2, 1, 4
    D = C // r
    if GPU:
        kus, default_scales = ([3, 5], [2, 3]) if quick else ([3, 5, 7, 9], [2, 3, 4])
    else:
        kus, default_scales = ([3, 5], [2]) if quick else ([3, 5, 7, 9], [2, 3, 4])
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
                    m = LDAAQU(C, scale_factor=s, reduction_factor=r, k_u=k_u, n_groups=G, num_heads=nh,
                               backend="auto" if GPU else "triton")
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
            if GPU or (k_u, s) == (kus[0], scales[0]):  # inductor on 2 CPU cores: one case is enough
                yield "op", "torch.compile", k_u, s, op("compile")
            yield "module", "LDAAQU", k_u, s, module(False)
            yield "module", "official-style", k_u, s, module(True)


def run(quick, dtypes, **grid):
    meta = dict(device=device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat())
    rows = []
    for case, backend, k_u, s, make in cases(quick, **grid):
        for dt in dtypes:
            for backward in (False, True):
                row = dict(meta, case=case, backend=backend, direction="fwd+bwd" if backward else "fwd", dtype=dt,
                           k_u=k_u, scale=s)
                try:
                    fn, tensors, out_numel = make(DTYPES[dt], backward)
                    row.update(B=tensors[0].shape[0], C=tensors[-1 if case == "module" else 2].shape[1],
                               H=tensors[-1 if case == "module" else 2].shape[2],
                               W=tensors[-1 if case == "module" else 2].shape[3])
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
    base = {("op", "eager"), ("module", "official-style")}
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
                ref = t.get("eager" if case == "op" else "official-style")
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
    columns = [c for c in ("saved_for_backward_bytes", "peak_cuda_bytes") if any(r[c] != "" for r in sel)]
    if columns:
        fig, axes = plt.subplots(1, len(columns), figsize=(8 * len(columns), 4), squeeze=False)
        keys = sorted({(r["case"], r["backend"]) for r in sel})
        groups = sorted({(r["k_u"], r["scale"], r["dtype"]) for r in sel})
        for ax, column in zip(axes[0], columns):
            for n, key in enumerate(keys):
                ys = [next((int(r[column]) / 2**20 for r in sel if (r["case"], r["backend"]) == key
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
    ap.add_argument("--shape", type=int, nargs=4, metavar=("B", "C", "H", "W"),
                    help="the input map (C divisible by 8); default 2 256 100 152 (FPN P2) on a GPU")
    ap.add_argument("--kernel-sizes", type=int, nargs="+", metavar="K_U")
    ap.add_argument("--scales", type=float, nargs="+", metavar="S")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    args = ap.parse_args()
    if args.shape and (min(args.shape) < 1 or args.shape[1] % 8):
        ap.error(f"--shape needs positive sizes and C divisible by 8 (D = C/4 in 2 groups), got {args.shape}")
    if args.kernel_sizes and any(k < 1 or k % 2 == 0 for k in args.kernel_sizes):
        ap.error(f"--kernel-sizes must be odd and positive, got {args.kernel_sizes}")
    if args.scales and min(args.scales) <= 0:
        ap.error(f"--scales must be positive, got {args.scales}")
    grid = dict(shape=args.shape, kernel_sizes=args.kernel_sizes, scales=args.scales)
    dtypes = args.dtype or (["fp32", "bf16"] if GPU else ["fp32"])
    if args.list:
        for case, backend, k_u, s, _ in cases(args.quick, **grid):
            print(f"{case} {backend} k_u={k_u} s={s:g} {' '.join(dtypes)} fwd fwd+bwd")
        return
    out = args.out or os.path.join("results", device_slug())
    os.makedirs(out, exist_ok=True)
    rows = run(args.quick, dtypes, **grid)
    with open(os.path.join(out, "bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    label = device_name() if GPU else "CPU interpreter (not a timing)"
    for p in [os.path.join(out, "bench.csv")] + plot(rows, out, label):
        print(f"wrote {p}")
    failed = [r for r in rows if r["status"] != "ok" and "OutOfMemory" not in r["status"]]
    if failed and not GPU:
        raise SystemExit(f"{len(failed)} cases failed")


if __name__ == "__main__":
    main()
