"""Compile kernels for a real GPU without one, exactly as Triton's JIT would compile the launches
in question, and read what the GPU would run: ptxas's registers, spills and shared memory, and
from the SASS (cuobjdump, shipped with Triton) the global loads by width, atomics and fences.

A launch is specialised on its real arguments: the launchers run on CPU tensors of the problem's
shapes and strides with `JITFunction.run` intercepted, and every argument goes through the JIT's
own binder for the target (ints equal to 1 become constants, multiples of 16 and 16-byte aligned
pointers get divisibility hints, `do_not_specialize` honoured), then `triton.compile` for sm_<cc>.

Kernels decorated under TRITON_INTERPRET=1 cannot be compiled, so from an interpreted process the
work goes to a child process with the interpreter off; either way it compiles on every core.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from typing import Iterator, NamedTuple, Optional

import torch
import triton

from ..kernels.launchers import INTERPRET, Config, Problem
from ..kernels.layout import DTYPES, acc_dtype

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

# Every Triton internal used here (they move between releases), looked up by internal() alone
INTERNALS = ("triton.backends.compiler:GPUTarget", "triton.compiler:make_backend", "triton.compiler:ASTSource",
             "triton.knobs:runtime", "triton.knobs:compilation", "triton.runtime.jit:JITFunction.run",
             "triton.runtime.jit:JITFunction._pack_args", "triton.runtime.jit:create_function_from_signature",
             "triton.backends.nvidia.compiler:get_ptxas")


class MissingTritonInternal(RuntimeError):
    """This Triton lacks something the compile harness needs; the message names it."""


def internal(path: str):
    """The Triton object at "module:attr.attr", or MissingTritonInternal naming it and this Triton."""
    module, _, attrs = path.partition(":")
    try:
        found = importlib.import_module(module)
        for name in attrs.split("."):
            found = getattr(found, name)
    except (ImportError, AttributeError) as e:
        raise MissingTritonInternal(f"lda_aqu.autotune.resources needs Triton's {path}, which Triton {triton.__version__} "
                                    f"lacks ({type(e).__name__}: {e}); launches cannot be compiled as its JIT "
                                    "would compile them") from None
    return found


def check_internals() -> None:
    """MissingTritonInternal for the first internal (or cuobjdump, which Triton ships) that is missing."""
    for path in INTERNALS:
        internal(path)
    if not os.path.exists(os.path.join(BIN, "cuobjdump")):
        raise MissingTritonInternal(f"lda_aqu.autotune.resources needs the cuobjdump that Triton ships in {BIN}, which "
                                    f"Triton {triton.__version__} lacks")


class Job(NamedTuple):
    """What to compile: one direction of the op at one problem. `config` None is what the op
    picks; `via_op` drives the public op instead of the launchers (the configuration is then the
    op's own)."""
    pb: Problem
    dtype: str = "fp32"
    direction: str = "fwd"  # "fwd": inference and training forwards; "bwd": the backward's kernels
    config: Optional[Config] = None
    deterministic: bool = False
    cc: int = 90
    int64: bool = False
    via_op: bool = False
    window: str = "centered"  # "clamped" (NAF's) or "ratio" (AnyUp's, ratio 0.1): attention, no offsets


class Report(NamedTuple):
    """One compiled launch. `phase` is "fwd" (inference), "fwd-train" (attention kept) or "bwd"."""
    phase: str
    kernel: str
    tiles: dict  # the BLOCK_* constants
    num_warps: int
    num_stages: int
    spec: str  # a digest of the specialisation: equal digests, equal compiled code
    registers: int = 0
    spill_bytes: int = 0  # ptxas's spill stores
    stack_bytes: int = 0  # ptxas's stack frame: local memory per thread, spill slots included
    shared: int = 0
    loads: dict = {}  # {bits: global-load instructions of that width}
    atomics: dict = {}  # {SASS opcode: count} of global atomics and reductions
    fences: int = 0  # MEMBAR / FENCE instructions
    error: Optional[str] = None  # the compiler's complaint, when it refused

    @property
    def spill_free(self) -> bool:
        return self.error is None and self.spill_bytes == 0 and self.stack_bytes == 0

    @property
    def wide_share(self) -> float:
        """Share of the global-load bytes in the code that come from loads of 64 bits or wider."""
        total = sum(bits * n for bits, n in self.loads.items())
        return sum(bits * n for bits, n in self.loads.items() if bits >= 64) / total if total else 1.0

    @property
    def returning_atomics(self) -> int:
        return sum(n for op, n in self.atomics.items() if op.startswith("ATOM"))


MIN_WIDE = 0.6  # the share of load bytes from loads of 64 bits or wider that a gather should reach


def shortfalls(r: Report) -> list[str]:
    """What keeps a launch from running well: spills, fences, returning atomics (a reduction
    should be a relaxed RED), narrow gathers."""
    if r.error:
        return [r.error.splitlines()[0][:200]]
    found = [f"spill {r.spill_bytes} B, stack {r.stack_bytes} B"] if not r.spill_free else []
    found += [f"{r.fences} fences"] if r.fences else []
    found += [f"{r.returning_atomics} ATOM"] if r.returning_atomics else []
    found += [f"wide {r.wide_share:.2f} < {MIN_WIDE}"] if r.wide_share < MIN_WIDE else []
    return found


# --- the launches -------------------------------------------------------------------------------

# how each weight mode is driven: as the upsampler that uses it (LDA-AQU, DySample-style given
# weights, CARAFE, DySample): (coords, padding, base window, offsets)
MODES = {"attention": ("align_corners", "zeros", False, True), "weights": ("half_pixel", "border", False, True),
         "logits": ("nearest", "zeros", True, False), "unit": ("half_pixel", "border", False, True)}


def _inputs(pb: Problem, dtype: torch.dtype, window: str = "centered") -> list[Optional[torch.Tensor]]:
    """q, k, v, offset, rpb, logits/weights on the CPU in the problem's real shapes (None where the
    weight mode takes none). Values do not matter, only shapes, strides and alignment."""
    attention, offsets = pb.weights == "attention", MODES[pb.weights][3] and window == "centered"
    return [torch.empty(pb.B, pb.D, pb.Ho, pb.Wo, dtype=dtype) if attention else None,
            torch.empty(pb.B, pb.D, pb.H, pb.W, dtype=dtype) if attention else None,
            torch.empty(pb.B, pb.C, pb.H, pb.W, dtype=dtype),
            torch.zeros(pb.B, 2 * pb.G * pb.K, pb.Ho, pb.Wo, dtype=dtype) if offsets else None,
            torch.empty(pb.NH, pb.K, pb.D // pb.NH, dtype=dtype) if attention and window != "ratio" else None,
            torch.empty(pb.B, pb.NH, pb.K, pb.Ho, pb.Wo, dtype=dtype) if pb.weights in ("logits", "weights") else None]


def drive_launchers(pb: Problem, dtype: torch.dtype, config: Optional[Config], direction: str,
                    deterministic: bool = False, int64: bool = False, window: str = "centered"
                    ) -> Iterator[Optional[str]]:
    """Everything here that knows the launchers' signatures (adapt it when they change): run one
    direction of the op (its weight mode `pb.weights`, driven as MODES says) through
    `kernels.launchers` on CPU tensors of the problem's real shapes, yielding the phase of the
    launches made since the last yield."""
    from ..kernels.launchers import Spec, upsample_bwd, upsample_fwd
    acc = acc_dtype(dtype)
    q, k, v, offset, rpb, wts = _inputs(pb, dtype, window)
    coords, padding, grid, _ = MODES[pb.weights]
    if window != "centered":
        coords, padding, grid = "nearest", "zeros", True
    spec = Spec(pb.G, pb.NH, pb.K, pb.weights, coords, padding, math.isqrt(pb.K) if grid else 0,
                (pb.D // pb.NH) ** -0.5 if pb.D else 1.0, window, 0.1 if window == "ratio" else 0.0)
    size = (pb.Ho, pb.Wo)
    if direction == "fwd":
        upsample_fwd(v, size, spec, offset, q, k, rpb, wts, config=config, need_attn=False, force_int64=int64)
        yield "fwd"
        upsample_fwd(v, size, spec, offset, q, k, rpb, wts, config=config, need_attn=True, force_int64=int64)
        yield "fwd-train"
    else:
        attn = torch.empty(pb.B, pb.NH, pb.K, pb.Ho, pb.Wo, dtype=acc)
        dout = torch.empty(pb.B, pb.C, pb.Ho, pb.Wo, dtype=dtype)
        upsample_bwd(dout, v, size, spec, offset, q, k, rpb, wts, attn, config=config, deterministic=deterministic,
                     force_int64=int64)
        yield "bwd"


def drive_op(pb: Problem, dtype: torch.dtype, direction: str, deterministic: bool = False) -> Iterator[Optional[str]]:
    """The launches of the public op, as a user runs it with backend="triton" (its own choice of
    kernels and configurations), on CPU tensors with the op's CPU refusal bypassed."""
    from ..upsampler import functional as F
    from ..upsampler import deformable_local_attention
    x = [t.requires_grad_() for t in _inputs(pb, dtype)[:5]]

    def op():
        return deformable_local_attention(*x, num_heads=pb.NH, num_groups=pb.G, backend="triton")
    refusal, F.can_run_triton = F.can_run_triton, lambda *a, **k: None
    try:
        if direction == "fwd":
            with torch.no_grad():
                op()
            yield "fwd"
            op()
            yield "fwd-train"
        else:
            out = op()
            yield None
            was = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(deterministic)
            try:
                out.backward(torch.empty_like(out))
            finally:
                torch.use_deterministic_algorithms(was)
            yield "bwd"
    finally:
        F.can_run_triton = refusal


class Launch(NamedTuple):
    """One kernel launch as the JIT specialised it for a target."""
    phase: str
    kernel: str  # "module:name" of the @triton.jit function
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict  # the backend's parsed options: num_warps, num_stages, ...
    cc: int

    def digest(self) -> str:
        text = repr((self.kernel, self.signature, sorted(self.constexprs.items()), sorted(self.attrs.items()),
                     sorted(self.options.items()), self.cc))
        return hashlib.sha1(text.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _intercepted(cc: int):
    """Kernel launches are recorded (specialised by the JIT's own binder for sm_<cc>), never run."""
    JITFunction = internal("triton.runtime.jit:JITFunction")
    create_function_from_signature = internal("triton.runtime.jit:create_function_from_signature")
    runtime, compilation = internal("triton.knobs:runtime"), internal("triton.knobs:compilation")
    pack_args = internal("triton.runtime.jit:JITFunction._pack_args")
    target = internal("triton.backends.compiler:GPUTarget")("cuda", cc, 32)
    backend = internal("triton.compiler:make_backend")(target)
    binders, recorded = {}, []

    def run(self, *args, grid, warmup, **kwargs):
        # as JITFunction.run does before compiling
        kwargs["debug"] = kwargs.get("debug", self.debug) or runtime.debug
        kwargs["instrumentation_mode"] = compilation.instrumentation_mode
        if self not in binders:
            binders[self] = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binders[self](*args, **kwargs)
        options, signature, constexprs, attrs = pack_args(self, backend, kwargs, bound, specialization, options)
        recorded.append(("", f"{self.fn.__module__}:{self.fn.__name__}", signature, constexprs, attrs,
                         dict(options.__dict__), cc))
        return None
    real, JITFunction.run = JITFunction.run, run
    try:
        yield recorded
    finally:
        JITFunction.run = real


def record(job: Job) -> list[Launch]:
    """The launches of a job, in order. Needs kernels compiled by the JIT (the interpreter off)."""
    if INTERPRET:
        raise RuntimeError("kernels decorated under TRITON_INTERPRET=1 cannot be compiled; use compile_reports")
    dtype = DTYPES[job.dtype]
    if job.via_op:
        if job.config is not None or job.int64:
            raise ValueError("the op picks its own configuration and index width")
        steps = drive_op(job.pb, dtype, job.direction, job.deterministic)
    else:
        steps = drive_launchers(job.pb, dtype, job.config, job.direction, job.deterministic, job.int64, job.window)
    launches = []
    with _intercepted(job.cc) as recorded:
        for phase in steps:
            launches += [Launch(phase, *r[1:]) for r in recorded if phase is not None]
            recorded.clear()
    return launches


# --- compiling ----------------------------------------------------------------------------------

def _ptxas(cc: int) -> str:
    return internal("triton.backends.nvidia.compiler:get_ptxas")(cc).path  # the one the JIT builds the cubin with


def sass_summary(sass: str) -> tuple[dict, dict, int]:
    """(global loads {bits: count}, global atomics {opcode: count}, fences) of cuobjdump -sass text."""
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)", line)
        if m:
            ops[m.group(1)] += 1
    loads = collections.Counter()
    for op, n in ops.items():
        if op.startswith("LDG"):  # LDG and LDGSTS (cp.async): the global loads
            tags = set(op.split("."))
            bits = next((b for t, b in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8))
                         if t in tags), 32)
            loads[bits] += n
    atomics = {".".join(op.split(".")[:4]): n for op, n in ops.items() if op.startswith(("RED", "ATOM"))
               and not op.startswith("ATOMS")}
    fences = sum(n for op, n in ops.items() if op.startswith(("MEMBAR", "FENCE")))
    return dict(sorted(loads.items())), atomics, fences


def _compile(launch: Launch) -> Report:
    ASTSource, GPUTarget = internal("triton.compiler:ASTSource"), internal("triton.backends.compiler:GPUTarget")
    module, name = launch.kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    names = list(launch.signature)
    consts = {names[path[0]]: v for path, v in launch.constexprs.items() if len(path) == 1}
    head = dict(phase=launch.phase, kernel=name, tiles={n: v for n, v in consts.items() if n.startswith("BLOCK")},
                num_warps=launch.options["num_warps"], num_stages=launch.options["num_stages"], spec=launch.digest())
    try:
        compiled = triton.compile(ASTSource(fn, launch.signature, launch.constexprs, launch.attrs),
                                  target=GPUTarget("cuda", launch.cc, 32), options=launch.options)
    except Exception as e:  # noqa: BLE001 - the compiler's refusal is the result
        return Report(**head, error=f"{type(e).__name__}: {str(e)[:2000]}")
    arch = f"sm_{launch.cc}a" if launch.cc >= 90 else f"sm_{launch.cc}"
    log = subprocess.run([_ptxas(launch.cc), "-v", f"--gpu-name={arch}", "-", "-o", os.devnull],
                         input=compiled.asm["ptx"], capture_output=True, text=True, check=True).stderr
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout

    def num(pattern):
        return sum(int(x) for x in re.findall(pattern, log))
    loads, atomics, fences = sass_summary(sass)
    return Report(**head, registers=num(r"Used (\d+) registers"), spill_bytes=num(r"(\d+) bytes spill stores"),
                  stack_bytes=num(r"(\d+) bytes stack frame"), shared=compiled.metadata.shared, loads=loads,
                  atomics=atomics, fences=fences)


def _pool_context():
    """Forked workers start at once. A process holding a CUDA context (the sweep's) must not fork:
    its workers come from a server that imported this module (and its main module must be
    import-safe, as `python -m lda_aqu.autotune` is)."""
    if not torch.cuda.is_initialized():
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["lda_aqu.autotune.resources"])
    return ctx


def _compile_here(jobs: list[Job]) -> list[list[Report]]:
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count(), mp_context=_pool_context()) as pool:
        launches = list(pool.map(record, jobs))  # the deterministic backward sorts on the host: seconds
        distinct = {launch.digest(): launch for found in launches for launch in found}
        done = dict(zip(distinct, pool.map(_compile, distinct.values())))
    # a launch shared by two phases is compiled once and reported under each
    return [[done[launch.digest()]._replace(phase=launch.phase) for launch in found] for found in launches]


