"""Random problems for the core op, and the error measure the tests use."""
import os

import pytest
import torch

# where the tests' tensors live: the GPU when the kernels are compiled for it, else the interpreter's CPU
DEVICE = torch.get_default_device()


def seeded_randn(*shape, generator: torch.Generator, dtype=None, device=None) -> torch.Tensor:
    """N(0, 1) drawn on the CPU from a CPU `generator` (the seed replays on any machine), returned on
    `device` (default: the tests' default device, the GPU on a CUDA machine)."""
    x = torch.randn(*shape, generator=generator, dtype=dtype, device="cpu")
    return x.to(torch.get_default_device() if device is None else device)


def fresh_seed() -> int:
    """A new seed each run (fresh inputs), reported in assertion messages so a failure replays."""
    return int.from_bytes(os.urandom(4), "little")


def make_problem(B, D, C, H, W, scale, G, nh, k_u, spread=3.0, rpb=True, dtype=torch.float64, seed=0,
                 integer=False, device=DEVICE):
    """q, k, v, offset (base grid + N(0, spread) in output pixels; integers when `integer`), rpb;
    drawn on the CPU (the seed replays anywhere), returned on `device`."""
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = int(H * scale), int(W * scale)
    K = k_u * k_u

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, device="cpu")
    base = torch.arange(k_u, dtype=torch.float64, device="cpu") - k_u // 2
    grid = torch.stack(torch.meshgrid(base, base, indexing="ij"), -1).reshape(1, 1, 2 * K, 1, 1)
    noise = randn(B, G, 2 * K, Ho, Wo) * spread
    offset = (grid + (noise.round() if integer else noise)).reshape(B, G * 2 * K, Ho, Wo)
    if not integer:
        offset = off_pixel_edges(offset, H, W)
    t = dict(q=randn(B, D, Ho, Wo), k=randn(B, D, H, W), v=randn(B, C, H, W), offset=offset,
             rpb=randn(nh, K, D // nh) * 0.5 if rpb else None)
    t = {n: (x.to(device, dtype) if x is not None else None) for n, x in t.items()}
    return t, dict(num_heads=nh, num_groups=G)


def off_pixel_edges(offset: torch.Tensor, H: int, W: int, margin: float = 1e-3,
                    coords: str = "align_corners") -> torch.Tensor:
    """Offsets [B, G*2K, Ho, Wo] (y, x per neighbour, in `coords`' units) moved so that every sample
    lands at least `margin` input pixels off the integer positions. The bilinear derivative jumps
    there, and an fp32 position within rounding of one takes it on the other side than the float64
    reference does: the d(offset) of that sample changes by O(1) (a 4e-3 relative error in the whole
    tensor, seen), whatever the kernel. The kink itself is tested exactly, in float64."""
    B, _, Ho, Wo = offset.shape
    o = offset.double().clone().view(B, -1, 2, Ho, Wo)
    for axis, n, n_out in ((0, H, Ho), (1, W, Wo)):
        idx = torch.arange(n_out, dtype=torch.float64)
        if coords == "align_corners":
            if n_out < 2 or n < 2:  # every sample at position 0 in fp32 and float64 alike
                continue
            origin, unit = idx, (n - 1) / (n_out - 1)
        elif coords == "half_pixel":
            origin, unit = (idx + 0.5) * (n / n_out) - 0.5, 1.0
        else:
            origin, unit = (idx * (n / n_out)).floor(), 1.0
        origin = origin.view(-1, 1) if axis == 0 else origin.view(1, -1)
        pos = ((origin + o[:, :, axis]) * unit) if coords == "align_corners" else origin + o[:, :, axis]
        frac = pos - pos.round()
        step = torch.where(frac >= 0, 2 * margin, -2 * margin) / unit
        o[:, :, axis] += torch.where(frac.abs() < margin, step, 0.0)
    return o.view(B, -1, Ho, Wo).to(offset.dtype)


def mode_problem(mode, coords, padding, offsets, kernel_size, G, nh, K, seed, dtype=torch.float64,
                 dims=(2, 8, 8, 5, 7, 10, 13), spread=2.0, margin=0.0):
    """Inputs of `local_upsample` for one row of the weight mode x coords x padding table: (tensors,
    keyword arguments, output size). dims = (B, C, D, H, W, Ho, Wo); offsets N(0, spread), kept
    `margin` off the pixel edges (off_pixel_edges) when positive."""
    g = torch.Generator().manual_seed(seed)
    B, C, D, H, W, Ho, Wo = dims

    def randn(*shape, s=1.0):
        return (seeded_randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)
    t = {"v": randn(B, C, H, W)}
    if offsets:
        t["offset"] = randn(B, G * 2 * K, Ho, Wo, s=spread)
        if margin > 0:
            t["offset"] = off_pixel_edges(t["offset"], H, W, margin, coords)
    if mode == "attention":
        t.update(q=randn(B, D, Ho, Wo), k=randn(B, D, H, W), rpb=randn(nh, K, D // nh, s=0.5))
    elif mode in ("logits", "weights"):
        t[mode] = randn(B, nh, K, Ho, Wo)
    kw = dict(coords=coords, padding=padding, kernel_size=kernel_size, num_heads=nh,
              num_groups=G if offsets else None)
    return t, kw, (Ho, Wo)


def run_op(t, kw, size, backend, dout, deterministic=False):
    """local_upsample(**t, **kw) on fresh leaves and its backward from dout: (output, {name: gradient})."""
    from lda_aqu.upsampler import local_upsample
    leaves = {n: x.detach().clone().requires_grad_(True) for n, x in t.items()}
    torch.use_deterministic_algorithms(deterministic)
    try:
        out = local_upsample(leaves["v"], size, backend=backend, **{n: x for n, x in leaves.items() if n != "v"}, **kw)
        out.backward(dout.to(out.dtype))
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(x.grad is not None for x in leaves.values()), "an input got no gradient"
    return out.detach(), {n: x.grad for n, x in leaves.items()}


def upcast(t: dict) -> dict:
    return {n: (x.detach().double() if x is not None else None) for n, x in t.items()}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref||, with NaN anywhere counting as failure; absolute when ref is zero."""
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("inf")
    denom = ref.norm().item()
    return (a - ref).norm().item() / (denom if denom > 0 else 1.0)


def backends_under_test() -> tuple:
    """The backends the upsampler tests run: $LDA_AQU_TEST_BACKENDS (comma-separated), else Triton and torch."""
    return tuple(os.environ.get("LDA_AQU_TEST_BACKENDS", "triton,torch").split(","))


def slow_except(values, *fast) -> list:
    """Parametrize `values` with all but those in `fast` marked slow: the fast tier (-m "not slow") keeps
    the cheap cases of a family, the full suite runs them all. A tuple is one case's arguments."""
    return [v if v in fast else pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=pytest.mark.slow)
            for v in values]


def assert_matches_with_grads(got, ref, inputs: dict, seed: int, tol: float = 1e-10):
    """got(inputs) against ref(inputs) in float64: the output (1e-12) and the gradient of every input
    (tol) for the same random dout. inputs: name -> tensor; each function gets fresh leaves."""
    results = []
    for fn in (got, ref):
        leaves = {n: t.detach().clone().requires_grad_(True) for n, t in inputs.items()}
        out = fn(leaves)
        out.backward(seeded_randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed)))
        results.append((out.detach(), leaves))
    (out, a), (expect, b) = results
    assert out.shape == expect.shape and rel_err(out, expect) < 1e-12, f"seed={seed}"
    for n in inputs:
        assert a[n].grad is not None and rel_err(a[n].grad, b[n].grad) < tol, f"d{n}, seed={seed}"
    return out
