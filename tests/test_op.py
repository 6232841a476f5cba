"""The Triton kernels and the torch path compute the eager reference's output (LDA-AQU's sampling and
attention steps)."""
import math

import pytest
import torch

from helpers import fresh_seed, make_problem, rel_err, slow_except, upcast
from lda_aqu.upsampler import deformable_local_attention, deformable_local_attention_ref

# (B, D, C, H, W, scale, G, nh, k_u, spread): every k_u, G, nh and scale of the issue, odd sizes
CASES = {
    "default": (1, 8, 16, 5, 7, 2, 2, 1, 3, 3.0),
    "k_u=1": (2, 8, 8, 4, 5, 3, 1, 2, 1, 2.0),
    "k_u=5,G=4,nh=4,s=1.5": (1, 16, 16, 5, 4, 1.5, 4, 4, 5, 4.0),
    "k_u=7,G=2,nh=4": (1, 8, 16, 3, 5, 2, 2, 4, 7, 3.0),
    "heads cross groups unevenly": (1, 12, 24, 4, 3, 2, 2, 3, 3, 3.0),
    "G=4,nh=2,s=3": (1, 8, 8, 3, 3, 3, 4, 2, 3, 3.0),
    "far outside the map": (1, 8, 8, 6, 5, 2, 4, 1, 3, 40.0),
    "Ho=1": (2, 8, 16, 1, 6, 1.5, 2, 2, 3, 3.0),
    "Wo=1": (1, 8, 8, 5, 1, 1.5, 1, 1, 5, 3.0),
}
# fp32 accumulation everywhere; half types only round inputs (exact in float64) and the output
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def run(t, kw, backend, **extra):
    return deformable_local_attention(t["q"], t["k"], t["v"], t["offset"], t["rpb"], backend=backend, **kw, **extra)


BACKENDS = ["triton", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", slow_except(list(TOL), torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("case", slow_except(list(CASES), "default"))
def test_forward_matches_reference(case, dtype, backend):
    seed = fresh_seed()
    t, kw = make_problem(*CASES[case], dtype=dtype, seed=seed, rpb=seed % 2 == 0)
    out = run(t, kw, backend)
    ref = run(upcast(t), kw, "reference")
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) < TOL[dtype], f"seed={seed}"


