"""Random problems for the core op, and the error measure the tests use."""
import os

import torch

# where the tests' tensors live: the GPU when the kernels are compiled for it, else the interpreter's CPU
DEVICE = torch.get_default_device()


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
    t = dict(q=randn(B, D, Ho, Wo), k=randn(B, D, H, W), v=randn(B, C, H, W), offset=offset,
             rpb=randn(nh, K, D // nh) * 0.5 if rpb else None)
    t = {n: (x.to(device, dtype) if x is not None else None) for n, x in t.items()}
    return t, dict(num_heads=nh, num_groups=G)


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


def assert_matches_with_grads(got, ref, inputs: dict, seed: int, tol: float = 1e-10):
    """got(inputs) against ref(inputs) in float64: the output (1e-12) and the gradient of every input
    (tol) for the same random dout. inputs: name -> tensor; each function gets fresh leaves."""
    results = []
    for fn in (got, ref):
        leaves = {n: t.detach().clone().requires_grad_(True) for n, t in inputs.items()}
        out = fn(leaves)
        out.backward(torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed)))
        results.append((out.detach(), leaves))
    (out, a), (expect, b) = results
    assert out.shape == expect.shape and rel_err(out, expect) < 1e-12, f"seed={seed}"
    for n in inputs:
        assert a[n].grad is not None and rel_err(a[n].grad, b[n].grad) < tol, f"d{n}, seed={seed}"
    return out
