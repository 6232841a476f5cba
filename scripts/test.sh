#!/usr/bin/env bash
# Set up, then run the whole test suite (Triton kernels through the interpreter when there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
