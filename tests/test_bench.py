"""bench.py --quick runs on a CPU-only machine: the torch path against the official-style module,
CSV and plots written, memory columns filled."""
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
                       text=True, timeout=900, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert {"device", "torch", "triton", "date", "backend", "direction", "ms", "ms_median", "ms_max", "reps",
            "saved_for_backward_bytes", "peak_rss_bytes", "rel_err", "status"} <= set(rows[0])
    assert {r["backend"] for r in rows} == {"LDAAQU", "official-style", "CARAFE", "unfold", "DySample", "grid_sample"}
    assert all(r["status"] == "ok" and r["device"].startswith("CPU") and float(r["ms"]) > 0 for r in rows)
    module = [r for r in rows if r["case"] == "module"]
    assert all(float(r["ms"]) <= float(r["ms_median"]) <= float(r["ms_max"]) for r in module)
    assert all(float(r["rel_err"]) < 1e-5 and int(r["peak_rss_bytes"]) > 0 for r in module)
    # what autograd keeps: the torch path holds the inputs and weights, the official the K sampled copies
    saved = {r["backend"]: int(r["saved_for_backward_bytes"]) for r in rows if r["direction"] == "fwd+bwd"}
    assert saved["LDAAQU"] * 4 < saved["official-style"]
    for png in ("throughput_vs_k_u.png", "speedup.png", "memory.png"):
        assert (tmp_path / png).stat().st_size > 10_000
