"""Every figure of bench.py, drawn from its CSV alone (CPU or GPU runs alike):

    python bench_plots.py results/cpu/bench.csv [--out DIR]

throughput_vs_k_u.png / throughput_vs_scale.png: output megapixels/s, one line per scale (per k_u),
ours solid and the baseline dashed, forward and forward+backward columns, one row of panels per
case, shape and dtype; speedup.png: the speed-up
over each case's baseline as a k_u x scale heat map; memory.png: what autograd keeps for backward
against k_u and scale; memory_ratio.png: ours over the official-style module's on the narrow maps,
per backend; gbps.png (GPU runs): effective GB/s on the op's byte floor; cost_vs_size.png (bench.py
--sizes): time and memory kept for backward per output pixel against the output size, log-log;
foundation.png (--cases anyup naf, from foundation.csv): time per output pixel and peak memory against
the output ratio, ours and the official forms, log-log. Titles name the device,
dtype, shape, threads and baseline, and flag a run whose load average exceeded the core count.
"""
from __future__ import annotations

import argparse
import csv
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# the baseline each case is compared against
BASELINES = {"op": "eager", "module": "official-style", "carafe": "unfold", "dysample": "grid_sample",
             "sapa": "unfold", "sapadeform": "grid_sample", "fade": "unfold", "memory": "official-style",
             "size": "official-style"}
WINDOWED = ("carafe", "sapa", "sapadeform", "fade")  # the cases with a kernel size (CARAFE's plots)
NUMERIC = ("k_u", "scale", "B", "C", "H", "W", "ms", "ms_median", "ms_max", "mpix_per_s", "gb_per_s",
           "saved_for_backward_bytes", "load_before", "load_after", "cores", "threads", "gflops", "limit_fraction",
           # foundation.csv
           "image", "h", "w", "ratio", "out_h", "out_w", "ns_per_pixel", "peak_bytes", "peak_total_bytes",
           "rss_before_bytes", "estimate_bytes")
MEMORY_TARGET = 0.2  # kept for backward: at most 1/5 of the official-style module's


def read(path: str) -> list[dict]:
    """The CSV's rows, numbers as floats ("" stays "")."""
    with open(path, newline="") as f:
        return read_rows(csv.DictReader(f))


def read_rows(rows) -> list[dict]:
    rows = [dict(r) for r in rows]
    for r in rows:
        for key in NUMERIC:
            if r.get(key, "") not in ("", None):
                r[key] = float(r[key])
    return rows


def shape_of(r) -> str:
    return f"{int(r['B'])}x{int(r['C'])}x{int(r['H'])}x{int(r['W'])}"


def loaded(rows) -> str:
    """'' or the flag for a run whose 1-minute load average exceeded its core count."""
    peaks = [max(r["load_before"], r["load_after"]) for r in rows
             if r.get("load_before", "") != "" and r.get("load_after", "") != ""]
    cores = next((r["cores"] for r in rows if r.get("cores", "") != ""), None)
    if peaks and cores and max(peaks) > cores:
        return f"  [LOADED: load average up to {max(peaks):.2f} > {int(cores)} cores]"
    return ""


def run_label(rows) -> str:
    r = rows[0]
    dtypes = "/".join(sorted({x["dtype"] for x in rows}))
    n = int(r["threads"]) if r.get("threads", "") != "" else 0
    threads = f", {n} thread{'s' if n > 1 else ''}" if n else ""
    heap = ", GLIBC_TUNABLES set (see malloc column)" if r.get("malloc") else ""  # moves large maps' cost
    if str(r.get("cpu_cache_gib", "")) in ("0", "0.0"):
        heap += ", CPU cache off"  # so does the library's cache: page faults on every large tensor
    return f"{r['device']}{threads}, {dtypes}, torch {r['torch']}{heap}{loaded(rows)}"


def _ok(rows, *cases):
    return [r for r in rows if r["status"] == "ok" and r["case"] in cases and r.get("ms", "") != ""]


def panel_of(r) -> tuple:
    """What one panel draws: a case at one shape in one dtype (fp32 and bf16 points never share a line
    or a heat-map cell)."""
    return r["case"], shape_of(r), r.get("dtype") or "fp32"


