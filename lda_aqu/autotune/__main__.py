"""python -m lda_aqu.autotune sweep|show|clear|inspect: tune offline, look up at run time, read the compiled code."""
import argparse
import itertools
import json
import math
import os
import sys

import torch

if not torch.cuda.is_available():  # the kernels can then only run through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ..kernels.launchers import Problem  # noqa: E402

from . import cache  # noqa: E402
from .sweep import ALL_DTYPES, DTYPES, VARIANTS  # noqa: E402


def _sweep(args):
    from ..kernels.launchers import INTERPRET

    from .sweep import sweep
    if INTERPRET:
        print("CPU interpreter (no GPU): a tiny space on tiny maps, to prove the plumbing (time, check, "
              "write the cache); the timings mean nothing", file=sys.stderr)
    else:
        print(f"tuning on {torch.cuda.get_device_name()}", file=sys.stderr)
    rows = sweep(args.problems, args.dtype, args.variants, args.quick)
    width = max([len(r.bucket) for r in rows] + [6])
    print(f"{'bucket':{width}} {'tried':>5} {'best ms':>9} {'default ms':>10} {'speed-up':>8}  {'config':30} "
          f"{'rel err':>7}  status")
    for r in rows:
        c = r.config
        cfg = f"P{c.block_p} D{c.block_d} C{c.block_c} w{c.num_warps} s{c.num_stages}" \
              f"{' cl' if c.channels_last else ''}" if c else "-"
        print(f"{r.bucket:{width}} {r.tried:5d} {r.best_ms:9.3f} {r.default_ms:10.3f} {r.default_ms / r.best_ms:7.2f}x  "
              f"{cfg:30} {r.rel_err:7.1e}  {r.status}")
    print(f"saved to {cache.cache_path()}")
    failed = [r for r in rows if not r.status.startswith("ok")]
    if failed:
        sys.exit(f"{len(failed)} of {len(rows)} buckets kept nothing")


def _show(args):
    """This device's entries as a table (committed defaults, then the user's cache over them), or with
    --json the user's file as written."""
    path = cache.cache_path()
    if args.json:
        print(path.read_text() if path.exists() else "{}")
        return
    files = [p for p in (cache.DEFAULTS / path.name, path) if p.exists()]
    if not files:
        print(f"no tuning cache at {path}, and no committed table for this device in {cache.DEFAULTS}: the "
              "launchers use their default configurations")
        return
    ident = cache.identity()
    width = 86  # a bucket: kernel, dtype, weights, offset, rpb, coords, padding, grid, sizes
    print(f"{'bucket':{width}} {'configuration':30} {'time ms':>9} {'default ms':>10}  verified  source")
    for f in files:
        try:
            entries = cache._read(f, ident)
            timings = json.loads(f.read_text()).get("timings", {})
        except ValueError as e:
            print(f"skipped: {e}")
            continue
        for key, c in sorted(entries.items()):
            t = timings.get(key, {})
            cfg = f"P{c.block_p} D{c.block_d} C{c.block_c} w{c.num_warps} s{c.num_stages}" \
                  f"{' cl' if c.channels_last else ''}"
            ms, dms = (f"{t[n]:.3f}" if n in t else "-" for n in ("ms", "default_ms"))
            # the sweep stores a winner only after it matched the reference
            verified = f"yes {t['rel_err']:.0e}" if "rel_err" in t else "yes"
            print(f"{key:{width}} {cfg:30} {ms:>9} {dms:>10}  {verified:8}  {f}")


def _clear(args):
    print(f"removed {cache.cache_path()}" if cache.clear() else f"no tuning cache at {cache.cache_path()}")


