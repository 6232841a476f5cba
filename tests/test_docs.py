"""The README and docs/ as users read them: every python block runs as written (each in a fresh
namespace, in an empty folder), the README fits a first screen of 200 lines, and every relative link
and repository path they name exists. Blocks that need a GPU or a long run are ```text blocks."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# what a command writes (git-ignored), not what the repository holds
OUTPUTS = ("results/cpu/", "results/demo/", "bench.csv", "targets.md", "profiles.txt", "compare.csv", "TABLE.md")
TOP = ("scripts", "docs", "lda_aqu", "tests", "results")


def blocks(kind):
    return [(page, i, code) for page in PAGES for i, (lang, code) in enumerate(BLOCK.findall(page.read_text()))
            if lang == kind]


PYTHON = blocks("python")


def test_pages_have_blocks():
    assert len(PYTHON) >= 10 and blocks("text"), [p.name for p, _, _ in PYTHON]


@pytest.mark.parametrize("page,i,code", PYTHON, ids=[f"{p.relative_to(ROOT)}#{i}" for p, i, _ in PYTHON])
def test_python_block_runs(page, i, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    exec(compile(code, f"{page.name} block {i}", "exec"), {"__name__": "__docs__"})


def test_readme_is_one_screen():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines"


def named_paths(page: Path):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", text)):  # links and images
        if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
            yield (page.parent / target.split("#")[0]).resolve(), target
    for token in re.findall(r"`([^`\s]+)`", text):  # repository paths in code spans
        path = token.split(":")[0]
        if any(c in path for c in "<>*{}()[]=,") or path.startswith(OUTPUTS):
            continue
        if path.split("/")[0] in TOP and "/" in path or re.fullmatch(r"[\w.-]+\.(py|md|sh|toml|txt)", path):
            yield ROOT / path, token


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_named_paths_exist(page):
    missing = sorted({name for path, name in named_paths(page) if not path.exists()})
    assert not missing, f"{page.relative_to(ROOT)} names what does not exist: {missing}"
