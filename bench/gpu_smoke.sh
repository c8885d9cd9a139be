#!/usr/bin/env bash
# Run this first on a GPU machine: every stage at tiny size on the GPU with 1 process, then with 2 under torchrun
# (2 GPUs, or 2 gloo processes on the CPU when there is no GPU: the same code paths, so the script cannot rot).
# A few minutes; writes one table per run to bench/gpu_smoke.md (stage, ok/fail, seconds, peak memory).
#   bash bench/gpu_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source ./setup_env.sh requirements.txt
OUT=bench/gpu_smoke.md
echo "# GPU smoke run ($(date -u +%Y-%m-%d), \`bash bench/gpu_smoke.sh\`)" > "$OUT"
echo "" >> "$OUT"
python bench/gpu_smoke.py --out "$OUT"
GPUS=$(python -c 'import torch; print(torch.cuda.device_count())')
NPROC=2; [ "$GPUS" = 1 ] && NPROC=1
if [ "$NPROC" = 2 ]; then
    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 bench/gpu_smoke.py --out "$OUT"
fi
echo "-> $OUT"
