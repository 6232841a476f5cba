"""compare.py: its metrics on known cases, and --quick end to end (train two upsamplers, write CSV, table, figure)."""
import csv
import math
import os
import subprocess
import sys

import torch

import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_metrics_on_known_predictions():
    _, label = compare.make_dataset(4, 32, seed=7)
    k = len(compare.CLASSES)
    assert compare.miou(compare.confusion(label, label, k))[0] == 1.0
    assert compare.boundary_f(compare.boundary_counts(label, label, k, tol=1)) == 1.0
    shifted = torch.roll(label, 1, dims=-1)  # every outline one pixel off: within a 1-pixel tolerance, not 0
    assert compare.miou(compare.confusion(shifted, label, k))[0] < 0.8
    assert compare.boundary_f(compare.boundary_counts(shifted, label, k, tol=1)) > 0.97
    assert compare.boundary_f(compare.boundary_counts(shifted, label, k, tol=0)) < 0.8
    blank = torch.zeros_like(label)  # all background: the thin classes' IoU and boundary F are 0
    m, ious = compare.miou(compare.confusion(blank, label, k))
    assert ious[1:] == [0, 0, 0] and 0 < m < 0.25
    assert compare.boundary_f(compare.boundary_counts(blank, label, k, tol=2)) < 0.25


def test_quick_run_writes_sane_results(tmp_path):
    other = dict.fromkeys(compare.COLUMNS, "1")
    with open(tmp_path / "compare.csv", "w", newline="") as f:  # another device's rows survive a rerun
        w = csv.DictWriter(f, compare.COLUMNS)
        w.writeheader()
        w.writerow(dict(other, device="GPU elsewhere"))
    r = subprocess.run([sys.executable, "compare.py", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "compare.csv")))
    assert [row["device"] for row in rows][0] == "GPU elsewhere"
    mine = {row["upsampler"]: row for row in rows[1:]}
    assert set(mine) == {"nearest", "lda_aqu"} and all(row["device"].startswith("CPU") for row in mine.values())
    for row in mine.values():
        assert 0 <= float(row["miou"]) <= 1 and 0 <= float(row["boundary_f"]) <= 1
        assert all(math.isfinite(float(row[c])) for c in ("loss_start", "loss_end", "ms_per_step"))
        assert float(row["ms_per_step"]) > 0
    assert any(float(row["loss_end"]) < float(row["loss_start"]) for row in mine.values())
    assert int(mine["nearest"]["upsampler_params"]) == 0 < int(mine["lda_aqu"]["upsampler_params"])
    assert int(mine["nearest"]["params"]) < int(mine["lda_aqu"]["params"])
    assert len(mine["lda_aqu"]["offset_px"].split("/")) == 3  # one per top-down step
    table = (tmp_path / "TABLE.md").read_text()
    assert "| nearest |" in table and "| lda_aqu |" in table
    assert (tmp_path / "compare.png").stat().st_size > 10_000
