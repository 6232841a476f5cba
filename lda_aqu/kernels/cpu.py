"""The native CPU kernels of local_upsample (local_upsample_cpu.cpp): built with the system C++ compiler
on first use into a per-user build folder, loaded through ctypes, launched on torch tensors.

No torch headers are compiled (a second's build), and the library links the same OpenMP runtime that
torch has loaded (libgomp.so.1, by soname), so its threads are torch's (`torch.get_num_threads()`).
Where no compiler is found, or the library's `Problem` struct differs from `_Problem` (checked on
load), the native kernels fail once, say why (`unavailable()`), and the torch path keeps its gather
form. LDA_AQU_NATIVE=0 turns the native kernels off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

from . import layout
from .layout import WEIGHT_MODES

SOURCE = Path(__file__).with_name("local_upsample_cpu.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]


class _Problem(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in (
        "B", "C", "H", "W", "Ho", "Wo", "G", "NH", "K", "Dq", "mode", "align", "exact", "border", "has_offset",
        "has_rpb", "n_threads", "chunk_pixels", "n_seg", "n_qseg")] + \
        [(n, ctypes.c_double) for n in ("unit_y", "unit_x", "scale")] + \
        [(n, ctypes.c_void_p) for n in ("seg", "qseg", "y0", "x0", "base", "v", "offset", "q", "k", "rpb", "given",
                                        "out", "w", "dout", "dv", "dk", "dq", "dlogit", "dw", "doffset")] + \
        [(n, ctypes.c_int64) for n in ("need_v", "need_offset", "need_q", "need_k", "need_weights", "grid")] + \
        [(n, ctypes.c_void_p) for n in ("ey", "ex")]


def _layout_mismatch(reported: str) -> Optional[str]:
    """Where the library's Problem (lu_problem_layout: "sizeof;name:offset:size:kind,...") and _Problem, its
    hand copy, differ, or None: a drifted field would silently point the kernels at the wrong memory."""
    size, fields = reported.split(";")
    theirs = {n: (int(o), int(z), k) for n, o, z, k in (f.split(":") for f in fields.split(","))}
    ours = {n: (getattr(_Problem, n).offset, ctypes.sizeof(t),
                "p" if t is ctypes.c_void_p else "f" if t in (ctypes.c_float, ctypes.c_double) else "i")
            for n, t in _Problem._fields_}

    def where(f):
        return "absent" if f is None else f"offset {f[0]} ({f[1]} bytes, {dict(i='int', f='float', p='pointer')[f[2]]})"

    for n in dict.fromkeys([*ours, *theirs]):
        if ours.get(n) != theirs.get(n):
            return f"field {n}: {where(theirs.get(n))} in {SOURCE.name}'s Problem, {where(ours.get(n))} in _Problem"
    if int(size) != ctypes.sizeof(_Problem):
        return f"sizeof(Problem) {size}, ctypes.sizeof(_Problem) {ctypes.sizeof(_Problem)}"
    return None


def _build_dir() -> Path:
    root = os.environ.get("LDA_AQU_BUILD_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lda_aqu")
    return Path(root)


def _cpu_key() -> str:
    """-march=native code runs on the CPU it was built for: the key names the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return "\n".join([platform.machine(), *lines])


