"""The kernels as a GPU compiles them, on this CPU-only machine: every launch the op makes with its
default configurations, specialised on its real arguments as Triton's JIT would specialise it
(autotune.resources), compiled for sm_90 and sm_80 and read back from ptxas and the SASS. The
interpreter alone accepts code the compiler rejects, and keeps no registers.

Every distinct launch is compiled once, in parallel, for the whole module."""
import os
import re
import subprocess
import sys

import pytest

from lda_aqu.autotune.resources import Job, compile_reports, sass_summary, shortfalls
from lda_aqu.kernels.launchers import Problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def problem(G, NH, K, D, C):
    return Problem(2, D, C, 100, 152, 200, 304, G, NH, K)


# (G, NH, K, D, C): FPN P2 (the default layout), every k_u up to 9, heads within groups, groups
# within heads, heads across groups unevenly
PROBLEMS = [problem(*p) for p in [(2, 1, 9, 64, 256), (1, 1, 1, 64, 256), (1, 2, 25, 64, 256), (4, 4, 9, 64, 256),
                                  (2, 2, 49, 64, 256), (2, 1, 81, 64, 256), (2, 3, 9, 48, 192)]]
FPN_P2 = PROBLEMS[0]

FWD, BWD, DET = ("fwd", False), ("bwd", False), ("bwd", True)  # (direction, deterministic)
# the forward (its inference and training launches) and the backward for every layout (fp32, and bf16
# where registers are tightest); the deterministic backward (its own specialisation and the gather kernel) on the
# layouts that change its channel tiles; fp16, sm_80, float64 (tests, gradcheck) and int64 indexing
# (past 2**31 elements) at FPN P2. A spill on sm_90 fails; elsewhere (and in float64 and int64)
# compiling is what counts. About 50 distinct launches, 3 s of CPU each.
JOBS = [Job(pb, "fp32", d, deterministic=det) for pb in PROBLEMS for d, det in (FWD, BWD)]
# bf16 where the register budget is tightest (FPN P2, k_u 7 and 9)
JOBS += [Job(pb, "bf16", d, deterministic=det) for pb in (FPN_P2, *PROBLEMS[4:6]) for d, det in (FWD, BWD)]
JOBS += [Job(pb, "fp32", "bwd", deterministic=True) for pb in (FPN_P2, PROBLEMS[6])]
# the other upsamplers' weight modes at the FPN P2 map: CARAFE's (softmax of logits over a 5x5 window
# of nearest source pixels, one corner read) and DySample's (unit weights at learned offsets, 4
# groups, border padding)
UPSAMPLERS = [Problem(2, 0, 256, 100, 152, 200, 304, 1, 1, 25, "logits"),
              Problem(2, 0, 256, 100, 152, 200, 304, 4, 1, 1, "unit")]
JOBS += [Job(pb, dtype, d, deterministic=det) for pb in UPSAMPLERS for dtype in ("fp32", "bf16") for d, det in (FWD, BWD)]
JOBS += [Job(pb, "fp32", "bwd", deterministic=True) for pb in UPSAMPLERS]
JOBS += [Job(FPN_P2, "fp16", d) for d in ("fwd", "bwd")]
JOBS += [Job(FPN_P2, "fp32", d, cc=80) for d in ("fwd", "bwd")]
EXTRA = [Job(FPN_P2, "fp64", d, deterministic=det) for d, det in (FWD, BWD, DET)]
EXTRA += [Job(FPN_P2, "fp32", d, int64=True) for d in ("fwd", "bwd")]
# a one-pixel output: the JIT passes P == 1 as a constant, which the int64 path must still widen
ONE_PIXEL = Problem(1, 64, 64, 4, 5, 1, 1, 2, 1, 9)
EXTRA += [Job(ONE_PIXEL, dtype, d, deterministic=det, int64=True) for dtype in ("fp32", "fp64")
          for d, det in (FWD, BWD, DET)]
# what the public op launches at FPN P2 (default, non-deterministic mode)
OP = [Job(FPN_P2, dtype, d, via_op=True) for dtype in ("fp32", "bf16") for d in ("fwd", "bwd")]


@pytest.fixture(scope="module")
def reports():
    jobs = JOBS + EXTRA + OP
    return dict(zip(jobs, compile_reports(jobs)))


def name(job):
    pb = job.pb
    return (f"{job.direction}{'-det' if job.deterministic else ''}-{pb.weights}-G{pb.G}-nh{pb.NH}-K{pb.K}-D{pb.D}-{job.dtype}"
            f"-sm{job.cc}{'-int64' if job.int64 else ''}{'-1px' if pb.Ho * pb.Wo == 1 else ''}")


