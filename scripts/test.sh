#!/usr/bin/env bash
# Set up, then run the whole test suite (Triton kernels through the interpreter when there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the optional mm extra: the mmengine registry tests
.venv/bin/python -c "import mmengine" 2>/dev/null || .venv/bin/pip install -q -e ".[mm]"
# two workers, a test file each at a time (a module fixture, e.g. test_gpu_compile's compiles, runs
# once); PYTEST_WORKERS=0 runs serially
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