@functools.lru_cache(maxsize=None)
def _library() -> tuple[Optional[ctypes.CDLL], str]:
    """(library, "") or (None, why not)."""
    if os.environ.get("LDA_AQU_NATIVE", "1") == "0":
        return None, "LDA_AQU_NATIVE=0"
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None, "no C++ compiler (g++ or $CXX) on PATH"
    key = hashlib.sha256("\n".join([SOURCE.read_text(), cxx, *FLAGS, _cpu_key()]).encode()).hexdigest()[:16]
    path = _build_dir() / f"local_upsample_cpu-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            run = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            if run.returncode:
                return None, f"{cxx} failed: {run.stderr.strip()[-2000:]}"
            os.replace(tmp, path)  # atomic: concurrent builds (test workers) each install a whole file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(path))
    lib.lu_problem_layout.restype = ctypes.c_char_p
    if why := _layout_mismatch(lib.lu_problem_layout().decode()):
        return None, f"{path.name} does not match lda_aqu/kernels/cpu.py's _Problem: {why}"
    for name in ("lu_forward_f32", "lu_forward_f64", "lu_backward_f32", "lu_backward_f64"):
        getattr(lib, name).argtypes = [ctypes.POINTER(_Problem)]
        getattr(lib, name).restype = None
    for name in ("lu_transpose_f32", "lu_transpose_f64"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4
        getattr(lib, name).restype = None
    for name in ("lu_offset_conv_head_f32", "lu_offset_conv_head_f64"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 8 + [ctypes.c_double, ctypes.c_int64]
        getattr(lib, name).restype = None
    for name in ("lu_layer_norm_f32", "lu_layer_norm_f64"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_double, ctypes.c_int64]
        getattr(lib, name).restype = None
    for name in ("lu_layer_norm_backward_f32", "lu_layer_norm_backward_f64"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 3 + [ctypes.c_double, ctypes.c_int64]
        getattr(lib, name).restype = None
    return lib, ""


def unavailable() -> Optional[str]:
    """None if the native kernels can run, else why not."""
    return _library()[1] or None


def torch_empty(shape, dtype) -> torch.Tensor:
    """The launchers' default allocator: every output buffer comes from `empty(shape, dtype)` (a caller may
    pass a cache's)."""
    return torch.empty(shape, dtype=dtype, device="cpu")


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def _transposed(t: torch.Tensor, shape, empty) -> torch.Tensor:
    """t [B, n, m] (contiguous, fp32/fp64) transposed into a new contiguous tensor of `shape` ([B, m, n])."""
    out = empty(shape, t.dtype)
    B, n, m = t.shape
    if out.numel():
        getattr(_library()[0], "lu_transpose_" + _suffix(t.dtype))(t.data_ptr(), out.data_ptr(), B, n, m,
                                                                    torch.get_num_threads())
    return out


def _cl(t: Optional[torch.Tensor], dtype, empty) -> Optional[torch.Tensor]:
    """[B, c, h, w] as contiguous channels-last rows [B, h, w, c] in dtype."""
    if t is None:
        return None
    B, c, h, w = t.shape
    t = t.to(dtype)
    if t.is_contiguous():
        return _transposed(t.reshape(B, c, h * w), (B, h, w, c), empty)
    rows = t.permute(0, 2, 3, 1)
    return rows if rows.is_contiguous() else empty((B, h, w, c), dtype).copy_(rows)


def _nchw(t: torch.Tensor, empty) -> torch.Tensor:
    """Channels-last rows [B, h, w, c] (contiguous) as a contiguous [B, c, h, w]."""
    B, h, w, c = t.shape
    return _transposed(t.reshape(B, h * w, c), (B, c, h, w), empty)


def _c(t: Optional[torch.Tensor], dtype, empty) -> Optional[torch.Tensor]:
    """t contiguous in dtype: t itself where it is, else a copy (the bench's expanded sum gradient)."""
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return empty(t.shape, dtype).copy_(t)


@functools.lru_cache(maxsize=256)
def _runs(segs) -> torch.Tensor:
    return torch.tensor(segs, dtype=torch.int64).reshape(-1, 4)


def _problem(v, size, offset, q, rpb, mode, G, nh, K, segs, qsegs, origins, base, units, scale, coords, padding,
             acc, keep, grid=1, extents=None):
    """The ctypes struct for tensors in acc; `keep` holds every tensor it points into. origins ([Ho], [Wo])
    and base ([K, 2]) contiguous CPU tensors in acc; grid: the window's side; extents: int32 ([Ho], [Wo])
    rows and columns of a "ratio" window, or None."""
    B, C, H, W = v.shape
    Ho, Wo = size
    seg, qseg = (_runs(tuple(s)) for s in (segs, qsegs))
    y0, x0 = origins
    ey, ex = extents or (None, None)
    keep += [seg, qseg, y0, x0, base, ey, ex]
    return _Problem(B=B, C=C, H=H, W=W, Ho=Ho, Wo=Wo, G=G, NH=nh, K=K, Dq=0 if q is None else q.shape[1],
                    mode=WEIGHT_MODES[mode], align=coords == "align_corners",
                    exact=coords == "nearest" and offset is None,
                    border=padding == "border", has_offset=offset is not None, has_rpb=rpb is not None,
                    n_threads=torch.get_num_threads(), chunk_pixels=max(1, layout.CHUNK_PAIRS // (G * K * 4)),
                    n_seg=len(segs), n_qseg=len(qsegs), unit_y=units[0], unit_x=units[1], scale=scale,
                    seg=_ptr(seg), qseg=_ptr(qseg), y0=_ptr(y0), x0=_ptr(x0), base=_ptr(base), grid=grid,
                    ey=_ptr(ey), ex=_ptr(ex))


def _suffix(acc) -> str:
    return "f64" if acc == torch.float64 else "f32"


def forward(v, size, offset, q, k, rpb, given, mode, G, nh, K, segs, qsegs, origins, base, units, scale, coords,
            padding, acc, keep_weights=True, empty=torch_empty, grid=1, extents=None):
    """out [B, C, Ho, Wo] in acc and the sample weights w [B, nh, Ho*Wo, K] in acc (None for unit weights, or
    keep_weights=False: no backward follows).
    offset [B, G*2K, Ho, Wo]; q [B, Dq, Ho, Wo], k [B, Dq, H, W], rpb [nh, K, Dq//nh]; given: logits or
    weights [B, nh, K, Ho, Wo]; segs/qsegs: (group, head, first, end) channel runs of v and q; origins:
    the output rows' and columns' input coordinates; base [K, 2] the window; units per offset unit;
    grid, extents: see _problem."""
    keep = []
    p = _problem(v, size, offset, q, rpb, mode, G, nh, K, segs, qsegs, origins, base, units, scale, coords, padding,
                 acc, keep, grid, extents)
    # q NCHW: the kernel transposes a row at a time (q is at output resolution, its copy the largest)
    tensors = dict(v=_cl(v, acc, empty), offset=_c(offset, acc, empty), q=_c(q, acc, empty), k=_cl(k, acc, empty),
                   rpb=_c(rpb, acc, empty), given=_c(given, acc, empty))
    out = empty((p.B, p.C, p.Ho, p.Wo), acc)
    w = empty((p.B, p.NH, p.Ho * p.Wo, p.K), acc) if mode != "unit" and keep_weights else None
    for n, t in dict(tensors, out=out, w=w).items():
        setattr(p, n, _ptr(t))
    if p.B and p.Ho and p.Wo:
        getattr(_library()[0], "lu_forward_" + _suffix(acc))(ctypes.byref(p))
    return out, w


def backward(dout, v, size, offset, q, k, rpb, w, mode, G, nh, K, segs, qsegs, origins, base, units, scale, coords,
             padding, acc, needs, empty=torch_empty, grid=1, extents=None):
    """Gradients in acc: dv, doffset, dq, dk [as their inputs], dlogit [B, nh, Ho*Wo, K] (softmax input,
    for attention and logits), dw [B, nh, Ho*Wo, K] (given weights), None where not needed.
    needs: (v, offset, q, k, weights)."""
    keep = []
    p = _problem(v, size, offset, q, rpb, mode, G, nh, K, segs, qsegs, origins, base, units, scale, coords, padding,
                 acc, keep, grid, extents)
    n_v, n_off, n_q, n_k, n_w = needs
    n_off = n_off and offset is not None
    B, C, H, W = v.shape
    Dq, P = p.Dq, p.Ho * p.Wo
    attention = mode == "attention"
    # q, dout and dq NCHW: the kernel transposes a chunk's rows as it reaches them
    tensors = dict(v=_cl(v, acc, empty), offset=_c(offset, acc, empty), q=_c(q, acc, empty), k=_cl(k, acc, empty),
                   rpb=_c(rpb, acc, empty), w=_c(w, acc, empty), dout=_c(dout, acc, empty))
    out = dict(
        dv=empty((B, H, W, C), acc).zero_() if n_v else None,
        dk=empty((B, H, W, Dq), acc).zero_() if attention and n_k else None,
        dq=empty((B, Dq, p.Ho, p.Wo), acc) if attention and n_q else None,
        dlogit=empty((B, p.NH, P, K), acc) if mode in ("attention", "logits") else None,
        dw=empty((B, p.NH, P, K), acc) if mode == "weights" and n_w else None,
        doffset=empty(offset.shape, acc) if n_off else None)
    for n, t in dict(tensors, **out).items():
        setattr(p, n, _ptr(t))
    p.need_v, p.need_offset, p.need_q, p.need_k, p.need_weights = n_v, n_off, n_q, n_k, n_w
    if p.B and P:
        getattr(_library()[0], "lu_backward_" + _suffix(acc))(ctypes.byref(p))
    for n in ("dv", "dk"):  # NCHW as their inputs: autograd's sums with other gradients stay contiguous
        if out[n] is not None:
            out[n] = _nchw(out[n], empty)
    return out


def layer_norm_channels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                        empty=torch_empty) -> torch.Tensor:
    """LayerNorm over the channels of a contiguous fp32/fp64 [N, C, H, W] map with the affine, NCHW in
    and out (no autograd)."""
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    out = empty(x.shape, x.dtype)
    N, C = x.shape[:2]
    if out.numel():
        getattr(_library()[0], "lu_layer_norm_" + _suffix(x.dtype))(
            x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(), N, C, x[0, 0].numel(), eps,
            torch.get_num_threads())
    return out


def layer_norm_channels_backward(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, eps: float,
                                 empty=torch_empty):
    """(dx, dweight, dbias) of layer_norm_channels(x, weight, bias, eps) for the output's gradient grad,
    x, weight and grad contiguous in one dtype; the statistics are recomputed from x."""
    x, weight, grad = x.contiguous(), weight.contiguous(), grad.contiguous()
    N, C = x.shape[:2]
    HW = x[0, 0].numel() if x.numel() else 0
    dx, dw, db = empty(x.shape, x.dtype), weight.new_empty(C), weight.new_empty(C)
    part = x.new_empty(N * -(-HW // 64), 2, C, dtype=torch.float64)  # per-block sums (LN_BP pixels a block)
    if dx.numel():
        getattr(_library()[0], "lu_layer_norm_backward_" + _suffix(x.dtype))(
            *(t.data_ptr() for t in (x, weight, grad, dx, dw, db, part)), N, C, HW, eps, torch.get_num_threads())
    else:
        dw.zero_(), db.zero_()
    return dx, dw, db


def offset_conv_head(h, weight, bias, base, range_factor: float, pad=None, empty=torch_empty) -> torch.Tensor:
    """tanh(conv2d(h, weight, bias, padding=k//2)) * range_factor + base[c] for the output channels c,
    h [N, Ci, Hi, W] fp32/fp64, weight [Co, Ci, k, k] (odd k), bias and base [Co] (no autograd); pad: (top,
    bottom) zero rows instead of k//2 each (a band whose halo rows h holds)."""
    N, Ci, Hi, W = h.shape
    Co, k = weight.shape[0], weight.shape[-1]
    pt, pb = (k // 2, k // 2) if pad is None else pad
    out = empty((N, Co, Hi + pt + pb - k + 1, W), h.dtype)
    if out.numel():
        ts = [t.contiguous() for t in (h, weight, bias, base)]
        getattr(_library()[0], "lu_offset_conv_head_" + _suffix(h.dtype))(
            *(t.data_ptr() for t in ts), out.data_ptr(), N, Ci, Hi, W, Co, k, pt, pb, range_factor,
            torch.get_num_threads())
    return out
