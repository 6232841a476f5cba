"""bench.py and bench_plots.py: flags honoured or refused with a reason, --list is what runs, every
figure drawn from a small made-up CSV (no timings), the memory bench's fake-tensor tracing agrees
with real runs, and one real tiny CPU point end to end."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import bench
import bench_plots
from lda_aqu.upsampler import module as upsampler_module
from helpers import seeded_randn
from lda_aqu.upsampler import cpu_cache
from lda_aqu.upsampler.official import official_forward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU grid's flags; a GPU runs the GPU grid")


@CPU_ONLY
@pytest.mark.parametrize("argv, why", [
    (["--kernel-sizes", "4"], "odd"),
    (["--kernel-sizes", "0"], "odd and positive"),
    (["--scales", "0"], "positive"),
    (["--shape", "1", "30", "8", "8"], "C divisible by 8"),
    (["--shape", "1", "64", "0", "8"], "positive sizes"),
    (["--upsampler-shape", "1", "12", "8", "8"], "C divisible by 8"),
    (["--dtype", "bf16"], "fp32 only"),
    (["--cases", "op"], "need a GPU"),
    (["--threads", "0"], "positive"),
    (["--memory-channels", "12"], "multiples of 8"),
    (["--cases", "carafe", "--scales", "1.5"], "integer scales"),
    (["--cases", "nope"], "invalid choice"),
    (["--sizes", "33"], "multiples of the integer scale"),
    (["--sizes", "--cases", "module"], "no --cases"),
    (["--torch-compile", "only"], "a CPU run has none"),
    (["--cases", "anyup", "module"], "a run of its own"),
    (["--ratios", "2"], "belong to --cases anyup naf"),
    (["--cases", "naf", "--foundation", "40", "12", "8"], "a multiple of the features"),
    (["--cases", "naf", "--foundation", "32", "8", "8"], "at least 9x9"),
    (["--cases", "naf", "--foundation-extra", "2048"], "pairs of positive OUT FEAT"),
])
def test_bad_flags_are_refused_with_the_reason(argv, why, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse(argv)
    assert e.value.code == 2 and why in capsys.readouterr().err


@CPU_ONLY
def test_flags_are_honoured_and_list_is_what_runs(capsys):
    args = bench.parse(["--quick"])
    assert len(args.kernel_sizes) >= 2 and len(args.scales) >= 2 and args.shapes == [(1, 64, 20, 24)]
    full = bench.parse([])
    assert full.kernel_sizes == [3, 5, 7, 9] and full.scales == [2, 3, 4]
    assert full.shapes == [bench.WORKLOAD, bench.TARGET_MAP] and full.memory_channels == [48, 64, 128, 256]
    bench.main(["--list", "--quick", "--kernel-sizes", "3", "--scales", "2", "1.5", "--shape", "1", "16", "6", "8"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("note: CARAFE and DySample take integer scales; [1.5]")
    runs = sorted(line.split("  (")[0] for line in lines[1:])
    assert runs == sorted([
        "module LDAAQU 1x16x6x8 k_u=3 s=2 fp32 fwd fwd+bwd", "module official-style 1x16x6x8 k_u=3 s=2 fp32 fwd fwd+bwd",
        "module LDAAQU 1x16x6x8 k_u=3 s=1.5 fp32 fwd fwd+bwd",
        "module official-style 1x16x6x8 k_u=3 s=1.5 fp32 fwd fwd+bwd",
        "carafe CARAFE 1x16x6x8 k_u=3 s=2 fp32 fwd fwd+bwd", "carafe unfold 1x16x6x8 k_u=3 s=2 fp32 fwd fwd+bwd",
        "dysample DySample 1x16x6x8 k_u=1 s=2 fp32 fwd fwd+bwd",
        "dysample grid_sample 1x16x6x8 k_u=1 s=2 fp32 fwd fwd+bwd",
        "sapa SAPA 1x16x6x8 k_u=3 s=2 fp32 fwd fwd+bwd", "sapa unfold 1x16x6x8 k_u=3 s=2 fp32 fwd fwd+bwd",
        "sapadeform SAPADeform 1x16x6x8 k_u=3 s=2 fp32 fwd fwd+bwd",
        "sapadeform grid_sample 1x16x6x8 k_u=3 s=2 fp32 fwd fwd+bwd",
        "fade FADE 1x16x6x8 k_u=3 s=2 fp32 fwd fwd+bwd", "fade unfold 1x16x6x8 k_u=3 s=2 fp32 fwd fwd+bwd",
        "memory LDAAQU/torch LDAAQU/triton official-style 1x16x6x8 k_u=3 s=2 1.5 (kept for backward, traced)"])


KEEP_HEAP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


@pytest.mark.parametrize("tunables,cache", [("", ""), (KEEP_HEAP, "0"), ("", "0.5")])
def test_every_row_records_the_allocator_setting(tunables, cache, monkeypatch):
    # glibc's tunables and the CPU cache move the CPU's cost on large maps by up to 1.5x (page faults): a
    # row must say which
    monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    monkeypatch.setenv("LDA_AQU_CPU_CACHE_GIB", cache)
    row = bench.meta()
    assert row["malloc"] == tunables and set(row) <= set(bench.FIELDS)
    assert row["cpu_cache_gib"] == (float(cache) if cache else pytest.approx(cpu_cache.limit() / 2 ** 30, rel=1e-3))
    assert row["cpu_cache_gib"] > 0 or cache == "0"
    label = bench_plots.run_label([dict(row, dtype="fp32", threads=1)])
    assert ("GLIBC_TUNABLES set" in label) == bool(tunables) and ("CPU cache off" in label) == (cache == "0")


@CPU_ONLY
def test_a_baseline_too_big_for_the_budget_is_refused(monkeypatch):
    build = bench.module_build((1, 16, 6, 8), 3, 2)
    kept = bench.traced(build, True, lambda fns: {b: bench.kept_for_backward(f) for b, f in fns.items()})
    # twice ours fits, twice the official's (its K sampled copies) does not
    monkeypatch.setattr(bench, "BUDGET", kept["LDAAQU"] + kept["official-style"])
    why = bench.refusals(build)
    assert list(why) == ["official-style"] and why["official-style"].startswith("refused: needs ~")


def test_the_budget_can_be_lowered(monkeypatch, capsys):
    # retained heap (GLIBC_TUNABLES) lets the official-style module's large steps outgrow the machine
    monkeypatch.setattr(bench, "BUDGET", bench.BUDGET)  # main sets it: restored after the test
    bench.main(["--sizes", "128", "--budget-gib", "0.0001", "--list"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("over the 0.0001 GiB budget" in ln for ln in lines)
    with pytest.raises(SystemExit):
        bench.parse(["--sizes", "--budget-gib", "0"])
    assert "--budget-gib must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("C", [48, 64])
def test_traced_memory_matches_real_runs_and_stays_under_a_fifth(C):
    """What autograd keeps, traced on fake tensors (the bench's memory rows), equals a real run's, for
    the torch and the Triton backend (interpreted on CPU) and the official-style module; narrow maps
    keep at most 1/5 of the official-style module's."""
    build = bench.module_build((1, C, 4, 5), 3, 2, backends=("torch", "triton"))
    fns, x = build(torch.float32, True)
    real = {b: bench.kept_for_backward(f) for b, f in fns.items()}
    traced = bench.traced(build, True, lambda fns: {b: bench.kept_for_backward(f) for b, f in fns.items()})
    assert traced == real
    for b in ("LDAAQU/torch", "LDAAQU/triton"):
        assert real[b] <= bench.TARGETS["memory"] * real["official-style"], (b, real)


def test_recomputed_offset_branch_keeps_less_and_matches_the_official_gradients(monkeypatch):
    """Eager training recomputes the offset branch in backward: the gradients of every parameter and of
    x still equal the official forward's (float64), and its outputs are not kept."""
    torch.manual_seed(0)
    m = bench.ldaaqu(16, 3, 2, dtype=torch.float64)
    x = torch.randn(1, 16, 5, 6, dtype=torch.float64, requires_grad=True)
    sd = dict(m.named_parameters())
    grads = []
    for fn in (lambda: m(x), lambda: official_forward(sd, x, scale_factor=2, n_groups=2, k_u=3)):
        out = fn()
        dout = seeded_randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        grads.append(torch.autograd.grad(out, [x, *sd.values()], dout))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # against the graph torch.compile and export take (every branch output kept): at least the tanh's
    # [B*G, 2K, Ho, Wo] output and the GELU's [B*G, D/G, Ho, Wo] input less
    kept = bench.kept_for_backward(lambda: m(x))
    monkeypatch.setattr(upsampler_module, "capture", lambda modes=True: "exporting")
    plain = bench.kept_for_backward(lambda: m(x))
    assert kept <= plain - (2 * 2 * 9 + 4) * 10 * 12 * 8


def _rows():
    """A made-up CSV's rows: a 2x2 module grid (one baseline refused), CARAFE, DySample, memory rows and
    GPU-style op rows with GB/s; the load average crosses the core count once."""
    base = dict(device="CPU (test), 2 cores", torch="2.x", triton="3.x", date="2026-01-01", threads=2, cores=2,
                dtype="fp32", B=1, C=64, H=20, W=24, reps=3, load_before=0.5, load_after=0.7)
    rows = []
    for case, ours, ks, ss in (("module", "LDAAQU", (3, 5), (2, 3)), ("carafe", "CARAFE", (3, 5), (2, 3)),
                               ("dysample", "DySample", (1,), (2, 3)), ("op", "triton", (3, 5), (2, 3))):
        for k in ks:
            for s in ss:
                for d, f in (("fwd", 1), ("fwd+bwd", 3)):
                    for b, slow in ((ours, 1), (bench_plots.BASELINES[case], 4 + k)):
                        ms = f * slow * k * s
                        row = dict(base, case=case, backend=b, direction=d, k_u=k, scale=s, ms=ms, ms_median=ms + 1,
                                   ms_max=ms + 2, mpix_per_s=100 / ms, status="ok",
                                   saved_for_backward_bytes=2 ** 20 * slow * k if d == "fwd+bwd" else "",
                                   gb_per_s=1000 / ms if case == "op" else "")
                        if case == "module" and (k, s) == (5, 3) and b != ours:
                            row.update(ms="", mpix_per_s="", status="refused: needs ~9 GiB")
                        rows.append(row)
    rows[-1]["load_after"] = 3.5
    for C in (48, 64):
        for k in (3, 5):
            for s in (2, 3):
                for b, n in (("LDAAQU/torch", 10), ("LDAAQU/triton", 11), ("official-style", 60 * k)):
                    rows.append(dict(base, case="memory", backend=b, direction="fwd+bwd", k_u=k, scale=s, C=C,
                                     saved_for_backward_bytes=n * 2 ** 20, status="ok", load_before="", load_after=""))
    return rows


def test_every_plot_is_drawn_from_a_small_csv(tmp_path):
    path = tmp_path / "bench.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=bench.FIELDS)
        w.writeheader()
        w.writerows(_rows())
    rows = bench_plots.read(str(path))
    assert "LOADED: load average up to 3.50 > 2 cores" in bench_plots.run_label(rows)
    paths = bench_plots.plot_all(rows, str(tmp_path / "png"))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["gbps.png", "memory.png", "memory_ratio.png", "speedup.png", "throughput_vs_k_u.png",
                     "throughput_vs_scale.png"]
    assert all(os.path.getsize(p) > 10_000 for p in paths)


@CPU_ONLY
def test_sizes_is_a_size_axis_and_its_plot(tmp_path, capsys):
    """--sizes: one LDAAQU point per output side at k_u=3 s=2 beside the official-style module, the
    biggest forward only; cost_vs_size.png from such rows, a refused baseline among them."""
    args = bench.parse(["--sizes", "8", "12", "--shape", "1", "16", "1", "1"])
    assert args.cases == ["size"] and args.shapes == [(1, 16, 4, 4), (1, 16, 6, 6)] and args.kernel_sizes == [3]
    bench.main(["--sizes", "8", "--list"])
    assert sorted(capsys.readouterr().out.splitlines()) == [
        "size LDAAQU 1x64x4x4 k_u=3 s=2 fp32 fwd fwd+bwd", "size official-style 1x64x4x4 k_u=3 s=2 fp32 fwd fwd+bwd"]
    base = dict(device="CPU (test), 2 cores", torch="2.x", triton="3.x", date="2026-01-01", threads=1, cores=2,
                dtype="fp32", case="size", B=1, C=64, k_u=3, scale=2, load_before=0.5, load_after=0.7, status="ok")
    rows = [dict(base, backend=b, direction=d, H=n, W=n, ms=n * n * f * (1 + 3 * (b != "LDAAQU")) / 1e3,
                 saved_for_backward_bytes=n * n * (500 if b == "LDAAQU" else 5000) if d == "fwd+bwd" else "")
            for n in (64, 128, 256) for b in ("LDAAQU", "official-style") for d, f in (("fwd", 1), ("fwd+bwd", 3))]
    rows[-1].update(ms="", status="refused: needs ~20 GiB")
    path = tmp_path / "bench.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=bench.FIELDS)
        w.writeheader()
        w.writerows(rows)
    assert [os.path.basename(p) for p in bench_plots.plot_all(str(path), str(tmp_path))] == ["cost_vs_size.png"]
    assert (tmp_path / "cost_vs_size.png").stat().st_size > 10_000


def test_plotting_refuses_what_is_not_a_bench_csv(tmp_path):
    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a bench.py CSV"):
        bench_plots.plot_all(str(bad), str(tmp_path))
    with pytest.raises(SystemExit):
        bench_plots.main([str(tmp_path / "missing.csv")])
    with pytest.raises(SystemExit):
        bench_plots.main([str(bad)])


@CPU_ONLY
@pytest.mark.slow
def test_one_point_end_to_end(tmp_path):
    """The issue's command: LDAAQU rows for exactly the point asked for, and the against-scale plot."""
    r = subprocess.run([sys.executable, "bench.py", "--quick", "--kernel-sizes", "5", "--scales", "3", "--shape", "1",
                        "48", "20", "24", "--threads", "1", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    ours = [x for x in rows if x["backend"] == "LDAAQU"]
    assert {(x["k_u"], x["scale"], x["B"], x["C"], x["H"], x["W"]) for x in ours} == {("5", "3.0", "1", "48", "20", "24")}
    assert sorted(x["direction"] for x in ours) == ["fwd", "fwd+bwd"]
    timed = [x for x in rows if x["case"] != "memory"]
    assert {x["backend"] for x in timed} == {"LDAAQU", "official-style", "CARAFE", "unfold", "DySample", "grid_sample",
                                          "SAPA", "SAPADeform", "FADE"}
    for x in timed:
        assert x["status"] == "ok" and x["device"].startswith("CPU") and x["threads"] == "1"
        assert 0 < float(x["ms"]) <= float(x["ms_median"]) <= float(x["ms_max"]) and int(x["reps"]) >= 3
        assert float(x["load_before"]) >= 0 and float(x["load_after"]) >= 0
        # the CSV keeps limit_fraction to 3 significant digits (rounding up to 5e-3 relative), limit_ms and ms to 4
        assert float(x["limit_fraction"]) == pytest.approx(float(x["limit_ms"]) / float(x["ms"]), rel=6e-3)
    # ours against the official-style module in fp32: the official's own error is ~7e-6 (range_factor x tanh)
    assert float(next(x for x in ours if x["direction"] == "fwd")["rel_err"]) < 1e-4
    kept = {x["backend"]: int(x["saved_for_backward_bytes"]) for x in rows if x["case"] == "memory"}
    assert kept["LDAAQU/torch"] * 5 <= kept["official-style"] and kept["LDAAQU/triton"] * 5 <= kept["official-style"]
    assert (tmp_path / "throughput_vs_scale.png").stat().st_size > 10_000
    assert "faster" in r.stdout or "slower" in r.stdout


@CPU_ONLY
@pytest.mark.slow
def test_a_run_killed_mid_way_keeps_the_rows_it_measured(tmp_path):
    """scripts/gpu.sh ends a stage past its limit with SIGTERM (timeout): every row measured before
    it is in the CSV, whole, under its header."""
    path = tmp_path / "bench.csv"
    run = subprocess.Popen([sys.executable, "bench.py", "--quick", "--cases", "dysample", "carafe", "--kernel-sizes",
                            "3", "5", "--scales", "2", "3", "--threads", "1", "--out", str(tmp_path)], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.poll() is None:
            if path.exists() and len(path.read_text().splitlines()) >= 3:  # the header and one case's two rows
                break
            time.sleep(0.05)
        run.send_signal(signal.SIGTERM)
        err = run.communicate(timeout=60)[1]
    finally:
        run.kill()
    assert run.returncode == -signal.SIGTERM, f"the run was not cut mid-way (exit {run.returncode}): {err[-2000:]}"
    rows = list(csv.DictReader(open(path)))
    assert 2 <= len(rows) < 24 and not list(tmp_path.glob("*.png"))  # 24: the whole run's rows
    assert all(r["status"] == "ok" and float(r["ms"]) > 0 and r["direction"] in ("fwd", "fwd+bwd") for r in rows)
    assert list(rows[0]) == bench.FIELDS


@pytest.mark.parametrize("compiled", ["after", "skip", "only"])
def test_gpu_torch_compile_rows_come_after_every_other_row(compiled, monkeypatch, tmp_path):
    """The cold torch.compile baselines run after every Triton and eager row (a GPU stage cut short
    keeps those), or alone, or not at all; each row reaches the CSV as it is measured."""
    timed = []

    def time_gpu(case, b, fn, x, dt, *args):
        timed.append((case, b, dt, args[-1]))
        assert len(list(csv.DictReader(open(tmp_path / "bench.csv")))) == len(timed) - 1
        return dict(case=case, backend=b, dtype=dt, status="ok")
    monkeypatch.setattr(bench, "time_gpu", time_gpu)

    def build(dtype=torch.float32, grad=False):
        return {b: None for b in ("triton", "eager", "torch.compile")}, None
    comps = [("op", k, 2.0, (1, 8, 4, 4), build) for k in (3, 5)] + [("module", 3, 2.0, (1, 8, 4, 4), lambda *a: (
        {"LDAAQU": None, "official-style": None}, None))]
    rows = bench.Rows(tmp_path / "bench.csv")
    bench.run_gpu(comps, ["fp32", "bf16"], rows, compiled)
    rows.close()
    kinds = [b == "torch.compile" for _, b, _, _ in timed]
    expect = {"after": (32, 8), "skip": (24, 0), "only": (8, 8)}[compiled]  # (all rows, torch.compile rows)
    assert (len(timed), sum(kinds)) == expect and kinds == sorted(kinds)
    assert len(list(csv.DictReader(open(tmp_path / "bench.csv")))) == len(timed)


def test_targets_table_says_pass_and_miss_from_the_numbers():
    rows = [dict(r, B=1, C=128, H=40, W=60) for r in bench_plots.read_rows(_rows()) if r["case"] == "module"]
    table, missed = bench.targets(rows)
    lines = {tuple(line.split(" | ")[1:3]): line for line in table.splitlines() if line.startswith("| 1x128x40x60")}
    assert set(lines) == {("3", "2"), ("3", "3"), ("5", "2"), ("5", "3")}
    assert lines[("3", "2")].count(" pass") == 3 and "7.0x pass" in lines[("3", "2")]  # (4 + k_u)x by construction
    assert "**miss** (not timed: refused" in lines[("5", "3")]
    assert missed == [((1, 128, 40, 60), 5, 3, "fwd"), ((1, 128, 40, 60), 5, 3, "fwd+bwd")]


def _gpu_rows():
    """A made-up GPU CSV: the op (triton, eager, torch.compile) and the module in fp32 and bf16, each dtype
    with its own speed-ups (bf16's baselines slower)."""
    base = dict(device="NVIDIA H200 (made up)", torch="2.x", triton="3.x", date="2026-01-01", B=2, C=256, H=100,
                W=152, reps="", load_before=0.1, load_after=0.1, status="ok")
    rows = []
    for case, backends in (("op", ("triton", "eager", "torch.compile")), ("module", ("LDAAQU", "official-style"))):
        for dtype, slower in (("fp32", 4), ("bf16", 9)):
            for k in (3, 5):
                for s in (2,):
                    for d, f in (("fwd", 1), ("fwd+bwd", 3)):
                        for i, b in enumerate(backends):
                            ms = f * k * s * (1 if i == 0 else slower + i)
                            rows.append(dict(base, case=case, backend=b, direction=d, dtype=dtype, k_u=k, scale=s,
                                             ms=ms, mpix_per_s=100 / ms, gb_per_s=1000 / ms if case == "op" else "",
                                             saved_for_backward_bytes=2 ** 20 * (i + 1) if d == "fwd+bwd" else ""))
    return bench_plots.read_rows(rows)


def test_gpu_plots_split_by_dtype(tmp_path, monkeypatch):
    """fp32 and bf16 rows draw separate panels: no line visits an x twice (a zig-zag through both
    dtypes), and each speed-up cell is its own dtype's ratio, not the last dtype's."""
    import matplotlib.axes
    lines, cells = [], {}
    plot, heat = matplotlib.axes.Axes.plot, bench_plots._heat
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, x, *a, **k: lines.append(list(x)) or plot(ax, x, *a, **k))
    monkeypatch.setattr(bench_plots, "_heat", lambda ax, grid, ks, ss, fmt, title, *a, **k: cells.setdefault(
        title, (grid, ks, ss)) and heat(ax, grid, ks, ss, fmt, title, *a, **k))
    # what is drawn, not the pixels: no file rendered
    monkeypatch.setattr(bench_plots, "_save", lambda fig, out, name: bench_plots.plt.close(fig) or name)
    rows = _gpu_rows()
    assert bench_plots.throughput(rows, str(tmp_path), "k_u") and bench_plots.speedup(rows, str(tmp_path))
    assert lines and all(x == sorted(set(x)) for x in lines)
    assert {p[2] for p in bench_plots._panels(rows)} == {"fp32", "bf16"}
    for dtype, slower in (("fp32", 4), ("bf16", 9)):
        for case, ours, base, i in (("op", "triton", "eager", 1), ("module", "LDAAQU", "official-style", 1)):
            grid, ks, ss = cells[f"{case} 2x256x100x152 {dtype}, fwd:\n{ours} over {base}"]
            assert grid == [[slower + i] * len(ss)] * len(ks)


def test_timed_backward_leaves_no_grad_behind():
    """fwd+bwd steps return their gradients: nothing accumulates in .grad across repetitions."""
    m = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4, requires_grad=True)
    fn = lambda: m(x)  # noqa: E731
    for _ in range(3):
        bench.step(fn, backward=True)
    assert x.grad is None and m.weight.grad is None and m.bias.grad is None
    assert {id(t) for t in bench._leaves[fn]} == {id(x), id(m.weight), id(m.bias)}


def test_dynamo_fallback_is_reported():
    """A compiled function that graph-breaks or reaches the recompile limit is reported as (partly) eager."""
    from torch._dynamo.utils import counters

    def note(fn, *calls):
        torch._dynamo.reset()
        counters.clear()
        f = torch.compile(fn, backend="eager", dynamic=False)
        for args in calls:
            f(*args)
        return bench.dynamo_note(counters)

    def breaks(x):
        y = x + 1
        torch._dynamo.graph_break()
        return y * 2
    assert note(torch.sin, (torch.ones(3),))[1] is False
    assert note(breaks, (torch.ones(3),))[1] is True
    with torch._dynamo.config.patch(recompile_limit=2):
        flagged = note(torch.sin, *[(torch.ones(n),) for n in (2, 3, 4, 5)])
    assert flagged[1] is True and "recompile limit (2) reached" in flagged[0]


@CPU_ONLY
@pytest.mark.slow
def test_foundation_end_to_end_on_a_tiny_harness(tmp_path, monkeypatch, capsys):
    """--cases anyup naf on a tiny harness (ratio 2, both models, both directions): each point's
    rows for ours and the official form, timed, their peaks measured in fresh processes, their outputs
    equal; the goals printed with verdicts; the figure drawn; and a budget below every estimate refuses
    the official forms and only them."""
    argv = ["--cases", "anyup", "naf", "--foundation", "40", "10", "8", "--ratios", "2", "--foundation-extra",
            "--threads", "1", "--quick"]
    r = subprocess.run([sys.executable, "bench.py", *argv, "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "foundation.csv")))
    assert list(rows[0]) == bench.FOUNDATION_FIELDS
    assert sorted((x["case"], x["ratio"], x["direction"], x["backend"]) for x in rows) == sorted(
        (m, r_, d, b) for m in ("anyup", "naf") for r_ in ("2",) for d in ("inference", "training")
        for b in ("ours", "official"))
    for x in rows:
        assert x["status"].startswith("ok"), x
        assert x["threads"] == "1" and x["out_h"] == x["out_w"] == str(10 * int(x["ratio"]))
        assert 0 < float(x["ms"]) <= float(x["ms_median"]) <= float(x["ms_max"]) and int(x["reps"]) >= 3
        assert float(x["ns_per_pixel"]) == pytest.approx(float(x["ms"]) * 1e6 / int(x["out_h"]) ** 2, rel=1e-3)
        # the step's growth of the peak RSS: positive, and the process's peak is that growth over the RSS before
        assert 0 < int(x["peak_bytes"]) < int(x["peak_total_bytes"])
        assert int(x["peak_total_bytes"]) == int(x["rss_before_bytes"]) + int(x["peak_bytes"])
        # both compute the same function in fp32; measured up to 1.5e-7
        assert float(x["rel_err"]) < 1e-5
        assert (x["estimate_bytes"] != "") == (x["backend"] == "official")
    assert "(1) AnyUp at x16" in r.stdout and "(4) training at x16" in r.stdout
    assert (tmp_path / "foundation.png").stat().st_size > 10_000
    assert bench_plots.plot_all(str(tmp_path / "foundation.csv"), str(tmp_path / "again")) == [
        str(tmp_path / "again" / "foundation.png")]

    # every official estimate over the budget: no official child runs, ours still does
    monkeypatch.setattr(bench, "BUDGET", bench.BUDGET)  # main sets it: restored after the test
    bench.main(["--cases", "naf", "--foundation", "40", "10", "8", "--ratios", "2", "--foundation-extra", "--threads",
                "1", "--quick", "--budget-gib", "1e-6", "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "r" / "foundation.csv")))
    assert [(x["direction"], x["backend"]) for x in rows] == [("inference", "ours"), ("inference", "official"),
                                                              ("training", "ours"), ("training", "official")]
    for x in rows:
        if x["backend"] == "official":
            assert x["status"].startswith("refused: needs ~") and "(estimate)" in x["status"] and x["ms"] == ""
        else:
            assert x["status"].startswith("ok") and x["rel_err"] == "" and float(x["ms"]) > 0
    assert out.count("official refused, needs ~") == 2


def test_foundation_goals_and_figure_from_made_up_rows(tmp_path):
    """The goals' verdicts follow the numbers (ours 4x faster at a tenth of the memory at AnyUp's x16,
    NAF's time per pixel 2x apart across ratios, its official refused in training and judged against
    its estimate), and the figure draws refused points."""
    base = dict(device="CPU (test), 2 cores", torch="2.x", triton="3.x", date="2026-01-01", threads=2, cores=2,
                dtype="fp32", B=1, C=384, image=448, h=28, w=28, reps=3, load_before=0.5, load_after=0.7, status="ok")
    rows = []
    for model in ("anyup", "naf"):
        for r in (2, 4, 8, 16):
            for d in ("inference", "training"):
                px = (28 * r) ** 2
                ns = 100.0 * (r if model == "naf" and r >= 8 else 1)  # naf: 8 and 16 twice 4's per pixel
                for b, slow, mem in (("ours", 1, 1), ("official", 4, 10)):
                    row = dict(base, case=model, backend=b, direction=d, ratio=r, out_h=28 * r, out_w=28 * r,
                               ms=ns * slow * px / 1e6, ns_per_pixel=ns * slow, peak_bytes=mem * px * 100,
                               estimate_bytes=mem * px * 100 if b == "official" else "")
                    if model == "naf" and d == "training" and b == "official":
                        row.update(ms="", ns_per_pixel="", peak_bytes="", status="refused: needs ~9 GiB (estimate)")
                    rows.append(row)
    rows.append(dict(base, case="anyup", backend="ours", direction="inference", image=512, h=32, w=32, ratio=64,
                     out_h=2048, out_w=2048, ms=1e3, ns_per_pixel=238.4, peak_bytes=20 * 2 ** 30))
    path = tmp_path / "foundation.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=bench.FOUNDATION_FIELDS)
        w.writeheader()
        w.writerows(rows)
    text = bench.foundation_goals(bench_plots.read(str(path)), 28)
    lines = text.splitlines()
    x16 = [ln for ln in lines if ln.startswith("    anyup x16")]
    assert len(x16) == 3 and all("4.00x faster" in ln and "= 0.100 of the official's" in ln
                                 and ln.count(": pass") == 2 for ln in x16)
    assert any(ln.startswith("    anyup inference:") and "max/min 1.00" in ln and ln.endswith("pass") for ln in lines)
    # naf's ratios 4, 8, 16: 100, 800, 1600 ns per pixel
    assert any(ln.startswith("    naf inference:") and "max/min 16.00" in ln and ln.endswith("**miss**")
               for ln in lines)
    naf4 = next(ln for ln in lines if ln.startswith("    naf x16 training"))
    assert "refused" in naf4 and "speed not measured" in naf4 and "against the estimate" in naf4
    assert any("2048x2048 from 32x32: peak 20.00 GiB" in ln and ln.endswith("**miss**") for ln in lines)
    assert bench_plots.plot_all(str(path), str(tmp_path)) == [str(tmp_path / "foundation.png")]
    assert (tmp_path / "foundation.png").stat().st_size > 10_000
