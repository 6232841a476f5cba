"""NAF against the official forward re-derived in float64 (lda_aqu/upsampler/official_naf.py: encoders,
RoPE, k and v copied to the output size, NATTEN's dilated neighbourhood attention): forward and every
gradient at exact-multiple sizes; official state dicts; that re-derivation against NATTEN's window rule
and, where NATTEN is installed, against NATTEN itself."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from helpers import assert_matches_with_grads, backends_under_test, fresh_seed, rel_err, seeded_randn
from lda_aqu.upsampler import NAF, local_upsample
from lda_aqu.upsampler.official_naf import (dilated_neighborhood_attention, natten_windows, official_attention,
                                            official_forward, official_state_dict)

BACKENDS = ("reference",) + backends_under_test()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
SMALL = dict(dim=32, heads_attn=2, heads_rope=2)

# features (h, w) and their channels, output = (h * ry, w * rx), kernel_size, image (H, W), img_layers
CASES = {
    "r2,k3": ((5, 4), 8, (2, 2), 3, (48, 44), 1),  # image > 4x the output: resized to (32, 32) first
    "r7,k5": ((6, 5), 8, (7, 7), 5, (40, 30), 1),
    "r8x2,k3": ((4, 6), 4, (8, 2), 3, (30, 14), 2),
    "r8,k3": ((4, 3), 8, (8, 8), 3, (30, 26), 1),
    "r14,k3": ((3, 4), 4, (14, 14), 3, (36, 50), 1),
    "r16,k5": ((5, 6), 4, (16, 16), 5, (64, 70), 1),
}
FAST = {"reference": ("r2,k3", "r7,k5", "r8x2,k3"), "torch": ("r2,k3", "r8x2,k3"), "triton": ("r2,k3",)}
# the interpreter takes minutes per launch on the larger maps: it runs the small ones only
INTERPRETED_TRITON = ("r2,k3", "r8x2,k3")


def problem(name, seed, dtype=torch.float64):
    (h, w), C, (ry, rx), ks, (H, W), layers = CASES[name]
    g = torch.Generator().manual_seed(seed)
    image = seeded_randn(2, 3, H, W, generator=g, dtype=dtype)
    features = seeded_randn(2, C, h, w, generator=g, dtype=dtype)
    sd = official_state_dict(dim=32, heads_rope=2, img_layers=layers, seed=seed)
    return image, features, (h * ry, w * rx), ks, layers, sd


@pytest.mark.parametrize("backend,name", [(b, n) if n in FAST[b] else pytest.param(b, n, marks=pytest.mark.slow)
                                          for b in BACKENDS for n in CASES
                                          if b != "triton" or not INTERPRETED or n in INTERPRETED_TRITON])
def test_matches_official_forward_and_backward(backend, name):
    seed = fresh_seed()
    image, features, size, ks, layers, sd = problem(name, seed)
    m = NAF(**SMALL, kernel_size=ks, img_layers=layers, backend=backend)
    m.load_state_dict(sd, strict=True)
    m = m.double().eval()
    params = dict(m.named_parameters())
    out = assert_matches_with_grads(
        lambda t: functional_call(m, {n: t[n] for n in params}, (t["image"], t["features"], size)),
        lambda t: official_forward(dict(t, **{"image_encoder.rope.periods": sd["image_encoder.rope.periods"]}),
                                   t["image"], t["features"], size, heads_attn=2, heads_rope=2, kernel_size=ks,
                                   img_layers=layers),
        dict(params, image=image, features=features), seed)
    assert out.shape == (2, features.shape[1], *size)


def test_state_dict_is_official():
    sd = official_state_dict(dim=32, heads_rope=2, img_layers=2)
    m = NAF(**SMALL, img_layers=2, kernel_size=3)
    assert set(m.state_dict()) == set(sd)
    m.load_state_dict(sd, strict=True)
    assert torch.equal(m.image_encoder.rope.periods, sd["image_encoder.rope.periods"].to(m.image_encoder.rope.periods))
    missing = {n: p for n, p in sd.items() if n != "image_encoder.sem_encoder.2.conv1.weight"}
    with pytest.raises(RuntimeError, match="Missing key"):
        NAF(**SMALL, img_layers=2).load_state_dict(missing, strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        NAF(**SMALL, img_layers=2).load_state_dict(dict(sd, **{"upsampler.scale": torch.ones(())}), strict=True)
    default = NAF().state_dict()
    assert {n: p.shape for n, p in default.items()} == {n: p.shape for n, p in official_state_dict().items()}
    # the official's periods: base 100 over the D_head // 4 rotated frequencies of each RoPE head
    assert torch.allclose(default["image_encoder.rope.periods"], 100.0 ** (torch.arange(16.0) / 16))


def legacy_window_start(i, length, kernel_size, dilation):
    """NATTEN's window start as its first kernels state it, index by index."""
    r = kernel_size // 2
    if i - r * dilation < 0:
        return i % dilation
    if i + r * dilation >= length:
        full = length // dilation * dilation
        if i % dilation < length - full:
            return length - (length - full) + i % dilation - 2 * r * dilation
        return full + i % dilation - kernel_size * dilation
    return i - r * dilation