def _to_json(job: Job) -> dict:
    return dict(job._asdict(), pb=list(job.pb), config=job.config and dataclasses.asdict(job.config))


def _from_json(d: dict) -> Job:
    return Job(**dict(d, pb=Problem(*d["pb"]), config=d["config"] and Config(**d["config"])))


def compile_reports(jobs: list[Job]) -> list[list[Report]]:
    """For each job, the report of each kernel launch it makes, in launch order. Every distinct
    launch is compiled once, all of them in parallel."""
    if not jobs:
        return []
    check_internals()
    if not INTERPRET:
        return _compile_here(jobs)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-m", "lda_aqu.autotune.resources"], input=json.dumps([_to_json(j) for j in jobs]),
                         capture_output=True, text=True, env=env)
    if run.returncode == MISSING:
        raise MissingTritonInternal(run.stderr.strip().splitlines()[-1])
    if run.returncode:
        raise RuntimeError(f"compiling in a child process failed:\n{run.stderr[-4000:]}")
    return [[Report(**dict(r, loads={int(b): n for b, n in r["loads"].items()})) for r in found]
            for found in json.loads(run.stdout)]


def evaluate(pb: Problem, dtype: str, direction: str, configs: list[Config], cc: int = 90,
             deterministic: bool = False) -> list[list[Report]]:
    """The reports of each candidate configuration (to choose defaults from): for each, one per
    kernel launch of that direction."""
    return compile_reports([Job(pb, dtype, direction, c, deterministic, cc) for c in configs])


MISSING = 3  # the child's exit status for MissingTritonInternal, its message the last line of stderr

if __name__ == "__main__":
    from ..autotune import resources  # the importable module, whose functions the workers can unpickle
    try:
        found = resources.compile_reports([resources._from_json(d) for d in json.load(sys.stdin)])
    except resources.MissingTritonInternal as e:
        print(e, file=sys.stderr)
        sys.exit(MISSING)
    print(json.dumps([[r._asdict() for r in reports] for reports in found]))
