"""Which kernels run a call, and why: the one place that chooses among the op's backends and that says
where the native CPU kernels may stand in for torch's ops.

The op's backends, as `choose` picks them:

    "triton"     the Triton kernels (function.py): CUDA tensors, or CPU ones under TRITON_INTERPRET=1;
    "native"     the native CPU kernels (kernels/cpu.py), behind the CPU custom op (torch_path.py);
    "sparse"     the same custom op's sparse products, where the native kernels did not build;
    "plain"      a graph of grid_sample calls (torch_path._plain): other devices, export, meta tensors,
                 and one unit-weight sample per pixel;
    "reference"  the eager reference (naive.py), asked for by name only.

Each `can_run_*` answers None or why not, so that a refusal can be shown as it is.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..kernels import cpu as _cpu

BACKENDS = ("auto", "triton", "torch", "reference")
# the floating dtypes the modules take, every one of which the kernels take too
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = FLOAT_DTYPES
# the native kernels' own dtypes; the op's kernels read half inputs into fp32 (FLOAT_DTYPES for them)
NATIVE_DTYPES = (torch.float32, torch.float64)
# the public name (backend=...) of each backend choose picks
FAMILY = dict(triton="triton", native="torch", sparse="torch", plain="torch", reference="reference")


class Choice(NamedTuple):
    backend: str  # "triton", "native", "sparse", "plain" or "reference"
    why: str

    @property
    def family(self) -> str:
        """The public backend name: "triton", "torch" or "reference"."""
        return FAMILY[self.backend]


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


# ---- what is capturing a graph: compile, export, dispatch modes --------------------------------------

def is_exporting() -> bool:
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def capture(modes: bool = True) -> Optional[str]:
    """What is capturing the ops run here, or None in plain eager: torch.compile, an exporter, and where
    `modes` a dispatch mode (FlopCounterMode, FakeTensorMode). Under any of them an op must be one node
    the tracer or mode sees, and no branch may read data."""
    if torch.compiler.is_compiling():  # first: constant under Dynamo, and the others are not all traceable
        return "torch.compile is tracing"
    if is_exporting():
        return "exporting: exporters lower standard ops only"
    if torch.jit.is_tracing():  # torch.onnx.export's trace is exporting; other traces refuse_jit refuses
        return "torch.jit.trace is tracing"
    if modes and torch.utils._python_dispatch._get_current_dispatch_mode() is not None:
        return "a dispatch mode (FlopCounterMode, FakeTensorMode, ...) sees every op"
    return None


def traced() -> bool:
    """A graph is captured or a dispatch mode sees the ops (see `capture`)."""
    return capture() is not None


def refuse_jit():
    """TorchScript cannot script this library (custom ops with optional tensors, symbolic sizes), and a
    trace would bake the input size into the graph: say which routes work instead."""
    if torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
        raise RuntimeError("torch.jit.trace is not supported (the trace would fix the input size); use "
                           "torch.compile, torch.export (then AOTInductor for C++ deployment) or torch.onnx.export")


@torch.compiler.assume_constant_result
def autocast_available(device_type: str) -> bool:
    # fixed per device type, so the compilers may call it while tracing and keep the answer: Dynamo
    # before torch 2.13 cannot trace torch.amp.is_autocast_available itself
    return torch.amp.is_autocast_available(device_type)


def autocasting(device_type: str) -> bool:
    # is_autocast_enabled raises for devices without autocast (meta: shape inference, model summaries)
    return autocast_available(device_type) and torch.is_autocast_enabled(device_type)


@torch.compiler.assume_constant_result
def native_unavailable() -> Optional[str]:
    # fixed per process (the library builds or fails once), so torch.compile may ask while tracing and
    # keep the answer; through the module attribute, which tests replace
    return _cpu.unavailable()


# ---- the backends ------------------------------------------------------------------------------------

def _graph_only(t: torch.Tensor) -> Optional[str]:
    """Why only the plain graph runs, whatever was asked: meta tensors need no kernel (the plain graph
    has meta kernels throughout), and exporters lower standard ops only, not the library's custom ops."""
    if t.is_meta:
        return "meta tensors carry no data: the plain graph's meta kernels give the shapes"
    if is_exporting():
        return "exporting: exporters lower standard ops only, not the library's custom ops"
    return None


def _off_cpu(t: torch.Tensor, what: str) -> Optional[str]:
    if t.device.type == "cpu":
        return None
    return _graph_only(t) if t.is_meta else f"{what} run on CPU tensors, not {t.device.type}"


def can_run_triton(*tensors: torch.Tensor) -> Optional[str]:
    """None if the Triton backend can take these tensors, else why not (export is `choose`'s: exporters
    take the plain graph whatever the tensors)."""
    from ..kernels.launchers import INTERPRET
    t = tensors[0]
    if t.is_meta:
        return _graph_only(t)
    if t.device.type == "cpu" and not INTERPRET:
        return "CPU tensors run Triton kernels only under TRITON_INTERPRET=1, set before importing lda-aqu"
    if t.device.type not in ("cuda", "cpu"):
        return f"Triton kernels here run on CUDA devices, not {t.device.type}"
    if t.dtype not in TRITON_DTYPES:
        return f"dtype {t.dtype} is not one of {TRITON_DTYPES}"
    return None


