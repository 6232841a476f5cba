"""Every configuration the launchers pick compiles for real GPUs (sm_90, sm_80) on this CPU-only
machine, and on sm_90 stays in registers: the interpreter alone accepts code the compiler rejects.
autotune.resources does triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)) and reads
ptxas's report, in a child process since this one interprets."""
import pytest

from autotune.resources import Job, compile_reports
from kernels.launchers import Problem, default_config


def problem(G, NH, K, D, C):
    return Problem(2, D, C, 100, 152, 200, 304, G, NH, K)


# (G, NH, K, D, C): the default layout, every k_u up to 9, heads within groups, groups within
# heads, heads across groups unevenly
PROBLEMS = [problem(*p) for p in [(2, 1, 9, 64, 256), (1, 1, 1, 64, 256), (1, 2, 25, 64, 256), (4, 4, 9, 64, 256),
                                  (2, 2, 49, 64, 256), (2, 1, 81, 64, 256), (2, 3, 9, 48, 192)]]


def default_job(kind, pb, dtype="fp32", cc=90, int64=False):
    return Job(kind, pb, default_config(pb, backward=kind != "fwd", interpret=False), dtype, cc, int64)


JOBS = [default_job(kind, pb, dtype) for pb in PROBLEMS for kind in ("fwd", "bwd", "gather") for dtype in ("fp32", "bf16")]
JOBS += [default_job(kind, PROBLEMS[0], "fp16", cc) for kind in ("fwd", "bwd") for cc in (90, 80)]
JOBS += [default_job(kind, pb, "fp32", 80) for pb in PROBLEMS[:3] for kind in ("fwd", "bwd", "gather")]
# float64 (tests, gradcheck) and the int64 indexing past 2**31 elements: compile, spills allowed
EXTRA = [default_job(kind, PROBLEMS[0], "fp64") for kind in ("fwd", "bwd", "gather")]
EXTRA += [default_job(kind, PROBLEMS[0], int64=True) for kind in ("fwd", "bwd")]


@pytest.fixture(scope="module")
def reports():
    return dict(zip(JOBS + EXTRA, compile_reports(JOBS + EXTRA)))


def name(job):
    return f"{job.kind}-G{job.pb.G}-nh{job.pb.NH}-K{job.pb.K}-{job.dtype}-sm{job.cc}{'-int64' if job.int64 else ''}"


@pytest.mark.parametrize("job", JOBS, ids=name)
def test_default_config_compiles_without_spills(job, reports):
    r = reports[job]
    assert r.error is None and r.registers > 0, r
    if job.cc == 90:
        assert r.spill_bytes == 0, r


@pytest.mark.parametrize("job", EXTRA, ids=name)
def test_float64_and_int64_paths_compile(job, reports):
    assert reports[job].error is None and reports[job].registers > 0, reports[job]
