"""Nearest and bilinear interpolation through the op against F.interpolate(size=...) in float64."""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_matches_with_grads, backends_under_test, fresh_seed, seeded_randn
from lda_aqu.upsampler import interpolate

BACKENDS = backends_under_test()
MODES = [("nearest", None), ("bilinear", True), ("bilinear", False)]
# from 5x7: non-integer up, exact x3, down, a one-row output
SIZES = [(11, 13), (15, 21), (3, 4), (1, 9)]


@pytest.mark.parametrize("mode,align_corners", MODES, ids=[f"{m}-ac={a}" for m, a in MODES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_f_interpolate(backend, mode, align_corners):
    seed = fresh_seed()
    x = seeded_randn(2, 8, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    for size in SIZES:
        assert_matches_with_grads(lambda t: interpolate(t["x"], size, mode, align_corners, backend=backend),
                                  lambda t: F.interpolate(t["x"], size=size, mode=mode, align_corners=align_corners),
                                  dict(x=x), seed, tol=1e-12)


def test_bad_arguments_raise():
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="mode"):
        interpolate(x, (6, 6), "bicubic")
    with pytest.raises(ValueError, match="align_corners"):
        interpolate(x, (6, 6), "nearest", align_corners=False)
    with pytest.raises(TypeError, match="size"):
        interpolate(x, 6, "bilinear")


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_scale_factor_as_f_interpolate(mode):
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    for s in (2, 3.0, (2, 3), 0.5):
        expect = F.interpolate(x, scale_factor=s, mode=mode, recompute_scale_factor=True)
        got = interpolate(x, scale_factor=s, mode=mode, backend="torch")
        assert got.shape == expect.shape and (got - expect).abs().max() < 1e-12, s
    with pytest.raises(ValueError, match="exactly one of size and scale_factor"):
        interpolate(x, (4, 4), scale_factor=2)
    with pytest.raises(ValueError, match="scale_factor must be"):
        interpolate(x, scale_factor=-1.0)
