"""The tuning cache: lazy, per device, atomic, and never fatal; the sweep CLI end to end."""
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from lda_aqu.autotune import cache, sweep
from helpers import DEVICE
from lda_aqu.autotune.__main__ import main
from lda_aqu.autotune.space import MAX_REGISTERS, candidates, estimated_registers, spill_free, unpruned
from lda_aqu.kernels.launchers import Config, Problem, Spec, default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PB = Problem(2, 64, 256, 100, 152, 200, 304, 2, 1, 9)
FWD, BWD = cache.Variant("fwd"), cache.Variant("bwd")


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, str(tmp_path))
    monkeypatch.setattr(cache, "_entries", {})
    monkeypatch.setattr(cache, "_warned", False)
    monkeypatch.setattr(cache, "DEFAULTS", tmp_path / "no-defaults")
    return tmp_path


def test_round_trip_and_missing_entry(fresh_cache):
    cfg = Config(16, 16, 32, 8, 2, False)
    path = cache.store({cache.bucket(PB, torch.bfloat16, BWD): cfg})
    assert path.parent == fresh_cache and path.name == cache._file_name(cache.identity())
    h100 = {"gpu": "NVIDIA H100 80GB HBM3", "capability": "sm_90"}
    assert cache._file_name(h100) == "nvidia-h100-80gb-hbm3-sm-90.json"
    assert [p.name for p in fresh_cache.iterdir()] == [path.name]  # no temporary file left behind
    assert cache.lookup(PB, torch.bfloat16, BWD) == cfg
    assert cache.lookup(PB, torch.bfloat16, FWD) is None
    assert cache.lookup(PB._replace(K=25), torch.bfloat16, BWD) is None
    # the same bucket for a map of the same power-of-two size
    assert cache.lookup(PB._replace(Ho=199, Wo=300), torch.bfloat16, BWD) == cfg


def test_lookup_reads_the_file_once(fresh_cache, monkeypatch):
    cache.store({cache.bucket(PB, torch.float32, FWD): Config()})
    reads = []
    real = cache._read
    monkeypatch.setattr(cache, "_read", lambda p, ident: reads.append(p) or real(p, ident))
    for _ in range(3):
        cache.lookup(PB, torch.float32, FWD)
    assert len(reads) == 2  # committed defaults + the user file, once


def test_committed_defaults_under_the_user_cache(fresh_cache, monkeypatch):
    """A packaged table answers what the user's sweep did not tune; the user's entries win."""
    fwd, bwd = cache.bucket(PB, torch.float32, FWD), cache.bucket(PB, torch.float32, BWD)
    monkeypatch.setenv(cache.ENV, str(fresh_cache / "shipped"))
    cache.store({fwd: Config(16, 16, 16, 4), bwd: Config(32, 16, 16, 8)})  # as a sweep on this device writes it
    monkeypatch.setattr(cache, "DEFAULTS", fresh_cache / "shipped")
    monkeypatch.setenv(cache.ENV, str(fresh_cache / "user"))
    cache.store({fwd: Config(64, 32, 64, 8)})
    assert cache.lookup(PB, torch.float32, FWD) == Config(64, 32, 64, 8)
    assert cache.lookup(PB, torch.float32, BWD) == Config(32, 16, 16, 8)


@pytest.mark.parametrize("bad", ["corrupt", "foreign gpu", "foreign triton", "foreign kernel", "bad entry"])
def test_bad_file_is_ignored_with_one_warning(fresh_cache, bad):
    path = cache.cache_path()
    header = cache.identity()
    entries = {cache.bucket(PB, torch.float32, FWD): {"block_p": 16, "block_d": 16, "block_c": 16,
                                                        "num_warps": 4, "num_stages": 1, "channels_last": True}}
    if bad == "corrupt":
        text = '{"header": {"gpu": '
    else:
        header = dict(header, **{"foreign gpu": {"gpu": "NVIDIA H100 80GB HBM3"},
                                 "foreign triton": {"triton": "2.0.0"},
                                 "foreign kernel": {"kernels": "0" * 16}}.get(bad, {}))
        if bad == "bad entry":
            entries = {"x": {"block_q": 3}}
        text = json.dumps({"header": header, "entries": entries})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            assert cache.lookup(PB, torch.float32, FWD) is None
        cache._entries.clear()
        assert cache.lookup(PB, torch.float32, FWD) is None  # a reload warns no more
    assert len(w) == 1 and "ignoring" in str(w[0].message)
    # a sweep result replaces the bad file
    cache.store({cache.bucket(PB, torch.float32, FWD): Config()})
    assert cache.lookup(PB, torch.float32, FWD) == Config()


