"""The dispatcher: each refusal of each backend is reachable and says what it is, and every module and the op
take their backend from `dispatch.choose`."""
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import fresh_seed, rel_err, seeded_randn
from lda_aqu.kernels import cpu
from lda_aqu.upsampler import CARAFE, FADE, LDAAQU, SAPA, DySample, SAPADeform, dispatch, functional, \
    local_upsample, select_backend
from lda_aqu.upsampler.dispatch import (Choice, can_run_native, can_run_plain, can_run_sparse, can_run_triton,
                                        choose)


def on(device: str, dtype=torch.float32):
    """A tensor on `device`, or where this machine has none, a stand-in with the attributes the predicates
    read (they look at where and what a tensor is, never at its data)."""
    try:
        return torch.empty(2, device=device, dtype=dtype)
    except (RuntimeError, AssertionError):
        return types.SimpleNamespace(device=torch.device(device), dtype=dtype, is_meta=False,
                                     is_cuda=device == "cuda")


def cpu_tensor(dtype=torch.float32):
    return torch.empty(2, dtype=dtype, device="cpu")


@pytest.fixture
def built():
    if cpu.unavailable():
        pytest.skip(f"native kernels unavailable: {cpu.unavailable()}")


@pytest.fixture
def exporting(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)


class _Watching(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_device_refusals_name_the_device():
    assert "not mps" in can_run_triton(on("mps"))
    for device in ("cuda", "mps"):
        assert f"not {device}" in can_run_native(on(device))
        assert f"not {device}" in can_run_sparse(on(device))
        assert can_run_plain(on(device)) is None
        got = choose("torch", on(device))
        assert got.backend == "plain" and f"not {device}" in got.why


def test_dtype_refusals_name_the_dtype():
    ints = cpu_tensor(torch.int64)
    assert "torch.int64" in can_run_triton(ints)
    assert "torch.int64" in can_run_sparse(ints)
    assert "torch.int64" in can_run_plain(ints)
    # the modules' native layers have fp32 and fp64 forms, one dtype for all their tensors; the op's read
    # half inputs into fp32
    assert "torch.float16" in can_run_native(cpu_tensor(torch.float16))
    assert "torch.float64" in can_run_native(cpu_tensor(), cpu_tensor(torch.float64))
    assert "torch.int64" in can_run_native(ints, dtypes=dispatch.FLOAT_DTYPES)


def test_native_dtypes_of_the_op(built):
    for dtype in dispatch.FLOAT_DTYPES:
        assert can_run_native(cpu_tensor(dtype), dtypes=dispatch.FLOAT_DTYPES) is None
        assert choose("torch", cpu_tensor(dtype)) == ("native", "CPU tensors, native kernels built")


def test_interpreter_refusal(monkeypatch):
    monkeypatch.setattr("lda_aqu.kernels.launchers.INTERPRET", False)
    why = can_run_triton(cpu_tensor())
    assert "TRITON_INTERPRET=1" in why
    with pytest.raises(ValueError, match="backend='triton' cannot run: CPU tensors run Triton kernels only under"):
        choose("triton", cpu_tensor())
    got = choose("auto", cpu_tensor())
    assert got.family == "torch" and got.backend != "triton"
    monkeypatch.setattr("lda_aqu.kernels.launchers.INTERPRET", True)
    assert can_run_triton(cpu_tensor()) is None
    assert choose("triton", cpu_tensor()) == ("triton", "backend='triton'")


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_export_takes_the_plain_graph(backend, exporting):
    got = choose(backend, cpu_tensor())
    assert got.backend == "plain" and got.why.startswith("exporting")
    assert can_run_native(cpu_tensor()).startswith("exporting")
    assert can_run_sparse(cpu_tensor()).startswith("exporting")
    assert can_run_plain(cpu_tensor()) is None


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_meta_takes_the_plain_graph(backend):
    meta = torch.empty(2, device="meta")
    got = choose(backend, meta)
    assert got.backend == "plain" and got.why.startswith("meta")
    for can_run in (can_run_triton, can_run_native, can_run_sparse):
        assert can_run(meta).startswith("meta")
    assert can_run_plain(meta) is None


def test_native_not_built(monkeypatch):
    monkeypatch.setattr("lda_aqu.kernels.cpu.unavailable", lambda: "no C++ compiler (test)")
    assert can_run_native(cpu_tensor()) == "no C++ compiler (test)"
    got = choose("torch", cpu_tensor())
    assert got.backend == "sparse" and got.why == "native kernels: no C++ compiler (test)"
    assert choose("auto", cpu_tensor(), single=True).backend == "plain"


def test_autocast_refuses_a_modules_layers_not_the_op(built):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        why = can_run_native(cpu_tensor())
        assert why.startswith("autocast to torch.bfloat16")
        # the op casts its inputs to autocast's dtype first: its kernels compute what its other backends do
        assert can_run_native(cpu_tensor(torch.bfloat16), dtypes=dispatch.FLOAT_DTYPES) is None
        assert choose("auto", cpu_tensor(torch.bfloat16)).backend == "native"
    assert can_run_native(cpu_tensor()) is None


def test_dispatch_modes_see_the_custom_ops_only(built):
    with _Watching():
        assert "dispatch mode" in can_run_native(cpu_tensor())
        assert can_run_native(cpu_tensor(), node="mode") is None
        assert can_run_native(cpu_tensor(), dtypes=dispatch.FLOAT_DTYPES, node="compile") is None
        assert dispatch.traced() and dispatch.capture(modes=False) is None
    assert not dispatch.traced()


def test_reference_and_single_sample():
    assert choose("reference", cpu_tensor()) == ("reference", "backend='reference'")
    got = choose("torch", cpu_tensor(), single=True)
    assert got.backend == "plain" and "one unit-weight sample" in got.why
    with pytest.raises(ValueError, match="backend must be one of"):
        choose("cuda", cpu_tensor())


def test_select_backend_sees_functional_can_run_triton(monkeypatch):
    """Tools replace functional.can_run_triton (autotune.resources, to drive CPU tensors): select_backend
    and choose see the replacement."""
    monkeypatch.setattr("lda_aqu.upsampler.functional.can_run_triton", lambda *t: "refused (test)")
    with pytest.raises(ValueError, match=r"backend='triton' cannot run: refused \(test\)"):
        select_backend("triton", cpu_tensor())
    monkeypatch.setattr("lda_aqu.upsampler.functional.can_run_triton", lambda *t: None)
    assert select_backend("triton", cpu_tensor()) == "triton"
    assert Choice("native", "").family == Choice("sparse", "").family == Choice("plain", "").family == "torch"


def test_op_without_native_kernels_runs_the_sparse_products(monkeypatch):
    """Native kernels not built: the op takes the sparse products (the native launch is never called),
    forward and backward, and matches the float64 reference."""
    def refuse(*a, **k):
        raise AssertionError("the native kernels ran")
    monkeypatch.setattr("lda_aqu.kernels.cpu.unavailable", lambda: "no C++ compiler (test)")
    monkeypatch.setattr(cpu, "forward", refuse)
    monkeypatch.setattr(cpu, "backward", refuse)
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    v = seeded_randn(1, 4, 5, 6, generator=g, dtype=torch.float64, device="cpu").requires_grad_()
    off = seeded_randn(1, 2 * 9, 10, 12, generator=g, dtype=torch.float64, device="cpu").requires_grad_()
    outs = [local_upsample(v, (10, 12), offset=off, kernel_size=3, backend=b) for b in ("torch", "reference")]
    assert rel_err(outs[0], outs[1]) < 1e-12, f"seed={seed}"
    grads = [torch.autograd.grad(o.square().sum(), (v, off)) for o in outs]
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-10, f"seed={seed}"


MODULES = {
    "LDAAQU": (lambda b: LDAAQU(8, backend=b), 1),
    "CARAFE": (lambda b: CARAFE(8, 2, compressed_channels=4, backend=b), 1),
    "DySample": (lambda b: DySample(8, backend=b), 1),
    "SAPA": (lambda b: SAPA(8, 8, norm_groups=4, backend=b), 2),
    "SAPADeform": (lambda b: SAPADeform(8, 8, backend=b), 2),
    "FADE": (lambda b: FADE(8, 8, backend=b), 2),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_every_module_takes_its_backend_from_choose(name, monkeypatch):
    """A dispatcher that answers "reference" whatever is asked: a module built for the torch backend then
    runs the reference op and gives the reference module's output bit for bit; the dispatcher saw the
    module's backend and the map it upsamples."""
    build, n_inputs = MODULES[name]
    real, seen, ran = dispatch.choose, [], []

    def forced(backend, *tensors, **kw):
        seen.append((backend, tuple(tensors[0].shape)))
        real(backend, *tensors, **kw)  # its checks still run
        return Choice("reference", "forced (test)")
    for mod in list(sys.modules.values()):  # every module that bound the name
        if getattr(mod, "__name__", "").startswith("lda_aqu.") and getattr(mod, "choose", None) is real:
            monkeypatch.setattr(mod, "choose", forced)
    ref_op = functional.local_upsample_ref
    monkeypatch.setattr(functional, "local_upsample_ref", lambda *a, **k: ran.append(1) or ref_op(*a, **k))
    seed = fresh_seed()
    torch.manual_seed(seed)
    m, ref = build("torch").double(), build("reference").double()
    with torch.no_grad():
        for p in m.parameters():  # off the zero-offset initialisations
            p.add_(torch.randn_like(p) * 0.1)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    ins = [torch.randn(2, 8, 10, 12, dtype=torch.float64), x][2 - n_inputs:]
    with torch.no_grad():
        got = m(*ins)
        assert seen and seen[0] == ("torch", tuple(x.shape)) and ran, f"seen={seen}, ran={len(ran)}"
        assert torch.equal(got, ref(*ins)), f"seed={seed}"