def _inspect(args):
    import triton

    from .resources import Job, compile_reports, shortfalls
    B, C, H, W = args.shape
    jobs = [Job(pb, dtype, direction, deterministic=args.deterministic, cc=args.cc, via_op=True)
            for pb in args.problems for dtype in args.dtype for direction in ("fwd", "bwd")]
    print(f"what the op launches (backend='triton', its default configurations, no tuning cache) at B={B} C={C} "
          f"D={C // 4} {H}x{W} -> {args.problems[0].Ho}x{args.problems[0].Wo}, G={args.groups} nh={args.heads}"
          f"{', deterministic' if args.deterministic else ''}; specialised as the JIT would, compiled for "
          f"sm_{args.cc} with Triton {triton.__version__}", flush=True)
    head = ("dtype", "k_u", "phase", "kernel", "tiles", "warps", "stages", "regs", "spill", "stack", "smem",
            "global loads bits:count", ">=64b", "atomics", "fences", "checks")
    rows, refused = [head], False
    for job, found in zip(jobs, compile_reports(jobs)):
        for r in found:
            refused |= r.error is not None
            tiles = " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in r.tiles.items())
            loads = " ".join(f"{bits}:{n}" for bits, n in r.loads.items()) or "-"
            atomics = " ".join(f"{op}:{n}" for op, n in r.atomics.items()) or "-"
            rows.append((job.dtype, str(math.isqrt(job.pb.K)), r.phase, r.kernel, tiles, str(r.num_warps),
                         str(r.num_stages), str(r.registers), str(r.spill_bytes), str(r.stack_bytes), str(r.shared),
                         loads, f"{r.wide_share:.2f}", atomics, str(r.fences), "; ".join(shortfalls(r)) or "ok"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if any(row[-1] != "ok" for row in rows[1:]):
        print("checks: no spills, no fences, no returning atomics (ATOM/ATOMG), >= 60% of global-load bytes from "
              "loads of 64 bits or wider")
    if refused:
        sys.exit("the compiler refused a launch (see checks)")


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not positive")
        return value
    return parse


def _odd(text):
    value = int(text)
    if value < 1 or value % 2 == 0:
        raise argparse.ArgumentTypeError(f"k_u must be odd and positive, got {text}")
    return value


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lda_aqu.autotune", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    gpu = torch.cuda.is_available()
    sw = sub.add_parser("sweep", help="time the search space per shape bucket and cache the winners")
    sw.add_argument("--quick", action="store_true",
                    help="two FPN levels, G=2 and one head, and a smaller space")
    sw.add_argument("--kernel-sizes", type=_odd, nargs="+", metavar="K_U",
                    help="k_u values (default: 3 5 7 on a GPU, 3 on the CPU interpreter)")
    sw.add_argument("--scales", type=_positive(float), nargs="+", default=[2.0])
    sw.add_argument("--groups", type=_positive(int), nargs="+", help="G values (default: 1 2 4; 2 with --quick)")
    sw.add_argument("--heads", type=_positive(int), nargs="+", help="nh values (default: 1 2; 1 with --quick)")
    sw.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    sw.add_argument("--variants", nargs="+", choices=list(cache.KERNELS), default=list(VARIANTS),
                    help="kernel variants: fwd (inference), fwd-train (the forward that stores the weights for the "
                         "backward), bwd (atomic), bwd-det (deterministic mode); default: "
                         f"{' '.join(VARIANTS)}, what inference and a training step run")
    sw.set_defaults(fn=_sweep)
    sh = sub.add_parser("show", help="print this device's tuned configurations as a table")
    sh.add_argument("--json", action="store_true", help="print the raw cache file instead")
    sh.set_defaults(fn=_show)
    sub.add_parser("clear", help="delete this device's cache").set_defaults(fn=_clear)
    ins = sub.add_parser("inspect", help="compile what the op launches at one problem for a GPU and read the code: "
                                         "registers, spills, shared memory, loads by width, atomics, fences")
    ins.add_argument("--kernel-sizes", type=_odd, nargs="+", default=[3], metavar="K_U")
    ins.add_argument("--dtype", nargs="+", choices=list(ALL_DTYPES), default=["fp32", "bf16"])
    ins.add_argument("--shape", type=_positive(int), nargs=4, default=[2, 256, 100, 152], metavar=("B", "C", "H", "W"),
                     help="v's shape; q and k get D = C/4 channels (default: FPN P2, 2 256 100 152)")
    ins.add_argument("--scale", type=_positive(float), default=2.0)
    ins.add_argument("--groups", type=_positive(int), default=2)
    ins.add_argument("--heads", type=_positive(int), default=1)
    ins.add_argument("--cc", type=int, choices=[90, 80], default=90, help="compute capability to compile for")
    ins.add_argument("--deterministic", action="store_true", help="the backward of deterministic mode")
    ins.set_defaults(fn=_inspect)
    args = ap.parse_args(argv)
    if args.cmd == "sweep":
        small = args.quick or not gpu
        args.kernel_sizes = args.kernel_sizes or ([3, 5, 7] if gpu else [3])
        args.groups = args.groups or ([2] if small else [1, 2, 4])
        args.heads = args.heads or ([1] if small else [1, 2])
        from .sweep import problems
        try:
            args.problems = problems(args.kernel_sizes, args.scales, itertools.product(args.groups, args.heads),
                                     args.quick)
        except ValueError as e:
            ap.error(str(e))
    if args.cmd == "inspect":
        B, C, H, W = args.shape
        D = C // 4
        if C % 4 or D % args.groups or C % args.groups or D % args.heads or C % args.heads:
            ap.error(f"C={C} must be a multiple of 4, and groups ({args.groups}) and heads ({args.heads}) must "
                     f"divide D=C/4={D} and C")
        Ho, Wo = int(H * args.scale), int(W * args.scale)
        if min(Ho, Wo) < 1:
            ap.error(f"--scale {args.scale} leaves an empty {Ho}x{Wo} output")
        args.problems = [Problem(B, D, C, H, W, Ho, Wo, args.groups, args.heads, k * k) for k in args.kernel_sizes]
    args.fn(args)


if __name__ == "__main__":
    main()