@pytest.mark.parametrize("rpb", [True, False])
def test_forward_int64_indexing_path(rpb):
    """The int64 offsets used past 2**31 elements compute the same thing (forced on a small map)."""
    from lda_aqu.kernels.launchers import Spec, upsample_fwd
    seed = fresh_seed()
    t, kw = make_problem(*CASES["default"], seed=seed, rpb=rpb)
    spec = Spec(kw["num_groups"], kw["num_heads"], 9, scale=(8 // kw["num_heads"]) ** -0.5)
    out, attn = upsample_fwd(t["v"], t["q"].shape[2:], spec, t["offset"], t["q"], t["k"], t["rpb"], force_int64=True)
    ref = run(t, kw, "reference")
    assert rel_err(out, ref) < 1e-12, f"seed={seed}"
    assert torch.allclose(attn.sum(2), torch.ones(()).double())


def test_int64_is_chosen_past_int32():
    from lda_aqu.kernels.launchers import _needs_int64
    assert not _needs_int64(torch.empty(2, 256, 4096, 2047, device="meta"))
    assert _needs_int64(torch.empty(2, 256, 4096, 2049, device="meta"))  # > 2**31 in one batch element
    assert not _needs_int64(torch.empty(2**20, 16, 16, 16, device="meta"))  # batch offsets are int64 anyway


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_forward_any_input_layout(layout, backend):
    seed = fresh_seed()
    t, kw = make_problem(*CASES["default"], seed=seed)
    ref = run(t, kw, "reference")
    if layout == "channels_last":
        t = {n: x.contiguous(memory_format=torch.channels_last) if x is not None and x.dim() == 4 else x
             for n, x in t.items()}
    else:  # every map a view into a larger buffer
        t = {n: torch.stack([x, -x], -1).flatten(-2)[..., ::2] if x is not None and x.dim() == 4 else x for n, x in t.items()}
    assert rel_err(run(t, kw, backend), ref) < 1e-12, f"seed={seed}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_and_far_offsets_read_zeros(backend):
    seed = fresh_seed()
    t, kw = make_problem(*CASES["default"], seed=seed)
    t["offset"][0, 0, 2, 3] = float("nan")  # y of neighbour 0, group 0, at one pixel
    out = run(t, kw, backend)
    ref = run(t, kw, "reference")
    nan = torch.isnan(out)
    assert torch.equal(nan, torch.isnan(ref)) and nan[0, :, 2, 3].all() and nan.sum() == out.shape[1]
    assert rel_err(out.nan_to_num(), ref.nan_to_num()) < 1e-12

    t["offset"] = torch.full_like(t["offset"], 1e6)  # every sample far outside: values read as 0
    assert run(t, kw, backend).abs().max() == 0
    t["offset"] = torch.full_like(t["offset"], -1e30)
    assert run(t, kw, backend).abs().max() == 0


@pytest.mark.slow
def test_default_scale_is_head_width():
    seed = fresh_seed()
    t, kw = make_problem(*CASES["k_u=7,G=2,nh=4"], seed=seed)
    out = run(t, kw, "triton")
    assert rel_err(out, run(t, kw, "triton", scale=(8 // 4) ** -0.5)) == 0
    assert rel_err(out, run(t, kw, "triton", scale=1.0)) > 1e-3


def test_groups_inferred_from_offset_and_rpb():
    seed = fresh_seed()
    t, kw = make_problem(*CASES["default"], seed=seed)
    ref = run(t, kw, "reference")
    inferred = deformable_local_attention(t["q"], t["k"], t["v"], t["offset"], t["rpb"], backend="triton")
    assert rel_err(inferred, ref) < 1e-12


def test_reference_matches_the_formula_at_one_pixel():
    """The reference itself against the op's formula written out for one output pixel in plain loops."""
    seed = fresh_seed()
    B, D, C, H, W, s, G, nh, k_u, _ = CASES["heads cross groups unevenly"]
    t, kw = make_problem(B, D, C, H, W, s, G, nh, k_u, seed=seed)
    out = deformable_local_attention_ref(t["q"], t["k"], t["v"], t["offset"], t["rpb"], num_heads=nh,
                                         num_groups=G, scale=(D // nh) ** -0.5)
    Ho, Wo = int(H * s), int(W * s)
    y, x, K = Ho - 2, 1, k_u * k_u

    def sample(feat, iy, ix):  # bilinear, zeros outside
        acc = torch.zeros(feat.shape[0], dtype=torch.float64)
        for yy in (math.floor(iy), math.floor(iy) + 1):
            for xx in (math.floor(ix), math.floor(ix) + 1):
                if 0 <= yy < H and 0 <= xx < W:
                    acc += (1 - abs(iy - yy)) * (1 - abs(ix - xx)) * feat[:, yy, xx]
        return acc
    ks = torch.zeros(K, D)
    vs = torch.zeros(K, C)
    for g in range(G):
        for n in range(K):
            oy, ox = t["offset"][0, g * 2 * K + 2 * n, y, x], t["offset"][0, g * 2 * K + 2 * n + 1, y, x]
            iy, ix = (y + oy.item()) * (H - 1) / (Ho - 1), (x + ox.item()) * (W - 1) / (Wo - 1)
            ks = ks.double()
            vs = vs.double()
            ks[n, g * D // G:(g + 1) * D // G] = sample(t["k"][0, g * D // G:(g + 1) * D // G], iy, ix)
            vs[n, g * C // G:(g + 1) * C // G] = sample(t["v"][0, g * C // G:(g + 1) * C // G], iy, ix)
    for h in range(nh):
        qs = t["q"][0, h * D // nh:(h + 1) * D // nh, y, x]
        logits = torch.stack([(qs * (ks[n, h * D // nh:(h + 1) * D // nh] + t["rpb"][h, n])).sum()
                              for n in range(K)]) * (D // nh) ** -0.5
        expect = logits.softmax(0) @ vs[:, h * C // nh:(h + 1) * C // nh]
        assert torch.allclose(out[0, h * C // nh:(h + 1) * C // nh, y, x], expect, rtol=1e-12, atol=1e-12)
