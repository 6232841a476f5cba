"""DySample against its definition (the official grid_sample formulation, lda_aqu/upsampler/plain.py) in
float64: forward and gradients, official state dicts and initialisation, exact sizes."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from helpers import assert_matches_with_grads, backends_under_test, fresh_seed, rel_err, seeded_randn, slow_except
from lda_aqu.upsampler import DySample, local_upsample
from lda_aqu.upsampler.plain import dysample_forward, dysample_init_pos, dysample_offset

BACKENDS = backends_under_test()

# (C, scale, style, groups, dyscope, H, W)
CONFIGS = {
    "lp,s=2,G=4": (16, 2, "lp", 4, False, 5, 7),
    "pl,s=2,G=2,dyscope": (8, 2, "pl", 2, True, 4, 5),
    "lp,s=3,G=1,dyscope": (8, 3, "lp", 1, True, 3, 4),
}


def official_state_dict(C, s, style, G, dyscope, seed):
    """The official keys and shapes; offsets of a few pixels, so samples cross cells and the border."""
    g = torch.Generator().manual_seed(seed)
    c_in, c_out = (C // (s * s), 2 * G) if style == "pl" else (C, 2 * G * s * s)
    sd = {"offset.weight": seeded_randn(c_out, c_in, 1, 1, generator=g, dtype=torch.float64) * 3,
          "offset.bias": seeded_randn(c_out, generator=g, dtype=torch.float64)}
    if dyscope:
        sd["scope.weight"] = seeded_randn(c_out, c_in, 1, 1, generator=g, dtype=torch.float64)
    # float64 init_pos: the official float32 buffer rounds 1/3 (a 1e-8 shift the op does not make)
    sd["init_pos"] = dysample_init_pos(s, G, torch.float64)
    return sd


def sample_at(x, off, groups, size):
    """Bilinear samples at F.affine_grid's half-pixel points of `size` plus off [B, 2*groups (x then y,
    group), *size] input pixels, border padding: the definition at any output size."""
    B, C, H, W = x.shape
    base = F.affine_grid(torch.eye(2, 3, dtype=x.dtype).expand(B * groups, 2, 3), [B * groups, 1, *size],
                         align_corners=False)
    off = off.reshape(B, 2, groups, *size).permute(0, 2, 3, 4, 1).reshape(B * groups, *size, 2)
    grid = base + 2 * off / torch.tensor([W, H], dtype=x.dtype)
    out = F.grid_sample(x.reshape(B * groups, C // groups, H, W), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out.view(B, C, *size)


@pytest.mark.parametrize("name", slow_except(list(CONFIGS), "lp,s=2,G=4"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_definition_forward_and_backward(backend, name):
    seed = fresh_seed()
    C, s, style, G, dyscope, H, W = CONFIGS[name]
    m = DySample(C, s, style, G, dyscope, backend=backend).double()
    sd = official_state_dict(C, s, style, G, dyscope, seed)
    m.load_state_dict(sd, strict=True)
    x = seeded_randn(2, C, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    params = dict(m.named_parameters())
    out = assert_matches_with_grads(
        lambda t: functional_call(m, {n: t[n] for n in params}, (t["x"],)),
        lambda t: dysample_forward(dict(t, init_pos=sd["init_pos"]), t["x"], scale=s, style=style, groups=G),
        dict(params, x=x), seed)
    assert out.shape == (2, C, s * H, s * W)


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_size(backend):
    """size = (h, w): half-pixel base positions for that size plus the nearest sub-pixel's offset; the
    default size through the same definition too (where it must equal init_pos)."""
    seed = fresh_seed()
    C, s, style, G, dyscope, H, W = CONFIGS["lp,s=2,G=4"]
    m = DySample(C, s, style, G, dyscope, backend=backend).double()
    sd = official_state_dict(C, s, style, G, dyscope, seed)
    m.load_state_dict(sd)
    x = seeded_randn(1, C, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        offsets = F.pixel_shuffle(dysample_offset(sd, x, scale=s, style=style), s)
        for size in ((s * H, s * W), (s * H - 1, s * W + 2), (3, 20)):
            ref = sample_at(x, F.interpolate(offsets, size=size, mode="nearest"), G, size)
            assert rel_err(m(x, size=size), ref) < 1e-12, f"size={size}, seed={seed}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_sampling_gradients(backend):
    """The op's DySample case (half-pixel positions + offsets, border padding, one sample of weight 1
    per group): gradients of the values and of the offsets, scale 3, offsets far past the border."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, C, H, W, G, size = 1, 8, 4, 5, 2, (12, 15)
    v = seeded_randn(B, C, H, W, dtype=torch.float64, generator=g)
    off = seeded_randn(B, G, 2, *size, dtype=torch.float64, generator=g) * 3  # the op's layout: (group, y|x)
    assert_matches_with_grads(
        lambda t: local_upsample(t["v"], size, offset=t["off"].flatten(1, 2), num_groups=G, coords="half_pixel",
                                 padding="border", backend=backend),
        lambda t: sample_at(t["v"], t["off"].flip(2).transpose(1, 2), G, size),
        dict(v=v, off=off), seed)


def test_inference_first_then_training():
    """The torch path keeps its sampling grid's constants per size: made first under inference_mode
    they must still be saveable by a training step at that size (inference tensors are not)."""
    seed = fresh_seed()
    m = DySample(8, 2, groups=2)
    torch.nn.init.normal_(m.offset.weight, std=0.5)
    x = seeded_randn(1, 8, 11, 13, generator=torch.Generator().manual_seed(seed))  # a size no other test uses
    with torch.inference_mode():
        first = m(x)
    out = m(x.clone().requires_grad_())
    out.square().sum().backward()
    assert torch.equal(out.detach(), first) and m.offset.weight.grad.abs().sum() > 0, f"seed={seed}"


def test_init_is_official():
    m = DySample(64, 2, groups=4, dyscope=True)
    assert 0.0008 < m.offset.weight.std() < 0.0012 and (m.offset.bias == 0).all()
    assert (m.scope.weight == 0).all() and m.scope.bias is None
    assert m.init_pos.dtype == torch.float32 and torch.equal(m.init_pos, dysample_init_pos(2, 4))
    assert torch.equal(DySample(18, 3, "pl", groups=2).init_pos, dysample_init_pos(3, 2))
    assert set(DySample(16).state_dict()) == {"offset.weight", "offset.bias", "init_pos"}


BAD = [
    (dict(in_channels=8, scale=1.5), "scale"),
    (dict(in_channels=8, scale=0), "scale"),
    (dict(in_channels=8, style="pp"), "style"),
    (dict(in_channels=8, groups=3), "groups"),
    (dict(in_channels=8, scale=3, style="pl", groups=1), "scale"),
    (dict(in_channels=8, dyscope=1), "dyscope"),
    (dict(in_channels=0), "in_channels"),
    (dict(in_channels=8, backend="cuda"), "backend"),
]


@pytest.mark.parametrize("kw,arg", BAD, ids=[f"{a}:{kw}" for kw, a in BAD])
def test_bad_hyper_parameters_raise(kw, arg):
    with pytest.raises(ValueError, match=arg):
        DySample(**kw)


def test_bad_input_raises():
    m = DySample(8, groups=2)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(1, 4, 3, 3))
    with pytest.raises(TypeError, match="size"):
        m(torch.randn(1, 8, 3, 3), size=6)
