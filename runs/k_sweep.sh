#!/usr/bin/env bash
# The paper's probe figure on the demo data: tokenize with several K, train the same GPT on each, probe every
# layer, and gather one table + plot (accuracy per layer, one line per K).
#   bash runs/k_sweep.sh                 # K = 64 256 1024 -> out_k/<K>/, out_k/probe_compare.md and .png
#   bash runs/k_sweep.sh 128 512         # other K values
#   STEPS=600 DIGIT_OUT=elsewhere bash runs/k_sweep.sh
# A finished K is skipped on a second run (its probe.json exists).
set -euo pipefail
cd "$(dirname "$0")/.."
source ./setup_env.sh requirements.txt
OUT="${DIGIT_OUT:-out_k}"
STEPS="${STEPS:-300}"
KS=("$@"); [ ${#KS[@]} -eq 0 ] && KS=(64 256 1024)
for K in "${KS[@]}"; do
    if [ -e "$OUT/$K/probe.json" ]; then echo "== K=$K: done before, skipped"; continue; fi
    echo "== K=$K"
    python tokenize_kmeans.py --out "$OUT/$K" --k "$K"
    python train_gpt.py --out "$OUT/$K" --max-steps "$STEPS" --eval-interval "$STEPS" --ckpt-interval "$STEPS" \
        $([ -e "$OUT/$K/gpt.pt" ] && echo --resume)
    python probe.py --out "$OUT/$K" --no-dinov2
done
python probe.py --out "$OUT" --compare $(for K in "${KS[@]}"; do echo "$OUT/$K"; done)
