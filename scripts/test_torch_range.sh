#!/usr/bin/env bash
# The tests that depend most on torch's version (torch.compile, torch.export, ONNX export, the custom
# ops' fake kernels, meta and fake tensors) under one torch, with triton 3.6.0; the log goes to
# results/torch-range/torch-<version>.log. pyproject.toml's lower bound is the oldest version this
# passes with; CI runs the pinned torch only (the CUDA build of an older one is about 5 GB).
#
#   scripts/test_torch_range.sh [VERSION]    VERSION defaults to 2.11.0
#
# The pinned version (requirements-cpu.txt) runs in .venv (scripts/setup.sh); any other in its own
# environment, $TORCH_RANGE_VENV or ~/.cache/lda_aqu/venv-torch-VERSION, made on the first run and
# reused after. TORCH_RANGE_PYTHON: an interpreter to run as it is, which must have that torch.
# PYTEST_WORKERS as scripts/test.sh (0: serially).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-2.11.0}
pinned=$(sed -n 's/^torch==//p' requirements-cpu.txt)

if [ -n "${TORCH_RANGE_PYTHON:-}" ]; then
    python=$TORCH_RANGE_PYTHON
    "$python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$version')" ||
        { echo "$python does not have torch $version" >&2; exit 2; }
elif [ "$version" = "$pinned" ]; then
    bash scripts/setup.sh
    python=.venv/bin/python
else
    venv=${TORCH_RANGE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lda_aqu/venv-torch-$version}
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    # the test dependencies as requirements-cpu.txt pins them, with this torch instead of the pinned one
    grep -v '^torch==' requirements-cpu.txt > "$venv/requirements.txt"
    "$venv/bin/pip" install -q "torch==$version" -r "$venv/requirements.txt"
    python=$venv/bin/python
fi

# the repository root is the working directory: its packages are imported, not an installed copy
tests=(tests/test_compile.py tests/test_export.py tests/test_output_size.py tests/test_guided.py
       tests/test_torch_path.py tests/test_edge_inputs.py tests/test_module.py)
select="compile or export or fake or meta or opcheck"

log=results/torch-range/torch-$version.log
mkdir -p "$(dirname "$log")"
start=$(date +%s)
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    # the log itself (truncated by now) is no local change
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo none)$(git diff --quiet HEAD -- . ":(exclude)$log" 2>/dev/null || echo ' (with local changes)')"
    "$python" -c "import platform, torch, triton; print(f'python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}')"
    echo "tests: ${tests[*]} -k \"$select\""
} > "$log"
set +e
"$python" -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" --dist loadfile -k "$select" "${tests[@]}" \
    2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
set -e
echo "wall: $(( $(date +%s) - start )) s, exit status $rc" | tee -a "$log"
exit "$rc"