def show(r):
    return (f"{r.phase} {r.kernel} {r.tiles} w{r.num_warps}: {r.registers} registers, spill stores "
            f"{r.spill_bytes} B, stack {r.stack_bytes} B{', ' + r.error if r.error else ''}")


@pytest.mark.slow
@pytest.mark.parametrize("job", JOBS, ids=name)
def test_default_configs_compile_without_spills(job, reports):
    found = reports[job]
    # fwd: inference and training; deterministic bwd: the backward, the gather and (with rpb) drpb's sum
    expect = 2 if job.direction == "fwd" else 1 + job.deterministic * (1 + (job.pb.weights == "attention"))
    assert len(found) == expect, found
    for r in found:
        assert r.error is None and r.registers > 0, show(r)
    if job.cc == 90:
        spilled = [show(r) for r in found if not r.spill_free]
        assert not spilled, spilled


@pytest.mark.slow
@pytest.mark.parametrize("job", EXTRA, ids=name)
def test_float64_and_int64_paths_compile(job, reports):
    for r in reports[job]:
        assert r.error is None and r.registers > 0, show(r)
    narrow = job._replace(int64=False)
    if job.int64 and narrow in reports:  # the flag reaches the kernel: a launch of its own, not the int32 one
        assert {r.spec for r in reports[job]}.isdisjoint(r.spec for r in reports[narrow])


@pytest.mark.slow
@pytest.mark.parametrize("job", OP, ids=name)
def test_launcher_driver_launches_what_the_op_launches(job, reports):
    """lda_aqu.autotune.resources.drive_launchers (what tuning and these tests compile) specialises each
    kernel exactly as the public op launches it."""
    assert [r.spec for r in reports[job._replace(via_op=False)]] == [r.spec for r in reports[job]]


@pytest.mark.slow
@pytest.mark.parametrize("job", OP, ids=name)
def test_compiled_efficiency_at_fpn_p2(job, reports):
    """What the GPU runs for every kernel the op launches at FPN P2: no fences and no returning
    atomics (a reduction is a relaxed RED), nothing in local memory, and at least MIN_WIDE of the
    global-load bytes from loads of 64 bits or wider (`python -m lda_aqu.autotune inspect` shows them)."""
    bad = [f"{r.phase} {r.kernel}: {', '.join(shortfalls(r))}" for r in reports[job] if shortfalls(r)]
    assert not bad, "; ".join(bad)


@pytest.mark.slow
def test_inspect_prints_every_launch(reports):
    """`python -m lda_aqu.autotune inspect` (through the public op) shows the launches and figures of the
    default configurations at FPN P2; the module's compiles above leave Triton's cache warm."""
    r = subprocess.run([sys.executable, "-m", "lda_aqu.autotune", "inspect", "--dtype", "fp32"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [re.split(r"\s{2,}", line) for line in r.stdout.splitlines() if line.startswith("fp32 ")]
    expect = reports[Job(FPN_P2, "fp32", "fwd")] + reports[Job(FPN_P2, "fp32", "bwd")]
    assert [(row[2], row[3], int(row[7]), int(row[8])) for row in rows] == [
        (e.phase, e.kernel, e.registers, e.spill_bytes) for e in expect], r.stdout


SASS = """
        /*0090*/                   LDG.E.128 R4, desc[UR4][R2.64] ;                 /* 0x0000000402047981 */
        /*00a0*/              @!P0 LDG.E.U16 R9, desc[UR4][R6.64] ;                 /* 0x0000000406098981 */
        /*00b0*/               @P1 REDG.E.ADD.F32x2.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R4 ;  /* 0x000000040200198e */
        /*00c0*/                   MEMBAR.ALL.GPU ;                                 /* 0x0000000000007992 */
        /*00d0*/                   ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU PT, RZ, desc[UR14][R40.64], R42 ; /* 0x00 */
        /*00e0*/                   LDG.E.64.CONSTANT R2, desc[UR4][R2.64] ;         /* 0x0000000402027981 */
        /*00f0*/                   LDG.E R3, desc[UR4][R2.64] ;                     /* 0x0000000402037981 */
        /*0100*/                   LDS.128 R8, [R0] ;                               /* 0x0000000000087984 */
        /*0110*/                   STG.E desc[UR4][R2.64], R4 ;                     /* 0x0000000402007986 */
"""


def test_sass_summary_reads_widths_atomics_and_fences():
    loads, atomics, fences = sass_summary(SASS)
    assert loads == {16: 1, 32: 1, 64: 1, 128: 1}  # shared-memory loads and stores do not count
    assert atomics == {"REDG.E.ADD.F32x2": 1, "ATOMG.E.ADD.F32": 1} and fences == 1
