"""Triton's interpreter with the compiled kernel's semantics where the two differ.

The interpreter runs a kernel's programs one after another in NumPy: it passes a Python float as a
float64 scalar and every int as a tensor, computes `/` and `exp` exactly, and lets a program read
what an earlier one wrote. A GPU launch does none of that. Installed (`install()`, which conftest
does for the whole suite), every interpreted launch instead:

- takes its scalar arguments as the JIT specialises them, by Triton's own rule
  (`native_specialize_impl`): a float is an fp32 parameter, an int equal to 1 is the constant 1
  unless `do_not_specialize` names it, ints past 2**31 are int64;
- computes fp32 `/` and `exp`/`exp2` as div.full.f32 and ex2.approx may: off by one ulp at lanes
  picked by a hash of the operands (`exp` through `exp2(x * log2(e))`, as Triton lowers it); `div_rn`
  stays exact, and fp64 math is exact, as on the GPU;
- runs its programs in a random order;
- checks every load, store and atomic: no active lane addresses memory outside the tensors passed
  to the launch, and no element is stored by two programs, or stored or atomically updated by one
  program and read by another (programs of one launch run at once on a GPU, in any order).

A violation raises `JitSemanticsError` naming the kernel and the seed that replays it
(`LDA_AQU_JIT_SEED`). `LDA_AQU_JIT_SEMANTICS=0` runs the plain interpreter.
"""
from __future__ import annotations

import inspect
import os

import numpy as np
import triton
import triton.language as tl
from triton.runtime import interpreter as _interp

try:
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
except ImportError as e:  # the rule moved: say so instead of running with the interpreter's own
    raise ImportError(f"jit_semantics needs triton._C.libtriton.native_specialize_impl (Triton {triton.__version__}): "
                      f"{e}") from e


class JitSemanticsError(AssertionError):
    pass


_NP = {"i1": np.bool_, "u1": np.bool_, "i8": np.int8, "i16": np.int16, "i32": np.int32, "i64": np.int64,
       "u8": np.uint8, "u16": np.uint16, "u32": np.uint32, "u64": np.uint64, "fp16": np.float16,
       "fp32": np.float32, "fp64": np.float64}
LOAD, STORE, ATOMIC = 0, 1, 2


class _Launch:
    """What one launch may touch, and what its programs touched."""

    def __init__(self, name: str, ranges: list, seed: int):
        self.name, self.ranges, self.seed = name, ranges, seed
        self.pid = 0
        self.addr, self.pids, self.kinds = [], [], []
        self.program = {LOAD: [], STORE: [], ATOMIC: []}  # this program's accesses, merged when it ends

    def access(self, kind: int, ptrs: np.ndarray, mask: np.ndarray, elsize: int):
        mask = np.broadcast_to(mask, ptrs.shape) if mask is not None else np.ones(ptrs.shape, bool)
        a = ptrs[mask].astype(np.uint64).ravel()
        if a.size == 0:
            return
        inside = np.zeros(a.shape, bool)
        for lo, hi, _ in self.ranges:
            inside |= (a >= lo) & (a + np.uint64(elsize) <= hi)
        if not inside.all():
            bad = int(a[~inside][0])
            near = min(self.ranges, key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])), default=None)
            where = f"; nearest argument {near[2]} spans [{near[0]:#x}, {near[1]:#x})" if near else ""
            raise JitSemanticsError(
                f"{self.name}: program {self.pid} {('loads', 'stores', 'atomically updates')[kind]} "
                f"{int((~inside).sum())} element(s) outside every tensor passed to the launch, first at {bad:#x}"
                f"{where} (LDA_AQU_JIT_SEED={self.seed})")
        self.program[kind].append(a)

    def end_program(self):
        for kind, seen in self.program.items():
            if seen:
                a = np.unique(np.concatenate(seen))
                self.addr.append(a)
                self.pids.append(np.full(a.shape, self.pid, np.int64))
                self.kinds.append(np.full(a.shape, kind, np.int8))
                seen.clear()

    def check_races(self):
        if not self.addr:
            return
        addr, pid, kind = np.concatenate(self.addr), np.concatenate(self.pids), np.concatenate(self.kinds)
        order = np.lexsort((pid, addr))
        addr, pid, kind = addr[order], pid[order], kind[order]
        first = np.r_[True, addr[1:] != addr[:-1]]
        group = np.cumsum(first) - 1
        n = int(group[-1]) + 1

        def has(k):
            return np.bincount(group[kind == k], minlength=n) > 0

        def programs(sel):
            # distinct programs per element among the selected accesses (sorted by address, then program)
            g, p = group[sel], pid[sel]
            new = np.r_[True, (g[1:] != g[:-1]) | (p[1:] != p[:-1])] if g.size else np.zeros(0, bool)
            return np.bincount(g[new], minlength=n)
        stored, atomic, loaded = has(STORE), has(ATOMIC), has(LOAD)
        racy = stored & (programs(np.ones(addr.shape, bool)) > 1)
        racy |= atomic & loaded & (programs(kind != STORE) > 1)
        if racy.any():
            g = int(np.flatnonzero(racy)[0])
            sel = group == g
            who = sorted({(int(p), ("load", "store", "atomic")[k]) for p, k in zip(pid[sel], kind[sel])})
            raise JitSemanticsError(
                f"{self.name}: {int(racy.sum())} element(s) written by one program and read or written by another "
                f"in the same launch; first at {int(addr[sel][0]):#x}: {who[:6]} (LDA_AQU_JIT_SEED={self.seed})")


