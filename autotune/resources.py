"""Compile a kernel configuration for a real GPU without one: Triton builds the PTX on the CPU and
ptxas (shipped with Triton) reports registers and spills. The interpreter accepts code that the
GPU compiler rejects, and a configuration that spills is never worth timing.

Kernels decorated under TRITON_INTERPRET=1 cannot be compiled, so from an interpreted process the
work goes to a child process with the interpreter off; either way it runs on every core.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.local_upsample import upsample_bwd_gather_kernel, upsample_bwd_kernel, upsample_fwd_kernel
from kernels.launchers import INTERPRET, Config, Problem

_TL = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16, "fp64": tl.float64}
# pointer arguments that are not feature maps
_INDEX_PTRS = {"row_ptr": "*i64", "src_p": "*i32", "src_n": "*i32", "tgt": "*i32"}
# accumulation-dtype buffers
_ACC_PTRS = {"attn", "doff", "drpb", "ds", "dk", "dv", "src_w", "dwts", "cw"}


class Report(NamedTuple):
    registers: int
    spill_bytes: int  # spill stores + stack frame: local memory the kernel touches
    shared: int
    error: Optional[str] = None  # the compiler's complaint, when it refused


def _signature(kernel, constexprs: dict, dtype: str) -> dict:
    acc = "fp64" if dtype == "fp64" else "fp32"
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "scale":
            sig[name] = "fp32"
        elif name.startswith("s_") or name in ("H", "W", "Ho", "Wo", "HW", "P"):
            sig[name] = "i32"
        elif name in _INDEX_PTRS:
            sig[name] = _INDEX_PTRS[name]
        else:
            sig[name] = "*" + (acc if name in _ACC_PTRS else dtype)
    return sig


def constexprs(kind: str, pb: Problem, cfg: Config, dtype: str, int64: bool = False) -> dict:
    """The constexpr arguments the launchers pass for this problem and configuration."""
    acc = tl.float64 if dtype == "fp64" else tl.float32
    shape = dict(D=pb.D, C=pb.C, G=pb.G, NH=pb.NH, K=pb.K)
    if kind == "gather":
        return dict(shape, HAS_W=True, HAS_K=True, BLOCK_E=32,
                    BLOCK_D=min(cfg.block_d * 2, triton.next_power_of_2(pb.D // pb.G)),
                    BLOCK_C=min(cfg.block_c * 2, triton.next_power_of_2(pb.C // pb.G)), ACC=acc)
    from kernels.launchers import Spec, _constexprs
    c = _constexprs(pb, Spec(pb.G, pb.NH, pb.K), cfg, torch.float64 if dtype == "fp64" else torch.float32,
                    True, True, int64)
    c.pop("num_warps"), c.pop("num_stages")
    c.update(ACC=acc, FLAT_Q=True)
    c.update(STORE_ATTN=True) if kind == "fwd" else c.update(ATOMIC=True, FLAT_DO=True)
    return c


KERNELS = {"fwd": upsample_fwd_kernel, "bwd": upsample_bwd_kernel, "gather": upsample_bwd_gather_kernel}


class Job(NamedTuple):
    kind: str  # "fwd", "bwd" or "gather"
    pb: Problem
    cfg: Config
    dtype: str = "fp32"
    cc: int = 90
    int64: bool = False


def _compile(job: Job) -> Report:
    kernel = KERNELS[job.kind]
    consts = constexprs(job.kind, job.pb, job.cfg, job.dtype, job.int64)
    src = ASTSource(fn=kernel, signature=_signature(kernel, consts, job.dtype), constexprs=consts)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", job.cc, 32),
                                  options={"num_warps": job.cfg.num_warps, "num_stages": job.cfg.num_stages})
    except Exception as e:  # noqa: BLE001 - the compiler's refusal is the result
        return Report(0, 0, 0, f"{type(e).__name__}: {e}")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        arch = f"sm_{job.cc}a" if job.cc == 90 else f"sm_{job.cc}"
        log = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr

    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0
    spill = num(r"(\d+) bytes stack frame") + num(r"(\d+) bytes spill stores")
    return Report(num(r"Used (\d+) registers"), spill, compiled.metadata.shared)


def _to_json(job: Job) -> dict:
    return dict(job._asdict(), pb=list(job.pb), cfg=dataclasses.asdict(job.cfg))


def _from_json(d: dict) -> Job:
    return Job(**dict(d, pb=Problem(*d["pb"]), cfg=Config(**d["cfg"])))


def compile_reports(jobs: list[Job]) -> list[Report]:
    """Compile every job (in parallel) and return ptxas's report of each, in order."""
    if not jobs:
        return []
    if INTERPRET:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        out = subprocess.run([sys.executable, "-m", "autotune.resources"], input=json.dumps([_to_json(j) for j in jobs]),
                             capture_output=True, text=True, env=env, check=True).stdout
        return [Report(*r) for r in json.loads(out)]
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        return list(pool.map(_compile, jobs))


if __name__ == "__main__":
    print(json.dumps(compile_reports([_from_json(d) for d in json.load(sys.stdin)])))
