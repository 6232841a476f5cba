"""Bad arguments to the core op raise a clear error naming the argument, before any kernel runs."""
import pytest
import torch

from helpers import DEVICE, make_problem
from lda_aqu.upsampler import deformable_local_attention


def args(device=DEVICE, **change):
    t, kw = make_problem(1, 8, 16, 4, 5, 2, 2, 2, 3, dtype=torch.float32, device=device)
    a = dict(t, **kw, backend="triton")
    a.update(change)
    return a


def call(a):
    a = dict(a)
    return deformable_local_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("offset"), a.pop("rpb"), **a)


BAD = {
    "q not a tensor": (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    "k 3-D": (dict(k=torch.randn(8, 4, 5)), ValueError, "k must be 4-D"),
    "v integer": (dict(v=torch.ones(1, 16, 4, 5, dtype=torch.int64)), TypeError, "v must be a floating"),
    "mixed dtypes": (dict(v=torch.randn(1, 16, 4, 5, dtype=torch.float64)), ValueError, "v has dtype"),
    "mixed devices": (dict(offset=torch.randn(1, 36, 8, 10, device="meta")), ValueError, "offset is on meta"),
    "batch": (dict(v=torch.randn(2, 16, 4, 5)), ValueError, "batch sizes differ"),
    "k channels": (dict(k=torch.randn(1, 4, 4, 5)), ValueError, "k has 4 channels"),
    "k/v size": (dict(k=torch.randn(1, 8, 4, 6)), ValueError, "k is"),
    "offset size": (dict(offset=torch.randn(1, 36, 8, 9)), ValueError, "offset is"),
    "offset channels odd": (dict(offset=torch.randn(1, 35, 8, 10), rpb=None), ValueError, "offset must have"),
    "offset channels unreadable": (dict(offset=torch.randn(1, 12, 8, 10), rpb=None, num_groups=None),
                                   ValueError, "offset has 12 channels"),
    "num_groups wrong": (dict(num_groups=3), ValueError, "offset has 36 channels"),
    "num_groups type": (dict(num_groups=2.0), ValueError, "num_groups must be"),
    "num_heads zero": (dict(num_heads=0), ValueError, "num_heads must be"),
    "num_heads divides": (dict(num_heads=3, rpb=None), ValueError, "num_heads=3 must divide"),
    "rpb shape": (dict(rpb=torch.randn(2, 9, 3)), ValueError, "rpb must have shape"),
    "rpb type": (dict(rpb=[0.0]), TypeError, "rpb must be"),
    "scale": (dict(scale=float("nan")), ValueError, "scale must be"),
    "backend": (dict(backend="cuda"), ValueError, "backend must be one of"),
    "empty": (dict(k=torch.randn(1, 8, 0, 5), v=torch.randn(1, 16, 0, 5)), ValueError, "v has height 0"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_argument_raises(name):
    change, err, match = BAD[name]
    with pytest.raises(err, match=match):
        call(args(**change))


def test_ambiguous_groups_need_num_groups():
    # 18 channels read as G=1, K=9 or G=9, K=1; both divide D=C=9
    q, k, v, off = torch.randn(1, 9, 4, 4), torch.randn(1, 9, 2, 2), torch.randn(1, 9, 2, 2), torch.randn(1, 18, 4, 4)
    with pytest.raises(ValueError, match="several"):
        deformable_local_attention(q, k, v, off, backend="reference")
    assert deformable_local_attention(q, k, v, off, num_groups=9, backend="reference").shape == (1, 9, 4, 4)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    from lda_aqu.kernels import launchers
    monkeypatch.setattr(launchers, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        call(args(device="cpu"))
    assert call(args(device="cpu", backend="auto")).shape == (1, 16, 8, 10)  # auto takes the torch path on CPU


def test_auto_picks_torch_on_cpu():
    from lda_aqu.kernels.launchers import INTERPRET
    from lda_aqu.upsampler import select_backend
    t = torch.randn(1, device="cpu")
    assert select_backend("auto", t) == "torch"
    if INTERPRET:  # the tests' interpreter takes CPU tensors (a GPU run compiles instead)
        assert select_backend("triton", t) == "triton"
