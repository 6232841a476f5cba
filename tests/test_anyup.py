"""AnyUp against a float64 re-derivation of the whole official forward (encoders, RoPE, feature
unification, the dense attention with AnyUp's boolean window mask, lda_aqu/upsampler/official_anyup.py):
forward and the gradients of the image, the features and every parameter; official state dicts; errors."""
import pytest
import torch
from torch.func import functional_call

from helpers import assert_matches_with_grads, fresh_seed, rel_err, seeded_randn, slow_except
from lda_aqu.upsampler import AnyUp, local_upsample
from lda_aqu.upsampler.official_anyup import dense_window_attention, official_forward, official_state_dict

# small channel counts (GroupNorm's 8 groups bound them below); lfu_dim != qk_dim exercises the shortcut conv
ARCH = dict(input_dim=3, qk_dim=8, kernel_size=3, kernel_size_lfu=3, num_heads=2, lfu_dim=16)
C_FEAT = 5

# name -> (image-to-feature ratio, feature (h, w), window_ratio, output_size or None for the image's)
CASES = {
    "x2": (2, (3, 5), 0.1, None),
    "x7": (7, (4, 3), 0.3, None),
    "x8": (8, (3, 5), 0.1, None),
    "x14": (14, (3, 4), 0.25, None),
    "x16": (16, (3, 5), 0.1, None),
    "x2,global": (2, (4, 6), 0.0, None),
    "x5,other size": (5, (3, 4), 0.2, (11, 23)),
}


def _state_dict(seed):
    arch = {n: v for n, v in ARCH.items() if n != "num_heads"}
    return {n: t.double() for n, t in official_state_dict(**arch, seed=seed).items()}


def _problem(ratio, hw, seed):
    g = torch.Generator().manual_seed(seed + 1)
    image = seeded_randn(2, ARCH["input_dim"], ratio * hw[0], ratio * hw[1], dtype=torch.float64, generator=g)
    features = seeded_randn(2, C_FEAT, *hw, dtype=torch.float64, generator=g)
    return image, features


def _check_against_official(backend, name):
    seed = fresh_seed()
    ratio, hw, r, size = CASES[name]
    m = AnyUp(**ARCH, window_ratio=r, backend=backend).double()
    sd = _state_dict(seed)
    m.load_state_dict(sd, strict=True)
    image, features = _problem(ratio, hw, seed)
    # the value and output projections of the official nn.MultiheadAttention take no part (theirs neither)
    params = {n: p for n, p in m.named_parameters() if ".out_proj." not in n}
    out = assert_matches_with_grads(
        lambda t: functional_call(m, {n: t[n] for n in params}, (t["image"], t["features"], size)),
        lambda t: official_forward(dict(sd, **{n: t[n] for n in params}), t["image"], t["features"], size,
                                   num_heads=ARCH["num_heads"], window_ratio=r),
        dict(params, image=image, features=features), seed)
    assert out.shape == (2, C_FEAT, *(size or image.shape[-2:]))


# the reference backend is an eager loop: one fast case (a non-integer ratio), the rest in the slow tier
@pytest.mark.parametrize("backend, name", slow_except(
    [(b, n) for b in ("reference", "torch") for n in CASES],
    ("reference", "x5,other size"), *[("torch", n) for n in ("x2", "x7", "x2,global", "x5,other size")]))
def test_matches_official(backend, name):
    _check_against_official(backend, name)


@pytest.mark.slow
def test_matches_official_triton():
    _check_against_official("triton", "x2")