def test_natten_windows_follow_natten():
    for length in range(1, 30):
        for ks in (1, 3, 5, 7):
            for d in range(1, 7):
                if length // d < ks:
                    with pytest.raises(ValueError, match="kernel_size"):
                        natten_windows(length, ks, d)
                    continue
                got = natten_windows(length, ks, d).tolist()
                want = [[legacy_window_start(i, length, ks, d) + j * d for j in range(ks)] for i in range(length)]
                assert got == want, (length, ks, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_is_official_attention(backend):
    """The op reading k and v at their own size against the official's nearest-exact copies with
    dilation, at a non-square exact multiple, different head widths for q/k and v."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    (h, w), size, nh, ks = (5, 4), (15, 8), 2, 3
    q = seeded_randn(1, 8, *size, generator=g, dtype=torch.float64)
    k = seeded_randn(1, 8, h, w, generator=g, dtype=torch.float64)
    v = seeded_randn(1, 6, h, w, generator=g, dtype=torch.float64)
    assert_matches_with_grads(
        lambda t: local_upsample(t["v"], size, q=t["q"], k=t["k"], num_heads=nh, scale=(8 // nh) ** -0.5,
                                 kernel_size=ks, coords="nearest", window="clamped", backend=backend),
        lambda t: official_attention(t["q"], t["k"], t["v"], nh, ks), dict(q=q, k=k, v=v), seed)


def test_against_natten():
    """NATTEN's na2d (CPU, fp32) against the plain-torch dilated attention and the op, on the official's
    nearest-exact copies; q/k and v of equal head width, as NATTEN's CPU backend needs."""
    natten = pytest.importorskip("natten")
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    (h, w), (ry, rx), nh, d, ks = (6, 5), (3, 4), 2, 8, 5
    size = (h * ry, w * rx)
    q = seeded_randn(2, nh * d, *size, generator=g, device="cpu")
    k = seeded_randn(2, nh * d, h, w, generator=g, device="cpu")
    v = seeded_randn(2, nh * d, h, w, generator=g, device="cpu")

    def heads_last(t):
        return t.reshape(2, nh, d, *size).permute(0, 3, 4, 1, 2).contiguous()
    kc, vc = (F.interpolate(t, size=size, mode="nearest-exact") for t in (k, v))
    ref = natten.na2d(heads_last(q), heads_last(kc), heads_last(vc), kernel_size=ks, dilation=(ry, rx))
    ref = ref.permute(0, 3, 4, 1, 2).reshape(2, nh * d, *size)
    plain = dilated_neighborhood_attention(q, kc, vc, nh, ks, (ry, rx), d ** -0.5)
    op = local_upsample(v, size, q=q, k=k, num_heads=nh, kernel_size=ks, coords="nearest", window="clamped",
                        backend="torch")
    assert rel_err(plain, ref) < 1e-6 and rel_err(op, ref) < 1e-6, f"seed={seed}"


def test_any_output_size_and_empty_batch():
    seed = fresh_seed()
    image, features, _, ks, layers, sd = problem("r2,k3", seed, torch.float32)
    m = NAF(**SMALL, kernel_size=ks, img_layers=layers)
    m.load_state_dict(sd)
    out = m(image, features, [11, 9])
    assert out.shape == (2, 8, 11, 9) and torch.isfinite(out).all()
    empty = m(image[:0], features[:0], (10, 8))
    assert empty.shape == (0, 8, 10, 8)


BAD = [
    (dict(kernel_size=4), "kernel_size"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(dim=32, heads_attn=3), "heads_attn"),
    (dict(dim=32, heads_rope=3), "heads_rope"),
    (dict(dim=40, heads_attn=2, heads_rope=2), "dim"),
    (dict(use_encoder=False), "use_encoder"),
    (dict(rope_base=0), "rope_base"),
    (dict(rope_rescale=0.5), "rope_rescale"),
    (dict(img_layers=-1), "img_layers"),
    (dict(backend="cuda"), "backend"),
]


@pytest.mark.parametrize("kw,arg", BAD, ids=[f"{a}:{kw}" for kw, a in BAD])
def test_bad_hyper_parameters_raise(kw, arg):
    with pytest.raises(ValueError, match=arg):
        NAF(**kw)


def test_bad_input_raises():
    m = NAF(**SMALL, kernel_size=5)
    image, features = torch.randn(1, 3, 16, 16), torch.randn(1, 8, 6, 5)
    with pytest.raises(ValueError, match="kernel_size=5 exceeds"):
        m(image, torch.randn(1, 8, 6, 4), (12, 8))
    with pytest.raises(ValueError, match="image must be"):
        m(torch.randn(1, 4, 16, 16), features, (12, 10))
    with pytest.raises(TypeError, match="image"):
        m(image.double(), features, (12, 10))
    with pytest.raises(ValueError, match="features must be"):
        m(image, torch.randn(2, 8, 6, 5), (12, 10))
    with pytest.raises(ValueError, match="heads_attn"):
        m(image, torch.randn(1, 7, 6, 5), (12, 10))
    with pytest.raises(TypeError, match="features"):
        m(image, features.long(), (12, 10))
    with pytest.raises(TypeError, match="output_size"):
        m(image, features, 12)
    with pytest.raises(ValueError, match="output_size"):
        m(image, features, (0, 10))
