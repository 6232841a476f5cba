"""SAPA, SAPADeform and FADE (tiny-smart/detection-with-upsamplers) against plain-PyTorch re-derivations of
the official forwards (lda_aqu/upsampler/plain.py: SAPA's unfold + einsum forward check, SAPADeform's grid_sample
one, FADE's SemiShift with mmcv's CARAFE reassembly), in float64: the output and every gradient, inputs and
parameters, on every backend; the guided FPN_UPSAMPLE and the released configs; the official key sets loading
strictly, the official initialisation, exports, bad inputs."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from helpers import assert_matches_with_grads, backends_under_test, fresh_seed, seeded_randn, slow_except
from lda_aqu.upsampler import FADE, FPN_UPSAMPLE, SAPA, SAPADeform
from lda_aqu.upsampler.plain import conv as _conv
from lda_aqu.upsampler.plain import fade_forward, sapa_forward, sapadeform_forward

BACKENDS = tuple(dict.fromkeys(backends_under_test() + ("reference",)))


# ---- the official key sets -------------------------------------------------------------------------------

def _conv_keys(name, c_out, c_in, k=1, bias=True):
    return {f"{name}.weight": (c_out, c_in, k, k), **({f"{name}.bias": (c_out,)} if bias else {})}


def official_keys(kind, C, cfg):
    """One module's state-dict shapes as the official constructor builds it (dim_x = dim_y = C)."""
    if kind == "fade":
        k = cfg.get("up_kernel_size", 5)
        gate = _conv_keys("gate_generator.conv", 1, C) if cfg.get("gating", False) else {}
        return {**gate, **_conv_keys("ker_generator.compressor_en", 64, C),
                **_conv_keys("ker_generator.compressor_de", 64, C, bias=False),
                **_conv_keys("ker_generator.content_encoder", k * k, 64, 3)}
    G = cfg.get("groups", 4) if kind == "sapadeform" else 1
    E, bias = cfg.get("embedding_dim", 32) * G, cfg.get("qkv_bias", True)
    norm = {f"norm_{n}.{p}": (C,) for n in "yx" for p in ("weight", "bias")} \
        if cfg.get("norm", kind == "sapa") else {}
    keys = {**norm, **_conv_keys("q", E, C, bias=bias), **_conv_keys("k", E, C, bias=bias)}
    if kind == "sapadeform":
        s2 = 4 if cfg.get("high_offset", True) else 1
        keys.update(_conv_keys("offset", G * cfg.get("num_point", 9) * 2 * s2, C, bias=bias))
    return keys


