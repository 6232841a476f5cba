"""The op's windows, in every backend, against float64 re-derivations of the formulas of the projects
they come from:
- window="clamped" (NATTEN's neighbourhood, as NAF uses it): NAF resizes the keys and values to the
  queries' size with nearest-exact and runs dilated neighbourhood attention on the copies; at an exact
  multiple that is the op reading them in place;
- window_ratio (AnyUp): a dense attention over every low-resolution key, masked to the rows and columns
  within the ratio of the pixel centre, each head's softmax averaged over the heads and applied to
  every channel of the values."""
import pytest
import torch
import torch.nn.functional as F

from helpers import backends_under_test, fresh_seed, rel_err, seeded_randn, slow_except
from lda_aqu.kernels.layout import ratio_box, window_bounds
from lda_aqu.upsampler import local_upsample
from lda_aqu.upsampler.naive import window_rows

BACKENDS = ("reference", *backends_under_test())


def anyup_dense(q, k, v, nh, scale, ratio):
    """AnyUp's attention as its code forms it: a boolean mask over all H*W keys per query (cells whose
    rows and columns lie within `ratio` of the query's pixel centre, in float32), a softmax per head,
    the heads' weights averaged and applied to the unprojected values."""
    B, D, Ho, Wo = q.shape
    C, H, W = v.shape[1:]

    def ok(n_out, n_in):  # [n_out, n_in]: low-resolution row i is in output row o's window
        centre = (torch.arange(n_out, dtype=torch.float32) + 0.5) / n_out
        first = ((centre - ratio).clamp(0.0, 1.0) * n_in).floor().long()
        end = ((centre + ratio).clamp(0.0, 1.0) * n_in).ceil().long()
        i = torch.arange(n_in)
        return ((i >= first[:, None]) & (i < end[:, None])).to(q.device)
    mask = (ok(Ho, H)[:, None, :, None] & ok(Wo, W)[None, :, None, :]).reshape(Ho * Wo, H * W)
    qh = q.reshape(B, nh, D // nh, Ho * Wo)
    kh = k.reshape(B, nh, D // nh, H * W)
    logits = torch.einsum("bhdp,bhdn->bhpn", qh * scale, kh).masked_fill(~mask, float("-inf"))
    weights = logits.softmax(-1).mean(1)  # [B, P, N]
    return torch.einsum("bpn,bcn->bcp", weights, v.reshape(B, C, H * W)).reshape(B, C, Ho, Wo)


def naf_dilated(q, k, v, nh, scale, ks):
    """NAF's attention as its code forms it: k and v copied to the queries' size (nearest-exact), then
    NATTEN's dilated neighbourhood attention with dilation Ho // H: in the query's dilation class (rows
    y mod d), the ks rows around y // d, the window moved inwards at the borders."""
    B, D, Ho, Wo = q.shape
    C, H, W = v.shape[1:]
    kc = F.interpolate(k, size=(Ho, Wo), mode="nearest-exact")
    vc = F.interpolate(v, size=(Ho, Wo), mode="nearest-exact")

    def rows(n_out, n_in):  # [n_out, ks] rows of the copy
        d = n_out // n_in
        o = torch.arange(n_out)
        first = (o // d - ks // 2).clamp(0, n_out // d - ks)
        return (o % d)[:, None] + (first[:, None] + torch.arange(ks)) * d
    ry, rx = rows(Ho, H), rows(Wo, W)
    idx = (ry[:, None, :, None] * Wo + rx[None, :, None, :]).reshape(Ho * Wo, ks * ks).to(q.device)
    ksmp = kc.flatten(2)[:, :, idx].reshape(B, nh, D // nh, Ho * Wo, ks * ks)
    vsmp = vc.flatten(2)[:, :, idx].reshape(B, nh, C // nh, Ho * Wo, ks * ks)
    qh = q.reshape(B, nh, D // nh, Ho * Wo, 1)
    a = (qh * scale * ksmp).sum(2, keepdim=True).softmax(-1)
    return (a * vsmp).sum(-1).reshape(B, C, Ho, Wo)


def problem(B, C, D, H, W, Ho, Wo, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {n: seeded_randn(*s, generator=g, dtype=dtype).requires_grad_(True)
            for n, s in (("v", (B, C, H, W)), ("q", (B, D, Ho, Wo)), ("k", (B, D, H, W)))}


def value_and_grads(fn, t, seed):
    out = fn(**t)
    # drawn in float64 and rounded: randn draws other numbers in float32
    dout = seeded_randn(*out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    dout = dout.to(out.dtype)
    return (out, *torch.autograd.grad(out, tuple(t.values()), dout))


# (H, W) -> (Ho, Wo): non-square maps at ratios 2, 7, 8, 14, 16 (the last ones small in space)
SIZES = [(5, 7, 10, 14), (3, 4, 21, 28), (3, 2, 24, 16), (2, 3, 28, 42), (3, 2, 48, 32)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,W,Ho,Wo", slow_except(SIZES, SIZES[0], SIZES[1]))
@pytest.mark.parametrize("nh,ratio", [(2, 0.1), (1, 0.3)])
def test_ratio_window_is_anyups_masked_dense_attention(backend, H, W, Ho, Wo, nh, ratio):
    seed = fresh_seed()
    t = problem(2, 6, 8, H, W, Ho, Wo, seed)
    scale = (8 // nh) ** -0.5
    got = value_and_grads(lambda v, q, k: local_upsample(v, (Ho, Wo), q=q, k=k, num_heads=nh, window_ratio=ratio,
                                                         average_heads=True, backend=backend), t, seed)
    want = value_and_grads(lambda v, q, k: anyup_dense(q, k, v, nh, scale, ratio), t, seed)
    for name, a, b in zip(("out", "dv", "dq", "dk"), got, want):
        assert rel_err(a, b) < 1e-12, f"{name} {backend} {(H, W, Ho, Wo)} seed={seed}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,W,Ho,Wo", slow_except(SIZES, SIZES[0], SIZES[2]))
@pytest.mark.parametrize("nh,ks", [(2, 3), (1, 1)])
def test_clamped_window_is_nafs_dilated_attention_on_copies(backend, H, W, Ho, Wo, nh, ks):
    while ks > min(H, W):  # NATTEN needs the window inside the map
        ks -= 2
    seed = fresh_seed()
    t = problem(2, 6, 8, H, W, Ho, Wo, seed)
    scale = (8 // nh) ** -0.5
    got = value_and_grads(lambda v, q, k: local_upsample(v, (Ho, Wo), q=q, k=k, num_heads=nh, kernel_size=ks,
                                                         coords="nearest", window="clamped", backend=backend), t, seed)
    want = value_and_grads(lambda v, q, k: naf_dilated(q, k, v, nh, scale, ks), t, seed)
    for name, a, b in zip(("out", "dv", "dq", "dk"), got, want):
        assert rel_err(a, b) < 1e-12, f"{name} {backend} {(H, W, Ho, Wo)} seed={seed}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", ["clamped", "ratio"])
def test_windows_per_head_and_averaged_agree_across_backends(backend, window):
    """Per-head values (average_heads=False) and heads averaged, groups of keys and rpb (clamped), at a
    size that is no multiple of the map, against the reference."""
    seed = fresh_seed()
    H, W, Ho, Wo = 6, 5, 13, 11
    t = problem(2, 8, 8, H, W, Ho, Wo, seed)
    rpb = seeded_randn(2, 9, 4, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    for avg in (False, True):
        kw = dict(num_heads=2, average_heads=avg)
        kw.update(dict(kernel_size=3, coords="nearest", window="clamped", rpb=rpb) if window == "clamped" else
                  dict(window_ratio=0.25))
        got, want = (value_and_grads(lambda v, q, k: local_upsample(v, (Ho, Wo), q=q, k=k, backend=b, **kw), t, seed)
                     for b in (backend, "reference"))
        for name, a, b in zip(("out", "dv", "dq", "dk"), got, want):
            assert rel_err(a, b) < 1e-12, f"{name} {backend} {window} average_heads={avg} seed={seed}"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_windows_in_fp32_within_the_measured_bound(backend):
    """fp32 against float64: the bound of the op's other fp32 attention cases (worst measured 3.2e-7)."""
    seed = fresh_seed()
    t = problem(2, 8, 8, 7, 6, 28, 24, seed)
    for kw in (dict(kernel_size=5, coords="nearest", window="clamped"), dict(window_ratio=0.1, average_heads=True)):
        want = value_and_grads(lambda v, q, k: local_upsample(v, (28, 24), q=q, k=k, num_heads=2, backend="reference",
                                                              **kw), t, seed)
        t32 = {n: x.detach().float().requires_grad_(True) for n, x in t.items()}
        got = value_and_grads(lambda v, q, k: local_upsample(v, (28, 24), q=q, k=k, num_heads=2, backend=backend,
                                                             **kw), t32, seed)
        for name, a, b in zip(("out", "dv", "dq", "dk"), got, want):
            assert a.dtype == torch.float32 and rel_err(a.double(), b) < 5e-6, f"{name} {kw} seed={seed}"


@pytest.mark.parametrize("n_in", [1, 2, 3, 7, 14, 28, 32, 37])
def test_window_rows_agree_and_fit_the_box(n_in):
    """The runtime's bounds (kernels.layout) and the reference's (naive) are derived apart; they agree for
    every output size up to 64x the map, and no window is wider than the box the backends allocate."""
    for n_out in sorted({1, 2, 5, n_in, 2 * n_in, 7 * n_in, 16 * n_in, 64 * n_in, 3 * n_in + 1}):
        for ratio in (0.01, 0.05, 0.1, 0.125, 0.25, 0.5, 1.0, 1 / 3):
            lo, hi = window_bounds(n_in, n_out, "ratio", None, ratio)
            assert list(zip(lo.tolist(), hi.tolist())) == window_rows(n_in, n_out, "ratio", None, ratio), (n_out, ratio)
            assert 1 <= (hi - lo).min() and (hi - lo).max() <= ratio_box(n_in, ratio), (n_out, ratio)
        for ks in range(1, n_in + 1, 2):
            lo, hi = window_bounds(n_in, n_out, "clamped", ks, 0.0)
            assert list(zip(lo.tolist(), hi.tolist())) == window_rows(n_in, n_out, "clamped", ks, None)
            assert lo.min() >= 0 and hi.max() <= n_in


def test_window_arguments_are_checked():
    t = problem(1, 4, 4, 5, 6, 10, 12, 0)
    v, q, k = t["v"], t["q"], t["k"]
    cases = [
        (dict(q=q, k=k, kernel_size=3, coords="nearest", window="square"), "window must be one of"),
        (dict(q=q, k=k, kernel_size=3, window="clamped"), "coords must be 'nearest'"),
        (dict(q=q, k=k, kernel_size=7, coords="nearest", window="clamped"), "kernel_size <= the map"),
        (dict(q=q, k=k, coords="nearest", window="clamped"), "needs kernel_size"),
        (dict(q=q, k=k, window="ratio"), "needs window_ratio"),
        (dict(q=q, k=k, window_ratio=0.0), "window_ratio must be a positive"),
        (dict(q=q, k=k, window_ratio=float("nan")), "window_ratio must be a positive"),
        (dict(q=q, k=k, window_ratio=0.1, kernel_size=3), "takes no kernel_size"),
        (dict(q=q, k=k, window_ratio=0.1, window="clamped"), "sets window='ratio'"),
        (dict(window_ratio=0.1), "needs q and k"),
        (dict(kernel_size=3, average_heads=True), "needs q and k"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            local_upsample(v, (10, 12), **kw)
    with pytest.raises(TypeError, match="average_heads must be a bool"):
        local_upsample(v, (10, 12), q=q, k=k, window_ratio=0.1, average_heads=1)


@pytest.mark.slow
@pytest.mark.parametrize("window", ["clamped", "ratio"])
def test_windows_compile_and_export(window, tmp_path):
    """torch.compile (Inductor, fullgraph) forward and backward as eager; torch.onnx.export run by
    onnxruntime as the eager fp32 op."""
    seed = fresh_seed()
    t = problem(2, 8, 8, 5, 6, 20, 24, seed, dtype=torch.float32)
    kw = dict(kernel_size=3, coords="nearest", window="clamped") if window == "clamped" else \
        dict(window_ratio=0.15, average_heads=True)

    class Attend(torch.nn.Module):
        def forward(self, v, q, k):
            return local_upsample(v, tuple(q.shape[-2:]), q=q, k=k, num_heads=2, backend="torch", **kw)
    m = Attend()
    eager = value_and_grads(m, t, seed)
    compiled = value_and_grads(torch.compile(m, fullgraph=True), t, seed)
    for name, a, b in zip(("out", "dv", "dq", "dk"), compiled, eager):
        assert rel_err(a, b) < 1e-5, f"compiled {name} seed={seed}"
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    args = tuple(x.detach() for x in t.values())
    path = str(tmp_path / f"{window}.onnx")
    torch.onnx.export(m, args, path, input_names=["v", "q", "k"], output_names=["y"])
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    y = torch.from_numpy(session.run(None, {n: x.numpy() for n, x in zip(("v", "q", "k"), args)})[0])
    assert rel_err(y, eager[0].detach()) < 1e-5, f"onnx seed={seed}"
