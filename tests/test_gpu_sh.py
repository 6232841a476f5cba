"""scripts/gpu.sh without a GPU: a dry run of every stage's plumbing that exits 0 and leaves its
results folder (the run a lent GPU gets once must not be the first)."""
import csv
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_sh_dry_run(tmp_path):
    r = subprocess.run(["bash", "scripts/gpu.sh", "--dry-run", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    stages = dict(line.split(None, 1) for line in (tmp_path / "stages.txt").read_text().splitlines())
    assert list(stages) == ["accuracy", "bandwidth", "sweep", "bench-list", "tests-list", "table"], stages
    assert all(how.startswith("ok") for how in stages.values()), stages
    acc = {row["dtype"]: row for row in csv.DictReader(open(tmp_path / "accuracy.csv"))}
    assert float(acc["fp32"]["out"]) < 1e-5 and float(acc["bf16"]["dv"]) < 2e-2
    assert json.loads((tmp_path / "bandwidth.json").read_text())["gb_per_s"] > 0
    assert len(json.loads((tmp_path / "tuning" / "cpu-interpreter-none.json").read_text())["entries"]) == 1
    assert "tests/test_gpu_sh.py::test_gpu_sh_dry_run" in (tmp_path / "tests-list.log").read_text()
    table = (tmp_path / "TABLE.md").read_text()
    assert "Device copy" in table and "| bf16 |" in table and "torch " in table and "Triton " in table
    assert "accuracy" in (tmp_path / "gpu.log").read_text()
