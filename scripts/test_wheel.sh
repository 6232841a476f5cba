#!/usr/bin/env bash
# The wheel as users install it: built from this checkout, it must hold one top-level package
# (lda_aqu), install beside Hugging Face's `kernels` from the package index in a fresh venv, and run
# the README's quickstart there with both imported. Needs the package index; about 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/pip wheel -q --no-deps --no-build-isolation -w "$work/dist" .
wheel=$(ls "$work"/dist/*.whl)
.venv/bin/python - "$wheel" <<'PY'
import sys, zipfile
top = sorted({n.split("/")[0] for n in zipfile.ZipFile(sys.argv[1]).namelist()} - {n for n in () })
top = [t for t in top if not t.endswith(".dist-info")]
assert top == ["lda_aqu"], f"the wheel's top-level names: {top}"
print("wheel top level:", top)
PY
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q -r requirements-cpu.txt "$wheel" kernels
cd "$work"  # not the checkout: what is imported is what was installed
sed -n '/^```python/,/^```/p' "$OLDPWD/README.md" | sed '1d;$d' | awk 'NR==1,/^```/' > quickstart.py
"$work/venv/bin/python" - <<'PY'
import importlib.metadata as md
import kernels, lda_aqu
assert hasattr(kernels, "get_kernel"), kernels.__file__  # Hugging Face's kernel hub, not ours
assert "site-packages" in lda_aqu.__file__, lda_aqu.__file__
print("kernels", md.version("kernels"), "from", kernels.__file__)
print("lda-aqu", md.version("lda-aqu"), "from", lda_aqu.__file__)
exec(open("quickstart.py").read(), {"__name__": "__main__"})
PY
