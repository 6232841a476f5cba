"""What only a GPU executes, checked here: the launchers driven with meta tensors of large problems,
every launch recorded instead of run. Index widths against the extents each kernel addresses, grids
within CUDA's limits, scratch no larger than the value map, every launch under its tensors' device."""
import contextlib

import pytest
import torch

import lda_aqu.kernels.launchers as L
from lda_aqu.kernels.launchers import MAX_GRID_X, MAX_GRID_YZ, Spec, upsample_bwd, upsample_fwd

KERNELS = ("upsample_fwd_kernel", "upsample_bwd_kernel", "upsample_bwd_gather_kernel", "upsample_drpb_kernel")


class Recorder:
    def __init__(self, name, launches, guard):
        self.name, self.launches, self.guard = name, launches, guard

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(dict(kernel=self.name, grid=tuple(grid) + (1,) * (3 - len(grid)), args=args,
                                      kwargs=kwargs, guarded=bool(self.guard)))
        return launch


@pytest.fixture
def launches(monkeypatch):
    recorded, guard = [], []

    @contextlib.contextmanager
    def on_device(t):
        guard.append(t.device)
        try:
            yield
        finally:
            guard.pop()
    monkeypatch.setattr(L, "_on_device", on_device)
    for name in KERNELS:
        monkeypatch.setattr(L, name, Recorder(name, recorded, guard))
    return recorded


def lda_aqu(B, C, H, W, s, k_u, D, G=2, NH=1):
    """Meta inputs of LDA-AQU's op: v, q, k, offset, rpb and the output size."""
    K, Ho, Wo = k_u * k_u, H * s, W * s
    m = dict(device="meta", dtype=torch.float32)
    return dict(v=torch.empty(B, C, H, W, **m), q=torch.empty(B, D, Ho, Wo, **m), k=torch.empty(B, D, H, W, **m),
                offset=torch.empty(B, G * 2 * K, Ho, Wo, **m), rpb=torch.empty(NH, K, D // NH, **m),
                spec=Spec(G, NH, K, scale=(D // NH) ** -0.5), size=(Ho, Wo))


def drive(t, deterministic=False):
    out, attn = upsample_fwd(t["v"], t["size"], t["spec"], t["offset"], t["q"], t["k"], t["rpb"])
    return upsample_bwd(torch.empty_like(out), t["v"], t["size"], t["spec"], t["offset"], t["q"], t["k"], t["rpb"],
                        attn=attn, deterministic=deterministic)


def tensors(launch):
    return [a for a in launch["args"] if isinstance(a, torch.Tensor)]


def extent(t):
    """The largest element offset inside one batch element (what int32 indices must hold)."""
    return sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:]))


def check_grids(recorded):
    for r in recorded:
        x, y, z = r["grid"]
        assert 0 < x <= MAX_GRID_X and 0 < y <= MAX_GRID_YZ and 0 < z <= MAX_GRID_YZ, (r["kernel"], r["grid"])
        assert r["guarded"], f"{r['kernel']} launched outside its tensors' device"


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_large_problem_launches(launches, deterministic):
    """B=16, C=512, 512x512 -> 1024x1024, k_u=7: every extent inside a batch element fits int32 (the
    batch offset is int64 anyway), and drpb's scratch is bounded slots, not one per program (it was
    524288 x 49 x 128 floats, 12.25 GiB, addressed in int32)."""
    t = lda_aqu(16, 512, 512, 512, 2, 7, 128)
    drive(t, deterministic)
    check_grids(launches)
    value_map = t["v"].numel()
    fwd_bwd = [r for r in launches if r["kernel"] in KERNELS[:2]]
    assert [r["kernel"] for r in fwd_bwd] == ["upsample_fwd_kernel", "upsample_bwd_kernel"]
    for r in fwd_bwd:
        need = max(extent(a) for a in tensors(r) if a.dim() >= 2) >= 2**31 - 1
        assert r["kwargs"]["INT64"] == need
    bwd = fwd_bwd[1]
    drpb = bwd["args"][11]
    if not deterministic:
        assert drpb.shape == (L.DRPB_SLOTS, 1, 49, 128) and drpb.numel() < value_map / 1000
    else:
        (part,) = [tensors(r)[2] for r in launches if r["kernel"] == "upsample_drpb_kernel"]
        assert part.shape[0] <= L.DRPB_SLOTS and part.numel() < value_map / 1000
        assert [r["kernel"] for r in launches].count("upsample_bwd_gather_kernel") == 1


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_extents_past_int32_take_int64(launches, deterministic):
    """C=2048 at 1024x1024: the output and the value gradient of one batch element pass 2**31."""
    t = lda_aqu(1, 2048, 512, 512, 2, 3, 64)
    drive(t, deterministic)
    check_grids(launches)
    for r in launches:
        if r["kernel"] != "upsample_drpb_kernel":  # addresses in int64 throughout
            assert r["kwargs"]["INT64"], r["kernel"]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_a_batch_past_the_grid_limit_is_split(launches, deterministic):
    """70,000 crops: grid y holds 65,535, so the batch goes in launches that cover it once."""
    B = 70_000
    t = lda_aqu(B, 16, 4, 4, 2, 3, 8)
    drive(t, deterministic)
    check_grids(launches)
    for name in KERNELS[:3] if deterministic else KERNELS[:2]:
        rows = [tensors(r)[2 if name != "upsample_bwd_gather_kernel" else 4].shape[0]
                for r in launches if r["kernel"] == name]
        assert sum(rows) == B, (name, rows)
        if name != "upsample_bwd_gather_kernel":  # the batch in grid y; the gather folds it into x
            assert len(rows) == 2 and max(rows) <= MAX_GRID_YZ, (name, rows)


def test_launches_go_to_the_tensors_device():
    """Triton launches on the current device's current stream: the launchers make the tensors' device
    current (a model on cuda:1 while cuda:0 is current)."""
    class OnGpu1:
        device = torch.device("cuda", 1)
    guard = L._on_device(OnGpu1())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(L._on_device(torch.empty(1)), contextlib.nullcontext)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_module_on_the_second_gpu():
    from helpers import seeded_randn
    from lda_aqu.upsampler import LDAAQU
    torch.manual_seed(0)
    m = LDAAQU(32, backend="triton").to("cuda:0")
    x = seeded_randn(2, 32, 12, 16, generator=torch.Generator().manual_seed(0), device="cuda:0")
    expect = m(x)
    m, x = m.to("cuda:1"), x.to("cuda:1").requires_grad_()
    with torch.cuda.device(0):  # the forward has no atomics: the same bits on either GPU
        y = m(x)
        y.square().sum().backward()
    assert y.device == x.grad.device == torch.device("cuda", 1) and torch.equal(y.cpu(), expect.cpu())
    assert torch.isfinite(x.grad).all()
