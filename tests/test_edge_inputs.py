"""Inputs users pass beyond the usual: empty batches, meta tensors, wrong dtypes, TorchScript, double
backward, NaN; each with the behaviour the README promises, on every backend."""
import pytest
import torch

from helpers import fresh_seed, make_problem, seeded_randn
from lda_aqu.upsampler import (CARAFE, FPN, LDAAQU, DySample, deformable_local_attention, interpolate, local_upsample)
from lda_aqu.upsampler.fpn import GUIDED, UPSAMPLERS
from lda_aqu.upsampler.naive import positions

BACKENDS = ("reference", "torch", "triton")
MODULES = {
    "lda_aqu": lambda: LDAAQU(16, num_heads=2),
    "carafe": lambda: CARAFE(16, 2, up_kernel=3, compressed_channels=8),
    "dysample": lambda: DySample(16, 2, groups=2, dyscope=True),
    "dysample_pl": lambda: DySample(16, 2, style="pl", groups=2),
}


def _randomised(m):
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODULES))
def test_empty_batch_gives_empty_output_and_gradients(name, backend):
    m = MODULES[name]()
    m.backend = backend
    x = torch.randn(0, 16, 5, 6, requires_grad=True)
    for size in (None, (9, 13)):
        y = m(x, size=size)
        assert y.shape == (0, 16, *(size or (10, 12)))
        m.zero_grad(set_to_none=True)
        y.sum().backward()
        assert x.grad.shape == x.shape
        for n, p in m.named_parameters():  # as a convolution's: zero, not missing (DDP needs every one)
            assert p.grad is not None and not p.grad.any(), n


