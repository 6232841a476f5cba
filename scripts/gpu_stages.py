"""The stages of scripts/gpu.sh that no other command does: accuracy against the reference, device
copy bandwidth, and the report: TABLE.md for BENCHMARKS.md and SUMMARY.md, one screen of what the
run found. Without a GPU each runs a small CPU form (the kernels through the interpreter) that
proves the plumbing, and says so.

    python scripts/gpu_stages.py accuracy|bandwidth|table --out DIR
"""
from __future__ import annotations

import argparse
import csv
import datetime
import glob
import json
import os
import re
import sys
import time
import xml.etree.ElementTree as ET

import torch

# a dry run on a GPU machine interprets too
GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not GPU:
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402

GRADS = ("out", "dq", "dk", "dv", "doffset", "drpb")
TEST_STAGES = {"tests-gpu-only": "those that skip without a GPU", "tests": "the rest"}  # scripts/gpu.sh's
# the GPU goals (BENCHMARKS.md), as ratios
TARGETS = {"fwd_vs_eager": 10, "fwd_vs_compile": 3, "fwdbwd_vs_eager": 5, "copy_share": 0.6, "module_vs_official": 3}


def device_name() -> str:
    return torch.cuda.get_device_name() if GPU else "CPU (Triton interpreter, plumbing only)"


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return (a - ref).norm().item() / (ref.norm().item() or 1.0)


