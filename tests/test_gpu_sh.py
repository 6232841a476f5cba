"""scripts/gpu.sh without a GPU: a dry run of every stage's plumbing that exits 0 and leaves its
results folder (the run a lent GPU gets once must not be the first)."""
import csv
import json
import os
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_sh_dry_run(tmp_path):
    res, pack = tmp_path / "res", tmp_path / "pack"
    r = subprocess.run(["bash", "scripts/gpu.sh", "--dry-run", "--out", str(res), "--pack", str(pack)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    stages = dict(line.split(None, 1) for line in (res / "stages.txt").read_text().splitlines())
    assert list(stages) == ["accuracy", "bandwidth", "sweep", "bench-list", "tests-list", "table"], stages
    assert all(how.startswith("ok") for how in stages.values()), stages
    acc = {row["dtype"]: row for row in csv.DictReader(open(res / "accuracy.csv"))}
    assert float(acc["fp32"]["out"]) < 1e-5 and float(acc["bf16"]["dv"]) < 2e-2
    assert json.loads((res / "bandwidth.json").read_text())["gb_per_s"] > 0
    assert len(json.loads((res / "tuning" / "cpu-interpreter-none.json").read_text())["entries"]) == 1
    assert "tests/test_gpu_sh.py::test_gpu_sh_dry_run" in (res / "tests-list.log").read_text()
    table = (res / "TABLE.md").read_text()
    assert "Device copy" in table and "| bf16 |" in table and "torch " in table and "Triton " in table
    assert "=== " in (res / "gpu.log").read_text()
    with tarfile.open(pack / "results-cpu-dry-run.tgz") as tar:
        assert {"res/TABLE.md", "res/stages.txt", "res/accuracy.csv"} <= set(tar.getnames())
