"""LDAAQU's output size int(H*s), int(W*s) is the same in eager Python, under torch.compile(dynamic=True)
and in a program exported with free height and width, at every scale: the size alone, through a tiny
module (an LDAAQU forward per size would cost seconds; the modules' forwards are tested elsewhere)."""
import random

import pytest
import torch
from torch.export import Dim

from lda_aqu.upsampler import LDAAQU

SCALES = [1.4, 0.7, 0.3, 2.6, 2.0, 4.0, 1.5, 1.1, 0.9, 3.3, 1 / 3, 1.7]


class Size(torch.nn.Module):
    def __init__(self, s):
        super().__init__()
        self.up = LDAAQU(8, scale_factor=s)

    def forward(self, x):
        Ho, Wo = self.up.output_size(*x.shape[-2:])
        return x.new_zeros(Ho + 2, Wo + 2)  # +2: neither 0 nor 1, which export would specialise


def eager(H, s):
    return int(H * s)


def test_eager_output_size_is_int_of_the_product():
    """Many (H, s) pairs, scales drawn at random too, up to H = 100000."""
    rng = random.Random(0)
    scales = SCALES + [rng.uniform(0.05, 8) for _ in range(20)] + [round(rng.uniform(0.1, 8), 1) for _ in range(20)]
    for s in scales:
        m = LDAAQU(8, scale_factor=s)
        for H in list(range(1, 300)) + [rng.randrange(300, 100_001) for _ in range(200)]:
            assert m.output_size(H, H + 1) == (eager(H, s), eager(H + 1, s)), (H, s)


@pytest.mark.parametrize("s", SCALES)
def test_export_with_free_sizes_agrees(s):
    m = Size(s)
    free = {2: Dim("h", min=3, max=64), 3: Dim("w", min=3, max=64)}
    ep = torch.export.export(m, (torch.randn(2, 8, 10, 12),), dynamic_shapes={"x": free})
    run = ep.module()
    for H in range(3, 65):
        W = 67 - H
        assert tuple(run(torch.empty(2, 8, H, W)).shape) == (eager(H, s) + 2, eager(W, s) + 2), (H, W, s)


@pytest.mark.parametrize("s", [1.4, 0.7, 2.6])
def test_compile_dynamic_agrees(s):
    m = Size(s)
    compiled = torch.compile(m, dynamic=True, fullgraph=True, backend="eager")
    for H in (5, 10, 17, 33, 50):
        assert tuple(compiled(torch.empty(1, 8, H, H + 2)).shape) == (eager(H, s) + 2, eager(H + 2, s) + 2), (H, s)
