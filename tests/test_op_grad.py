"""The Triton and torch backwards give the eager reference's gradients for q, k, v, offset and rpb."""
import pytest
import torch

from helpers import fresh_seed, make_problem, rel_err, seeded_randn, slow_except, upcast
from lda_aqu.upsampler import deformable_local_attention

NAMES = ("q", "k", "v", "offset", "rpb")
# (B, D, C, H, W, scale, G, nh, k_u, spread)
CASES = {
    "default": (2, 8, 16, 5, 7, 2, 2, 1, 3, 3.0),
    "k_u=1": (1, 8, 8, 4, 5, 3, 1, 2, 1, 2.0),
    "k_u=5,G=4,nh=2,s=1.5": (1, 8, 16, 4, 5, 1.5, 4, 2, 5, 4.0),
    "k_u=7,nh=4": (1, 16, 16, 3, 4, 2, 2, 4, 7, 3.0),
    "heads cross groups unevenly": (1, 12, 24, 4, 3, 2, 2, 3, 3, 3.0),
    "far outside + Ho=1": (1, 8, 8, 1, 6, 1.5, 2, 1, 3, 12.0),
}
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def grads(t, kw, backend, dout, deterministic=False):
    t = {n: (x.detach().clone().requires_grad_(True) if x is not None else None) for n, x in t.items()}
    torch.use_deterministic_algorithms(deterministic)
    try:
        out = deformable_local_attention(t["q"], t["k"], t["v"], t["offset"], t["rpb"], backend=backend, **kw)
        out.backward(dout.to(out.dtype))
    finally:
        torch.use_deterministic_algorithms(False)
    for n, x in t.items():
        assert x is None or x.grad is not None, f"no gradient for {n}"
    return {n: x.grad for n, x in t.items() if x is not None}


# half types on two cases only: the interpreter is slow, and they share every code path
PAIRS = [(c, d) for c in CASES for d in (torch.float64, torch.float32)] + [
    (c, d) for c in ("default", "heads cross groups unevenly") for d in (torch.float16, torch.bfloat16)]
BACKENDS = ["triton", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,dtype", slow_except(PAIRS, ("default", torch.float64), ("default", torch.float32)),
                         ids=[f"{c}-{d}" for c, d in PAIRS])
def test_backward_matches_reference(case, dtype, backend):
    seed = fresh_seed()
    t, kw = make_problem(*CASES[case], dtype=dtype, seed=seed, rpb=seed % 3 != 0)
    dout = seeded_randn(t["q"].shape[0], t["v"].shape[1], *t["q"].shape[2:], dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))
    got = grads(t, kw, backend, dout)
    ref = grads(upcast(t), kw, "reference", dout)
    for n in got:
        assert got[n].dtype == dtype and got[n].shape == ref[n].shape
        # with K=1 the softmax is constant: the q, k and rpb gradients are exactly zero
        assert rel_err(got[n], ref[n]) < TOL[dtype], f"d{n}, seed={seed}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G,nh,s", slow_except([(2, 1, 2), (4, 2, 1.5)], (2, 1, 2)))
def test_gradcheck_float64(G, nh, s, backend):
    seed = fresh_seed()
    t, kw = make_problem(1, 8, 8, 3, 4, s, G, nh, 3, seed=seed)
    inputs = tuple(t[n].requires_grad_(True) for n in NAMES)

    def f(*xs):
        return deformable_local_attention(*xs, backend=backend, **kw)
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True, atol=1e-7, rtol=1e-5), f"seed={seed}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_positions_and_borders(backend):
    """Samples exactly on pixels and on the border (the kink of the bilinear weights): the kernel
    takes the same one-sided derivative as autograd through floor()."""
    seed = fresh_seed()
    # scale 1: output pixels are input pixels, so integer offsets land exactly on them
    t, kw = make_problem(2, 8, 8, 5, 6, 1, 2, 2, 3, spread=2.5, integer=True, seed=seed)
    assert (t["offset"] == t["offset"].round()).all()
    dout = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    got, ref = grads(t, kw, backend, dout), grads(t, kw, "reference", dout)
    for n in got:
        assert rel_err(got[n], ref[n]) < 1e-10, f"d{n}, seed={seed}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", slow_except([torch.float32, torch.float64], torch.float32), ids=str)
def test_deterministic_mode_repeats_bit_for_bit(dtype, backend):
    seed = fresh_seed()
    t, kw = make_problem(1, 8, 8, 4, 5, 1.5, 4, 2, 3, spread=4.0, dtype=dtype, seed=seed)
    dout = torch.randn(1, 8, *t["q"].shape[2:], dtype=dtype)
    first = grads(t, kw, backend, dout, deterministic=True)
    second = grads(t, kw, backend, dout, deterministic=True)
    atomic = grads(t, kw, backend, dout)
    for n in first:
        assert torch.equal(first[n], second[n]), f"d{n} differs between runs, seed={seed}"
        assert rel_err(first[n], atomic[n]) < (1e-12 if dtype == torch.float64 else 1e-5), f"d{n}, seed={seed}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_no_sampled_copies(backend):
    """What autograd keeps is the inputs and the [B, nh, K, Ho, Wo] attention, not K copies of k, v."""
    seed = fresh_seed()
    t, kw = make_problem(1, 16, 32, 6, 6, 2, 2, 1, 5, seed=seed, dtype=torch.float32)
    inputs = [x.requires_grad_(True) for x in t.values()]

    def saved_bytes(backend):
        seen = {}

        def pack(x):
            seen[(x.untyped_storage().data_ptr(), x.dtype, x.shape)] = x.numel() * x.element_size()
            return x
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            deformable_local_attention(*inputs, backend=backend, **kw)
        return sum(seen.values())
    inputs_bytes = sum(x.numel() * x.element_size() for x in inputs)
    attn_bytes = 25 * 12 * 12 * 4
    assert saved_bytes(backend) <= inputs_bytes + attn_bytes
    assert saved_bytes("reference") > 5 * saved_bytes(backend)
