"""The torch path's no-compiler fallback (sparse products, LDA_AQU_NATIVE=0) against the plain grid_sample
graph (torch_path._plain), both through upsampler.local_upsample on the CPU.

    python results/sparse-vs-grid-sample/measure.py          # writes results.csv next to this file

Time: both paths interleaved in one process, the minimum of REPEATS calls each after a warm-up. Memory: a
fresh process per (case, path, direction); its peak RSS (VmHWM, reset through /proc/self/clear_refs once
the inputs exist) above the RSS at that point, then the bytes autograd keeps for backward beyond the inputs.
"""
import csv
import os
import subprocess
import sys
import time

os.environ["LDA_AQU_NATIVE"] = "0"
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402

from upsampler import functional, local_upsample, torch_path  # noqa: E402
from upsampler.functional import deformable_local_attention  # noqa: E402
from kernels import cpu  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPEATS = 10
THREADS = 1
C = 64


def cases():
    out = {}
    for k_u in (3, 5):
        for H, W in ((32, 48), (64, 96)):
            out[f"LDAAQU k_u={k_u} {H}x{W}"] = ("attention", k_u, H, W)
    for H, W in ((32, 48), (64, 96)):
        out[f"CARAFE k_u=5 {H}x{W}"] = ("logits", 5, H, W)
        out[f"DySample {H}x{W}"] = ("dysample", 1, H, W)
    return out


def inputs(mode, k_u, H, W, grad):
    """Fresh inputs of an LDAAQU-, CARAFE- or DySample-style call (the modules' defaults), scale 2."""
    g = torch.Generator().manual_seed(0)
    size, K = (2 * H, 2 * W), k_u * k_u

    def randn(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).requires_grad_(grad)
    if mode == "attention":  # D = C / 4, 2 offset groups, 1 head, a relative position bias
        G, D = 2, C // 4
        t = dict(q=randn(1, D, *size), k=randn(1, D, H, W), v=randn(1, C, H, W),
                 offset=randn(1, G * 2 * K, *size, scale=2.0), rpb=randn(1, K, D, scale=0.1))
        return lambda: deformable_local_attention(**t, num_groups=G), t, size
    if mode == "logits":  # CARAFE: a k_u x k_u window, no offsets, one group
        t = dict(v=randn(1, C, H, W), logits=randn(1, 1, K, *size))
        return lambda: local_upsample(t["v"], size, logits=t["logits"], kernel_size=k_u, coords="nearest",
                                      padding="zeros"), t, size
    G = 4  # DySample: one unit-weight sample per pixel per group
    t = dict(v=randn(1, C, H, W), offset=randn(1, G * 2, *size, scale=0.25))
    return lambda: local_upsample(t["v"], size, offset=t["offset"], num_groups=G, coords="half_pixel",
                                  padding="border"), t, size


def plain(v, size, *, offset, q, k, rpb, logits, weights, kernel_size, num_groups, num_heads, scale, coords,
          padding):
    return torch_path._plain(v, size, offset, q, k, rpb, logits, weights, kernel_size, num_groups, num_heads, scale,
                             coords, padding)


PATHS = {"sparse": torch_path.local_upsample_torch, "grid_sample": plain}


def use(path):
    functional.local_upsample_torch = PATHS[path]


def step(fn, t, backward, dout=None):
    out = fn()
    if backward:
        out.backward(dout)
        for x in t.values():
            x.grad = None
    return out


def timings():
    rows = []
    for name, (mode, k_u, H, W) in cases().items():
        for direction in ("fwd", "fwd+bwd"):
            backward = direction == "fwd+bwd"
            fn, t, size = inputs(mode, k_u, H, W, backward)
            dout = torch.randn(1, C, *size) if backward else None
            best = {}
            with torch.set_grad_enabled(backward):
                for path in PATHS:  # warm-up
                    use(path)
                    step(fn, t, backward, dout)
                for _ in range(REPEATS):
                    for path in PATHS:
                        use(path)
                        t0 = time.perf_counter()
                        step(fn, t, backward, dout)
                        best[path] = min(best.get(path, float("inf")), time.perf_counter() - t0)
            for path, s in best.items():
                rows.append(dict(case=name, direction=direction, path=path, ms=f"{s * 1e3:.2f}"))
            print(name, direction, {p: f"{s * 1e3:.2f} ms" for p, s in best.items()}, flush=True)
    return rows


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def memory_child(name, path, direction):
    """Peak RSS above the inputs' and the bytes kept for backward of one call, in this fresh process."""
    mode, k_u, H, W = cases()[name]
    backward = direction == "fwd+bwd"
    use(path)
    # a tiny call of the same mode first: libraries and kernels loaded, not counted
    fn, t, _ = inputs(mode, k_u, 4, 6, backward)
    with torch.set_grad_enabled(backward):
        step(fn, t, backward, torch.ones(1, C, 8, 12) if backward else None)
    fn, t, size = inputs(mode, k_u, H, W, backward)
    dout = torch.randn(1, C, *size) if backward else None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    with torch.set_grad_enabled(backward):
        step(fn, t, backward, dout)
    peak = status("VmHWM") - base
    kept = 0
    if backward:
        seen = {}

        def pack(x):
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = fn()
        ins = {x.untyped_storage().data_ptr() for x in t.values()}
        kept = sum(n for p, n in seen.items() if p not in ins)  # beyond the inputs, which the caller holds
        del out
    print(peak, kept)


def main():
    torch.set_num_threads(THREADS)
    assert cpu.unavailable() == "LDA_AQU_NATIVE=0", cpu.unavailable()
    load = [os.getloadavg()]
    rows = timings()
    load.append(os.getloadavg())
    for r in rows:
        out = subprocess.run([sys.executable, __file__, "mem", r["case"], r["path"], r["direction"]],
                             capture_output=True, text=True, check=True).stdout.split()
        r["peak_rss_mib"] = f"{int(out[0]) / 2 ** 20:.1f}"
        r["kept_for_backward_mib"] = f"{int(out[1]) / 2 ** 20:.1f}" if r["direction"] == "fwd+bwd" else ""
        print(r, flush=True)
    load.append(os.getloadavg())
    with open("/proc/cpuinfo") as f:
        model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    meta = dict(device=model, torch=torch.__version__, threads=THREADS, repeats=REPEATS,
                load_1min_before_time_mid_after=" / ".join(f"{a[0]:.2f}" for a in load))
    with open(os.path.join(HERE, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, [*rows[0], *meta])
        w.writeheader()
        for r in rows:
            w.writerow({**r, **meta})
    print(meta)


if __name__ == "__main__":
    if sys.argv[1:2] == ["mem"]:
        torch.set_num_threads(THREADS)
        memory_child(*sys.argv[2:5])
    else:
        main()
