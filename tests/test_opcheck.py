"""torch.library.opcheck, all its default tests (schema, autograd registration, fake tensors, AOT
dispatch with dynamic shapes: outputs and gradients against eager), on every `lda_aqu::` custom op,
with the arguments the modules really pass: each case runs a module (or `local_upsample`) forward
and backward under a dispatch mode that records every `lda_aqu::` call, then checks each call.

Forward ops keep the inputs' requires_grad as recorded, so their autograd formulas are checked too;
backward ops get inputs that need no gradient (they refuse double backward)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from helpers import fresh_seed, seeded_randn
from lda_aqu.upsampler import CARAFE, LDAAQU, DySample, local_upsample
from lda_aqu.upsampler import function  # noqa: F401  (registers the Triton ops, else imported on first use)

B, C, H, W = 1, 8, 5, 6  # upsampled 2x: 10x12


class _Record(TorchDispatchMode):
    """Records the `lda_aqu::` calls made under it, with their tensors copied; a call in `training`
    keeps its inputs' requires_grad (a backward op's excepted)."""

    def __init__(self, training: bool):
        super().__init__()
        self.training, self.calls = training, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "lda_aqu":
            # not torch.is_grad_enabled(): an op's autograd formula runs its forward under no_grad
            grad = self.training and not func.name().endswith("_bwd")
            copy = (lambda t: t.detach().clone().requires_grad_(t.requires_grad and grad))
            self.calls.append((func, *tree_map_only(torch.Tensor, copy, (args, kwargs))))
        return func(*args, **kwargs)


def _given_weights(backend, dtype):
    """`local_upsample` with weights given, as DySample-like callers pass them."""
    g = torch.Generator().manual_seed(fresh_seed())
    G, nh, K = 2, 2, 4
    offset, w = (seeded_randn(*s, generator=g, dtype=dtype, device=torch.get_default_device()).requires_grad_(True)
                 for s in ((B, G * 2 * K, 2 * H, 2 * W), (B, nh, K, 2 * H, 2 * W)))
    return lambda x: local_upsample(x, (2 * H, 2 * W), offset=offset, weights=w, num_groups=G, num_heads=nh,
                                    coords="half_pixel", padding="border", backend=backend)


# name: (make(backend, dtype) -> the call on x, the ops that call must record for each backend)
CASES = {
    "attention, offsets, rpb (LDAAQU)": (
        lambda b, d: LDAAQU(C, reduction_factor=2, range_factor=2, num_heads=2, backend=b).to(d),
        {"triton": {"upsample_fwd", "upsample_bwd", "layer_norm_channels", "layer_norm_channels_bwd"},
         "torch": {"local_upsample_cpu", "local_upsample_cpu_bwd", "layer_norm_channels", "layer_norm_channels_bwd"}}),
    "logits, kernel_size (CARAFE)": (
        lambda b, d: CARAFE(C, 2, up_kernel=3, up_group=2, compressed_channels=4, backend=b).to(d),
        {"triton": {"upsample_fwd", "upsample_bwd"}, "torch": {"local_upsample_cpu", "local_upsample_cpu_bwd"}}),
    "unit weights, offsets (DySample)": (
        lambda b, d: DySample(C, 2, groups=2, backend=b).to(d),
        {"triton": {"upsample_fwd", "upsample_bwd"}}),  # the torch path samples with grid_sample
    "given weights, offsets (local_upsample)": (
        _given_weights,
        {"triton": {"upsample_fwd", "upsample_bwd"}, "torch": {"local_upsample_cpu", "local_upsample_cpu_bwd"}}),
}
PARAMS = [pytest.param(name, backend, id=f"{name}-{backend}") for name, (_, ops) in CASES.items() for backend in ops]


def _record(name, backend, dtype, grad=True):
    # the Triton ops on the tests' device; the native CPU ops on CPU tensors
    device = torch.get_default_device() if backend == "triton" else torch.device("cpu")
    with torch.device(device):
        f = CASES[name][0](backend, dtype)
        x = seeded_randn(B, C, H, W, generator=torch.Generator().manual_seed(fresh_seed()), dtype=dtype,
                         device=device).requires_grad_(grad)
        with torch.set_grad_enabled(grad), _Record(grad) as rec:
            out = f(x)
            if grad:
                out.backward(torch.randn_like(out))
    return rec.calls


def _opcheck(calls):
    for func, args, kwargs in calls:
        failed = {t: r for t, r in torch.library.opcheck(func, args, kwargs, raise_exception=False).items()
                  if r != "SUCCESS"}
        assert not failed, f"{func}: {failed}"


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float64, marks=pytest.mark.slow)],
                         ids=["fp32", "fp64"])
@pytest.mark.parametrize("name, backend", PARAMS)
def test_opcheck_training_calls(name, backend, dtype):
    calls = _record(name, backend, dtype)
    assert {f._opname for f, _, _ in calls} == CASES[name][1][backend]
    # each forward op is on the graph itself (its registered formula trains it), so opcheck checks
    # that formula against AOT's trace of it
    for f, args, _ in calls:
        if not f._opname.endswith("_bwd"):
            assert any(t.requires_grad for t in args if isinstance(t, torch.Tensor)), f"{f} was called off the graph"
    _opcheck(calls)


@pytest.mark.parametrize("name", ["attention, offsets, rpb (LDAAQU)", "logits, kernel_size (CARAFE)"])
def test_opcheck_inference_calls(name):
    """No gradient: the Triton forward keeps no softmax weights (need_attn=False)."""
    calls = _record(name, "triton", torch.float32, grad=False)
    fwd = [args for f, args, _ in calls if f._opname == "upsample_fwd"]
    assert fwd and not any(args[-1] for args in fwd), "inference must not ask for the softmax weights"
    _opcheck(calls)


@pytest.mark.slow
def test_opcheck_deterministic_backward():
    torch.use_deterministic_algorithms(True)
    try:
        calls = _record("attention, offsets, rpb (LDAAQU)", "triton", torch.float32)
    finally:
        torch.use_deterministic_algorithms(False)
    bwd = [args for f, args, _ in calls if f._opname == "upsample_bwd"]
    assert bwd and all(args[-1] for args in bwd)
    _opcheck(calls)


def test_every_op_is_checked():
    ops = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("lda_aqu::")}
    assert ops == set().union(*(s for _, by in CASES.values() for s in by.values()))


def test_backward_without_saved_weights_says_why():
    """A direct call with need_attn=False keeps nothing for a softmax backward: a clear error, not a crash
    in the kernel."""
    g = torch.Generator().manual_seed(fresh_seed())
    v, wts = (seeded_randn(*s, generator=g).requires_grad_(True) for s in ((B, C, H, W), (B, 2, 9, 2 * H, 2 * W)))
    out, _ = torch.ops.lda_aqu.upsample_fwd(v, [2 * H, 2 * W], None, None, None, None, wts, 1, 2, 9, "logits",
                                            "nearest", "zeros", 3, 1.0, "centered", 0.0, False)
    with pytest.raises(RuntimeError, match="need_attn=False"):
        out.sum().backward()
