"""Kernels run compiled on a CUDA GPU when there is one (tensors are made there by default), else on
CPU through the Triton interpreter, which must be on before `kernels` is imported."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    torch.set_default_device("cuda")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


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
