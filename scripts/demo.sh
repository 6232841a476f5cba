#!/usr/bin/env bash
# The demo (demo.py): set up, then run it (both backends on a feature map, a picture of where
# output pixels sample). Extra arguments go to demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python demo.py "$@"
