"""torch.compile(LDAAQU, fullgraph=True) as users call it: the default (Inductor) backend, three input
sizes in a row, the output and every gradient equal to eager."""
import pytest
import torch

from helpers import fresh_seed, make_problem, rel_err
from upsampler import LDAAQU
from upsampler.function import dla_bwd_op, dla_fwd_op
from upsampler.official import official_state_dict

BACKENDS = ("triton", "reference")
# odd sizes that change both H and W, so the second call recompiles with dynamic shapes
SIZES = ((3, 5), (4, 3), (5, 4))


def forward_backward(f, m, x, dout):
    x = x.clone().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    out = f(x)
    out.backward(dout)
    return {"out": out.detach(), "x": x.grad, **{n: p.grad for n, p in m.named_parameters()}}


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_module_matches_eager(backend):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    torch._dynamo.reset()  # each backend gets its own compilations, not the leftovers of another test
    m = LDAAQU(16, num_heads=2, range_factor=2, backend=backend)
    m.load_state_dict(official_state_dict(16, nh=2, seed=seed))  # nonzero offsets: every parameter matters
    compiled = torch.compile(m, fullgraph=True)
    for H, W in SIZES:
        x = torch.randn(2, 16, H, W, generator=gen)
        dout = torch.randn(2, 16, 2 * H, 2 * W, generator=gen)
        eager, comp = forward_backward(m, m, x, dout), forward_backward(compiled, m, x, dout)
        for name, g in eager.items():
            assert g is not None and comp[name] is not None, f"{name}: no gradient, size {(H, W)}, seed={seed}"
            assert rel_err(comp[name], g) < 1e-4, f"{name}, size {(H, W)}, seed={seed}"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_custom_ops_fake_layouts_are_the_real_ones(layout):
    """Inductor trusts the fake kernels' output layouts; it hands the ops channels-last tensors (before
    and after convs) and any rpb layout."""
    def laid_out(x):
        if layout == "contiguous":
            return x
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.mT.contiguous().mT

    t, _ = make_problem(1, 4, 8, 3, 4, 2, 2, 2, 3, dtype=torch.float32, seed=fresh_seed())
    q, k, v, offset, rpb = (laid_out(t[n]) for n in ("q", "k", "v", "offset", "rpb"))
    fwd = (q, k, v, offset, rpb, 2, 2, 0.5, True)
    torch.library.opcheck(dla_fwd_op, fwd, test_utils="test_faketensor")
    out, attn = dla_fwd_op(*fwd)
    bwd = (laid_out(torch.randn_like(out)), q, k, v, offset, rpb, attn, 2, 2, 0.5, False)
    torch.library.opcheck(dla_bwd_op, bwd, test_utils="test_faketensor")