_current: list[_Launch] = []
_rng = np.random.default_rng(0)
_seed = 0


def _span(t) -> tuple[int, int]:
    es = t.element_size()
    lo = sum(min(0, (n - 1) * s) for n, s in zip(t.shape, t.stride()))
    hi = sum(max(0, (n - 1) * s) for n, s in zip(t.shape, t.stride()))
    return t.data_ptr() + lo * es, t.data_ptr() + (hi + 1) * es


def _jit_arg(value, specialize: bool, align: bool):
    """A scalar argument as a compiled launch receives it."""
    ty, _ = native_specialize_impl(BaseBackend, value, False, specialize, align)
    if ty == "constexpr":
        return tl.constexpr(value)
    if ty not in _NP:
        raise JitSemanticsError(f"no interpreter type for a {ty} argument ({value!r})")
    tl_ty = tl.str_to_ty(ty, None) if ty != "u1" else tl.int1
    return tl.tensor(_interp.TensorHandle(np.array([value], dtype=_NP[ty]), tl_ty), tl_ty)


def _run(self, *args, grid, warmup, **kwargs):
    if warmup:
        return
    fn = self.rewrite()
    dns = set(self.kwargs.get("do_not_specialize") or ())
    dns_oa = set(self.kwargs.get("do_not_specialize_on_alignment") or ())
    ex = _interp.GridExecutor(fn, self.arg_names, grid, self.pre_run_hooks)
    argspec = inspect.getfullargspec(ex.fn)
    kwargs = {k: v for k, v in kwargs.items() if k in argspec.args}
    args_hst, kwargs_hst = ex._init_args_hst(args, kwargs)
    for hook in ex.pre_run_hooks:
        hook(*args_hst, **kwargs_hst)
    patch_scope = _interp._patch_lang(ex.fn)
    try:
        bound = inspect.getcallargs(ex.fn, *args_hst, **kwargs_hst)
        conv, ranges = {}, []
        for i, (name, value) in enumerate(bound.items()):
            if name in ex.constexprs:
                conv[name] = value
            elif isinstance(value, (bool, int, float)):
                conv[name] = _jit_arg(value, not ({i, name} & dns), not ({i, name} & dns_oa))
            else:
                if hasattr(value, "data_ptr") and value.numel() > 0:
                    ranges.append((*_span(value), name))
                conv[name] = _interp._implicit_cvt(value)
        g = grid(conv) if callable(grid) else grid
        g = tuple(g) + (1,) * (3 - len(g))
        _interp.interpreter_builder.set_grid_dim(*g)
        launch = _Launch(self.fn.__name__, ranges, _seed)
        _current.append(launch)
        try:
            for lin in _rng.permutation(g[0] * g[1] * g[2]):
                x, y, z = int(lin % g[0]), int(lin // g[0] % g[1]), int(lin // (g[0] * g[1]))
                launch.pid = int(lin)
                _interp.interpreter_builder.set_grid_idx(x, y, z)
                ex.fn(**conv)
                launch.end_program()
        except JitSemanticsError:
            raise
        except Exception as e:
            if triton.knobs.compilation.front_end_debugging:
                raise
            raise _interp.InterpreterError(repr(e)) from e
        finally:
            _current.pop()
        launch.check_races()
    finally:
        patch_scope.restore()
    ex._restore_args_dev(args, args_hst, kwargs, kwargs_hst)


def _elsize(ptrs) -> int:
    return np.dtype(_interp._get_np_dtype(ptrs.get_element_ty())).itemsize


def _recorded(kind: int, original, ptr_at: int, mask_at: int | None):
    def wrapper(self, *args):
        if _current:
            ptrs = args[ptr_at]
            mask = args[mask_at].data if mask_at is not None and args[mask_at] is not None else None
            _current[-1].access(kind, ptrs.data, mask, _elsize(ptrs))
        return original(self, *args)
    return wrapper


def _ulp_off(x: np.ndarray, *operands: np.ndarray) -> np.ndarray:
    """x one ulp off at pseudo-random lanes (fp32 only). Which lanes, and which way, is a hash of the
    operands' bits and the seed: an approximate instruction is a function of its inputs, so a kernel
    that is deterministic on the GPU stays deterministic here."""
    if x.dtype != np.float32:
        return x
    h = np.full(x.shape, np.uint32(_seed & 0xFFFFFFFF), np.uint32)
    with np.errstate(over="ignore"):
        for op in operands:
            bits = np.broadcast_to(np.asarray(op, np.float32), x.shape).view(np.uint32)
            h = (h ^ bits) * np.uint32(0x9E3779B1)
            h ^= h >> np.uint32(15)
        h = (h * np.uint32(0x85EBCA77)) ^ (h >> np.uint32(13))
    lanes = (h & np.uint32(1)).astype(bool)
    toward = np.where(h & np.uint32(2), np.float32(np.inf), np.float32(-np.inf))
    x = np.array(x, copy=True)
    x[lanes] = np.nextafter(x[lanes], toward[lanes])
    return x


def _approx_div(self, lhs, rhs):
    out = self.binary_op(lhs, rhs, np.divide)
    return _interp.TensorHandle(_ulp_off(out.data, lhs.data, rhs.data), out.dtype)


def _approx_exp2(self, arg):
    with np.errstate(over="ignore"):
        return _interp.TensorHandle(_ulp_off(np.exp2(arg.data), arg.data), arg.dtype.scalar)


def _approx_exp(self, arg):
    if arg.data.dtype != np.float32:
        return _interp.TensorHandle(np.exp(arg.data), arg.dtype.scalar)
    with np.errstate(over="ignore"):
        x = (arg.data * np.float32(1.4426950408889634)).astype(np.float32)
        return _interp.TensorHandle(_ulp_off(np.exp2(x), x), arg.dtype.scalar)


_PATCHES = {
    "create_fdiv": _approx_div,
    "create_exp": _approx_exp,
    "create_exp2": _approx_exp2,
    # (self, ptrs, mask, other, ...), (self, ptrs, value, mask, ...), (self, rmwOp, ptr, val, mask, ...)
    "create_masked_load": _recorded(LOAD, _interp.InterpreterBuilder.create_masked_load, 0, 1),
    "create_masked_store": _recorded(STORE, _interp.InterpreterBuilder.create_masked_store, 0, 2),
    "create_atomic_rmw": _recorded(ATOMIC, _interp.InterpreterBuilder.create_atomic_rmw, 1, 3),
    "create_atomic_cas": _recorded(ATOMIC, _interp.InterpreterBuilder.create_atomic_cas, 0, None),
}


def enabled() -> bool:
    return os.environ.get("LDA_AQU_JIT_SEMANTICS", "1") not in ("0", "")


def install(seed: int | None = None) -> int:
    """Give every interpreted launch from now on the compiled semantics; returns the seed."""
    global _rng, _seed
    _seed = int(os.environ.get("LDA_AQU_JIT_SEED", "0") or 0) if seed is None else seed
    if _seed == 0:
        _seed = int.from_bytes(os.urandom(4), "little") or 1
        # pytest-xdist's workers start after conftest is imported, and inherit the environment
        os.environ["LDA_AQU_JIT_SEED"] = str(_seed)
    _rng = np.random.default_rng(_seed)
    _interp.InterpretedFunction.run = _run
    for name, fn in _PATCHES.items():
        setattr(_interp.InterpreterBuilder, name, fn)
    return _seed