def can_run_native(*tensors: torch.Tensor, dtypes=NATIVE_DTYPES, node: str = "") -> Optional[str]:
    """None if the native CPU kernels may run on these tensors here, else why not. One rule for the op
    and the modules' layers:

    - CPU tensors, all of one dtype among `dtypes` (the kernel's: the layer norm and offset head have
      fp32 and fp64 forms; the op reads half inputs into fp32, as all its backends compute);
    - under autocast, only tensors already in autocast's dtype. The op casts its inputs first, so its
      kernels compute what its other backends do; a module's kernel stands in for torch ops that
      autocast would run in its own dtype (or in fp32 where torch's casts say so), which a native
      pass would not reproduce: there it runs outside autocast only;
    - nothing capturing a graph (`capture`), except a custom op, one node the tracer sees, where the
      caller has one: `node="mode"` under dispatch modes (the layer norm's op; torch.compile sees
      torch's ops, which Inductor fuses), `node="compile"` under torch.compile too (the op's);
      exporters never (they lower standard ops only);
    - the library built (`kernels.cpu.unavailable()`).
    """
    if why := _off_cpu(tensors[0], "the native kernels"):
        return why
    why = capture(modes=node == "")  # before the checks that format dtypes: constant under torch.compile
    if why and not (node == "compile" and torch.compiler.is_compiling()):
        return why
    return _native_on_cpu(tensors, dtypes)


def _native_on_cpu(tensors, dtypes) -> Optional[str]:
    """can_run_native's checks that follow the device's and the capture's."""
    t = tensors[0]
    if t.dtype not in dtypes or any(x.dtype != t.dtype for x in tensors[1:]):
        return f"dtypes {[x.dtype for x in tensors]}: the native kernels take one of {dtypes}"
    if torch.is_autocast_enabled("cpu") and t.dtype != torch.get_autocast_dtype("cpu"):
        return f"autocast to {torch.get_autocast_dtype('cpu')}: torch's ops would compute in it, not in {t.dtype}"
    return native_unavailable()


def can_run_sparse(*tensors: torch.Tensor) -> Optional[str]:
    """None if the CPU custom op's sparse products can take these tensors, else why not."""
    return _graph_only(tensors[0]) or _sparse_on(tensors[0])


def _sparse_on(t: torch.Tensor) -> Optional[str]:
    if why := _off_cpu(t, "the sparse products"):
        return why
    if t.dtype not in FLOAT_DTYPES:
        return f"dtype {t.dtype} is not one of {FLOAT_DTYPES}"
    return None


def can_run_plain(*tensors: torch.Tensor) -> Optional[str]:
    """None if the grid_sample graph can take these tensors (any device, export, meta), else why not."""
    if tensors[0].dtype not in FLOAT_DTYPES:
        return f"grid_sample takes floating tensors, {FLOAT_DTYPES}, not {tensors[0].dtype}"
    return None


def choose(backend: str, *tensors: torch.Tensor, single: bool = False) -> Choice:
    """The backend that runs `local_upsample` for `backend` (the user's: "auto", "triton", "torch",
    "reference") on these tensors, and why. `single`: one unit-weight sample per output pixel
    (DySample, interpolation), which grid_sample's CPU kernel runs faster than the native one, keeping
    the same tensors for backward.

    Exporting or on meta tensors it is the plain graph whatever was asked; "auto" is Triton on CUDA,
    else the torch family: plain off the CPU, else native where it runs, else sparse. Raises where
    backend="triton" cannot run.
    """
    check_backend(backend)
    refuse_jit()
    t = tensors[0]
    if why := _graph_only(t):
        return Choice("plain", why)
    if backend == "reference":
        return Choice("reference", "backend='reference'")
    if backend != "torch":
        # looked up through functional, whose name tools replace (autotune.resources drives CPU tensors)
        from . import functional
        refusal = functional.can_run_triton(*tensors)
        if backend == "triton":
            if refusal:
                raise ValueError(f"backend='triton' cannot run: {refusal}; use backend='reference' or 'auto'")
            return Choice("triton", "backend='triton'")
        if t.is_cuda and refusal is None:
            return Choice("triton", "backend='auto' on CUDA")
    if single:
        return Choice("plain", "one unit-weight sample per pixel: grid_sample's kernel is the fastest")
    # the checks of can_run_sparse and can_run_native that remain: meta and export are taken above, the
    # op is a custom op (one node under compile and dispatch modes), and refuse_jit took other traces
    if why := _sparse_on(t):
        return Choice("plain", why)
    if why := _native_on_cpu(tensors, FLOAT_DTYPES):
        return Choice("sparse", f"native kernels: {why}")
    return Choice("native", "CPU tensors, native kernels built")
