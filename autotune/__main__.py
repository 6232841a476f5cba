"""python -m autotune sweep|show|clear: tune offline, look up at run time."""
import argparse
import itertools
import os
import sys

import torch

if not torch.cuda.is_available():  # the kernels can then only run through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import cache  # noqa: E402
from .sweep import DTYPES  # noqa: E402


def _sweep(args):
    from kernels.launchers import INTERPRET

    from .sweep import sweep
    if INTERPRET:
        print("CPU interpreter (no GPU): a tiny space on tiny maps, to prove the plumbing (time, check, "
              "write the cache); the timings mean nothing", file=sys.stderr)
    else:
        print(f"tuning on {torch.cuda.get_device_name()}", file=sys.stderr)
    rows = sweep(args.problems, args.dtype, args.backward, args.quick)
    print(f"{'bucket':44} {'tried':>5} {'best ms':>9} {'default ms':>10} {'speed-up':>8}  {'config':30} "
          f"{'rel err':>7}  status")
    for r in rows:
        c = r.config
        cfg = f"P{c.block_p} D{c.block_d} C{c.block_c} w{c.num_warps} s{c.num_stages}" \
              f"{' cl' if c.channels_last else ''}" if c else "-"
        print(f"{r.bucket:44} {r.tried:5d} {r.best_ms:9.3f} {r.default_ms:10.3f} {r.default_ms / r.best_ms:7.2f}x  "
              f"{cfg:30} {r.rel_err:7.1e}  {r.status}")
    print(f"saved to {cache.cache_path()}")
    failed = [r for r in rows if r.status != "ok"]
    if failed:
        sys.exit(f"{len(failed)} of {len(rows)} buckets kept nothing")


def _show(args):
    path = cache.cache_path()
    if not path.exists():
        print(f"no tuning cache at {path}")
        return
    print(f"{path}\n{path.read_text()}")


def _clear(args):
    print(f"removed {cache.cache_path()}" if cache.clear() else f"no tuning cache at {cache.cache_path()}")


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
    ap = argparse.ArgumentParser(prog="python -m autotune", description=__doc__)
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
    sw.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True,
                    help="also tune the backward kernel (default: yes)")
    sw.set_defaults(fn=_sweep)
    sub.add_parser("show", help="print this device's cache").set_defaults(fn=_show)
    sub.add_parser("clear", help="delete this device's cache").set_defaults(fn=_clear)
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
    args.fn(args)


if __name__ == "__main__":
    main()
