"""`local_upsample` beyond LDA-AQU: every weight mode, coordinate rule and padding through the kernels
against the eager reference (float64), the deterministic backward for each, and argument checks."""
import pytest
import torch

from helpers import fresh_seed, mode_problem, rel_err, run_op, seeded_randn, slow_except
from lda_aqu.kernels.launchers import Config
from lda_aqu.upsampler import local_upsample

# name: (mode, coords, padding, offsets?, kernel_size, G, nh, K); C=8, 5x7 -> 10x13
MODES = {
    "logits, nearest, window (CARAFE)": ("logits", "nearest", "zeros", False, 3, 1, 2, 9),
    "unit, half-pixel, border, offsets (DySample)": ("unit", "half_pixel", "border", True, None, 4, 1, 1),
    "given weights, half-pixel, border, offsets": ("weights", "half_pixel", "border", True, None, 2, 4, 4),
    "attention, nearest, window": ("attention", "nearest", "zeros", False, 3, 1, 2, 9),
    "attention, align-corners, border, window + offsets": ("attention", "align_corners", "border", True, 3, 2, 1, 9),
}


SMALL = (2, 8, 8, 3, 4, 6, 7)  # (B, C, D, H, W, Ho, Wo)


@pytest.mark.parametrize("name", list(MODES))
def test_mode_matches_reference_and_is_deterministic(name, force_int64):
    """The forward and both backwards against the reference, the atomic one and one deterministic one
    with 64-bit indices (forward, backward, gather and drpb kernels); the deterministic backward in
    int32 repeats the int64 one bit for bit (index width changes no arithmetic)."""
    seed = fresh_seed()
    t, kw, size = mode_problem(*MODES[name], seed=seed, dims=SMALL)
    dout = seeded_randn(2, 8, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref, ref_grads = run_op(t, kw, size, "reference", dout)
    force_int64["on"] = True
    out, grads = run_op(t, kw, size, "triton", dout)
    assert rel_err(out, ref) < 1e-12, f"seed={seed}"
    for n in grads:
        assert rel_err(grads[n], ref_grads[n]) < 1e-10, f"d{n}, seed={seed}"
    first = run_op(t, kw, size, "triton", dout, deterministic=True)[1]
    force_int64["on"] = False
    second = run_op(t, kw, size, "triton", dout, deterministic=True)[1]
    for n in grads:
        assert torch.equal(first[n], second[n]), f"d{n} differs between runs, seed={seed}"
        assert rel_err(first[n], ref_grads[n]) < 1e-10, f"d{n}, seed={seed}"


# configurations a sweep may pick, unlike the defaults: channel loops of several chunks (segments of 4
# channels here, or 2 where heads split the groups), the last chunk masked, strided (not channels-last)
# copies, narrow pixel tiles, 8 and 2 warps
CONFIGS = {
    "logits, nearest, window (CARAFE)": Config(block_p=16, block_d=2, block_c=2, num_warps=8, channels_last=False),
    "unit, half-pixel, border, offsets (DySample)": Config(block_p=32, block_d=2, block_c=2, num_warps=2),
    "given weights, half-pixel, border, offsets": Config(block_p=16, block_d=2, block_c=1, num_warps=8,
                                                          channels_last=False),
    "attention, nearest, window": Config(block_p=16, block_d=2, block_c=2, num_warps=8, channels_last=False),
    "attention, align-corners, border, window + offsets": Config(block_p=32, block_d=2, block_c=4, num_warps=8,
                                                                 num_stages=2),
}


@pytest.mark.parametrize("name", slow_except(list(CONFIGS), "attention, align-corners, border, window + offsets"))
def test_non_default_configs_compute_the_same(name, monkeypatch):
    """Forward and both backwards of each mode under a configuration the defaults never use."""
    import lda_aqu.upsampler.function as Fn
    monkeypatch.setattr(Fn, "_config", lambda *a, **k: CONFIGS[name])
    seed = fresh_seed()
    t, kw, size = mode_problem(*MODES[name], seed=seed, dims=SMALL)
    dout = seeded_randn(2, 8, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref, ref_grads = run_op(t, kw, size, "reference", dout)
    for deterministic in (False, True):
        out, grads = run_op(t, kw, size, "triton", dout, deterministic=deterministic)
        assert rel_err(out, ref) < 1e-12, f"seed={seed}"
        for n in grads:
            assert rel_err(grads[n], ref_grads[n]) < 1e-10, f"d{n}, deterministic={deterministic}, seed={seed}"


@pytest.mark.parametrize("dtype", slow_except([torch.float32, torch.bfloat16], torch.bfloat16), ids=str)
def test_low_precision_accumulates_in_fp32(dtype):
    seed = fresh_seed()
    t, kw, size = mode_problem(*MODES["logits, nearest, window (CARAFE)"], seed=seed, dtype=dtype)
    out = local_upsample(t.pop("v"), size, backend="triton", **t, **kw)
    t64, _, _ = mode_problem(*MODES["logits, nearest, window (CARAFE)"], seed=seed, dtype=dtype)
    ref = local_upsample(t64.pop("v").double(), size, backend="reference", **{n: x.double() for n, x in t64.items()},
                         **kw)
    assert out.dtype == dtype and rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2), f"seed={seed}"


def good(**change):
    a = dict(v=torch.randn(1, 8, 4, 5), size=(8, 10), offset=torch.randn(1, 4, 8, 10), num_groups=2,
             coords="half_pixel", padding="border", backend="triton")
    a.update(change)
    return a


BAD = {
    "v not a tensor": (dict(v=[1.0]), TypeError, "v must be a torch.Tensor"),
    "v 3-D": (dict(v=torch.randn(8, 4, 5)), ValueError, "v must be 4-D"),
    "size": (dict(size=(8,)), TypeError, "size must be a pair"),
    "size float": (dict(size=(8.0, 10)), TypeError, "size must be a pair"),
    "size zero": (dict(size=(0, 10)), ValueError, "size must be positive, got height 0"),
    "coords": (dict(coords="bicubic"), ValueError, "coords must be one of"),
    "padding": (dict(padding="reflect"), ValueError, "padding must be one of"),
    "offset size": (dict(offset=torch.randn(1, 4, 8, 9)), ValueError, "offset is"),
    "offset dtype": (dict(offset=torch.randn(1, 4, 8, 10, dtype=torch.float64)), ValueError, "offset has dtype"),
    "offset groups": (dict(num_groups=3), ValueError, "offset has 4 channels"),
    "q without k": (dict(q=torch.randn(1, 4, 8, 10)), ValueError, "q and k go together"),
    "rpb without q": (dict(rpb=torch.randn(1, 1, 4)), ValueError, "rpb is a bias"),
    "two weightings": (dict(logits=torch.randn(1, 1, 1, 8, 10), weights=torch.randn(1, 1, 1, 8, 10)), ValueError,
                       "at most one way"),
    "logits 4-D": (dict(logits=torch.randn(1, 1, 8, 10)), ValueError, "logits must be 5-D"),
    "logits K": (dict(logits=torch.randn(1, 1, 9, 8, 10)), ValueError, "offset has 4 channels"),
    "weights heads": (dict(weights=torch.randn(1, 3, 1, 8, 10)), ValueError, "num_heads=3 must divide"),
    "kernel_size even": (dict(kernel_size=2), ValueError, "kernel_size must be"),
    "K without placement": (dict(offset=None, num_groups=None, logits=torch.randn(1, 1, 9, 8, 10)), ValueError,
                            "neither offset nor kernel_size"),
    "backend": (dict(backend="cuda"), ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_argument_raises(name):
    change, err, match = BAD[name]
    a = good(**change)
    with pytest.raises(err, match=match):
        local_upsample(a.pop("v"), a.pop("size"), **a)


def test_good_arguments_run():
    a = good()
    assert local_upsample(a.pop("v"), a.pop("size"), **a).shape == (1, 8, 8, 10)
