#!/usr/bin/env bash
# Does a learned upsampler help? Set up, then train the small segmenter with each upsampler and write
# results/compare/{compare.csv,compare.png,TABLE.md} (--task nuclei: results/compare-nuclei/). Extra
# arguments go to compare.py (e.g. --task nuclei --seeds 0 1 2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python compare.py "$@"
