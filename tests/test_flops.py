"""FlopCounterMode counts the library's custom ops by their arithmetic, and upsampler.profile adds
them to the convolutions: each count checked against sizes multiplied out here."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lda_aqu.upsampler as upsampler
from helpers import seeded_randn
from lda_aqu.upsampler import LDAAQU, deformable_local_attention


def expected_op_flops(B, C, D, Ho, Wo, K, rpb):
    # per output pixel and sample: each value and key channel is a bilinear blend of 4 corners
    # (4 multiply-adds) and one more multiply-add (the weighted sum, the dot with q); rpb adds q . rpb_n
    macs_per_sample = C * (4 + 1) + D * (4 + 1) + (D if rpb else 0)
    return 2 * macs_per_sample * K * Ho * Wo * B


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rpb", [True, False])
def test_flop_counter_counts_the_op(backend, rpb):
    import lda_aqu.upsampler.flops  # noqa: F401  registers the formulas
    B, C, D, H, W, Ho, Wo, G, k_u = 2, 8, 4, 3, 4, 6, 7, 2, 3
    K = k_u * k_u
    g = torch.Generator().manual_seed(0)
    q, k = seeded_randn(B, D, Ho, Wo, generator=g), seeded_randn(B, D, H, W, generator=g)
    v, off = seeded_randn(B, C, H, W, generator=g), seeded_randn(B, G * 2 * K, Ho, Wo, generator=g)
    bias = seeded_randn(1, K, D, generator=g) if rpb else None
    ts = [t.requires_grad_() for t in (q, k, v, off)]
    with FlopCounterMode(display=False) as fwd:
        out = deformable_local_attention(*ts, bias, num_groups=G, backend=backend)
    with FlopCounterMode(display=False) as bwd:
        out.sum().backward()
    want = expected_op_flops(B, C, D, Ho, Wo, K, rpb)
    assert fwd.get_total_flops() == want
    assert bwd.get_total_flops() == 2 * want


def test_profile_adds_the_op_to_the_convolutions():
    C, H, W, s, k_u, G = 16, 5, 6, 2, 5, 2
    m = LDAAQU(C, scale_factor=s, k_u=k_u, n_groups=G, backend="torch")
    D, Ho, Wo, K = C // 4, H * s, W * s, k_u * k_u
    convs = (2 * (2 * C * D * H * W)  # proj_q and proj_k, 1x1
             + 2 * 9 * D * Ho * Wo  # the depth-wise 3x3 conv of q
             + 2 * (D // G) * 9 * 2 * K * Ho * Wo * G)  # the offset conv, 3x3, per group
    got = upsampler.profile(m, (1, C, H, W))
    assert got["params"] == sum(p.numel() for p in m.parameters())
    assert got["gflops"] * 1e9 == pytest.approx(convs + expected_op_flops(1, C, D, Ho, Wo, K, True), rel=1e-12)
    with pytest.raises(ValueError, match="input_shape"):
        upsampler.profile(m, (1, C, 0, W))
