#!/usr/bin/env bash
# Latent stability where DINOv2 is in its own domain (the paper's setting, in miniature): natural photos that ship
# offline (the sample images inside the scikit-image wheel), cut into 128 px crops; a K-means (DiGIT) and a small
# pixel VQ are fitted on crops of 8 photos, and stability.py measures both on crops of 6 other photos, with the
# noise at native resolution (DINOv2 sees 112 px, the VQ the native 128 px: both near native, as on ImageNet).
#   bash runs/photos_stability.sh                 # -> out_photos/stability.md (+ .json, .png)
#   DIGIT_OUT=elsewhere bash runs/photos_stability.sh
# Finished steps are skipped on a second run.
set -euo pipefail
cd "$(dirname "$0")/.."
source ./setup_env.sh requirements.txt
OUT="${DIGIT_OUT:-out_photos}"
[ -d "$OUT/crops/val" ] || python stability.py --write-photos "$OUT/crops"
[ -e "$OUT/codebook.pt" ] || python tokenize_kmeans.py --data "$OUT/crops" --out "$OUT" --encoder dinov2_vits14_offline \
    --image-size 112 --k 512
[ -e "$OUT/vq_tokens_val.pt" ] || python train_vq.py --out "$OUT" --pixel-size 128 --max-steps 300 --lr 1e-3 --batch-size 16 \
    --vq-channels 16 --vq-codes 512 --perceptual 0 --eval-interval 300 --ckpt-interval 100 $([ -e "$OUT/vq.pt" ] && echo --resume)
python stability.py --out "$OUT" --images 200
