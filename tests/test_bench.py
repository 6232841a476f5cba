"""bench.py --quick runs on a CPU-only machine and writes its CSV and plots."""
import csv
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode's plumbing; on a GPU scripts/gpu.sh runs the "
                    "real benchmark")
def test_bench_quick_writes_csv_and_plots(tmp_path):
    r = subprocess.run([sys.executable, "bench.py", "--quick", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert {"device", "torch", "triton", "date", "backend", "direction", "k_u", "scale", "ms", "mpix_per_s",
            "gb_per_s", "floor_bytes", "saved_for_backward_bytes", "peak_cuda_bytes", "status"} <= set(rows[0])
    assert {r["backend"] for r in rows} == {"triton", "eager", "torch.compile", "LDAAQU", "official-style"}
    assert {r["k_u"] for r in rows} == {"3", "5"} and all(r["status"] == "ok" for r in rows)
    assert all(float(r["ms"]) > 0 and r["device"] == "CPU (Triton interpreter)" for r in rows)
    # what autograd keeps: the fused op holds less than the eager op that materialises K copies
    saved = {(r["backend"], r["k_u"]): int(r["saved_for_backward_bytes"]) for r in rows if r["direction"] == "fwd+bwd"}
    assert saved[("triton", "5")] * 5 < saved[("eager", "5")]
    for png in ("throughput_vs_k_u.png", "speedup.png", "memory.png"):
        assert (tmp_path / png).stat().st_size > 10_000
