"""CARAFE against its definition (mmcv's CARAFEPack semantics through unfold, lda_aqu/upsampler/plain.py) in
float64: forward and gradients, mmcv's state dicts and initialisation, exact sizes."""
import pytest
import torch
from torch.func import functional_call

from helpers import assert_matches_with_grads, backends_under_test, fresh_seed, rel_err, seeded_randn, slow_except
from lda_aqu.upsampler import CARAFE, local_upsample
from lda_aqu.upsampler.plain import carafe_forward, carafe_reassemble

BACKENDS = backends_under_test()

# (C, scale_factor, up_kernel, up_group, encoder_kernel, encoder_dilation, compressed_channels, H, W, size)
CONFIGS = {
    "defaults,s=2": (8, 2, 5, 1, 3, 1, 8, 5, 7, None),
    "k=3,G=4,s=3,dilation=2,size": (16, 3, 3, 4, 5, 2, 8, 3, 4, (8, 13)),
}


def mmcv_state_dict(C, s, k, G, enc_k, cc, seed):
    """CARAFEPack's keys and shapes, random values large enough for uneven kernels."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"channel_compressor.weight": (cc, C, 1, 1), "channel_compressor.bias": (cc,),
              "content_encoder.weight": (k * k * G * s * s, cc, enc_k, enc_k), "content_encoder.bias": (k * k * G * s * s,)}
    return {n: seeded_randn(shape, generator=g, dtype=torch.float64) * 0.5 for n, shape in shapes.items()}


@pytest.mark.parametrize("name", slow_except(list(CONFIGS), "defaults,s=2"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_definition_forward_and_backward(backend, name):
    seed = fresh_seed()
    C, s, k, G, enc_k, dil, cc, H, W, size = CONFIGS[name]
    m = CARAFE(C, s, up_kernel=k, up_group=G, encoder_kernel=enc_k, encoder_dilation=dil, compressed_channels=cc,
               backend=backend).double()
    sd = mmcv_state_dict(C, s, k, G, enc_k, cc, seed)
    m.load_state_dict(sd, strict=True)
    x = seeded_randn(2, C, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    params = dict(m.named_parameters())
    out = assert_matches_with_grads(
        lambda t: functional_call(m, {n: t[n] for n in params}, (t["x"],), dict(size=size)),
        lambda t: carafe_forward(t, t["x"], scale_factor=s, up_kernel=k, up_group=G, encoder_dilation=dil, size=size),
        dict(params, x=x), seed)
    assert out.shape == (2, C, *(size or (s * H, s * W)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_reassembly_gradients(backend):
    """The op's CARAFE case (nearest source pixel, k x k window, zero padding, softmax of the logits):
    gradients of the values and of the kernel logits, scale 3, four groups, an odd map."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, C, H, W, s, k, G = 1, 8, 3, 5, 3, 3, 4
    v = seeded_randn(B, C, H, W, dtype=torch.float64, generator=g)
    logits = seeded_randn(B, G, k * k, s * H, s * W, dtype=torch.float64, generator=g) * 2
    assert_matches_with_grads(
        lambda t: local_upsample(t["v"], (s * H, s * W), logits=t["logits"], kernel_size=k, coords="nearest",
                                 backend=backend),
        lambda t: carafe_reassemble(t["v"], t["logits"].softmax(2).flatten(1, 2), k, G, (s * H, s * W)),
        dict(v=v, logits=logits), seed)


def test_size_one_pixel_short_is_the_crop():
    """size = s*H - 1 (an FPN's odd lateral) reads exactly what mmdet's FPN_CARAFE keeps after cropping."""
    m = CARAFE(8, 2, compressed_channels=4, backend=BACKENDS[0]).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(1, 8, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(m(x, size=(9, 7)), m(x)[..., :9, :7]) < 1e-12


def test_init_weights_is_mmcv():
    m = CARAFE(64, 2)
    w = m.channel_compressor.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5  # xavier-uniform of a 1x1 conv
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert 0.0008 < m.content_encoder.weight.std() < 0.0012
    assert (m.channel_compressor.bias == 0).all() and (m.content_encoder.bias == 0).all()


BAD = [
    (dict(channels=8, scale_factor=1.5), "scale_factor"),
    (dict(channels=8, scale_factor=2.0), "scale_factor"),
    (dict(channels=8, scale_factor=0), "scale_factor"),
    (dict(channels=8, scale_factor=2, up_kernel=4), "up_kernel"),
    (dict(channels=8, scale_factor=2, up_group=3), "up_group"),
    (dict(channels=8, scale_factor=2, encoder_kernel=2), "encoder_kernel"),
    (dict(channels=8, scale_factor=2, encoder_dilation=0), "encoder_dilation"),
    (dict(channels=8, scale_factor=2, compressed_channels=0), "compressed_channels"),
    (dict(channels=8, scale_factor=2, backend="cuda"), "backend"),
]


@pytest.mark.parametrize("kw,arg", BAD, ids=[f"{a}:{kw}" for kw, a in BAD])
def test_bad_hyper_parameters_raise(kw, arg):
    with pytest.raises(ValueError, match=arg):
        CARAFE(**kw)


def test_bad_input_raises():
    m = CARAFE(8, 2, compressed_channels=4)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match="size"):
        m(torch.randn(1, 8, 3, 3), size=(0, 4))
    with pytest.raises(TypeError, match="size"):
        m(torch.randn(1, 8, 3, 3), size=(5.0, 4))