def _panels(sel):
    """(case, shape, dtype) of the panels that have points, in a stable order."""
    return sorted({panel_of(r) for r in sel}, key=lambda p: (list(BASELINES).index(p[0]), p[1], p[2]))


def _lines(ax, sel, x_key, line_key, y_key, scale_y=1.0):
    """One line per (backend, line_key value): the baseline dashed, ours solid (others dotted)."""
    colours = {v: f"C{i}" for i, v in enumerate(sorted({r[line_key] for r in sel}))}
    backends = sorted({r["backend"] for r in sel}, key=lambda b: (b == BASELINES[sel[0]["case"]], b))
    styles = {}
    for b in backends:
        styles[b] = "--" if b == BASELINES[sel[0]["case"]] else "-" if "-" not in styles.values() else ":"
    for b in backends:
        for v in sorted(colours):
            pts = sorted((r[x_key], r[y_key] * scale_y) for r in sel if r["backend"] == b and r[line_key] == v
                         and r.get(y_key, "") != "")
            base = styles[b] == "--"  # open squares: a single point has no dashes to tell it by
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[b], color=colours[v],
                        marker="s" if base else "o", ms=5, mfc="none" if base else colours[v],
                        label=b if sel[0]["case"] == "dysample" and line_key == "k_u"
                        else f"{b}, {'k_u' if line_key == 'k_u' else 's'}={v:g}")
    ax.set_xticks(sorted({r[x_key] for r in sel}))
    ax.grid(alpha=0.3)
    # below the axes: inside, "best" still sat on the top line where the lines span the whole panel
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)


def _figure(panels, n_cols, w=6.4, h=4.2):
    fig, axes = plt.subplots(len(panels), n_cols, figsize=(w * n_cols, h * len(panels)), squeeze=False)
    return fig, axes


def throughput(rows, out, x_key):
    """Output Mpx/s against k_u (one line per scale) or scale (one line per k_u)."""
    sel = _ok(rows, "op", "module", "dysample", *WINDOWED)
    # DySample's one sample per pixel has no kernel size to draw against
    panels = [p for p in _panels(sel) if x_key == "scale" or p[0] != "dysample"]
    return _per_direction(rows, out, sel, panels, x_key, "mpix_per_s", "output Mpx/s (log)",
                          f"Throughput against {'kernel size' if x_key == 'k_u' else 'scale'}",
                          f"throughput_vs_{x_key}.png")


def _per_direction(rows, out, sel, panels, x_key, y_key, ylabel, title, name):
    """One row of panels per (case, shape), one column per direction, y_key against x_key."""
    if not panels:
        return None
    line_key = "scale" if x_key == "k_u" else "k_u"
    dirs = sorted({r["direction"] for r in sel})
    fig, axes = _figure(panels, len(dirs))
    for i, panel in enumerate(panels):
        case, shape, dtype = panel
        for j, d in enumerate(dirs):
            ax = axes[i][j]
            pts = [r for r in sel if panel_of(r) == panel and r["direction"] == d]
            if not pts:
                ax.set_axis_off()
                continue
            _lines(ax, pts, x_key, line_key, y_key)
            ax.set(xlabel="kernel size k_u (k_u x k_u samples)" if x_key == "k_u" else "scale s", ylabel=ylabel,
                   yscale="log", title=f"{case} {shape} {dtype}, {d}:\nours solid, {BASELINES[case]} dashed")
    fig.suptitle(f"{title}\n{run_label(rows)}")
    return _save(fig, out, name)


def _heat(ax, grid, ks, ss, fmt, title, cmap, vmin=None, vmax=None, note=None):
    im = ax.imshow(grid, cmap=cmap, origin="lower", aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(ss)), [f"{s:g}" for s in ss])
    ax.set_yticks(range(len(ks)), [f"{k:g}" for k in ks])
    ax.set(xlabel="scale s", ylabel="k_u", title=title)
    for i in range(len(ks)):
        for j in range(len(ss)):
            v = grid[i][j]
            text = fmt(v) if v == v else (note[i][j] if note and note[i][j] else "-")
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    plt.colorbar(im, ax=ax, fraction=0.046)