def random_state_dict(shapes, seed, offset_scale=1.0):
    """Random values under the official keys: uneven softmaxes, norms off their identity, offsets of
    `offset_scale` pixels or so (many points off the map at 2)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n, shape in shapes.items():
        t = torch.randn(shape, generator=g, device="cpu", dtype=torch.float64)
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        layer = n.split(".")[-2]
        if layer.startswith("norm_") and n.endswith("weight"):
            t = 1 + 0.2 * t
        elif layer == "offset":
            t = t * offset_scale * (fan_in ** -0.5 if len(shape) > 1 else 1)
        else:
            t = t * (fan_in ** -0.5 if len(shape) > 1 else 0.3)
        sd[n] = t
    return sd


# ---- parity, forward and every gradient --------------------------------------------------------------------

BUILD = {"sapa": SAPA, "sapadeform": SAPADeform, "fade": FADE}
OFFICIAL = {"sapa": sapa_forward, "sapadeform": sapadeform_forward, "fade": fade_forward}
# (kind, C, constructor keywords, the official forward's keywords); tiny maps and channels
CASES = {
    "sapa": ("sapa", 8, dict(norm_groups=4), dict(norm_groups=4)),
    "sapa-k3-no_norm-no_bias": ("sapa", 8, dict(up_kernel_size=3, norm=False, qkv_bias=False, embedding_dim=4),
                                dict(up_kernel_size=3)),
    "sapadeform": ("sapadeform", 8, dict(groups=2, embedding_dim=4), dict(groups=2)),
    "sapadeform-p5-low_offset-norm": ("sapadeform", 8, dict(num_point=5, groups=2, embedding_dim=4,
                                                            high_offset=False, norm=True, norm_groups=2),
                                      dict(num_point=5, groups=2, high_offset=False, norm_groups=2)),
    "fade": ("fade", 8, dict(), dict()),
    "fade-gating-k3": ("fade", 8, dict(gating=True, up_kernel_size=3), dict(up_kernel_size=3)),
}
SIZES = {"square": (3, 3), "wide": (2, 5)}
SLOW = ("triton", "reference")  # the interpreter and the eager reference: the three defaults, one map, batch 1


def _cases():
    for name in CASES:
        for backend in BACKENDS if name in BUILD else ("torch",):
            for size in SIZES if backend not in SLOW and name in BUILD else ["wide"]:
                yield name, backend, size


# the fast tier: every case on the torch path and each default module through Triton, on one map
FAST = [(name, backend, "wide") for name in CASES for backend in ("torch", "triton")]


@pytest.mark.parametrize("name,backend,size", slow_except(list(_cases()), *FAST))
def test_matches_official_forward_and_backward(name, backend, size):
    seed = fresh_seed()
    kind, C, kw, ref_kw = CASES[name]
    m = BUILD[kind](C, **kw, backend=backend).double()
    sd = random_state_dict(official_keys(kind, C, kw), seed, offset_scale=3.0)
    m.load_state_dict(sd, strict=True)
    g = torch.Generator().manual_seed(seed + 1)
    H, W = SIZES[size]
    B = 1 if backend in SLOW else 2
    x = torch.randn(B, C, H, W, generator=g, device="cpu", dtype=torch.float64)
    y = torch.randn(B, C, 2 * H, 2 * W, generator=g, device="cpu", dtype=torch.float64)
    params = dict(m.named_parameters())
    assert set(params) <= set(sd)
    out = assert_matches_with_grads(
        lambda t: functional_call(m, {n: t[n] for n in params}, (t["y"], t["x"])),
        lambda t: OFFICIAL[kind]({**sd, **{n: t[n] for n in params}}, t["y"], t["x"], **ref_kw),
        dict(params, x=x, y=y), seed)
    assert out.shape == (B, C, 2 * H, 2 * W)


def test_sapadeform_offsets_leave_the_map():
    """The parity cases' offsets reach well outside the map: zero padding is exercised, not skirted."""
    seed = fresh_seed()
    kw = dict(groups=2, embedding_dim=4)
    sd = random_state_dict(official_keys("sapadeform", 8, kw), seed, offset_scale=3.0)
    x = seeded_randn(2, 8, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    off = F.pixel_shuffle(_conv(sd, "offset", x), 2).view(2, 2, 9, 2, 6, 6)
    pos = off + torch.arange(6, dtype=torch.float64).div(2, rounding_mode="floor").view(1, 1, 1, 1, 6, 1)
    assert ((pos < -1) | (pos > 3)).double().mean() > 0.1, f"seed={seed}"


# ---- keys, initialisation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,cfg", [("sapa", {}), ("sapadeform", {}), ("fade", {}), ("fade", dict(gating=True)),
                                      ("sapadeform", dict(num_point=4, groups=2, high_offset=False, norm=True))])
def test_official_key_sets_at_detector_width(kind, cfg):
    m = BUILD[kind](64, **cfg)
    assert {n: tuple(t.shape) for n, t in m.state_dict().items()} == official_keys(kind, 64, cfg)


def test_official_initialisation():
    """SAPA and SAPADeform: convs N(0, 0.02), zero biases, GroupNorm at (1, 0). FADE: xavier-uniform, zero
    biases."""
    for m in (SAPA(64), SAPADeform(64, norm=True)):
        for name, p in m.named_parameters():
            if name.startswith("norm_"):
                assert torch.all(p == (1 if name.endswith("weight") else 0)), name
            elif name.endswith("bias"):
                assert not p.any(), name
            else:
                assert 0.015 < p.std() < 0.025, name
    for name, p in FADE(64, gating=True).named_parameters():
        if name.endswith("bias"):
            assert not p.any(), name
        else:
            bound = math.sqrt(6 / ((p.shape[0] + p.shape[1]) * p[0, 0].numel()))
            assert p.abs().max() <= bound and p.std() > bound / 3, name


# ---- exports -----------------------------------------------------------------------------------------------

