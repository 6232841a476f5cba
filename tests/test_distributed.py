"""Data-parallel training of an FPN with LDA-AQU upsamplers: DistributedDataParallel and FSDP2
(fully_shard), 2 gloo ranks on CPU on 127.0.0.1, a few SGD steps, every parameter equal to one process
training on the whole batch (float64)."""
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # two ranks training in subprocesses

STEPS, BATCH = 3, 4


def _model(seed):
    from lda_aqu.upsampler import FPN
    torch.manual_seed(seed)
    m = FPN([8, 16], 8, upsampler="lda_aqu", upsampler_cfg=dict(reduction_factor=2, range_factor=2)).double()
    with torch.no_grad():  # learned offsets away from zero: every parameter gets a gradient
        for up in m.upsample_modules:
            up.conv_offset[-1].weight.normal_(0, 0.1)
    return m


def _data(seed):
    # gloo ranks train on the CPU
    g = torch.Generator().manual_seed(seed + 1)
    return [(torch.randn(BATCH, 8, 9, 11, generator=g, dtype=torch.float64, device="cpu"),
             torch.randn(BATCH, 16, 5, 6, generator=g, dtype=torch.float64, device="cpu")) for _ in range(STEPS)]


def _train(model, data, rows):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x0, x1 in data:
        opt.zero_grad()
        outs = model([x0[rows], x1[rows]])
        # the mean over the whole batch: each rank's share of it, which DDP/FSDP's gradient average restores
        loss = sum((o ** 2).mean() for o in outs)
        loss.backward()
        opt.step()


def _worker(rank, world, port, seed, wrap, out):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _model(seed)
        if wrap == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            model = DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for up in model.module.upsample_modules if hasattr(model, "module") else model.upsample_modules:
                fully_shard(up)
            fully_shard(model)
        per = BATCH // world
        _train(model, _data(seed), slice(rank * per, (rank + 1) * per))
        state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                 for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({n.removeprefix("module."): p for n, p in state.items()}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_data_parallel_training_matches_one_process(wrap, tmp_path):
    from helpers import fresh_seed
    seed = fresh_seed() % 2**31
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), seed, wrap, out), nprocs=2, join=True)
    got = torch.load(out)
    ref = _model(seed)
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    _train(ref, _data(seed), slice(None))
    assert set(got) == set(start)
    for n, p in ref.named_parameters():
        assert not torch.equal(p, start[n]), f"{n} did not train"
        assert (got[n] - p).abs().max() < 1e-12, f"{wrap}: {n}, seed={seed}"
