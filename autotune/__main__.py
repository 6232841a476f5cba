"""python -m autotune sweep|show|clear: tune offline, look up at run time."""
import argparse
import os
import sys

import torch

if not torch.cuda.is_available():  # the kernels can then only run through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import cache  # noqa: E402


def _sweep(args):
    from .sweep import DTYPES, problems, sweep
    if torch.cuda.is_available():
        print(f"tuning on {torch.cuda.get_device_name()}", file=sys.stderr)
    else:
        print("no GPU: CPU interpreter over a tiny space, to prove the plumbing; the timings mean nothing",
              file=sys.stderr)
    bad = [d for d in args.dtype if d not in DTYPES]
    if bad:
        sys.exit(f"--dtype: unknown {bad}, choose from {list(DTYPES)}")
    rows = sweep(problems(args.kernel_sizes, args.scales, args.quick), args.dtype, args.backward, args.quick)
    print(f"{'kernel':6} {'bucket':44} {'tried':>5} {'best ms':>9} {'default ms':>10}  {'config':36} rel err")
    for r in rows:
        c = r.config
        cfg = f"P{c.block_p} D{c.block_d} C{c.block_c} w{c.num_warps} s{c.num_stages}{' cl' if c.channels_last else ''}"
        print(f"{r.kernel:6} {r.bucket:44} {r.tried:5d} {r.best_ms:9.3f} {r.default_ms:10.3f}  {cfg:36} {r.rel_err:.1e}")
    print(f"saved to {cache.cache_path()}")


def _show(args):
    path = cache.cache_path()
    if not path.exists():
        print(f"no tuning cache at {path}")
        return
    print(f"{path}\n{path.read_text()}")


def _clear(args):
    print(f"removed {cache.cache_path()}" if cache.clear() else f"no tuning cache at {cache.cache_path()}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m autotune", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sw = sub.add_parser("sweep", help="time the search space per shape bucket and cache the winners")
    sw.add_argument("--quick", action="store_true", help="fewer shapes and a smaller space")
    sw.add_argument("--kernel-sizes", type=int, nargs="+", metavar="K_U",
                    help="k_u values (default: 3 5 7 on a GPU, 3 on the CPU interpreter)")
    sw.add_argument("--scales", type=float, nargs="+", default=[2.0])
    sw.add_argument("--dtype", nargs="+", default=["fp32", "bf16"])
    sw.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True,
                    help="also tune the backward kernel (default: yes)")
    sw.set_defaults(fn=_sweep)
    sub.add_parser("show", help="print this device's cache").set_defaults(fn=_show)
    sub.add_parser("clear", help="delete this device's cache").set_defaults(fn=_clear)
    args = ap.parse_args(argv)
    if args.cmd == "sweep":
        args.kernel_sizes = args.kernel_sizes or ([3, 5, 7] if torch.cuda.is_available() else [3])
        if any(k < 1 or k % 2 == 0 for k in args.kernel_sizes):
            ap.error("--kernel-sizes: odd positive integers")
        if any(s <= 0 for s in args.scales):
            ap.error("--scales: positive numbers")
    args.fn(args)


if __name__ == "__main__":
    main()
