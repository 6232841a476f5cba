"""Kernels run compiled on a CUDA GPU when there is one (tensors are made there by default), else on
CPU through the Triton interpreter, which must be on before `kernels` is imported."""
import faulthandler
import os
import signal
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    torch.set_default_device("cuda")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

from lda_aqu.upsampler import cpu_cache  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when loaded by path (test_gpu_suite)
import jit_semantics  # noqa: E402

# interpreted launches take the compiled kernel's semantics (see jit_semantics.py)
JIT_SEED = jit_semantics.install() if os.environ.get("TRITON_INTERPRET") == "1" and jit_semantics.enabled() else None


def pytest_report_header(config):
    if JIT_SEED is None:
        return "kernels: compiled, or the plain interpreter (LDA_AQU_JIT_SEMANTICS=0)"
    return f"kernels: interpreter with the JIT's semantics, LDA_AQU_JIT_SEED={JIT_SEED}"

# torch.device(...) as a context (and set_default_device) moves factory calls found in a set that is built
# once, on first use; built after the patch below it would hold the patched torch.empty, which then makes
# its tensors on the CPU whatever the context says. Build it now, with the real one.
try:
    from torch.utils._device import _device_constructors
    _device_constructors()
except ImportError:
    pass


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every torch.empty comes back full of NaN (floats) or -2**30 (ints): an output element that
    a kernel forgets to write fails the comparison instead of passing on leftover memory."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        if t.is_floating_point():  # through detach(): torch.empty(..., requires_grad=True) is a leaf (Inductor's)
            t.detach().fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.detach().fill_(-(2**30))
        return t
    monkeypatch.setattr(torch, "empty", poisoned)
    cached = cpu_cache.empty  # and the CPU cache's blocks, which come back holding the last call's values

    def poisoned_cached(shape, dtype):
        t = cached(shape, dtype)
        t.fill_(float("nan"))
        return t
    monkeypatch.setattr(cpu_cache, "empty", poisoned_cached)


@pytest.fixture
def force_int64(monkeypatch):
    """Every launch addresses in 64 bits, as past 2**31 elements: the INT64 paths on small problems."""
    import lda_aqu.kernels.launchers as L
    needs = L._needs_int64
    state = {"on": False}
    monkeypatch.setattr(L, "_needs_int64", lambda *t: state["on"] or needs(*t))
    return state


# A per-test time limit without pytest-timeout (the GPU machine has only pytest and pytest-xdist):
# $LDA_AQU_TEST_TIMEOUT seconds, then the test fails with its stack; a test stuck where Python cannot
# interrupt it (a kernel that never returns) is stopped 30 s later by faulthandler, which prints every
# thread's stack and ends the process (under xdist: the worker, reported as crashed in that test).
TIMEOUT = float(os.environ.get("LDA_AQU_TEST_TIMEOUT", "0") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if TIMEOUT <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran past LDA_AQU_TEST_TIMEOUT={TIMEOUT:g} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT)
    faulthandler.dump_traceback_later(TIMEOUT + 30, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()
