#!/usr/bin/env bash
# The main job: set up, then measure throughput against kernel size and scale, with its figures.
#   On a GPU: the autotuning sweep for this GPU (its tuned configurations cached for the later runs),
#   then bench.py's GPU grid (the Triton op, the LDAAQU module eager and compiled, the official-style
#   module) into results/<gpu>/.
#   On a CPU: the torch path's grid against the official-style module (k_u 3 5 7, scales 2 3, one
#   1x64x32x48 map, fp32, 2 threads) into results/cpu/ (git-ignored): 7.5 minutes on 2 cores at a
#   load of 10-12, less on a quiet machine.
# Extra arguments go to bench.py (e.g. --kernel-sizes 3 5 7 9 --scales 2 3 4 for the full grid).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)
if "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    "$PY" -m lda_aqu.autotune sweep --kernel-sizes 3 5 7 --dtype fp32 bf16
    "$PY" bench.py "$@"
else
    echo "no GPU: the CPU grid of the torch path against the official-style module (load average $(cut -d' ' -f1 /proc/loadavg))"
    if [ $# -eq 0 ]; then
        set -- --cases module --kernel-sizes 3 5 7 --scales 2 3 --shape 1 64 32 48 --memory-channels
    fi
    "$PY" bench.py "$@"
fi
echo "bench.sh: done in $(( $(date +%s) - start )) s after set-up; the CSV and figures are in the folder of the 'wrote' lines above"