def _randomised(kind, seed, C=8):
    # few neighbours: the exporters trace the torch path's loop over them (a 5x5 window triples the time)
    kw = {"sapa": dict(norm_groups=4, embedding_dim=4, up_kernel_size=3),
          "sapadeform": dict(groups=2, embedding_dim=4, num_point=2), "fade": dict(gating=True, up_kernel_size=3)}[kind]
    m = BUILD[kind](C, **kw)
    m.load_state_dict({n: t.float() for n, t in random_state_dict(official_keys(kind, C, kw), seed).items()})
    return m.eval()


# FADE's op mode (logits over a window) exports with CARAFE, its gate is plain torch: two modules keep this cheap
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sapa", "sapadeform"])
def test_torch_export_with_free_sizes(kind):
    """The guide's height and width are 2h and 2w of a free h and w, the batch free."""
    from torch.export import Dim
    seed = fresh_seed()
    m = _randomised(kind, seed).double()
    b, h, w = Dim("b", min=1), Dim("h", min=1), Dim("w", min=1)
    ep = torch.export.export(m, (torch.randn(2, 8, 6, 10, dtype=torch.float64),
                                 torch.randn(2, 8, 3, 5, dtype=torch.float64)),
                             dynamic_shapes=({0: b, 2: 2 * h, 3: 2 * w}, {0: b, 2: h, 3: w}))
    for B, H, W in ((1, 1, 1), (3, 4, 2), (1, 7, 9)):
        y, x = torch.randn(B, 8, 2 * H, 2 * W, dtype=torch.float64), torch.randn(B, 8, H, W, dtype=torch.float64)
        with torch.no_grad():
            got, expect = ep.module()(y, x), m(y, x)
        assert got.shape == expect.shape == (B, 8, 2 * H, 2 * W)
        assert (got - expect).abs().max() < 1e-12, f"{kind} at {(B, H, W)}, seed={seed}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sapadeform"])  # the op's modes of the others export with LDAAQU and CARAFE
