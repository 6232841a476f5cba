"""One import name: everything lives under `lda_aqu`; the checkout's former name `upsampler` (upsampler.py,
for tools run from the repository root) is the same modules, not a second copy that would register the
custom ops again. The wheel itself is checked by scripts/test_wheel.sh (it needs the package index)."""
import importlib
import pkgutil
import sys
from pathlib import Path

import lda_aqu
import lda_aqu.upsampler

ROOT = Path(__file__).resolve().parent.parent


def test_the_former_name_is_the_same_modules():
    sys.path.insert(0, str(ROOT))
    try:
        import upsampler
        import upsampler.functional
    finally:
        sys.path.remove(str(ROOT))
    assert upsampler is lda_aqu.upsampler
    for info in pkgutil.iter_modules(lda_aqu.upsampler.__path__):
        assert sys.modules[f"upsampler.{info.name}"] is importlib.import_module(f"lda_aqu.upsampler.{info.name}")
    assert upsampler.functional.can_run_triton is lda_aqu.upsampler.functional.can_run_triton


def test_one_top_level_package():
    tops = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert tops == {"lda_aqu"}, tops
    assert 'include = ["lda_aqu*"]' in (ROOT / "pyproject.toml").read_text()
    assert set(lda_aqu.__all__) >= {"LDAAQU", "AnyUp", "NAF", "local_upsample"}
