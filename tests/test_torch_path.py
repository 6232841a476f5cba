"""The torch path of local_upsample: every weight mode, coordinate rule and padding against the
reference (forward and gradients, float64), its dtypes and saved memory, the plain graph it exports,
and ONNX export of the module run by onnxruntime at other sizes."""
import copy
import ctypes

import pytest
import torch

from helpers import fresh_seed, rel_err, seeded_randn
from lda_aqu.upsampler import CARAFE, LDAAQU, DySample, local_upsample, select_backend
from lda_aqu.upsampler import torch_path
from lda_aqu.kernels import cpu, layout
from lda_aqu.kernels.layout import Spec

# (B, C, H, W, size, G, nh, kernel_size): odd sizes, groups and heads crossing unevenly, Ho = 1
GEOMETRY = {
    "s2,G=3,nh=2": (2, 6, 5, 4, (10, 8), 3, 2, 3),
    "s1.5,G=1,nh=1,k=5": (1, 4, 4, 5, (6, 7), 1, 1, 5),
    "Ho=1,G=2,nh=4": (1, 8, 3, 6, (1, 9), 2, 4, 3),
}
MODES = ["attention", "logits", "weights", "unit"]


@pytest.fixture(params=["native", "gathers"])
def impl(request, monkeypatch):
    """The CPU op's two forms: the native kernels (lda_aqu/kernels/local_upsample_cpu.cpp) and, where they cannot
    build, the gathers (embedding_bag, sampled_addmm)."""
    if request.param == "native":
        if cpu.unavailable():
            pytest.skip(f"native kernels unavailable: {cpu.unavailable()}")
    else:
        monkeypatch.setattr(cpu, "unavailable", lambda: "the gathers, forced by the test")
    return request.param


