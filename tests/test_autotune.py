"""The tuning cache: lazy, per device, atomic, and never fatal; the sweep CLI end to end."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from autotune import cache
from autotune.resources import Job, compile_reports
from autotune.space import candidates, estimated_registers, spill_free
from kernels.launchers import Config, Problem, default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PB = Problem(2, 64, 256, 100, 152, 200, 304, 2, 1, 9)


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, str(tmp_path))
    monkeypatch.setattr(cache, "_entries", None)
    monkeypatch.setattr(cache, "_warned", False)
    monkeypatch.setattr(cache, "DEFAULTS", tmp_path / "no-defaults")
    return tmp_path


def test_round_trip_and_missing_entry(fresh_cache):
    cfg = Config(16, 16, 32, 8, 2, False)
    path = cache.store({cache.bucket(PB, torch.bfloat16, True): cfg})
    assert path.parent == fresh_cache and path.name == "cpu-interpreter-none.json"
    assert [p.name for p in fresh_cache.iterdir()] == [path.name]  # no temporary file left behind
    assert cache.lookup(PB, torch.bfloat16, backward=True) == cfg
    assert cache.lookup(PB, torch.bfloat16, backward=False) is None
    assert cache.lookup(PB._replace(K=25), torch.bfloat16, backward=True) is None
    # the same bucket for a map of the same power-of-two size
    assert cache.lookup(PB._replace(Ho=199, Wo=300), torch.bfloat16, backward=True) == cfg


def test_lookup_reads_the_file_once(fresh_cache, monkeypatch):
    cache.store({cache.bucket(PB, torch.float32, False): Config()})
    reads = []
    real = cache._read
    monkeypatch.setattr(cache, "_read", lambda p: reads.append(p) or real(p))
    for _ in range(3):
        cache.lookup(PB, torch.float32)
    assert len(reads) == 2  # committed defaults + the user file, once


@pytest.mark.parametrize("bad", ["corrupt", "foreign gpu", "foreign triton", "foreign kernel", "bad entry"])
def test_bad_file_is_ignored_with_one_warning(fresh_cache, bad):
    path = cache.cache_path()
    header = cache.identity()
    entries = {cache.bucket(PB, torch.float32, False): {"block_p": 16, "block_d": 16, "block_c": 16,
                                                        "num_warps": 4, "num_stages": 1, "channels_last": True}}
    if bad == "corrupt":
        text = '{"header": {"gpu": '
    else:
        header = dict(header, **{"foreign gpu": {"gpu": "NVIDIA H100 80GB HBM3"},
                                 "foreign triton": {"triton": "2.0.0"},
                                 "foreign kernel": {"kernel_version": -1}}.get(bad, {}))
        if bad == "bad entry":
            entries = {"x": {"block_q": 3}}
        text = json.dumps({"header": header, "entries": entries})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            assert cache.lookup(PB, torch.float32) is None
        cache._entries = None
        assert cache.lookup(PB, torch.float32) is None  # a reload warns no more
    assert len(w) == 1 and "ignoring" in str(w[0].message)
    # a sweep result replaces the bad file
    cache.store({cache.bucket(PB, torch.float32, False): Config()})
    assert cache.lookup(PB, torch.float32) == Config()


def test_clear(fresh_cache):
    cache.store({"k": Config()})
    assert cache.clear() and not cache.cache_path().exists() and not cache.clear()


def test_space_is_pruned_and_holds_the_default():
    for backward in (False, True):
        space = candidates(PB, backward)
        assert space[0] == default_config(PB, backward, interpret=False)
        assert len(space) == len(set(space)) > 20
        assert all(c.fits(PB) and estimated_registers(PB, c, backward) <= 255 for c in space[1:])
        # the estimate drops what cannot fit: 64x128 tiles on 2 warps
        assert not any(c.block_p == 64 and c.block_c == 128 and c.num_warps == 2 for c in space)


def test_quick_space_compiles_and_spill_pruning_keeps_what_ptxas_keeps():
    """The sweep only times configurations ptxas keeps in registers: every quick candidate
    compiles for sm_90 and sm_80, and pruning keeps exactly the spill-free ones."""
    for backward in (False, True):
        space = candidates(PB, backward, quick=True)
        kind = "bwd" if backward else "fwd"
        for cc in (90, 80):
            reports = compile_reports([Job(kind, PB, c, "fp32", cc) for c in space])
            assert all(r.error is None and r.registers > 0 for r in reports)
            kept = spill_free(PB, space, backward, "fp32", cc)
            assert kept == [c for c, r in zip(space, reports) if r.spill_bytes == 0] and kept


def run_cli(*args, env):
    return subprocess.run([sys.executable, "-m", "autotune", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cli_sweep_show_clear(fresh_cache):
    env = dict(os.environ, TRITON_INTERPRET="1", **{cache.ENV: str(fresh_cache)})
    r = run_cli("sweep", "--quick", env=env)
    assert r.returncode == 0, r.stderr
    assert "CPU interpreter" in r.stderr and "[4/4]" in r.stderr
    assert "fwd|fp32|D4|C16|G2|NH1|K9|P256" in r.stdout
    shown = run_cli("show", env=env)
    assert shown.returncode == 0 and '"kernel_version"' in shown.stdout
    entries = json.loads(cache.cache_path().read_text())["entries"]
    assert len(entries) == 4
    pb = Problem(1, 4, 16, 6, 6, 12, 12, 2, 1, 9)
    cfg = cache.lookup(pb, torch.float32, backward=True)
    assert cfg is not None and cfg.fits(pb)
    cleared = run_cli("clear", env=env)
    assert cleared.returncode == 0 and not cache.cache_path().exists()
    assert run_cli("sweep", "--kernel-sizes", "4", env=env).returncode == 2
    assert run_cli("sweep", "--dtype", "int8", env=env).returncode != 0


def test_launcher_uses_the_cached_config(fresh_cache, monkeypatch):
    """On CUDA tensors the op asks the cache; what it gets is what the launcher runs."""
    import upsampler.function as function
    seen = []
    monkeypatch.setattr(function, "dla_fwd", lambda *a, config=None, **k: seen.append(config) or (a[0] + 1, None))
    q = torch.randn(1, 4, 12, 12)
    cache.store({cache.bucket(Problem.of(q, torch.randn(1, 16, 6, 6), torch.randn(1, 36, 12, 12), 2, 1),
                              torch.float32, False): Config(16, 2, 8, 2, 1)})
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    function.dla_fwd_op(q, torch.randn(1, 4, 6, 6), torch.randn(1, 16, 6, 6), torch.randn(1, 36, 12, 12), None,
                        1, 2, 0.5, False)
    assert seen == [Config(16, 2, 8, 2, 1)]
