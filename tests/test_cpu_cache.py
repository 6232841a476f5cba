"""The CPU cache of large buffers (upsampler.cpu_cache): a freed block comes back, a live one never
does (views, autograd, numpy, shared memory), the limit holds, and the module's outputs survive the
next call."""
import threading

import numpy as np
import pytest
import torch

from helpers import fresh_seed, seeded_randn
from lda_aqu.upsampler import LDAAQU, cpu_cache
from lda_aqu.kernels import cpu

MIB = 1 << 20
SHAPE = (64, 64, 64)  # 1 MiB of fp32: the smallest block the cache takes


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.delenv("LDA_AQU_CPU_CACHE_GIB", raising=False)
    cpu_cache.release()
    yield
    cpu_cache.release()


def test_a_freed_block_comes_back_a_live_one_does_not():
    a = cpu_cache.empty(SHAPE, torch.float32)
    ptr = a.data_ptr()
    assert a.shape == SHAPE and a.is_contiguous() and a.untyped_storage().nbytes() == MIB
    held = [cpu_cache.empty(SHAPE, torch.float32) for _ in range(3)]  # a is live: none of these is a
    assert ptr not in {t.data_ptr() for t in held}
    view, arr = a[3:5], a.numpy()
    del a
    assert cpu_cache.empty(SHAPE, torch.float32).data_ptr() != ptr  # its view holds it
    del view
    assert cpu_cache.empty(SHAPE, torch.float32).data_ptr() != ptr  # and numpy's array
    del arr
    assert cpu_cache.empty(SHAPE, torch.float32).data_ptr() == ptr
    assert cpu_cache.empty((7, 3), torch.float32).data_ptr() != ptr  # small: torch.empty's


def test_a_cached_storage_is_its_own_and_autograd_holds_what_it_saves():
    # the storage's only user is the tensor, as torch.empty's: autograd may steal and sum into it in place
    g = cpu_cache.empty(SHAPE, torch.float32)
    assert torch._C._storage_Use_Count(g.untyped_storage()._cdata) == \
        torch._C._storage_Use_Count(torch.empty(3, device="cpu").untyped_storage()._cdata)
    assert g._base is None
    leaf = torch.randn(SHAPE, device="cpu", requires_grad=True)
    s = cpu_cache.empty(SHAPE, torch.float32).normal_()
    sp, want = s.data_ptr(), s.clone()
    y = (leaf * s).sum()  # autograd keeps s
    del s
    assert cpu_cache.empty(SHAPE, torch.float32).fill_(7.0).data_ptr() != sp
    y.backward()
    assert torch.equal(leaf.grad, want)


def test_shared_memory_leaves_the_cache():
    a = cpu_cache.empty(SHAPE, torch.float32).fill_(3.0)
    ptr = a.data_ptr()
    a.share_memory_()
    assert a.is_shared() and a.data_ptr() != ptr and torch.all(a == 3.0)
    b = cpu_cache.empty(SHAPE, torch.float32).fill_(5.0)  # the old block, free: a no longer reads it
    assert b.data_ptr() == ptr and torch.all(a == 3.0)


def test_the_limit_holds_and_zero_turns_the_cache_off(monkeypatch):
    monkeypatch.setenv("LDA_AQU_CPU_CACHE_GIB", str(3 * MIB / 2 ** 30))
    live = [cpu_cache.empty(SHAPE, torch.float32) for _ in range(5)]
    assert cpu_cache.stats()["held"] == 3 * MIB  # the other two are torch.empty's
    assert len({t.data_ptr() for t in live}) == 5
    del live
    assert cpu_cache.stats() == dict(held=3 * MIB, free=3 * MIB)
    big = cpu_cache.empty((2, *SHAPE), torch.float32)  # another size: the oldest free blocks make room
    assert cpu_cache.stats()["held"] <= 3 * MIB and big.shape == (2, *SHAPE)
    assert cpu_cache.release() == 2 * MIB  # big is live
    monkeypatch.setenv("LDA_AQU_CPU_CACHE_GIB", "0")
    del big
    cpu_cache.release()
    cpu_cache.empty(SHAPE, torch.float32)
    assert cpu_cache.stats()["held"] == 0
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("LDA_AQU_CPU_CACHE_GIB", bad)
        with pytest.raises(ValueError, match="LDA_AQU_CPU_CACHE_GIB"):
            cpu_cache.empty(SHAPE, torch.float32)


def test_deterministic_mode_fills_as_torch_empty():
    cpu_cache.empty(SHAPE, torch.float32).fill_(1.0)
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.isnan(cpu_cache.empty(SHAPE, torch.float32)).all()
    finally:
        torch.use_deterministic_algorithms(False)


def test_threads_never_share_a_live_block():
    errors = []

    def work(i):
        try:
            for _ in range(50):
                t = cpu_cache.empty(SHAPE, torch.float32).fill_(i)
                if not torch.all(t == i):
                    errors.append(i)
                del t
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and cpu_cache.stats()["held"] <= 4 * MIB


@pytest.mark.parametrize("grad", [False, True])
def test_module_outputs_survive_the_next_call(grad):
    """Two steps of LDAAQU on a map whose tensors the cache serves: the first step's output (and its
    gradient) are untouched by the second, which reuses the cache's blocks and gives the same result."""
    if cpu.unavailable():
        pytest.skip(f"native kernels unavailable: {cpu.unavailable()}")
    seed = fresh_seed()
    torch.manual_seed(seed)
    m = LDAAQU(64, scale_factor=2).to("cpu")
    with torch.no_grad():
        m.conv_offset[-1].weight.normal_(0, 0.05)
    x = seeded_randn(1, 64, 48, 48, generator=torch.Generator().manual_seed(seed), device="cpu").requires_grad_(grad)

    def step():
        with torch.set_grad_enabled(grad):
            out = m(x)
            dx = torch.autograd.grad(out.square().sum(), x)[0] if grad else None
        return out, dx
    out1, dx1 = step()
    copies = [t.clone() for t in (out1, dx1) if t is not None]
    held = cpu_cache.stats()["held"]
    assert held > 0, "the map is large enough for the cache"
    out2, dx2 = step()
    out3, dx3 = step()
    assert cpu_cache.stats()["held"] <= held + 2 * out1.untyped_storage().nbytes()  # out1, out2 live
    for c, t1, t3 in zip(copies, (out1, dx1), (out3, dx3)):
        assert torch.equal(c, t1) and torch.equal(t1, t3), f"seed={seed}"
    assert not np.shares_memory(out1.detach().numpy(), out2.detach().numpy())