def test_clear(fresh_cache):
    cache.store({"k": Config()})
    assert cache.clear() and not cache.cache_path().exists() and not cache.clear()


# FPN P2 with the layouts, a head split inside groups, and a width-8 segment
PROBLEMS = [PB, PB._replace(G=4, NH=2, K=49), PB._replace(G=1, K=81), Problem(1, 16, 64, 4, 4, 8, 8, 2, 1, 9),
            Problem(1, 12, 24, 4, 3, 8, 6, 2, 3, 25)]


@pytest.mark.parametrize("pb", PROBLEMS, ids=lambda pb: f"D{pb.D}-C{pb.C}-G{pb.G}-NH{pb.NH}-K{pb.K}")
def test_space_is_pruned_and_holds_the_defaults(pb):
    grid = unpruned(pb)
    for backward in (False, True):
        for interpret in (False, True):
            assert default_config(pb, backward, interpret=interpret) in grid
        for quick in (False, True):
            space = candidates(pb, backward, quick)
            assert space and len(space) == len(set(space))
            assert all(c.fits(pb) and estimated_registers(pb, c, backward) <= MAX_REGISTERS for c in space)
            assert set(space) <= set(unpruned(pb, quick)) and (quick or set(candidates(pb, backward, True)) <= set(space))


def test_register_estimate_prunes_the_wide_tiles():
    fwd, bwd = candidates(PB), candidates(PB, BWD)
    assert len(fwd) > len(bwd) > 20
    # 64x128 channel tiles on 2 warps cannot stay in registers; 16x16 tiles on 4 warps can
    assert not any(c.block_p == 64 and c.block_c == 128 and c.num_warps == 2 for c in fwd + bwd)
    assert Config(16, 16, 16, 4) in fwd and Config(16, 16, 16, 4) in bwd


def test_spill_pruning_keeps_what_ptxas_keeps():
    """Timing only what ptxas keeps in registers: the backward default stays, a 64x64-pixel-channel
    tile that spills 2 KB on sm_90 goes."""
    default, wide = default_config(PB, backward=True, interpret=False), Config(64, 32, 64, 4)
    assert spill_free(PB, [default, wide], BWD) == [default]


