#!/usr/bin/env bash
# Set up .venv with the project installed (editable). On a machine without a GPU: the pinned CPU
# set (torch 2.13.0 from local disk). Idempotent; a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null 2>&1; then
    # a GPU machine keeps its own torch and triton builds
    [ -x .venv/bin/python ] || python3 -m venv --system-site-packages .venv
    .venv/bin/pip install -q -e ".[test,bench,onnx]"
else
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/pip install -q -r requirements-cpu.txt
    .venv/bin/pip install -q --no-deps -e .
fi
# the checkout's root on this venv's path: tools that run by file from it import the former name
# `upsampler` (upsampler.py, an alias of lda_aqu.upsampler; the wheel does not install it)
echo "$PWD" > "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/lda_aqu_checkout.pth"
