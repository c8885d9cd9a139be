#!/usr/bin/env bash
# The whole pipeline on the offline default (5,000 MNIST digits, DINOv2 ViT-S/14): bash demo.sh [--force]
# Writes everything to out/. A stage whose outputs exist is skipped unless --force.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh requirements.txt
FORCE=0; [ "${1:-}" = "--force" ] && FORCE=1
OUT=out

stage() {  # stage NAME OUTPUT COMMAND...
    local name="$1" output="$2"; shift 2
    if [ "$FORCE" = 0 ] && [ -e "$OUT/$output" ]; then
        echo "== $name: $OUT/$output exists, skipped (--force to redo)"
        return
    fi
    echo "== $name: $*"
    local t0=$SECONDS
    "$@"
    echo "== $name done in $((SECONDS - t0)) s"
}

stage "tokenize (DINOv2 features + K-means)" tokens_val.pt python tokenize_kmeans.py --out "$OUT" $([ "$FORCE" = 1 ] && echo --refit)
