"""The FPN neck with every upsampler on odd sizes, against mmdet's FPN computation; exact sizes of LDAAQU."""
import pytest
import torch
import torch.nn.functional as F

from helpers import backends_under_test, fresh_seed, rel_err, seeded_randn
from lda_aqu.upsampler import FPN, LDAAQU
from lda_aqu.upsampler.official import official_forward, official_state_dict
from lda_aqu.upsampler.plain import carafe_forward

BACKENDS = backends_under_test()
UPSAMPLERS = ["nearest", "bilinear", "carafe", "dysample", "lda_aqu"]
IN_CHANNELS = [8, 16, 16]
SIZES = [(13, 11), (7, 6), (4, 3)]  # a stride-2 pyramid of a 13x11 map: every top-down step lands on an odd size
CFG = {"carafe": dict(compressed_channels=8, up_kernel=3), "dysample": dict(groups=2)}


def pyramid(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [seeded_randn(2, c, *s, generator=g, dtype=dtype) for c, s in zip(IN_CHANNELS, SIZES)]


@pytest.mark.parametrize("upsampler", UPSAMPLERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_upsampler_on_odd_sizes(backend, upsampler):
    seed = fresh_seed()
    torch.manual_seed(seed)
    fpn = FPN(IN_CHANNELS, 16, upsampler, num_outs=5, upsampler_cfg=dict(CFG.get(upsampler, {}), backend=backend))
    if upsampler == "lda_aqu":  # leave the zero-initialised offsets, so every parameter gets a gradient
        for m in fpn.upsample_modules:
            torch.nn.init.normal_(m.conv_offset[-1].weight, std=0.1)
    xs = [x.requires_grad_(True) for x in pyramid(seed)]
    outs = fpn(xs)
    assert [tuple(o.shape) for o in outs] == [(2, 16, *s) for s in SIZES + [(2, 2), (1, 1)]]
    sum((o * torch.randn(o.shape)).sum() for o in outs).backward()
    for n, p in list(fpn.named_parameters()) + [(f"inputs[{i}]", x) for i, x in enumerate(xs)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"d{n}, seed={seed}"


@pytest.mark.parametrize("upsampler", ["nearest", "carafe"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_mmdet_definition(backend, upsampler):
    """mmdet's FPN (F.interpolate(size=...) nearest) and FPN_CARAFE (CARAFE at 2x, cropped to the
    lateral) computed from the state dict, float64."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    fpn = FPN(IN_CHANNELS, 16, upsampler, num_outs=4, upsampler_cfg=dict(CFG.get(upsampler, {}), backend=backend))
    fpn = fpn.double()
    for p in fpn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    sd = fpn.state_dict()
    xs = pyramid(seed, torch.float64)

    def conv(name, x):
        w = sd[name + ".conv.weight"]
        return F.conv2d(x, w, sd[name + ".conv.bias"], padding=w.shape[-1] // 2)

    lat = [conv(f"lateral_convs.{i}", x) for i, x in enumerate(xs)]
    for i in range(len(lat) - 1, 0, -1):
        if upsampler == "nearest":
            up = F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        else:
            sub = {n.split(".", 2)[2]: p for n, p in sd.items() if n.startswith(f"upsample_modules.{i - 1}.")}
            up = carafe_forward(sub, lat[i], scale_factor=2, up_kernel=3)[..., :lat[i - 1].shape[2], :lat[i - 1].shape[3]]
        lat[i - 1] = lat[i - 1] + up
    ref = [conv(f"fpn_convs.{i}", x) for i, x in enumerate(lat)]
    ref.append(F.max_pool2d(ref[-1], 1, stride=2))
    with torch.no_grad():
        outs = fpn(xs)
    for i, (o, r) in enumerate(zip(outs, ref)):
        assert rel_err(o, r) < 1e-12, f"level {i}, seed={seed}"


def test_conv_keys_are_mmdet():
    fpn = FPN([8, 16], 8)
    keys = {f"{kind}_convs.{i}.conv.{p}" for kind in ("lateral", "fpn") for i in range(2) for p in ("weight", "bias")}
    assert set(fpn.state_dict()) == keys
    fpn.load_state_dict({k: torch.randn(v.shape) for k, v in fpn.state_dict().items()}, strict=True)
    assert "upsample_modules.0.content_encoder.weight" in FPN([8, 16], 8, "carafe").state_dict()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lda_aqu_any_size(backend):
    """LDAAQU(x, size=(9, 13)) is the official computation at the scale whose int(H*s), int(W*s) give that size."""
    seed = fresh_seed()
    m = LDAAQU(16, backend=backend).double()
    sd = official_state_dict(16, seed=seed)
    m.load_state_dict(sd)
    x = seeded_randn(1, 16, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        assert rel_err(m(x, size=(9, 13)), official_forward(sd, x, scale_factor=1.9)) < 1e-12, f"seed={seed}"


BAD = [
    (dict(in_channels=[], out_channels=8), "in_channels"),
    (dict(in_channels=[8, 0], out_channels=8), "in_channels"),
    (dict(in_channels=[8], out_channels=8, upsampler="deconv"), "upsampler"),
    (dict(in_channels=[8, 8], out_channels=8, num_outs=1), "num_outs"),
    (dict(in_channels=[8], out_channels=8, upsampler_cfg=dict(align_corners=True)), "upsampler_cfg"),
    (dict(in_channels=[8], out_channels=8, upsampler_cfg=[1]), "upsampler_cfg"),
]


@pytest.mark.parametrize("kw,arg", BAD, ids=[f"{a}:{kw}" for kw, a in BAD])
def test_bad_arguments_raise(kw, arg):
    with pytest.raises(ValueError, match=arg):
        FPN(**kw)


def test_bad_inputs_raise():
    fpn = FPN([8, 16], 8)
    with pytest.raises(ValueError, match="inputs must be"):
        fpn([torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match=r"inputs\[1\]"):
        fpn([torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2)])
