"""The interpreter harness of jit_semantics.py catches what a compiled launch would do differently, and
every kernel, weight mode and backward passes under it: fp32 and fp64, 64-bit indices forced, one-pixel
outputs included, against the float64 reference."""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import jit_semantics
from helpers import fresh_seed, mode_problem, rel_err, run_op, seeded_randn
from jit_semantics import JitSemanticsError
from lda_aqu.kernels.launchers import split_float

pytestmark = pytest.mark.skipif(not jit_semantics.enabled() or torch.cuda.is_available(),
                                reason="the harness patches the interpreter (LDA_AQU_JIT_SEMANTICS=0 turns it off)")


@triton.jit
def _copy_kernel(x, y, n, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + o + SHIFT, tl.load(x + o, mask=o < n), mask=o < n)


@triton.jit
def _neighbour_kernel(x, n, BLOCK: tl.constexpr):
    # reads the next program's tile after writing its own
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x + o, tl.load(x + o + BLOCK, mask=o + BLOCK < n, other=0.), mask=o < n)


@triton.jit
def _same_row_kernel(x, BLOCK: tl.constexpr):
    tl.store(x + tl.arange(0, BLOCK), tl.full([BLOCK], 1., tl.float32) * tl.program_id(0))


@triton.jit
def _scaled_kernel(x, y, scale):
    tl.store(y, tl.load(x) * scale)


@triton.jit
def _widen_kernel(y, P):
    tl.store(y, P.to(tl.int64))


@triton.jit(do_not_specialize=["P"])
def _widen_unspecialised_kernel(y, P):
    tl.store(y, P.to(tl.int64))


@triton.jit
def _math_kernel(a, b, q, q_rn, e, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    x, z = tl.load(a + o), tl.load(b + o)
    tl.store(q + o, x / z)
    tl.store(q_rn + o, tl.math.div_rn(x, z))
    tl.store(e + o, tl.exp(x))


@triton.jit
def _count_then_read_kernel(x):
    tl.atomic_add(x, 1., sem="relaxed")
    tl.store(x + 1 + tl.program_id(0), tl.load(x))


@triton.jit
def _arrival_kernel(x, y):
    tl.store(y + tl.program_id(0), tl.atomic_add(x, 1., sem="relaxed"))


def test_out_of_bounds_access_is_caught():
    x, y = torch.randn(40), torch.full((40,), float("nan"))
    _copy_kernel[(3,)](x, y, 40, SHIFT=0, BLOCK=16)
    assert torch.equal(x, y)
    with pytest.raises(JitSemanticsError, match="_copy_kernel.*stores 1 element"):
        _copy_kernel[(3,)](x, y, 40, SHIFT=1, BLOCK=16)
    with pytest.raises(JitSemanticsError, match="loads 8 element"):
        _copy_kernel[(3,)](x[:32], y, 40, SHIFT=0, BLOCK=16)


def test_cross_program_races_are_caught():
    with pytest.raises(JitSemanticsError, match="_neighbour_kernel.*written by one program and read"):
        _neighbour_kernel[(4,)](torch.randn(64), 64, BLOCK=16)
    with pytest.raises(JitSemanticsError, match="_same_row_kernel"):
        _same_row_kernel[(2,)](torch.zeros(8), BLOCK=8)
    with pytest.raises(JitSemanticsError, match="_count_then_read_kernel"):  # an atomic read by other programs
        _count_then_read_kernel[(4,)](torch.zeros(5))
    y = torch.zeros(8)
    _arrival_kernel[(8,)](torch.zeros(1), y)  # atomics alone do not race
    assert sorted(y.tolist()) == list(range(8))


def test_programs_run_in_a_random_order():
    orders = set()
    for _ in range(4):
        y = torch.zeros(8)
        _arrival_kernel[(8,)](torch.zeros(1), y)
        orders.add(tuple(y.tolist()))
    assert len(orders) > 1


def test_float_arguments_are_fp32_and_split_floats_are_not():
    x = torch.ones(1, dtype=torch.float64)
    y = torch.full((1,), float("nan"), dtype=torch.float64)
    scale = 3 ** -0.5
    _scaled_kernel[(1,)](x, y, scale)
    assert y.item() == float(np.float32(scale)) != scale
    hi, lo = split_float(scale)
    assert abs((hi + lo) - scale) <= 2 ** -46 * scale


def test_an_int_equal_to_one_is_a_constant():
    y = torch.zeros(1, dtype=torch.int64)
    _widen_kernel[(1,)](y, 2)
    assert y.item() == 2
    with pytest.raises(Exception, match="'constexpr' object has no attribute 'to'"):
        _widen_kernel[(1,)](y, 1)
    _widen_unspecialised_kernel[(1,)](y, 1)
    assert y.item() == 1


def test_fp32_division_and_exp_are_approximate_and_div_rn_exact():
    a, b = torch.randn(256) * 3, torch.rand(256) + 0.5
    q, q_rn, e = (torch.full((256,), float("nan")) for _ in range(3))
    _math_kernel[(1,)](a, b, q, q_rn, e, BLOCK=256)
    exact = (a.double() / b.double()).float()
    assert torch.equal(q_rn, exact)
    ulps = (q.view(torch.int32) - exact.view(torch.int32)).abs()
    assert ulps.max() == 1 and 0.2 < (ulps == 1).float().mean() < 0.8
    assert rel_err(e, a.double().exp()) < 1e-6 and not torch.equal(e, a.exp())


# the kernels' modes (as tests/test_op_modes.py): (mode, coords, padding, offsets?, kernel_size, G, nh, K)
MODES = {
    "attention, align-corners, window + offsets": ("attention", "align_corners", "zeros", True, 3, 2, 2, 9),
    "attention, nearest, window": ("attention", "nearest", "zeros", False, 3, 1, 1, 9),
    "logits, nearest, window (CARAFE)": ("logits", "nearest", "zeros", False, 3, 1, 2, 9),
    "given weights, half-pixel, border, offsets": ("weights", "half_pixel", "border", True, None, 2, 2, 2),
    "unit, half-pixel, border, offsets": ("unit", "half_pixel", "border", True, None, 2, 1, 2),
    "unit, align-corners, no offsets (bilinear)": ("unit", "align_corners", "zeros", False, None, 1, 1, 1),
}
# (B, C, D, H, W, Ho, Wo): a map, a one-pixel output, a one-row output
SIZES = {"3x4->5x7": (1, 4, 4, 3, 4, 5, 7), "3x4->1x1": (1, 4, 4, 3, 4, 1, 1), "2x3->1x5": (1, 4, 4, 2, 3, 1, 5)}
# (output, gradients): float64 holds the suite's bounds; fp32 against float64, under the harness's
# approximate division and exp, was at worst 3.2e-7 / 2.7e-7 over 40 seeds of each case (measured
# here, forward and both backwards): 5e-6 leaves a margin of 15
TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (5e-6, 5e-6)}