@pytest.mark.parametrize("upsampler", [u for u in UPSAMPLERS if u not in GUIDED])  # odd sizes
def test_empty_batch_through_fpn(upsampler):
    fpn = FPN([8, 16], 8, upsampler=upsampler)
    xs = [torch.randn(0, 8, 9, 11, requires_grad=True), torch.randn(0, 16, 5, 6, requires_grad=True)]
    outs = fpn(xs)
    assert [tuple(o.shape) for o in outs] == [(0, 8, 9, 11), (0, 8, 5, 6)]
    sum(o.sum() for o in outs).backward()
    assert all(x.grad.shape == x.shape for x in xs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_of_the_ops(backend):
    t, kw = make_problem(2, 4, 6, 3, 4, 2, 2, 2, 3)
    t = {n: (x[:0] if n != "rpb" else x).requires_grad_(True) for n, x in t.items()}
    out = deformable_local_attention(t["q"], t["k"], t["v"], t["offset"], t["rpb"], backend=backend, **kw)
    assert out.shape == (0, 6, 6, 8)
    out.sum().backward()
    assert all(x.grad is not None and x.grad.shape == x.shape for x in t.values())
    assert not t["rpb"].grad.any()
    v = torch.randn(0, 6, 3, 4)
    assert local_upsample(v, (5, 7), kernel_size=3, logits=torch.randn(0, 1, 9, 5, 7), coords="nearest",
                          backend=backend).shape == (0, 6, 5, 7)
    for mode in ("nearest", "bilinear"):
        assert interpolate(v, (5, 7), mode=mode, backend=backend).shape == (0, 6, 5, 7)


@pytest.mark.parametrize("name", list(MODULES))
def test_zero_height_or_width_names_it(name):
    m = MODULES[name]()
    for shape, what in (((2, 16, 0, 5), "height 0"), ((2, 16, 5, 0), "width 0")):
        with pytest.raises(ValueError, match=f"x has {what}"):
            m(torch.randn(shape))
    with pytest.raises(ValueError, match="size must be positive, got width 0"):
        m(torch.randn(1, 16, 4, 4), size=(4, 0))
    with pytest.raises(ValueError, match="v has height 0"):
        interpolate(torch.randn(1, 4, 0, 3), (2, 2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODULES))
def test_meta_device_forward_gives_the_shape(name, backend):
    """Model summaries, FLOP counters and init-on-meta run the forward on meta tensors."""
    m = MODULES[name]().to("meta")  # (a torch.device("meta") context misses conftest's patched torch.empty)
    m.backend = backend
    x = torch.empty(2, 16, 5, 7, device="meta")
    assert m(x).shape == (2, 16, 10, 14)
    assert m(x, size=(9, 13)).shape == (2, 16, 9, 13)
    fpn = FPN([8, 16], 8, upsampler=name.split("_pl")[0]).to("meta")
    outs = fpn([torch.empty(2, 8, 9, 11, device="meta"), torch.empty(2, 16, 5, 6, device="meta")])
    assert [tuple(o.shape) for o in outs] == [(2, 8, 9, 11), (2, 8, 5, 6)]


def test_fake_tensor_forward_gives_the_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode
    built = {name: build() for name, build in MODULES.items()}  # torch's trunc_normal_ cannot run fake
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        for name, m in built.items():
            for backend in ("torch", "triton"):  # the custom ops' fake kernels
                m.backend = backend
                assert m(mode.from_tensor(torch.empty(2, 16, 5, 7))).shape == (2, 16, 10, 14), name


@pytest.mark.parametrize("name", list(MODULES))
def test_wrong_dtypes_name_the_fix(name):
    m = MODULES[name]()
    for dtype in (torch.int64, torch.bool, torch.complex64):
        with pytest.raises(TypeError, match=r"x must be a floating-point tensor.*float32.*got torch\.(int64|bool|com)"):
            m(torch.ones(1, 16, 4, 4, dtype=dtype))
    for dtype in (torch.bfloat16, torch.float64):
        with pytest.raises(TypeError, match=rf"x has dtype {dtype}.*torch.float32.*module.to.*torch.autocast"):
            m(torch.randn(1, 16, 4, 4, dtype=dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the fix the message names
        assert m(torch.randn(1, 16, 4, 4, dtype=torch.bfloat16)).shape == (1, 16, 8, 8)
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a floating-point"):
        FPN([8, 16], 8)([torch.randn(1, 8, 4, 4), torch.ones(1, 16, 2, 2, dtype=torch.int64)])


@pytest.mark.parametrize("name", list(MODULES))
def test_torchscript_names_the_supported_routes(name):
    m = MODULES[name]()
    with pytest.raises(RuntimeError, match="torch.jit.script is not supported.*torch.compile, torch.export"):
        torch.jit.script(m)
    with pytest.raises(RuntimeError, match="torch.jit.trace is not supported.*torch.compile, torch.export"):
        torch.jit.trace(m, torch.randn(1, 16, 4, 4))
    with pytest.raises(RuntimeError, match="torch.jit.script is not supported"):
        torch.jit.script(FPN([8, 16], 8))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_names_the_backend_that_has_it(backend):
    t, kw = make_problem(1, 4, 4, 3, 4, 2, 2, 1, 3)
    t = {n: x.requires_grad_(True) for n, x in t.items()}
    args = (t["q"], t["k"], t["v"], t["offset"], t["rpb"])
    out = deformable_local_attention(*args, backend=backend, **kw)
    grads = torch.autograd.grad(out.square().sum(), args, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward.*backend='reference'"):
        sum(g.sum() for g in grads).backward()
    # the reference backend does have it
    out = deformable_local_attention(*args, backend="reference", **kw)
    grads = torch.autograd.grad(out.square().sum(), args, create_graph=True)
    second = torch.autograd.grad(sum(g.sum() for g in grads), args)
    assert all(torch.isfinite(g).all() for g in second) and second[0].abs().sum() > 0


# (mode: local_upsample arguments builder) for the NaN contract
def _nan_case(mode, seed):
    t, kw = make_problem(1, 4, 4, 4, 5, 2, 2, 2 if mode == "attention" else 1, 3, spread=1.0, seed=seed)
    K = 9
    if mode == "attention":  # LDA-AQU
        args = dict(offset=t["offset"], q=t["q"], k=t["k"], rpb=t["rpb"], num_heads=2, num_groups=2)
        return t, args, dict(coords="align_corners", padding="zeros")
    if mode == "logits":  # CARAFE: a window around the nearest source pixel, no offsets
        g = torch.Generator().manual_seed(seed)
        t["logits"] = seeded_randn(1, 1, K, 8, 10, generator=g, dtype=torch.float64)
        return t, dict(logits=t["logits"], kernel_size=3), dict(coords="nearest", padding="zeros")
    # DySample: one unit-weight sample per pixel and group, border padding
    t["offset"] = t["offset"].view(1, 2, K, 2, 8, 10)[:, :, 4].reshape(1, 4, 8, 10)
    return t, dict(offset=t["offset"], num_groups=2), dict(coords="half_pixel", padding="border")


def _reads(t, args, rule, y, x):
    """[1, C, Ho, Wo]: whether output (c, Y, X) has a sample with input pixel (y, x) among its four
    bilinear corners (SPEC's contract for a NaN in v), from the positions alone."""
    G = args.get("num_groups", 1)
    iy, ix = positions(args.get("offset"), (8, 10), (4, 5), kernel_size=args.get("kernel_size"), num_groups=G,
                       coords=rule["coords"], dtype=torch.float64, device=None)
    iy, ix = torch.broadcast_tensors(iy, ix)
    if rule["padding"] == "border":
        iy, ix = iy.clamp(0, 3), ix.clamp(0, 4)
    if rule["coords"] == "nearest":
        hit = (iy == y) & (ix == x)
    else:
        hit = ((iy.floor() == y) | (iy.floor() == y - 1)) & ((ix.floor() == x) | (ix.floor() == x - 1))
    return hit.any(2).repeat_interleave(4 // G, 1)  # [1, G, Ho, Wo] -> channels


@pytest.mark.parametrize("mode", ["attention", "logits", "unit"])
def test_one_nan_contract_across_backends(mode):
    """A NaN reaches exactly: from v[c, y, x], the outputs of channel c with a sample whose four bilinear
    corners include (y, x), whatever the corner's weight (0 * NaN is NaN; corners outside the map read
    exact zeros); from k, the same outputs widened to every channel of the head (the softmax's logits);
    from q, a logit or a weight at (Y, X), every channel of its head there; from an offset at (Y, X),
    every channel it moves (its group; with attention, the heads that share it). At the nearest rule's
    integer positions without offsets (CARAFE) a sample reads its pixel alone."""
    seed = fresh_seed()
    t, args, rule = _nan_case(mode, seed)
    C, Ho, Wo = 4, 8, 10
    poisoned = [("v", (0, 1, 2, 3)), ("v", (0, 2, 0, 0)), ("v", (0, 3, 3, 4))]
    if mode == "attention":
        poisoned += [("k", (0, 1, 1, 2)), ("q", (0, 3, 5, 6)), ("offset", (0, 20, 2, 7)), ("rpb", (1, 4, 0))]
    elif mode == "logits":
        poisoned += [("logits", (0, 0, 4, 3, 3))]
    else:
        poisoned += [("offset", (0, 2, 6, 1))]
    for name, where in poisoned:
        masks = {}
        for backend in BACKENDS:
            a = dict(args, v=t["v"])
            a[name] = a[name].clone()
            a[name][where] = float("nan")
            masks[backend] = local_upsample(a.pop("v"), (Ho, Wo), **a, **rule, backend=backend).isnan()
        for backend in BACKENDS[1:]:
            assert torch.equal(masks[backend], masks["reference"]), f"{name}{where} {backend} {mode}, seed={seed}"
        got = masks["reference"]
        if name == "v":
            expect = torch.zeros_like(got)
            expect[:, where[1]] = _reads(t, args, rule, *where[2:])[:, where[1]]
            assert torch.equal(got, expect), f"{name}{where} {mode}, seed={seed}"
        elif name == "q":
            expect = torch.zeros_like(got)
            expect[0, 2:, 5, 6] = True  # head 1 = channels 2, 3
            assert torch.equal(got, expect), f"q, seed={seed}"
        elif name == "rpb":
            assert got[:, 2:].all() and not got[:, :2].any(), f"rpb, seed={seed}"
        elif name in ("offset", "logits"):
            assert got[0, :, where[-2], where[-1]].any() and got.sum() == got[0, :, where[-2], where[-1]].sum(), \
                f"{name}, seed={seed}"
        else:  # k: within head 0's channels, at the pixels whose group-0 samples read it
            assert got.any() and not got[:, 2:].any(), f"k, seed={seed}"