def problem(name, mode, seed, dtype=torch.float64, offsets=True):
    B, C, H, W, size, G, nh, ks = GEOMETRY[name]
    g = torch.Generator().manual_seed(seed)
    K, D = ks * ks, 2 * C

    def randn(*shape):
        return seeded_randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    t = dict(v=randn(B, C, H, W), offset=randn(B, G * 2 * K, *size) * 2 if offsets else None)
    if mode == "attention":
        t.update(q=randn(B, D, *size), k=randn(B, D, H, W), rpb=randn(nh, K, D // nh) * 0.5)
    elif mode in ("logits", "weights"):
        t[mode] = randn(B, nh, K, *size)
    kw = dict(kernel_size=ks, num_groups=G if offsets else None, num_heads=nh if mode == "attention" else 1)
    return t, size, kw


def run(t, size, kw, backend, **extra):
    t = dict(t)
    return local_upsample(t.pop("v"), size, **t, **kw, backend=backend, **extra)


def grads(t, size, kw, backend, dout, **extra):
    t = {n: (x.detach().clone().requires_grad_(True) if x is not None else None) for n, x in t.items()}
    run(t, size, kw, backend, **extra).backward(dout)
    return {n: x.grad for n, x in t.items() if x is not None}


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("coords", ["align_corners", "half_pixel", "nearest"])
@pytest.mark.parametrize("mode", MODES)
def test_modes_match_reference(mode, coords, padding, impl):
    seed = fresh_seed()
    name = list(GEOMETRY)[seed % len(GEOMETRY)]
    t, size, kw = problem(name, mode, seed)
    extra = dict(coords=coords, padding=padding)
    out, ref = run(t, size, kw, "torch", **extra), run(t, size, kw, "reference", **extra)
    assert out.shape == ref.shape and rel_err(out, ref) < 1e-12, f"{name}, seed={seed}"
    dout = torch.randn(out.shape, dtype=torch.float64)
    got, expect = grads(t, size, kw, "torch", dout, **extra), grads(t, size, kw, "reference", dout, **extra)
    for n in expect:
        assert rel_err(got[n], expect[n]) < 1e-10, f"d{n}, {name}, seed={seed}"


@pytest.mark.parametrize("mode", MODES)
def test_chunks_match_reference(mode, monkeypatch, impl):
    """One output row per chunk (tables per image, gradients of v and k summed over each chunk's band
    of rows; the native backward's scatter passes): the same op, and bitwise repeatable."""
    monkeypatch.setattr(layout, "CHUNK_PAIRS", 1)
    seed = fresh_seed()
    name = list(GEOMETRY)[seed % len(GEOMETRY)]
    extra = dict(coords=["align_corners", "half_pixel", "nearest"][seed % 3], padding=["zeros", "border"][seed % 2])
    t, size, kw = problem(name, mode, seed)
    out, ref = run(t, size, kw, "torch", **extra), run(t, size, kw, "reference", **extra)
    assert rel_err(out, ref) < 1e-12, f"{name}, {extra}, seed={seed}"
    dout = torch.randn(out.shape, dtype=torch.float64)
    got, expect = grads(t, size, kw, "torch", dout, **extra), grads(t, size, kw, "reference", dout, **extra)
    again = grads(t, size, kw, "torch", dout, **extra)
    for n in expect:
        assert rel_err(got[n], expect[n]) < 1e-10, f"d{n}, {name}, {extra}, seed={seed}"
        assert torch.equal(got[n], again[n]), f"d{n} not repeatable, {name}, {extra}, seed={seed}"


@pytest.mark.parametrize("mode", ["attention", "unit"])
def test_base_grid_without_offsets(mode):
    seed = fresh_seed()
    t, size, kw = problem("s2,G=3,nh=2", mode, seed, offsets=False)
    assert rel_err(run(t, size, kw, "torch"), run(t, size, kw, "reference")) < 1e-12, f"seed={seed}"


@pytest.mark.parametrize("mode", ["attention", "weights"])
def test_gradcheck_float64(mode, impl):
    seed = fresh_seed()
    t, size, kw = problem("Ho=1,G=2,nh=4", mode, seed)
    names = [n for n, x in t.items() if x is not None]

    def f(*xs):
        return run(dict(t, **dict(zip(names, xs))), size, kw, "torch")
    inputs = tuple(t[n].requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True, atol=1e-7, rtol=1e-5), f"seed={seed}"


def test_bfloat16_accumulates_in_float32(impl):
    seed = fresh_seed()
    t, size, kw = problem("s2,G=3,nh=2", "attention", seed, dtype=torch.bfloat16)
    out = run(t, size, kw, "torch")
    ref = run({n: x.double() for n, x in t.items()}, size, kw, "reference")
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1.6e-2, f"seed={seed}"
    g = grads(t, size, kw, "torch", torch.randn(out.shape, dtype=torch.bfloat16))
    assert all(x.dtype == torch.bfloat16 and torch.isfinite(x).all() for x in g.values())


@pytest.mark.parametrize("mode", MODES)
def test_native_is_the_same_at_any_thread_count(mode):
    """The native kernels split pixels (forward, per-pixel gradients) and channels (the scatters of dv
    and dk) over threads; every element sums in one order, so 1 and 2 threads agree bit for bit."""
    if cpu.unavailable():
        pytest.skip(f"native kernels unavailable: {cpu.unavailable()}")
    seed = fresh_seed()
    t, size, kw = problem("s2,G=3,nh=2", mode, seed, dtype=torch.float32)
    dout = seeded_randn(t["v"].shape[0], t["v"].shape[1], *size, generator=torch.Generator().manual_seed(seed))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((run(t, size, kw, "torch"), grads(t, size, kw, "torch", dout)))
    finally:
        torch.set_num_threads(threads)
    (out1, g1), (out2, g2) = results
    assert torch.equal(out1, out2), f"seed={seed}"
    assert all(torch.equal(g1[n], g2[n]) for n in g1), f"seed={seed}"


@pytest.mark.parametrize("shape,Co,k,pad", [((2, 8, 11, 37), 18, 3, None), ((1, 4, 6, 5), 50, 5, None),
                                          ((3, 8, 9, 19), 98, 3, (0, 2)), ((1, 2, 1, 1), 18, 3, None)])
def test_native_offset_conv_head_is_the_branch(shape, Co, k, pad):
    """The offset branch's last conv, tanh, range and base grid in one native pass (inference): float64
    as F.conv2d and torch's tanh (widths off the vector length, a band's halo rows given, channels past
    the register blocks, a 1x1 map), fp32 within 4x torch's own fp32 error, 1 and 2 threads alike."""
    if cpu.unavailable():
        pytest.skip(f"native kernels unavailable: {cpu.unavailable()}")
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    h, w, b, base = (seeded_randn(*s, generator=g, dtype=torch.float64, device="cpu")
                     for s in (shape, (Co, shape[1], k, k), (Co,), (Co,)))
    w = w * 0.3
    pt, pb = (k // 2, k // 2) if pad is None else pad

    def branch(h, w, b, base):
        o = torch.nn.functional.conv2d(torch.nn.functional.pad(h, (0, 0, pt, pb)), w, b, padding=(0, k // 2))
        return o.tanh() * 11.0 + base.view(1, -1, 1, 1)
    truth = branch(h, w, b, base)
    assert rel_err(cpu.offset_conv_head(h, w, b, base, 11.0, pad), truth) < 1e-14, f"seed={seed}"
    f32 = [t.float() for t in (h, w, b, base)]
    tol = 4 * rel_err(branch(*f32), truth) + 1e-7
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(cpu.offset_conv_head(*f32, 11.0, pad))
    finally:
        torch.set_num_threads(threads)
    assert rel_err(outs[0], truth) < tol and torch.equal(outs[0], outs[1]), f"seed={seed}"


def test_native_build_says_why_not(monkeypatch, tmp_path):
    """No compiler, a failing one, or LDA_AQU_NATIVE=0: unavailable() says so, and the op runs the gathers."""
    for env, why in ((dict(LDA_AQU_NATIVE="0"), "LDA_AQU_NATIVE=0"), (dict(CXX="false"), "false failed")):
        monkeypatch.setenv("LDA_AQU_BUILD_DIR", str(tmp_path))
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        _gathers_stand_in(monkeypatch, why)


def _gathers_stand_in(monkeypatch, why: str):
    """With the library refused for `why` (as monkeypatch has set things up), the op runs its gathers and
    matches the reference; then the patches go and the real library comes back."""
    cpu._library.cache_clear()
    try:
        assert why in cpu.unavailable()
        t, size, kw = problem("s2,G=3,nh=2", "attention", fresh_seed())
        assert rel_err(run(t, size, kw, "torch"), run(t, size, kw, "reference")) < 1e-12
    finally:
        monkeypatch.undo()
        cpu._library.cache_clear()


def test_native_layout_matches_ctypes():
    """The library reports its Problem struct field by field, in the order, offsets and sizes of the ctypes
    copy that fills it."""
    if cpu.unavailable():
        pytest.skip(f"native kernels unavailable: {cpu.unavailable()}")
    size, fields = cpu._library()[0].lu_problem_layout().decode().split(";")
    reported = [f.split(":")[:3] for f in fields.split(",")]
    assert int(size) == ctypes.sizeof(cpu._Problem)
    assert reported == [[n, str(getattr(cpu._Problem, n).offset), str(ctypes.sizeof(t))]
                        for n, t in cpu._Problem._fields_]


def test_native_layout_drift_is_refused(monkeypatch, tmp_path):
    """A library whose Problem differs from lda_aqu.kernels/cpu.py's _Problem (two fields swapped in the C++, or a
    field added to the ctypes copy alone) is not called: unavailable() names the field, and the op runs the
    gathers."""
    if cpu.unavailable():
        pytest.skip(f"native kernels unavailable: {cpu.unavailable()}")
    source = cpu.SOURCE.read_text()
    swapped = source.replace("double unit_y, unit_x, scale;", "double unit_x, unit_y, scale;")
    assert swapped != source
    (tmp_path / cpu.SOURCE.name).write_text(swapped)

    class Extended(ctypes.Structure):
        _fields_ = cpu._Problem._fields_ + [("extra", ctypes.c_double)]

    # the swapped source builds in tmp_path; the extended copy loads the real library, already built
    cases = ((tmp_path, "SOURCE", tmp_path / cpu.SOURCE.name,
              "field unit_y: offset 168 (8 bytes, float) in local_upsample_cpu.cpp's Problem, "
              "offset 160 (8 bytes, float) in _Problem"),
             (None, "_Problem", Extended,
              f"field extra: absent in local_upsample_cpu.cpp's Problem, offset {ctypes.sizeof(cpu._Problem)} "
              "(8 bytes, float) in _Problem"))
    for build_dir, name, value, why in cases:
        if build_dir is not None:
            monkeypatch.setenv("LDA_AQU_BUILD_DIR", str(build_dir))
        monkeypatch.setattr(cpu, name, value)
        _gathers_stand_in(monkeypatch, why)


@pytest.mark.parametrize("mode", ["attention", "logits"])
def test_saves_inputs_and_weights_only(mode, impl):
    seed = fresh_seed()
    t, size, kw = problem("s2,G=3,nh=2", mode, seed, dtype=torch.float32)
    t = {n: x.requires_grad_(True) for n, x in t.items()}
    seen = {}

    def pack(x):
        seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        run(t, size, kw, "torch")
    B, nh, K = t["v"].shape[0], GEOMETRY["s2,G=3,nh=2"][6], 9
    weights_bytes = B * nh * K * size[0] * size[1] * 4
    assert sum(seen.values()) <= sum(x.numel() * 4 for x in t.values()) + weights_bytes


def test_plain_graph_matches_reference():
    """The graph taken under export and on devices other than the CPU (grid_sample per neighbour)."""
    seed = fresh_seed()
    for i, (mode, offsets) in enumerate([(m, o) for m in MODES for o in (True, False)]):
        name = list(GEOMETRY)[i % len(GEOMETRY)]
        t, size, kw = problem(name, mode, seed, offsets=offsets)  # without offsets: CARAFE, interpolation
        G, nh = kw["num_groups"] or 1, 1 if mode == "unit" else GEOMETRY[name][6]
        for coords, padding in (("align_corners", "zeros"), ("half_pixel", "border")):
            scale = (t["q"].shape[1] // nh) ** -0.5 if mode == "attention" else 1.0
            K = t["offset"].shape[1] // (2 * G) if t["offset"] is not None else (kw["kernel_size"] or 1) ** 2
            spec = Spec(G, nh, K, mode, coords, padding, kw["kernel_size"] or 0, scale)
            out = torch_path._plain(t["v"], size, t["offset"], t.get("q"), t.get("k"), t.get("rpb"), t.get("logits"),
                                    t.get("weights"), spec)
            ref = run(t, size, kw, "reference", coords=coords, padding=padding)
            assert rel_err(out, ref) < 1e-10, f"{mode} {coords} offsets={offsets}, seed={seed}"


def test_plain_graph_one_weighted_sample():
    """K = 1 at half-pixel positions with offsets takes DySample's grid_sample shortcut only when the
    sample's weight is 1: given weights still scale it."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    v = seeded_randn(2, 6, 4, 5, dtype=torch.float64, generator=g)
    size, G = (8, 10), 2
    off = seeded_randn(2, 2 * G, *size, dtype=torch.float64, generator=g) * 2
    for weights in (None, seeded_randn(2, 1, 1, *size, dtype=torch.float64, generator=g)):
        spec = Spec(G, 1, 1, "unit" if weights is None else "weights", "half_pixel", "border")
        out = torch_path._plain(v, size, off, None, None, None, None, weights, spec)
        ref = local_upsample(v, size, offset=off, weights=weights, num_groups=G, coords="half_pixel",
                             padding="border", backend="reference")
        assert rel_err(out, ref) < 1e-12, f"weights={weights is not None}, seed={seed}"


@pytest.mark.parametrize("backend", ["auto", "triton", "torch", "reference"])
def test_every_backend_takes_the_plain_graph_while_exporting(backend, monkeypatch):
    v = torch.randn(1)
    assert select_backend(backend, v) == ("torch" if backend == "auto" else backend)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert select_backend(backend, v) == "torch"


@pytest.mark.slow
def test_onnx_export_runs_at_other_sizes(tmp_path):
    """The ordinary torch.onnx.export call; onnxruntime at the export size and two others, batch
    included, output size included (scale 1.5: int(H * s) must stay symbolic). The example batch is
    2: torch.export fixes every dimension that is 1 in the example."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    seed = fresh_seed()
    torch.manual_seed(seed)
    m = LDAAQU(16, scale_factor=1.5, n_groups=2, num_heads=2, backend="triton").eval()  # Triton cannot export
    torch.nn.init.normal_(m.conv_offset[-1].weight, std=0.1)
    path = str(tmp_path / "lda_aqu.onnx")
    torch.onnx.export(m, (torch.randn(2, 16, 6, 7),), path, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}})
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    m.backend = "reference"
    exact = copy.deepcopy(m).double()
    for shape in [(2, 16, 6, 7), (1, 16, 9, 5), (3, 16, 5, 12)]:
        x = torch.randn(shape)
        y = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        with torch.no_grad():
            expect, truth = m(x), exact(x.double())
        assert y.shape == expect.shape == (shape[0], 16, int(shape[2] * 1.5), int(shape[3] * 1.5))
        # The module is ill-conditioned in fp32 (range_factor * tanh magnifies the offsets' rounding):
        # PyTorch's own fp32 output is up to ~2e-4 from float64 here, and so is onnxruntime's, each
        # rounding its own way. So onnxruntime is held to float64 within PyTorch's fp32 error + 1e-4.
        fp32_err = (expect.double() - truth).abs().max().item()
        assert (y.double() - truth).abs().max() <= 1e-4 + 2 * fp32_err, f"{shape}, seed={seed}"
        assert (y - expect).abs().max() < 1e-3, f"{shape}, seed={seed}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["carafe", "dysample"])
def test_onnx_export_of_the_other_upsamplers(name, tmp_path):
    """CARAFE (a window, no offsets) and DySample (one sample per pixel) export the same way and run
    in onnxruntime at another size, output size included."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    seed = fresh_seed()
    torch.manual_seed(seed)
    m = CARAFE(16, 2, up_kernel=3, compressed_channels=8) if name == "carafe" else DySample(16, 2)
    for p in m.parameters():  # away from the initialisation's plain kernels and zero offsets
        torch.nn.init.normal_(p, std=0.1)
    m.eval()
    path = str(tmp_path / f"{name}.onnx")
    torch.onnx.export(m, (torch.randn(2, 16, 6, 7),), path, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}})
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for shape in [(2, 16, 6, 7), (1, 16, 9, 5)]:
        x = torch.randn(shape)
        y = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        with torch.no_grad():
            expect = m(x)
        assert y.shape == expect.shape == (shape[0], 16, 2 * shape[2], 2 * shape[3])
        assert (y - expect).abs().max() < 1e-4, f"{name} {shape}, seed={seed}"


@pytest.mark.parametrize("shape", [(2, 24, 13, 70), (1, 5, 3, 3), (3, 64, 17, 9)])
def test_native_layer_norm_trains_as_torchs(shape):
    """The channels' layer norm in eager CPU training is the native pass with its native backward: float64
    value and every gradient as F.layer_norm's, fp32 within 4x torch's own fp32 error, 1 and 2 threads
    alike bit for bit, and autograd keeps x and the weight alone (pixels off the 64-pixel blocks, odd C)."""
    from lda_aqu.upsampler.layernorm import _layer_norm_channels
    if cpu.unavailable():
        pytest.skip(f"native kernels unavailable: {cpu.unavailable()}")
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    x = seeded_randn(*shape, generator=g, dtype=torch.float64, device="cpu") * 2 + 0.5
    w, b = (seeded_randn(shape[1], generator=g, dtype=torch.float64, device="cpu") for _ in range(2))
    dy = seeded_randn(*shape, generator=g, dtype=torch.float64, device="cpu")

    def torch_form(x, w, b):
        return torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), shape[1:2], w, b, 1e-5).permute(0, 3, 1, 2)

    def value_and_grads(f, dtype):
        ins = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            y = f(*ins)
        return y, torch.autograd.grad(y, ins, dy.to(dtype)), kept

    truth, truth_grads, _ = value_and_grads(torch_form, torch.float64)
    y, grads, kept = value_and_grads(lambda *t: _layer_norm_channels(*t, 1e-5), torch.float64)
    assert type(y.grad_fn).__name__ == "_LayerNormChannelsBackward"
    assert sorted(t.shape for t in kept) == sorted([torch.Size(shape[1:2]), torch.Size(shape)])
    assert rel_err(y, truth) < 1e-14 and all(rel_err(a, t) < 1e-13 for a, t in zip(grads, truth_grads)), \
        f"seed={seed}"
    _, torch32, _ = value_and_grads(torch_form, torch.float32)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(value_and_grads(lambda *t: _layer_norm_channels(*t, 1e-5), torch.float32)[1])
    finally:
        torch.set_num_threads(threads)
    for a, a2, t32, t in zip(*runs, torch32, truth_grads):
        assert rel_err(a, t) < 4 * rel_err(t32, t) + 1e-7 and torch.equal(a, a2), f"seed={seed}"