def test_onnx_export_runs_at_other_sizes(kind, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from torch.export import Dim
    seed = fresh_seed()
    m = _randomised(kind, seed)
    path = str(tmp_path / f"{kind}.onnx")
    b, h, w = Dim("b", min=1), Dim("h", min=1), Dim("w", min=1)
    torch.onnx.export(m, (torch.randn(2, 8, 6, 10), torch.randn(2, 8, 3, 5)), path, input_names=["y", "x"],
                      output_names=["out"], dynamic_shapes=({0: b, 2: 2 * h, 3: 2 * w}, {0: b, 2: h, 3: w}))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for B, H, W in ((2, 3, 5), (1, 4, 2)):
        y, x = torch.randn(B, 8, 2 * H, 2 * W), torch.randn(B, 8, H, W)
        got = torch.from_numpy(session.run(None, {"y": y.numpy(), "x": x.numpy()})[0])
        with torch.no_grad():
            expect = m(y, x)
        assert got.shape == expect.shape and (got - expect).abs().max() < 1e-4, f"{kind} {(B, H, W)}, seed={seed}"


@pytest.mark.slow
def test_compiled_matches_eager():
    """torch.compile(fullgraph=True, dynamic=True), the Inductor default: SAPADeform (offsets, q/k, groups) at
    two sizes, the output and every gradient as eager (float64)."""
    seed = fresh_seed()
    torch._dynamo.reset()
    m = _randomised("sapadeform", seed).double()
    compiled = torch.compile(m, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(seed)
    for H, W in ((3, 5), (4, 3)):
        y = torch.randn(2, 8, 2 * H, 2 * W, generator=g, device="cpu", dtype=torch.float64)
        x = torch.randn(2, 8, H, W, generator=g, device="cpu", dtype=torch.float64)
        dout = torch.randn(2, 8, 2 * H, 2 * W, generator=g, device="cpu", dtype=torch.float64)
        grads = []
        for f in (m, compiled):
            leaves = [t.clone().requires_grad_(True) for t in (y, x)]
            m.zero_grad(set_to_none=True)
            out = f(*leaves)
            out.backward(dout)
            grads.append([out.detach(), *(t.grad for t in leaves), *(p.grad for p in m.parameters())])
        for a, b in zip(*grads):
            assert b is not None and (a - b).abs().max() < 1e-9 * max(1.0, a.abs().max().item()), f"seed={seed}"


# ---- the neck ----------------------------------------------------------------------------------------------

def fpn_upsample_guided_official(sd, xs, kind, num_outs, **kw):
    """FPN_UPSAMPLE's forward with guided=True: laterals, then from the top laterals[i-1] +=
    up[i-1](laterals[i-1], laterals[i]), 3x3 output convs, max-pooled extra levels."""
    lats = [_conv(sd, f"lateral_convs.{i}.conv", x) for i, x in enumerate(xs)]
    for i in range(len(lats) - 1, 0, -1):
        p = f"upsample_modules.{i - 1}."
        up = OFFICIAL[kind]({n[len(p):]: t for n, t in sd.items() if n.startswith(p)}, lats[i - 1], lats[i], **kw)
        lats[i - 1] = lats[i - 1] + up
    outs = [_conv(sd, f"fpn_convs.{i}.conv", x, padding=1) for i, x in enumerate(lats)]
    while len(outs) < num_outs:
        outs.append(F.max_pool2d(outs[-1], 1, stride=2))
    return outs


NECK_CFGS = {"sapa": (dict(type="sapa", guided=True, up_kernel_size=3), dict(up_kernel_size=3)),
             "sapadeform": (dict(type="sapadeform", guided=True, num_point=5, groups=2, embedding_dim=4),
                            dict(num_point=5, groups=2)),
             "fade": (dict(type="fade", guided=True, gating=True, up_kernel_size=3), dict(up_kernel_size=3))}


@pytest.mark.parametrize("kind", slow_except(list(NECK_CFGS), "sapa"))
def test_fpn_upsample_guided_matches_official(kind):
    """Each step guided by the lower level's own lateral before it receives the sum; non-square levels,
    an extra max-pooled level. 32 channels: SAPA's GroupNorm(32) as the official builds it."""
    seed = fresh_seed()
    cfg, ref_kw = NECK_CFGS[kind]
    neck = FPN_UPSAMPLE([8, 16, 8], 32, 4, upsample_cfg=cfg, backend="torch").double()
    sd = random_state_dict({n: t.shape for n, t in neck.state_dict().items()}, seed, offset_scale=3.0)
    neck.load_state_dict(sd, strict=True)
    g = torch.Generator().manual_seed(seed + 1)
    xs = [torch.randn(2, c, 8 >> i, 12 >> i, generator=g, device="cpu", dtype=torch.float64)
          for i, c in enumerate([8, 16, 8])]
    with torch.no_grad():
        outs = neck(xs)
    ref = fpn_upsample_guided_official(sd, xs, kind, 4, **ref_kw)
    assert len(outs) == len(ref) == 4
    for i, (o, r) in enumerate(zip(outs, ref)):
        assert o.shape == r.shape and (o - r).abs().max() < 1e-10 * r.abs().max(), f"level {i}, seed={seed}"


# the neck configs of detection-with-upsamplers' configs/dynamic_upsampling, with their base's FPN
DYNAMIC_UPSAMPLING = {
    "fade": dict(type='FPN_UPSAMPLE', in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5,
                 upsample_cfg=dict(type='fade', guided=True,)),
    "fade-without-gating": dict(type='FPN_UPSAMPLE', in_channels=[256, 512, 1024, 2048], out_channels=256,
                                num_outs=5, upsample_cfg=dict(type='fade', guided=True, gating=False,)),
    "sapa": dict(type='FPN_UPSAMPLE', in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5,
                 upsample_cfg=dict(type='sapa', guided=True,)),
    "sapadeform-p9g4": dict(type='FPN_UPSAMPLE', in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5,
                            upsample_cfg=dict(type='sapadeform', guided=True, num_point=9, groups=4,
                                              high_offset=True, norm=False)),
}


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
@pytest.mark.parametrize("name", list(DYNAMIC_UPSAMPLING))
def test_dynamic_upsampling_configs_build(name):
    """Through mmengine's registry, unchanged; the builder's defaults (the plain fade config has no gate);
    every upsampler the official key set."""
    pytest.importorskip("mmengine", reason="the mm extra (pip install lda-aqu[mm])")
    from mmengine.registry import MODELS
    cfg = DYNAMIC_UPSAMPLING[name]
    with torch.device("meta"):
        neck = MODELS.build(dict(cfg, upsample_cfg=dict(cfg["upsample_cfg"])))
    assert type(neck) is FPN_UPSAMPLE and len(neck.upsample_modules) == 3
    kind = cfg["upsample_cfg"]["type"]
    up_cfg = {k: v for k, v in cfg["upsample_cfg"].items() if k not in ("type", "guided")}
    for m in neck.upsample_modules:
        assert type(m) is BUILD[kind] and m.scale_factor == 2
        assert {n: tuple(t.shape) for n, t in m.state_dict().items()} == official_keys(kind, 256, up_cfg)
    if kind == "fade":
        assert not neck.upsample_modules[0].gating


NECK_BAD = [
    (dict(type="dysample", guided=True), "guided must be False"),
    (dict(type="nearest", guided=True), "guided must be False"),
    (dict(type="sapa", guided=False), "guided must be True"),
    (dict(type="fade"), "guided must be True"),
    (dict(type="fade", guided="yes"), "guided must be True"),
    (dict(type="sapa", guided=True, norm_groups=4), "upsample_cfg of type 'sapa' takes"),
    (dict(type="sapadeform", guided=True, groups=3), "groups"),
]


@pytest.mark.parametrize("cfg,match", NECK_BAD, ids=[str(c) for c, _ in NECK_BAD])
def test_fpn_upsample_guided_refuses(cfg, match):
    with pytest.raises(ValueError, match=match):
        FPN_UPSAMPLE([8, 16], 32, 2, upsample_cfg=cfg)


# ---- bad inputs ------------------------------------------------------------------------------------------

BAD_ARGS = [
    (SAPA, dict(dim_y=0), "dim_y"),
    (SAPA, dict(dim_y=16), "norm_groups"),
    (SAPA, dict(dim_y=32, dim_x=48), "dim_x"),
    (SAPA, dict(dim_y=32, up_kernel_size=4), "up_kernel_size"),
    (SAPA, dict(dim_y=32, norm=1), "norm"),
    (SAPA, dict(dim_y=32, embedding_dim=0), "embedding_dim"),
    (SAPA, dict(dim_y=32, backend="cuda"), "backend"),
    (SAPADeform, dict(dim_y=8, groups=3), "groups"),
    (SAPADeform, dict(dim_y=8, num_point=0), "num_point"),
    (SAPADeform, dict(dim_y=8, scale_factor=1.5), "scale_factor"),
    (SAPADeform, dict(dim_y=8, high_offset="yes"), "high_offset"),
    (FADE, dict(in_channels_en=8, in_channels_de=4, gating=True), "in_channels_en"),
    (FADE, dict(in_channels_en=8, up_kernel_size=2), "up_kernel_size"),
    (FADE, dict(in_channels_en=8, gating=None), "gating"),
]


@pytest.mark.parametrize("cls,kw,arg", BAD_ARGS, ids=[f"{c.__name__}:{a}:{kw}" for c, kw, a in BAD_ARGS])
def test_bad_arguments_raise(cls, kw, arg):
    with pytest.raises(ValueError, match=arg):
        cls(**kw)


@pytest.mark.parametrize("kind,names", [("sapa", ("y", "x")), ("fade", ("en", "de"))])
def test_bad_inputs_raise(kind, names):
    m = _randomised(kind, 0)
    guide, low = names
    with pytest.raises(ValueError, match=f"{guide} must be scale_factor=2 times {low}"):
        m(torch.randn(1, 8, 6, 9), torch.randn(1, 8, 3, 5))
    with pytest.raises(ValueError, match=f"{low} must be \\(B, 8, H, W\\)"):
        m(torch.randn(1, 8, 6, 10), torch.randn(1, 4, 3, 5))
    with pytest.raises(ValueError, match=f"{guide} must be \\(B, 8, H, W\\)"):
        m(torch.randn(1, 6, 6, 10), torch.randn(1, 8, 3, 5))
    with pytest.raises(ValueError, match=f"{guide} has batch size 2"):
        m(torch.randn(2, 8, 6, 10), torch.randn(1, 8, 3, 5))
    with pytest.raises(TypeError, match=guide):
        m(torch.randn(1, 8, 6, 10).numpy(), torch.randn(1, 8, 3, 5))
    with pytest.raises(TypeError, match=low):
        m(torch.randn(1, 8, 6, 10), torch.randn(1, 8, 3, 5, dtype=torch.float64))


def test_empty_batch_keeps_the_graph():
    m = _randomised("sapadeform", 0)
    y, x = torch.randn(0, 8, 6, 10, requires_grad=True), torch.randn(0, 8, 3, 5, requires_grad=True)
    out = m(y, x)
    assert out.shape == (0, 8, 6, 10)
    out.sum().backward()
    assert y.grad is not None and x.grad is not None and m.offset.weight.grad is not None