def _grid(cells, ks, ss):
    nan = float("nan")
    return [[cells.get((k, s), nan) for s in ss] for k in ks]


def speedup(rows, out):
    """Speed-up over the baseline (its ms over ours) per k_u x scale cell; refused or failed baseline
    points say so in their cell."""
    sel = _ok(rows, "op", "module", *WINDOWED)
    panels = []
    for panel in _panels(sel):
        ours = sorted({r["backend"] for r in sel if panel_of(r) == panel} - {BASELINES[panel[0]]})
        panels += [(*panel, b) for b in ours]
    if not panels:
        return None
    dirs = sorted({r["direction"] for r in sel})
    fig, axes = _figure(panels, len(dirs), w=5.6)
    for i, (case, shape, dtype, backend) in enumerate(panels):
        pts = [r for r in rows if r.get("B", "") != "" and panel_of(r) == (case, shape, dtype)]
        ks, ss = sorted({r["k_u"] for r in pts}), sorted({r["scale"] for r in pts})
        for j, d in enumerate(dirs):
            ms = {(r["backend"], r["k_u"], r["scale"]): r["ms"] for r in pts if r["direction"] == d
                  and r["status"] == "ok" and r.get("ms", "") != ""}
            cells = {(k, s): ms[(BASELINES[case], k, s)] / ms[(backend, k, s)] for k in ks for s in ss
                     if (BASELINES[case], k, s) in ms and (backend, k, s) in ms}
            why = {(r["k_u"], r["scale"]): r["status"].split(":")[0] for r in pts if r["direction"] == d
                   and r["status"] != "ok"}
            note = [[why.get((k, s), "") for s in ss] for k in ks]
            _heat(axes[i][j], _grid(cells, ks, ss), ks, ss, lambda v: f"{v:.1f}x",
                  f"{case} {shape} {dtype}, {d}:\n{backend} over {BASELINES[case]}", "viridis", vmin=0, note=note)
    fig.suptitle(f"Speed-up over the baseline\n{run_label(rows)}")
    return _save(fig, out, "speedup.png")


def memory(rows, out):
    """MiB kept for backward by the timed points, against k_u and against scale."""
    sel = [r for r in _ok(rows, "op", "module", *WINDOWED) if r["direction"] == "fwd+bwd"
           and r.get("saved_for_backward_bytes", "") != ""]
    panels = _panels(sel)
    if not panels:
        return None
    fig, axes = _figure(panels, 2)
    for i, panel in enumerate(panels):
        case, shape, dtype = panel
        pts = [r for r in sel if panel_of(r) == panel]
        for j, (x_key, line_key) in enumerate((("k_u", "scale"), ("scale", "k_u"))):
            _lines(axes[i][j], pts, x_key, line_key, "saved_for_backward_bytes", 2.0 ** -20)
            axes[i][j].set(xlabel="k_u" if x_key == "k_u" else "scale s", ylabel="MiB kept for backward (log)",
                           yscale="log", title=f"{case} {shape} {dtype}: ours solid, {BASELINES[case]} dashed")
    fig.suptitle(f"Memory kept for backward\n{run_label(rows)}")
    return _save(fig, out, "memory.png")


def memory_ratio(rows, out):
    """Ours over the official-style module's kept-for-backward bytes, k_u x scale, per channel count
    and backend (the bench's memory-only rows)."""
    sel = [r for r in rows if r["case"] == "memory" and r["status"] == "ok"
           and r.get("saved_for_backward_bytes", "") != ""]
    panels = sorted({(shape_of(r), r["backend"]) for r in sel if r["backend"] != BASELINES["memory"]},
                    key=lambda p: (int(p[0].split("x")[1]), p[1]))
    if not panels:
        return None
    n = min(len(panels), 4)
    fig, axes = plt.subplots((len(panels) + n - 1) // n, n, figsize=(5.2 * n, 4.2 * ((len(panels) + n - 1) // n)),
                             squeeze=False)
    for a in axes.flat[len(panels):]:
        a.set_axis_off()
    for ax, (shape, backend) in zip(axes.flat, panels):
        pts = [r for r in sel if shape_of(r) == shape]
        ks, ss = sorted({r["k_u"] for r in pts}), sorted({r["scale"] for r in pts})
        b = {(r["backend"], r["k_u"], r["scale"]): r["saved_for_backward_bytes"] for r in pts}
        cells = {(k, s): b[(backend, k, s)] / b[(BASELINES["memory"], k, s)] for k in ks for s in ss
                 if (backend, k, s) in b and (BASELINES["memory"], k, s) in b}
        _heat(ax, _grid(cells, ks, ss), ks, ss, lambda v: f"{v:.3f}",
              f"{shape}, {backend}\nover official-style (target <= {MEMORY_TARGET:g})", "magma_r", 0, 0.3)
    fig.suptitle(f"Kept for backward, ours / official-style\n{run_label(sel)}")
    return _save(fig, out, "memory_ratio.png")