# every mode in fp32 on a map and in float64 at a one-pixel output (tests/test_op_modes.py runs the
# float64 maps under the same harness); one-row outputs for the two coordinate rules with a ratio
CASES = [(n, "3x4->5x7", torch.float32) for n in MODES] + [(n, "3x4->1x1", torch.float64) for n in MODES] + [
    (n, "2x3->1x5", d) for n, d in (("attention, align-corners, window + offsets", torch.float64),
                                    ("unit, half-pixel, border, offsets", torch.float32))]


@pytest.mark.parametrize("name,size,dtype", CASES, ids=[f"{n}-{s}-{d}" for n, s, d in CASES])
def test_kernels_match_the_reference_under_jit_semantics(name, size, dtype, force_int64):
    """Forward, atomic backward and deterministic backward (gather and drpb kernels), every index 64-bit."""
    force_int64["on"] = True
    seed = fresh_seed()
    # offsets 1e-2 off the pixel edges, where the bilinear derivative jumps (helpers.off_pixel_edges)
    t, kw, out_size = mode_problem(*MODES[name], seed=seed, dtype=dtype, dims=SIZES[size], spread=1.5, margin=1e-2)
    dout = seeded_randn(1, 4, *out_size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref, ref_grads = run_op({n: x.double() for n, x in t.items()}, kw, out_size, "reference", dout)
    tol_out, tol_grad = TOL[dtype]
    for deterministic in (False, True):
        out, grads = run_op(t, kw, out_size, "triton", dout, deterministic)
        assert out.dtype == dtype and rel_err(out, ref) < tol_out, f"seed={seed}"
        for n in grads:
            assert grads[n].dtype == dtype, n
            # relative to dout where the exact gradient is 0 (one-pixel align-corners outputs sample one
            # position K times: the softmax does not depend on q, and the reference's dq is rounding)
            err = (grads[n].double() - ref_grads[n]).norm() / max(ref_grads[n].norm(), dout.norm())
            assert err < tol_grad, f"d{n}, deterministic={deterministic}, seed={seed}"
