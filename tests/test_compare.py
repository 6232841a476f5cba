"""compare.py: its metrics on known cases, the nuclei data's fetch, and --quick end to end for both tasks (train two
upsamplers, write CSV, table, figure)."""
import csv
import math
import os
import subprocess
import sys
import zipfile

import pytest
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


def _flood_fill(mask):
    """4-connected components by breadth-first search, as sets of pixels."""
    todo, parts = {(y, x) for y, x in mask.nonzero().tolist()}, []
    while todo:
        part, front = set(), [todo.pop()]
        while front:
            y, x = front.pop()
            part.add((y, x))
            for q in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if q in todo:
                    todo.remove(q)
                    front.append(q)
        parts.append(frozenset(part))
    return set(parts)


@pytest.mark.parametrize("seed", range(4))
def test_components_match_a_flood_fill(seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(23, 31, generator=gen, device="cpu").to(torch.get_default_device()) < 0.55  # near percolation
    lab = compare.components(mask)
    assert lab.max() == len(_flood_fill(mask)) and torch.equal(lab > 0, mask)
    assert {frozenset(map(tuple, (lab == i).nonzero().tolist())) for i in range(1, int(lab.max()) + 1)} == \
        _flood_fill(mask)


def _blobs():
    """Instance labels [40, 48]: discs and rectangles, two pairs touching, one on the edge."""
    py, px = torch.meshgrid(torch.arange(40), torch.arange(48), indexing="ij")
    inst = torch.zeros(40, 48, dtype=torch.long)
    for i, (cy, cx, r) in enumerate([(8, 8, 5), (8, 19, 6), (28, 10, 7), (30, 40, 6), (0, 30, 4)], 1):
        inst[(py - cy) ** 2 + (px - cx) ** 2 <= r * r] = i
    inst[15:24, 26:33], inst[15:24, 33:38] = 6, 7
    return inst


def test_object_f1_on_known_labels():
    inst = _blobs()
    label = compare.semantic(inst)
    assert set(label.unique().tolist()) == {0, 1, 2}
    boundary = label == 2  # a 1 px rim inside every instance, 2 px between touching ones, none along the image edge
    assert not boundary[0, 28:33].any() and boundary[15, 26:33].all() and boundary[15:24, 32:34].all()
    objects = compare.nuclei_objects(label)  # the rims separate the touching pairs: every instance comes back,
    assert ((objects > 0) <= (inst > 0)).all() and ((objects > 0) != (inst > 0)).sum() == 18  # but 4 tips per disc
    assert compare.object_counts(objects, inst).tolist() == [7, 7, 7]
    assert compare.f1(compare.object_counts(objects, inst)) == 1.0
    merged = label.clone()
    merged[16:23, 32:34] = 1  # no rim between the rectangles: one object, matching the larger (IoU 63 / 108)
    counts = compare.object_counts(compare.nuclei_objects(merged), inst)
    assert counts.tolist() == [6, 6, 7] and abs(compare.f1(counts) - 12 / 13) < 1e-12
    shifted = compare.nuclei_objects(torch.roll(label, 1, dims=-1))  # one pixel off: IoU still above 0.5
    assert compare.object_counts(shifted, inst)[0] == 7
    assert compare.object_counts(torch.zeros_like(inst), inst).tolist() == [0, 0, 7]
    assert compare.f1(compare.object_counts(torch.zeros_like(inst), inst)) == 0.0


def test_paired_interval():
    rows = [dict(upsampler=n, seed=s, miou=v) for n, vals in (("nearest", (0.5, 0.6, 0.7)), ("x", (0.6, 0.8, 1.0)))
            for s, v in enumerate(vals)]
    mean, half = compare.paired(rows, "x", "miou")
    assert abs(mean - 0.2) < 1e-12 and abs(half - 4.303 * 0.1 / math.sqrt(3)) < 1e-9
    assert compare.paired(rows[:4], "x", "miou") == (rows[3]["miou"] - rows[0]["miou"], None)  # one shared seed
    assert abs(compare.t975(30) - 2.0423) < 1e-3 and abs(compare.t975(11) - 2.2010) < 3e-3


def _fake_wheel(path, payload):
    with zipfile.ZipFile(path, "w") as z:
        for f in compare.STARDIST_FILES:
            z.writestr(f"stardist/data/images/{f}", payload)


def test_nuclei_fetch_checks_what_it_extracts(tmp_path):
    _fake_wheel(tmp_path / "stardist-0.9.2-py3-none-any.whl", b"not the image")
    with pytest.raises(RuntimeError, match="sha256"):
        compare.fetch_nuclei(str(tmp_path))


def test_nuclei_fetch_without_index_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(RuntimeError, match="pip download --no-deps") as e:
        compare.fetch_nuclei(str(tmp_path / "cache"))
    assert str(tmp_path / "cache") in str(e.value)


@pytest.mark.slow
def test_quick_run_writes_sane_results(tmp_path):
    cols = compare.columns(compare.Outlines)
    with open(tmp_path / "compare.csv", "w", newline="") as f:  # another device's rows survive a rerun
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerow(dict(dict.fromkeys(cols, "1"), device="GPU elsewhere"))
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
    # --resume keeps those runs and adds the missing seed; with two seeds the table has the paired intervals
    r = subprocess.run([sys.executable, "compare.py", "--quick", "--out", str(tmp_path), "--resume", "--seeds", "0",
                        "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "seed 0" not in r.stdout and "lda_aqu   seed 1" in r.stdout
    again = list(csv.DictReader(open(tmp_path / "compare.csv")))
    assert [row["seed"] for row in again[1:]] == ["0", "0", "1", "1"] and again[1:3] == rows[1:]
    table = (tmp_path / "TABLE.md").read_text()
    assert "Paired difference against nearest" in table and "1 degrees of freedom" in table


@pytest.mark.slow
def test_nuclei_quick_run(tmp_path):
    """The CI smoke run of the real-image task (fetches the data into the user cache once)."""
    r = subprocess.run([sys.executable, "compare.py", "--task", "nuclei", "--quick", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["upsampler"]: row for row in csv.DictReader(open(tmp_path / "compare.csv"))}
    assert set(rows) == {"nearest", "lda_aqu"}
    for row in rows.values():
        assert all(0 <= float(row[m]) <= 1 for m in ("miou", "boundary_f", "object_f1", "iou_interior"))
        assert float(row["loss_end"]) < float(row["loss_start"])
    table = (tmp_path / "TABLE.md").read_text()
    assert "task nuclei" in table and "object F1" in table and "| lda_aqu |" in table
    assert (tmp_path / "compare.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize("task", ["outlines", "nuclei"])
def test_guided_upsamplers_train_in_the_comparison(task):
    """SAPA and FADE in compare.py's model, guided by the encoder's laterals: a few steps of each task's quick
    settings train and evaluate, their parameters counted as upsamplers'."""
    small = ["--train", "8", "--val", "4"] if task == "outlines" else []
    args = compare.parse_args(["--task", task, "--quick", "--upsamplers", "sapa", "fade", "--steps", "3", *small])
    data = compare.TASKS[task](args)
    for name in args.upsamplers:
        r = compare.train_one(name, 0, data, args, torch.device("cpu"))
        assert r["upsampler"] == name and 0 < r["upsampler_params"] < r["params"]
        assert all(0 <= r[m] <= 1 for m in data.metrics) and all(math.isfinite(x) for x in r["losses"])