def gbps(rows, out):
    """GPU runs: effective GB/s of the op on its byte floor (every input read once, output written once)."""
    sel = [r for r in _ok(rows, "op") if r.get("gb_per_s", "") != ""]
    return _per_direction(rows, out, sel, _panels(sel), "k_u", "gb_per_s", "GB/s on the byte floor (log)",
                          "Bandwidth against the byte floor", "gbps.png")


def cost_vs_size(rows, out):
    """bench.py --sizes: microseconds and bytes kept for backward per output pixel against the output's
    pixels, one line per (backend, direction), log-log: a flat line is a cost that grows with the work."""
    sel = [r for r in rows if r["case"] == "size"]
    if not sel:
        return None
    r0 = sel[0]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), squeeze=False)
    px = lambda r: r["B"] * r["H"] * r["W"] * r["scale"] ** 2  # noqa: E731
    base = BASELINES["size"]
    for ax, key, ylabel, scale in ((axes[0][0], "ms", "time per output pixel (us, log)", 1e3),
                                   (axes[0][1], "saved_for_backward_bytes", "kept for backward per output pixel "
                                                                            "(bytes, log)", 1.0)):
        lines = sorted({(r["backend"], r["direction"]) for r in sel if r.get(key, "") != ""
                        and (key == "ms" or r["direction"] == "fwd+bwd")}, key=lambda bd: (bd[0] == base, bd))
        for b, d in lines:
            i = int(d == "fwd+bwd")
            pts = sorted((px(r), r[key] * scale / px(r)) for r in sel if r["backend"] == b and r["direction"] == d
                         and r.get(key, "") != "" and (key != "ms" or r["status"] == "ok"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if b == base else "-", color=f"C{i}",
                    marker="s" if b == base else "o", mfc="none" if b == base else f"C{i}", label=f"{b}, {d}")
        refused = sorted({px(r) for r in sel if r["backend"] == base and r["status"].startswith("refused")})
        for x in refused:
            ax.axvline(x, color="grey", lw=0.8, ls=":")
        sides = sorted({px(r) for r in sel})
        ax.set(xscale="log", yscale="log", xlabel="output pixels (log; side labelled)", ylabel=ylabel)
        ax.set_xticks(sides, [f"{int(r['H'] * r['scale'])}x{int(r['W'] * r['scale'])}" for r in
                              sorted({px(r): r for r in sel}.values(), key=px)], fontsize=7)
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
        if refused:
            ax.set_title(f"{base} refused right of the grey lines (over the memory budget)", fontsize=8)
    fig.suptitle(f"Cost against size: LDAAQU C={int(r0['C'])} k_u={int(r0['k_u'])} s={r0['scale']:g}, ours solid, "
                 f"{base} dashed\n{run_label(rows)}")
    return _save(fig, out, "cost_vs_size.png")


def foundation(rows, out):
    """bench.py --cases anyup naf: time per output pixel and peak memory against the output ratio,
    log-log, one row of panels per model; ours solid, the official form dashed, inference and training
    in their colours; the extra points (another feature size) as stars; a refused official point as an
    x at its estimate (memory) and a grey line (time)."""
    sel = [r for r in rows if r.get("ratio", "") != ""]
    models = [m for m in ("anyup", "naf") if any(r["case"] == m for r in sel)]
    if not models:
        return None
    harness = max({r["h"] for r in sel}, key=lambda h: sum(r["h"] == h for r in sel))
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.8 * len(models)), squeeze=False)
    colours = {"inference": "C0", "training": "C1"}
    for i, model in enumerate(models):
        pts = [r for r in sel if r["case"] == model]
        main = [r for r in pts if r["h"] == harness]
        for ax, key, scale, ylabel in ((axes[i][0], "ns_per_pixel", 1.0, "time per output pixel (ns, log)"),
                                       (axes[i][1], "peak_bytes", 2.0 ** -30, "peak memory of the step (GiB, log)")):
            for b in ("ours", "official"):
                for d, c in colours.items():
                    line = sorted((r["ratio"], r[key] * scale) for r in main if r["backend"] == b
                                  and r["direction"] == d and str(r["status"]).startswith("ok") and r[key] != "")
                    if line:
                        ax.plot([p[0] for p in line], [p[1] for p in line], "-" if b == "ours" else "--", color=c,
                                marker="o" if b == "ours" else "s", mfc=c if b == "ours" else "none",
                                label=f"{b}, {d}")
                    refused = [r for r in main if r["backend"] == b and r["direction"] == d
                               and str(r["status"]).startswith("refused")]
                    for r in refused:
                        if key == "peak_bytes" and r.get("estimate_bytes", "") != "":
                            ax.plot(r["ratio"], r["estimate_bytes"] * scale, "x", color=c, ms=8,
                                    label=f"{b}, {d}: refused (estimate)" if r is refused[0] else None)
                        elif key == "ns_per_pixel":
                            ax.axvline(r["ratio"], color="grey", lw=0.8, ls=":")
            for r in pts:
                if r["h"] != harness and r["backend"] == "ours" and str(r["status"]).startswith("ok"):
                    ax.plot(r["ratio"], r[key] * scale, "*", color=colours[r["direction"]], ms=12,
                            label=f"ours, {int(r['out_h'])}x{int(r['out_w'])} from {int(r['h'])}x{int(r['w'])}, "
                                  f"{r['direction']}")
            ratios = sorted({r["ratio"] for r in pts})
            ax.set(xscale="log", yscale="log", xlabel="output side / feature side (log)", ylabel=ylabel)
            ax.set_xticks(ratios, [f"x{int(x)}" for x in ratios])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
            r0 = main[0] if main else pts[0]
            ax.set_title(f"{model}: image {int(r0['image'])}, features {int(r0['C'])}x{int(r0['h'])}x{int(r0['w'])}"
                         + ("; official refused right of the grey lines" if key == "ns_per_pixel"
                            and any(str(r["status"]).startswith("refused") for r in main) else ""), fontsize=9)
    fig.suptitle(f"AnyUp and NAF against their official forms: ours solid, official dashed\n{run_label(rows)}")
    return _save(fig, out, "foundation.png")