def test_official_state_dict_loads():
    """The official keys (wimmerth/anyup's AnyUp, use_natten=False) and nothing else, for the default
    architecture too; a missing or an extra key fails strict loading."""
    for arch in (dict(), {n: v for n, v in ARCH.items() if n != "num_heads"}):
        sd = official_state_dict(**arch)
        m = AnyUp(**arch)
        assert set(m.state_dict()) == set(sd)
        m.load_state_dict(sd, strict=True)
        assert all(torch.equal(t, sd[n]) for n, t in m.state_dict().items())
    missing = dict(sd)
    del missing["cross_decode.cross_attn.norm_k.weight"]
    with pytest.raises(RuntimeError, match="norm_k.weight"):
        m.load_state_dict(missing, strict=True)
    with pytest.raises(RuntimeError, match="rope.inv_freq"):
        m.load_state_dict(dict(sd, **{"rope.inv_freq": torch.ones(4)}), strict=True)
    assert "key_features_encoder.1.shortcut.weight" in sd  # lfu_dim != qk_dim


def test_op_is_the_dense_window_attention():
    """The op's window_ratio / average_heads case alone against the dense masked attention, on a ratio
    and window that cut rows unevenly (window edges between query centres)."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    for (H, W), (Ho, Wo), r, nh in (((5, 7), (17, 9), 0.15, 2), ((3, 4), (3, 4), 0.34, 4), ((6, 2), (11, 23), 0.0, 1)):
        q = seeded_randn(2, 8, Ho, Wo, dtype=torch.float64, generator=g)
        k = seeded_randn(2, 8, H, W, dtype=torch.float64, generator=g)
        v = seeded_randn(2, 3, H, W, dtype=torch.float64, generator=g)
        ref = dense_window_attention(q, k, v, nh, r)
        got = local_upsample(v, (Ho, Wo), q=q, k=k, num_heads=nh, scale=(8 // nh) ** -0.5,
                             window_ratio=r if r > 0 else 1.0, average_heads=True, backend="reference")
        assert rel_err(got, ref) < 1e-12, f"{(H, W, Ho, Wo, r)}, seed={seed}"


def test_empty_batch():
    m = AnyUp(**ARCH).double()
    image = torch.randn(0, 3, 8, 10, dtype=torch.float64, requires_grad=True)
    features = torch.randn(0, C_FEAT, 2, 3, dtype=torch.float64, requires_grad=True)
    out = m(image, features, (5, 4))
    assert out.shape == (0, C_FEAT, 5, 4)
    out.sum().backward()
    assert features.grad.shape == features.shape and m.rope.freqs.grad is not None


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(qk_dim=12), ValueError, "qk_dim"),
    (dict(qk_dim=16, num_heads=3), ValueError, "qk_dim"),
    (dict(qk_dim=0), ValueError, "qk_dim"),
    (dict(lfu_dim=12), ValueError, "lfu_dim"),
    (dict(kernel_size_lfu=4), ValueError, "kernel_size_lfu"),
    (dict(kernel_size_lfu=1, init_gaussian_derivatives=True), ValueError, "kernel_size_lfu"),
    (dict(input_dim=2.0), ValueError, "input_dim"),
    (dict(window_ratio=float("nan")), ValueError, "window_ratio"),
    (dict(window_ratio="0.1"), ValueError, "window_ratio"),
    (dict(init_gaussian_derivatives=1), ValueError, "init_gaussian_derivatives"),
    (dict(use_natten=True), NotImplementedError, "use_natten"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        AnyUp(**dict(dict(qk_dim=8, num_heads=2), **kwargs))


def test_bad_inputs():
    m = AnyUp(**ARCH)
    image, features = torch.randn(1, 3, 8, 10), torch.randn(1, C_FEAT, 2, 3)
    for args, error, match in (
            ((image[:, :2], features), ValueError, "image"),
            ((image, features[0]), ValueError, "features"),
            ((image, features.expand(2, -1, -1, -1)), ValueError, "batch"),
            ((image.double(), features), TypeError, "image"),
            ((image, features.long()), TypeError, "features"),
            ((image, features.numpy()), TypeError, "features"),
            ((image, features, (0, 4)), ValueError, "output_size"),
            ((image, features, (4,)), TypeError, "output_size"),
            ((image, features, (4.0, 3)), TypeError, "output_size")):
        with pytest.raises(error, match=match):
            m(*args)