def accuracy(out: str) -> int:
    """The public op (backend="triton") against the float64 eager reference, forward and every
    gradient, at FPN P2 (B=2, C=256, D=64, 100x152 -> 200x304, k_u=3, G=2, nh=1) in fp32 and bf16."""
    from lda_aqu.autotune.sweep import inputs
    from lda_aqu.kernels.launchers import Problem
    from lda_aqu.upsampler import deformable_local_attention
    pb = Problem(2, 64, 256, 100, 152, 200, 304, 2, 1, 9) if GPU else Problem(1, 4, 16, 5, 6, 10, 12, 2, 1, 9)
    problem = " ".join(f"{k}={v}" for k, v in pb._asdict().items())
    worst = 0.0
    # each dtype's row written and flushed as it is measured: a stage cut short keeps fp32's
    with open(os.path.join(out, "accuracy.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "dtype", "problem", *GRADS])
        w.writeheader()
        f.flush()
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            x = [t.requires_grad_() for t in inputs(pb, dtype, "cuda" if GPU else "cpu", seed=1)]
            x64 = [t.detach().double().requires_grad_() for t in x]
            dout = torch.randn(pb.B, pb.C, pb.Ho, pb.Wo, device=x[0].device)
            kw = dict(num_heads=pb.NH, num_groups=pb.G)
            got = deformable_local_attention(*x, backend="triton", **kw)
            got.backward(dout.to(dtype))
            ref = deformable_local_attention(*x64, backend="reference", **kw)
            ref.backward(dout.double())
            errs = {"out": rel_err(got, ref)}
            errs.update({f"d{n}": rel_err(a.grad, b.grad) for n, a, b in zip(("q", "k", "v", "offset", "rpb"), x, x64)})
            w.writerow(dict(device=device_name(), dtype=name, problem=problem,
                            **{k: f"{v:.2e}" for k, v in errs.items()}))
            f.flush()
            worst = max(worst, *errs.values())
            print(f"{name}: relative error against the float64 reference: "
                  + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()), flush=True)
            del x, x64, got, ref
    return 0 if worst < 0.1 else 1


def bandwidth(out: str) -> int:
    """A large device-to-device copy: the bandwidth the op's effective GB/s is measured against."""
    n = 2**28 if GPU else 2**22  # 1 GiB of fp32 on a GPU
    x = torch.ones(n, device="cuda" if GPU else "cpu")
    y = torch.empty_like(x)
    if GPU:
        import triton.testing
        ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    else:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            y.copy_(x)
            times.append((time.perf_counter() - t) * 1e3)
        ms = sorted(times)[2]
    result = dict(device=device_name(), bytes_copied=x.numel() * 4, ms=ms, gb_per_s=2 * x.numel() * 4 / ms / 1e6)
    print(f"device copy: {result['gb_per_s']:.0f} GB/s (bytes read + written, {x.numel() * 4 / 2**30:.3g} GiB, "
          f"median {ms:.3f} ms) on {result['device']}")
    with open(os.path.join(out, "bandwidth.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


def _read(pattern: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def _fmt(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:.3g}{unit}"


def table(out: str) -> int:
    """TABLE.md: the benchmark against the GPU goals, accuracy, tests, sweep and stages."""
    copy = None
    if os.path.exists(os.path.join(out, "bandwidth.json")):
        copy = json.load(open(os.path.join(out, "bandwidth.json")))["gb_per_s"]
    lines = [f"### {device_name()}: torch {torch.__version__}, Triton {triton.__version__} "
             f"({datetime.date.today().isoformat()}, `scripts/gpu.sh`)", ""]
    lines.append(f"Device copy: {_fmt(copy)} GB/s (bytes read + written)." if copy else "Device copy: not measured.")
    lines.append("")
    rows = [r for r in _read(os.path.join(out, "bench-*", "bench.csv")) if r["status"] == "ok"]
    bench = [r for r in rows if r["case"] in ("op", "module")]

    def key_of(r):
        return r["B"], r["C"], r["H"], r["W"], r["k_u"], r["scale"], r["dtype"], r["direction"]
    keys = sorted({key_of(r) for r in bench})
    if keys:
        lines += ["| problem (B C H W, k_u, s) | dtype | pass | Triton ms | eager ms | torch.compile ms | vs eager "
                  "| vs compile | GB/s | of copy | LDAAQU ms | official ms | module | goals |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in keys:
        ms = {r["backend"]: float(r["ms"]) for r in bench if key_of(r) == key}
        gbs = next((float(r["gb_per_s"]) for r in bench if key_of(r) == key and r["backend"] == "triton"), None)
        tri = ms.get("triton")
        vs_eager = ms["eager"] / tri if tri and "eager" in ms else None
        vs_compile = ms["torch.compile"] / tri if tri and "torch.compile" in ms else None
        share = gbs / copy if gbs and copy else None
        module = ms["official-style"] / ms["LDAAQU"] if "LDAAQU" in ms and "official-style" in ms else None
        fwd = key[7] == "fwd"
        checks = [(vs_eager, TARGETS["fwd_vs_eager" if fwd else "fwdbwd_vs_eager"], "x eager"),
                  (vs_compile if fwd else None, TARGETS["fwd_vs_compile"], "x compile"),
                  (share and 100 * share if fwd else None, 100 * TARGETS["copy_share"], "% of copy"),
                  (module, TARGETS["module_vs_official"], "x official")]
        missed = [f"{_fmt(v, what)} < {t:g}{what}" for v, t, what in checks if v is not None and v < t]
        lines.append(f"| {' '.join(key[:4])}, {key[4]}, {float(key[5]):g} | {key[6]} | {key[7]} | {_fmt(tri)} "
                     f"| {_fmt(ms.get('eager'))} | {_fmt(ms.get('torch.compile'))} | {_fmt(vs_eager, 'x')} "
                     f"| {_fmt(vs_compile, 'x')} | {_fmt(gbs)} | {_fmt(share and 100 * share, '%')} "
                     f"| {_fmt(ms.get('LDAAQU'))} | {_fmt(ms.get('official-style'))} | {_fmt(module, 'x')} "
                     f"| {'; '.join(missed) or ('met' if any(v is not None for v, _, _ in checks) else '-')} |")
    if not keys:
        lines.append("No benchmark rows (the bench stages did not run or failed; see stages.txt).")
    others = [r for r in rows if r["case"] in ("carafe", "dysample")]
    if others:
        lines += ["", "| upsampler (B C H W, k, s) | dtype | pass | ours ms | plain PyTorch ms | speed-up | "
                  "saved for backward, ours / plain |", "| --- | --- | --- | --- | --- | --- | --- |"]
        plain = {"carafe": "unfold", "dysample": "grid_sample"}
        for r in others:
            if r["backend"] == plain[r["case"]]:
                continue
            base = next((b for b in others if b["backend"] == plain[r["case"]] and
                         all(b[f] == r[f] for f in ("B", "C", "H", "W", "k_u", "scale", "dtype", "direction"))), None)
            saved = (f"{int(r['saved_for_backward_bytes']) / 2**20:.1f} / "
                     f"{int(base['saved_for_backward_bytes']) / 2**20:.1f} MiB"
                     if base and r["saved_for_backward_bytes"] and base["saved_for_backward_bytes"] else "-")
            lines.append(f"| {r['backend']} {r['B']} {r['C']} {r['H']} {r['W']}, {r['k_u']}, {float(r['scale']):g} "
                         f"| {r['dtype']} | {r['direction']} | {_fmt(float(r['ms']))} "
                         f"| {_fmt(float(base['ms']) if base else None)} "
                         f"| {_fmt(float(base['ms']) / float(r['ms']) if base else None, 'x')} | {saved} |")
    lines += ["", "Goals: forward >= 10x the eager op and >= 3x its torch.compile, >= 60% of the copy "
              "bandwidth on the op's byte floor; forward+backward >= 5x eager; the module >= 3x the official-style "
              "module. Medians of `triton.testing.do_bench`; configurations from the sweep's cache where it ran, "
              "else the defaults.", ""]
    acc = _read(os.path.join(out, "accuracy.csv"))
    if acc:
        names = [k for k in GRADS if k in acc[0]]
        lines += [f"Relative error against the float64 reference (`backend=\"triton\"`, {acc[0]['problem']}):", "",
                  "| dtype | " + " | ".join(names) + " |", "| --- " * (len(names) + 1) + "|"]
        lines += [f"| {r['dtype']} | " + " | ".join(r[n] for n in names) + " |" for r in acc]
        lines.append("")
    tuned = sorted(glob.glob(os.path.join(out, "tuning", "*.json")))
    for path in tuned:
        entries = json.load(open(path)).get("entries", {})
        lines.append(f"Sweep: {len(entries)} tuned buckets in `{os.path.relpath(path, out)}` (commit as "
                     f"`lda_aqu/autotune/defaults/{os.path.basename(path)}`).")
    for name, what in TEST_STAGES.items():
        if os.path.exists(os.path.join(out, f"{name}.log")):
            summary = [ln for ln in open(os.path.join(out, f"{name}.log")).read().splitlines()
                       if " passed" in ln or " failed" in ln or " error" in ln or " skipped" in ln]
            lines.append(f"Tests, {what} (compiled, no interpreter): "
                         f"{summary[-1].strip('= ') if summary else 'no summary line'}.")
    if os.path.exists(os.path.join(out, "stages.txt")):
        lines += ["", "Stages:", "", "```", open(os.path.join(out, "stages.txt")).read().rstrip(), "```"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "TABLE.md"), "w") as f:
        f.write(text)
    print(text)
    write_summary(out, copy, bench)
    return 0


def failed_tests(out: str, name: str = "tests") -> tuple[str, list[str]]:
    """A test stage's counts and the node ids that failed, errored or crashed: from its JUnit XML
    when pytest finished, else from the names its log printed as they ran (a stage cut short)."""
    xml, log = os.path.join(out, f"{name}.xml"), os.path.join(out, f"{name}.log")
    if os.path.exists(xml):
        try:
            root = ET.parse(xml).getroot()
            cases = root.iter("testcase")
            bad = [f"{c.get('classname', '').replace('.', '/')}.py::{c.get('name')}" for c in cases
                   if c.find("failure") is not None or c.find("error") is not None]
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            return (f"{n['tests'] - n['failures'] - n['errors'] - n['skipped']} passed, {n['failures']} failed, "
                    f"{n['errors']} errors, {n['skipped']} skipped"), bad
        except (ET.ParseError, AttributeError, ValueError):
            pass
    if not os.path.exists(log):
        return "not run", []
    text = open(log).read()
    bad = sorted(set(re.findall(r"(?:FAILED|ERROR) (tests/\S+)", text)) |
                 set(re.findall(r"worker '\w+' crashed while running '([^']+)'", text)))
    return "no JUnit report (the stage was cut short or crashed); names from its log", bad


def write_summary(out: str, copy, bench) -> None:
    """SUMMARY.md: one screen of the run (the details in TABLE.md and the logs)."""
    lines = [f"# {device_name()}: torch {torch.__version__}, Triton {triton.__version__}, "
             f"{datetime.date.today().isoformat()}", ""]
    acc = _read(os.path.join(out, "accuracy.csv"))
    for r in acc:
        worst = max(GRADS, key=lambda k: float(r[k]))
        lines.append(f"- accuracy {r['dtype']}: worst relative error {r[worst]} ({worst}) against float64")
    if not acc:
        lines.append("- accuracy: not measured")
    lines.append(f"- device copy: {_fmt(copy)} GB/s" if copy else "- device copy: not measured")
    speed = {}
    for r in bench:
        key = (r["case"], r["dtype"], r["direction"], r["k_u"], r["scale"], f"{r['B']}x{r['C']}x{r['H']}x{r['W']}")
        speed.setdefault(key, {})[r["backend"]] = r
    for (case, dtype, d, k, sc, shape), by in sorted(speed.items()):
        ours = by.get("triton") or by.get("LDAAQU")
        if not ours:
            continue
        ms = float(ours["ms"])
        parts = [f"{ms:.3g} ms"]
        for base in ("eager", "torch.compile", "official-style"):
            if base in by:
                parts.append(f"{float(by[base]['ms']) / ms:.2f}x {base}")
        if ours.get("gb_per_s") and copy:
            parts.append(f"{float(ours['gb_per_s']):.0f} GB/s = {100 * float(ours['gb_per_s']) / copy:.0f}% of copy")
        lines.append(f"- {case} {shape} k_u={k} s={float(sc):g} {dtype} {d}: " + ", ".join(parts))
    if not bench:
        lines.append("- bench: no rows (see stages below)")
    for name, what in TEST_STAGES.items():
        counts, bad = failed_tests(out, name)
        if counts == "not run" and name != "tests":
            continue
        lines.append(f"- tests, {what} (compiled for the GPU): {counts}")
        lines += [f"  - {t}" for t in bad[:12]] + ([f"  - ... {len(bad) - 12} more ({name}.log)"] if len(bad) > 12
                                                   else [])
    if os.path.exists(os.path.join(out, "stages.txt")):
        lines += ["", "Stages (name, how it ended, seconds):", "", "```",
                  open(os.path.join(out, "stages.txt")).read().rstrip(), "```"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "SUMMARY.md"), "w") as f:
        f.write(text)
    print(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["accuracy", "bandwidth", "table"])
    ap.add_argument("--out", required=True, help="the results folder")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    return {"accuracy": accuracy, "bandwidth": bandwidth, "table": table}[args.stage](args.out)


if __name__ == "__main__":
    sys.exit(main())