def plot_all(rows, out: str) -> list[str]:
    """Draw every figure the rows allow into out; the paths written."""
    if isinstance(rows, str):
        rows = read(rows)
    if not rows:
        raise ValueError("no rows to plot")
    if {"ratio", "case", "backend", "direction", "status"} <= set(rows[0]):  # foundation.csv
        os.makedirs(out, exist_ok=True)
        return [p for p in [foundation(rows, out)] if p]
    missing = {"device", "case", "backend", "direction", "status", "k_u", "scale"} - set(rows[0])
    if missing:
        raise ValueError(f"not a bench.py CSV: columns {sorted(missing)} are missing")
    os.makedirs(out, exist_ok=True)
    figs = [throughput(rows, out, "k_u"), throughput(rows, out, "scale"), speedup(rows, out), memory(rows, out),
            memory_ratio(rows, out), gbps(rows, out), cost_vs_size(rows, out)]
    return [p for p in figs if p]


def _save(fig, out, name):
    path = os.path.join(out, name)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the two-line suptitle
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="a bench.csv written by bench.py")
    ap.add_argument("--out", help="folder for the PNGs (default: the CSV's folder)")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.csv):
        ap.error(f"no such CSV: {args.csv}")
    try:
        paths = plot_all(read(args.csv), args.out or os.path.dirname(os.path.abspath(args.csv)))
    except ValueError as e:
        ap.error(str(e))
    for p in paths:
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