def run_cli(*args, env):
    return subprocess.run([sys.executable, "-m", "lda_aqu.autotune", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_cli_sweep_show_clear(fresh_cache):
    env = dict(os.environ, TRITON_INTERPRET="1", **{cache.ENV: str(fresh_cache)})
    # the interpreter's sweep, GPU or not
    r = run_cli("sweep", "--quick", "--kernel-sizes", "3", "--dtype", "bf16", env=env)
    assert r.returncode == 0, r.stderr
    assert "CPU interpreter" in r.stderr and "the timings mean nothing" in r.stderr and "[3/3]" in r.stderr
    for kernel in sweep.VARIANTS:
        assert f"{kernel}|bf16|attention|offset|rpb|align_corners|zeros|grid0|D4|C16|G2|NH1|K9|P64 " in r.stdout
    raw = run_cli("show", "--json", env=env)
    assert raw.returncode == 0 and json.loads(raw.stdout) == json.loads(cache.cache_path().read_text())
    entries = json.loads(raw.stdout)["entries"]
    assert len(entries) == 3 and set(json.loads(raw.stdout)["timings"]) == set(entries)
    shown = run_cli("show", env=env)
    table = shown.stdout.splitlines()
    assert shown.returncode == 0 and table[0].split()[:5] == ["bucket", "configuration", "time", "ms", "default"]
    assert sorted(line.split()[0] for line in table[1:]) == sorted(entries)
    assert all(" yes " in line for line in table[1:])
    # the bucket is the power of two above the map's size: a 7x9 output shares the 8x8 entry
    for pb in (Problem(1, 4, 16, 4, 4, 8, 8, 2, 1, 9), Problem(1, 4, 16, 3, 4, 7, 9, 2, 1, 9)):
        cfg = cache.lookup(pb, torch.bfloat16, BWD)
        assert cfg is not None and cfg.fits(pb)
    cleared = run_cli("clear", env=env)
    assert cleared.returncode == 0 and not cache.cache_path().exists()


@pytest.mark.parametrize("args", [["sweep", "--kernel-sizes", "4"], ["sweep", "--dtype", "int8"],
                                  ["sweep", "--groups", "3"], ["sweep", "--scales", "0"], ["sweep", "--heads", "x"],
                                  ["inspect", "--groups", "3"], ["inspect", "--scale", "0.001"],
                                  ["inspect", "--cc", "75"], ["inspect", "--shape", "2", "256", "100"]])
def test_cli_rejects_bad_arguments(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def fake_kernel(bias):
    """upsample_fwd as the reference in the inputs' precision plus bias(config): a fast stand-in for
    right and wrong kernels."""
    def fwd(v, size, spec, offset, q, k, rpb, config=None, need_attn=True):
        ref = sweep.deformable_local_attention_ref(q.float(), k.float(), v.float(), offset.float(), rpb.float(),
                                                   num_heads=spec.NH, num_groups=spec.G, scale=spec.scale)
        return (ref + bias(config)).to(q.dtype), None
    return fwd


FAST = Config(16, 16, 16, 4)


@pytest.mark.parametrize("fast_bias, default_bias, kept", [(0.0, 0.0, FAST), (1e-3, 0.0, "default"),
                                                          (0.1, 0.1, None)])
def test_sweep_keeps_what_matches_float64_else_the_default(fresh_cache, monkeypatch, fast_bias, default_bias, kept):
    """The fastest configuration is kept when its error against float64 is within the bound of the
    default's; a faster one off by 1e-3 (fp32: far past rounding) leaves the default kept, so that
    the variant still has a verified configuration; a default that is itself wrong keeps nothing."""
    monkeypatch.setattr(sweep, "upsample_fwd", fake_kernel(lambda cfg: fast_bias if cfg == FAST else default_bias))
    monkeypatch.setattr(sweep, "_space", lambda *a: (FAST,))  # nothing compiled on a GPU
    times = iter([2.0, 1.0])  # the default, then FAST
    monkeypatch.setattr(sweep, "_time", lambda fn: next(times))
    pb = sweep.problems([3], [2], [(2, 1)], quick=True)[0]
    rows = sweep.sweep([pb], ["fp32"], ["fwd"], quick=True)
    row, default = rows[0], default_config(pb)
    assert row.tried == 2
    if kept is None:
        assert row.status.startswith("the default configuration's error exceeds") and row.config is None
        assert cache.lookup(pb, torch.float32, FWD) is None
        return
    kept = default if kept == "default" else kept
    assert row.status.startswith("ok") and row.config == kept == cache.lookup(pb, torch.float32, FWD)
    assert row.rel_err < 1e-6  # fp32 against float64
    assert row.best_ms == (1.0 if kept == FAST else 2.0) and row.default_ms == 2.0


def test_a_missing_triton_internal_is_named_and_the_sweep_times_the_default(fresh_cache, monkeypatch, capsys):
    import triton
    import triton.compiler

    from lda_aqu.autotune import resources
    monkeypatch.delattr(triton.compiler, "make_backend")
    pb = sweep.problems([3], [2], [(2, 1)], quick=True)[0]
    with pytest.raises(resources.MissingTritonInternal, match=rf"triton.compiler:make_backend, which Triton "
                                                              rf"{re.escape(triton.__version__)} lacks"):
        resources.compile_reports([resources.Job(pb)])
    monkeypatch.setattr(sweep, "INTERPRET", False)  # as on a GPU: the space comes from compiled reports
    monkeypatch.setattr(sweep, "_SPACES", {})
    assert sweep._space(pb, "fwd", "fp32", True, 90) == ()
    assert "triton.compiler:make_backend" in capsys.readouterr().err
    monkeypatch.setattr(sweep, "INTERPRET", True)
    monkeypatch.setattr(sweep, "_space", lambda *a: ())
    row = sweep.sweep([pb], ["fp32"], ["fwd"], quick=True)[0]
    assert row.tried == 1 and row.status == "ok" and row.config == default_config(pb)
    assert cache.lookup(pb, torch.float32, FWD) == default_config(pb)


def test_the_two_forwards_share_one_compile(monkeypatch):
    """fwd and fwd-train launch the same kernel: one compile of the candidates reports both launches."""
    calls = []
    monkeypatch.setattr(sweep, "INTERPRET", False)
    monkeypatch.setattr(sweep, "_SPACES", {})
    monkeypatch.setattr(sweep, "spill_free", lambda pb, found, backward, *a, **k: calls.append(backward) or found[:2])
    pb = sweep.problems([3], [2], [(2, 1)], quick=True)[0]
    spaces = [sweep._space(pb, kernel, "fp32", True, 90) for kernel in ("fwd", "fwd-train", "bwd", "fwd-train")]
    assert calls == [False, True] and spaces[0] == spaces[1] == spaces[3] and len(spaces[0]) == 2


@pytest.mark.parametrize("K", [9, 1])
def test_reference_check_over_a_batch(K):
    """The reference runs one batch element at a time; the rpb gradient sums them. With K=1 the q, k
    and rpb gradients are zero: their error is absolute."""
    pb = Problem(2, 4, 8, 3, 4, 6, 8, 2, 2, K)
    x = sweep.inputs(pb, torch.float32, DEVICE.type, seed=1)
    assert sweep.check(pb, default_config(pb, backward=True), x, "bwd") < 1e-5


def test_launcher_uses_the_cached_config(fresh_cache, monkeypatch):
    """On CUDA tensors the op asks the cache; what it gets is what the launcher runs."""
    import lda_aqu.upsampler.function as function
    from lda_aqu.kernels.launchers import Spec
    seen = []
    monkeypatch.setattr(function, "upsample_fwd", lambda v, *a, config=None, **k: seen.append(config) or (v + 1, None))
    q, v = torch.randn(1, 4, 12, 12), torch.randn(1, 16, 6, 6)
    spec = Spec(2, 1, 9, scale=0.5)
    # offsets, no rpb, no weights kept for a backward: the inference forward of that variant
    key = cache.bucket(Problem.of(v, (12, 12), q, spec), torch.float32, cache.Variant("fwd", rpb=False))
    cache.store({key: Config(16, 2, 8, 2, 1)})
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    function.upsample_fwd_op(v, [12, 12], torch.randn(1, 36, 12, 12), q, torch.randn(1, 4, 6, 6), None, None,
                             *spec, False)
    assert seen == [Config(16, 2, 8, 2, 1)]


def test_keys_name_every_variant():
    """One key per kernel variant, dtype, weight mode, offsets and rpb present or not, coords, padding, base window."""
    import itertools
    keys = {cache.bucket(PB._replace(weights=w), dt, cache.Variant(*v))
            for w in ("attention", "logits") for dt in (torch.float32, torch.bfloat16)
            for v in itertools.product(cache.KERNELS, (True, False), (True, False), ("align_corners", "half_pixel"),
                                       ("zeros", "border"), (0, 3))}
    assert len(keys) == 2 * 2 * 4 * 2 * 2 * 2 * 2 * 2
    with pytest.raises(ValueError, match="kernel"):
        cache.Variant.of("forward", Spec(2, 1, 9), None, None)


def _record_lookups(monkeypatch):
    import lda_aqu.upsampler.function as function
    seen = []
    real = cache.lookup
    monkeypatch.setattr(function, "_tunable", lambda v: True)  # look up as on CUDA tensors
    monkeypatch.setattr(cache, "lookup", lambda pb, dt, var, dev=None: seen.append(cache.bucket(pb, dt, var))
                        or real(pb, dt, var, dev))
    return seen


def _ldaaqu_step(train, deterministic=False):
    from lda_aqu.upsampler import LDAAQU
    torch.manual_seed(0)
    m = LDAAQU(16, scale_factor=2, reduction_factor=4, k_u=3, n_groups=2, num_heads=1, backend="triton")
    x = torch.randn(1, 16, 3, 4, requires_grad=train)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        if train:
            m(x).sum().backward()
        else:
            with torch.no_grad():
                m(x)
    finally:
        torch.use_deterministic_algorithms(was)


def test_the_module_looks_up_what_the_sweep_tunes(monkeypatch):
    """Inference looks up the inference forward; a training step the forward that stores the weights
    and the backward (deterministic mode: its own): each a bucket of the sweep's plan. A winner tuned
    for the training forward reaches that launch only; the others run their defaults."""
    import lda_aqu.upsampler.function as function
    seen = _record_lookups(monkeypatch)
    pb = Problem(1, 4, 16, 3, 4, 6, 8, 2, 1, 9)
    tuned = Config(16, 4, 8, 2, 1, False)
    cache.store({cache.bucket(pb, torch.float32, sweep.variant("fwd-train")): tuned})
    configs = []
    for name in ("upsample_fwd", "upsample_bwd"):
        real = getattr(function, name)
        monkeypatch.setattr(function, name, lambda *a, real=real, config=None, **k: configs.append(config)
                            or real(*a, config=config, **k))
    _ldaaqu_step(train=False)
    inference, seen[:] = list(seen), []
    _ldaaqu_step(train=True)
    training, seen[:] = list(seen), []
    _ldaaqu_step(train=True, deterministic=True)
    planned = {k: cache.bucket(p, sweep.DTYPES[dt], sweep.variant(k))
               for k, p, dt in sweep.plan([pb], ["fp32"], cache.KERNELS)}
    assert inference == [planned["fwd"]] and training == [planned["fwd-train"], planned["bwd"]]
    assert seen == [planned["fwd-train"], planned["bwd-det"]]
    assert {k for k, _, _ in sweep.plan([pb], ["fp32"])} == {"fwd", "fwd-train", "bwd"}
    assert configs == [None, tuned, None, tuned, None]


def test_a_changed_kernel_source_invalidates(tmp_path, monkeypatch):
    """The files' header names a hash of the @triton.jit sources: an edited kernel hashes otherwise, and a
    file tuned for other sources is ignored."""
    import importlib
    import sys
    pkg = tmp_path / "fake_kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    body = "import triton\n\n\n@triton.jit\ndef k(x):\n    return x {}\n\n\ndef host():\n    pass\n"
    monkeypatch.syspath_prepend(str(tmp_path))
    hashes = []
    for src, tail in (("+ 1", ""), ("+ 1", "# a host-side comment\n"), ("+ 2", "")):
        (pkg / "a.py").write_text(body.format(src) + tail)
        for name in [n for n in sys.modules if n.startswith("fake_kernels")]:
            del sys.modules[name]
        importlib.invalidate_caches()
        cache.kernel_source_hash.cache_clear()
        hashes.append(cache.kernel_source_hash("fake_kernels"))
    cache.kernel_source_hash.cache_clear()
    assert hashes[0] == hashes[1] != hashes[2]
    cache.store({cache.bucket(PB, torch.float32, FWD): Config()})
    assert cache.lookup(PB, torch.float32, FWD) == Config()
    monkeypatch.setattr(cache, "kernel_source_hash", lambda: hashes[2])
    cache._entries.clear()
    with pytest.warns(UserWarning, match="ignoring"):
        assert cache.lookup(PB, torch.float32, FWD) is None


def test_sweep_tunes_and_stores_each_training_variant(monkeypatch):
    """The sweep's plumbing with a fake timer: each variant keeps its own fastest verified
    configuration (the real kernels, interpreted, checked against the reference)."""
    a, b = Config(16, 4, 16, 4), Config(32, 4, 8, 2, 1, False)
    monkeypatch.setattr(sweep, "_space", lambda *args: (a, b))
    times = iter([5.0, 1.0, 3.0, 5.0, 3.0, 1.0, 1.0, 5.0, 5.0])  # default, a, b per variant: a, b, the default win
    monkeypatch.setattr(sweep, "_time", lambda fn: next(times))
    pb = Problem(1, 4, 16, 3, 4, 6, 8, 2, 1, 9)
    rows = sweep.sweep([pb], ["fp32"], quick=True)
    assert [r.kernel for r in rows] == [k for k, _, _ in sweep.plan([pb], ["fp32"])] == ["fwd", "fwd-train", "bwd"]
    assert all(r.status == "ok" and r.rel_err < 1e-5 for r in rows)
    won = [cache.lookup(pb, torch.float32, sweep.variant(k)) for k in sweep.VARIANTS]
    assert won == [a, b, default_config(pb, backward=True)]
