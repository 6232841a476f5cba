"""scripts/gpu.sh without a GPU: a dry run of every stage's plumbing that exits 0 and leaves its
results folder (the run a lent GPU gets once must not be the first)."""
import csv
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_sh_dry_run(tmp_path):
    res, pack = tmp_path / "res", tmp_path / "pack"
    r = subprocess.run(["bash", "scripts/gpu.sh", "--dry-run", "--out", str(res), "--pack", str(pack)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    stages = dict(line.split(None, 1) for line in (res / "stages.txt").read_text().splitlines())
    assert list(stages) == ["accuracy", "bandwidth", "sweep", "bench-list", "tests-gpu-only", "tests-list", "table"], \
        stages
    assert all(how.startswith("ok") for how in stages.values()), stages
    acc = {row["dtype"]: row for row in csv.DictReader(open(res / "accuracy.csv"))}
    assert float(acc["fp32"]["out"]) < 1e-5 and float(acc["bf16"]["dv"]) < 2e-2
    assert json.loads((res / "bandwidth.json").read_text())["gb_per_s"] > 0
    assert len(json.loads((res / "tuning" / "cpu-interpreter-none.json").read_text())["entries"]) == 1
    assert "tests/test_gpu_sh.py::test_gpu_sh_dry_run" in (res / "tests-list.log").read_text()
    # the GPU-only tests exist, and skip here: the GPU run is where they run first
    assert "3 skipped" in (res / "tests-gpu-only.log").read_text()
    table = (res / "TABLE.md").read_text()
    assert "Device copy" in table and "| bf16 |" in table and "torch " in table and "Triton " in table
    assert "=== " in (res / "gpu.log").read_text()
    with tarfile.open(pack / "results-cpu-dry-run.tgz") as tar:
        assert {"res/TABLE.md", "res/stages.txt", "res/accuracy.csv"} <= set(tar.getnames())
    summary = (res / "SUMMARY.md").read_text()
    assert "accuracy fp32: worst relative error" in summary and "device copy:" in summary


def test_gpu_stage_limits_fit_the_budget():
    """The GPU run's stage limits add up to its budget (a 9-minute call less the set-up), the report's
    within the reserve; the cold torch.compile baselines come after every Triton row, the GPU-only
    tests before the rest."""
    text = open(os.path.join(ROOT, "scripts", "gpu.sh")).read()
    budget = int(re.search(r"BUDGET=(\d+)", text).group(1))
    gpu = text[text.index("# most telling first"):]
    limits = dict(re.findall(r"stage (\S+) (\d+) ", gpu))
    limits = {name: int(n) for name, n in limits.items()}
    assert sum(limits.values()) <= budget <= 540 - 30, limits
    reserve = int(re.search(r"RESERVE=(\d+)", text).group(1))
    assert limits["table"] <= reserve
    names = list(limits)
    assert names[-2:] == ["bench-compile", "table"] and names.index("tests-gpu-only") == names.index("tests") - 1
    benches = re.findall(r"stage (bench-\S+) \d+ (.*?)(?<!\\)\n", gpu, re.S)
    assert all(("--torch-compile skip" in cmd) == (name not in ("bench-compile", "bench-upsamplers"))
               for name, cmd in benches), benches
    assert "--torch-compile only" in dict(benches)["bench-compile"]


def test_summary_names_speedups_and_failed_tests(tmp_path):
    """SUMMARY.md from a made-up GPU run: the op against eager and torch.compile with its share of the
    copy bandwidth, the module against the official-style one, and every failed test by name, from
    the log when pytest was cut short before its JUnit report."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_stages", os.path.join(ROOT, "scripts", "gpu_stages.py"))
    stages = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stages)
    (tmp_path / "bandwidth.json").write_text(json.dumps({"gb_per_s": 4000.0}))
    (tmp_path / "bench-fpn").mkdir()
    base = dict(B=2, C=256, H=100, W=152, k_u=3, scale=2.0, dtype="bf16", direction="fwd", status="ok", gb_per_s="")
    rows = [dict(base, case="op", backend="triton", ms=0.5, gb_per_s=2000.0),
            dict(base, case="op", backend="eager", ms=5.0), dict(base, case="op", backend="torch.compile", ms=1.5),
            dict(base, case="module", backend="LDAAQU", ms=1.0), dict(base, case="module", backend="official-style", ms=4.0)]
    with open(tmp_path / "bench-fpn" / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["ms"])
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "tests.log").write_text("tests/test_op.py::test_a PASSED\nFAILED tests/test_op.py::test_b - boom\n"
                                        "[gw1] node down: worker 'gw1' crashed while running 'tests/test_x.py::test_c'\n")
    assert stages.table(str(tmp_path)) == 0
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "op 2x256x100x152 k_u=3 s=2 bf16 fwd: 0.5 ms, 10.00x eager, 3.00x torch.compile, 2000 GB/s = 50% of copy" \
        in summary
    assert "module 2x256x100x152 k_u=3 s=2 bf16 fwd: 1 ms, 4.00x official-style" in summary
    assert "  - tests/test_op.py::test_b" in summary and "  - tests/test_x.py::test_c" in summary
    assert len(summary.splitlines()) < 40
