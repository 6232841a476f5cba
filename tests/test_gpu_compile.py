"""The kernels as a GPU compiles them, on this CPU-only machine: every launch the op makes with its
default configurations, specialised on its real arguments as Triton's JIT would specialise it
(autotune.resources), compiled for sm_90 and sm_80 and read back from ptxas and the SASS. The
interpreter alone accepts code the compiler rejects, and keeps no registers.

Every distinct launch is compiled once, in parallel, for the whole module."""
import pytest

from autotune.resources import Job, compile_reports, shortfalls
from kernels.launchers import Problem


def problem(G, NH, K, D, C):
    return Problem(2, D, C, 100, 152, 200, 304, G, NH, K)


# (G, NH, K, D, C): FPN P2 (the default layout), every k_u up to 9, heads within groups, groups
# within heads, heads across groups unevenly
PROBLEMS = [problem(*p) for p in [(2, 1, 9, 64, 256), (1, 1, 1, 64, 256), (1, 2, 25, 64, 256), (4, 4, 9, 64, 256),
                                  (2, 2, 49, 64, 256), (2, 1, 81, 64, 256), (2, 3, 9, 48, 192)]]
FPN_P2 = PROBLEMS[0]

FWD, BWD, DET = ("fwd", False), ("bwd", False), ("bwd", True)  # (direction, deterministic)
# the forward (its inference and training launches) and the backward for every layout and both
# common dtypes; the deterministic backward (its own specialisation and the gather kernel) on the
# layouts that change its channel tiles; fp16, sm_80, float64 (tests, gradcheck) and int64 indexing
# (past 2**31 elements) at FPN P2. A spill on sm_90 fails; elsewhere (and in float64 and int64)
# compiling is what counts. About 70 distinct launches: two minutes on two cores.
JOBS = [Job(pb, dtype, d, deterministic=det) for pb in PROBLEMS for dtype in ("fp32", "bf16") for d, det in (FWD, BWD)]
JOBS += [Job(pb, "fp32", "bwd", deterministic=True) for pb in (FPN_P2, PROBLEMS[3], PROBLEMS[6])]
JOBS += [Job(FPN_P2, "fp16", d, deterministic=det, cc=cc) for d, det in (FWD, BWD) for cc in (90, 80)]
JOBS += [Job(FPN_P2, "fp32", d, deterministic=det, cc=80) for d, det in (FWD, BWD, DET)]
EXTRA = [Job(FPN_P2, "fp64", d, deterministic=det) for d, det in (FWD, BWD, DET)]
EXTRA += [Job(FPN_P2, "fp32", d, int64=True) for d in ("fwd", "bwd")]
# what the public op launches at FPN P2 (default, non-deterministic mode)
OP = [Job(FPN_P2, dtype, d, via_op=True) for dtype in ("fp32", "bf16") for d in ("fwd", "bwd")]


@pytest.fixture(scope="module")
def reports():
    jobs = JOBS + EXTRA + OP
    return dict(zip(jobs, compile_reports(jobs)))


def name(job):
    pb = job.pb
    return (f"{job.direction}{'-det' if job.deterministic else ''}-G{pb.G}-nh{pb.NH}-K{pb.K}-D{pb.D}-{job.dtype}"
            f"-sm{job.cc}{'-int64' if job.int64 else ''}")


def show(r):
    return (f"{r.phase} {r.kernel} {r.tiles} w{r.num_warps}: {r.registers} registers, spill stores "
            f"{r.spill_bytes} B, stack {r.stack_bytes} B{', ' + r.error if r.error else ''}")


@pytest.mark.parametrize("job", JOBS, ids=name)
def test_default_configs_compile_without_spills(job, reports):
    found = reports[job]
    assert len(found) == (2 if job.direction == "fwd" or job.deterministic else 1), found
    for r in found:
        assert r.error is None and r.registers > 0, show(r)
    if job.cc == 90:
        spilled = [show(r) for r in found if not r.spill_free]
        assert not spilled, spilled


@pytest.mark.parametrize("job", EXTRA, ids=name)
def test_float64_and_int64_paths_compile(job, reports):
    for r in reports[job]:
        assert r.error is None and r.registers > 0, show(r)
    if job.int64:  # the flag reaches the kernel: a launch of its own, not the int32 one
        assert {r.spec for r in reports[job]}.isdisjoint(r.spec for r in reports[job._replace(int64=False)])


@pytest.mark.parametrize("job", OP, ids=name)
def test_launcher_driver_launches_what_the_op_launches(job, reports):
    """autotune.resources.drive_launchers (what tuning and these tests compile) specialises each
    kernel exactly as the public op launches it."""
    assert [r.spec for r in reports[job._replace(via_op=False)]] == [r.spec for r in reports[job]]


@pytest.mark.parametrize("job", OP, ids=name)
def test_compiled_efficiency_at_fpn_p2(job, reports):
    """What the GPU runs for every kernel the op launches at FPN P2: no fences and no returning
    atomics (a reduction is a relaxed RED), nothing in local memory, and at least MIN_WIDE of the
    global-load bytes from loads of 64 bits or wider (`python -m autotune inspect` shows them)."""
    bad = [f"{r.phase} {r.kernel}: {', '.join(shortfalls(r))}" for r in reports[job] if shortfalls(r)]
    assert not bad, "; ".join(bad)
