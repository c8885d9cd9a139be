#!/usr/bin/env bash
# The paper's ImageNet recipe with the official code's settings (DAMO-NLP-SG/DiGIT cd6d8ca: config/*.yaml,
# scripts/*.sh, fairseq's transformer_lm defaults they do not override), one command per headline number:
#   linear probe 71.7 (unconditional GPT, the official probe protocol)
#   class-conditional FID 4.62 (MaskGIT stage 2) and 4.79 (autoregressive stage 2)
#   unconditional FID 9.04 (MaskGIT) and 9.13 (autoregressive)
# Run on GPUs (run bench/gpu_smoke.sh first); each step resumes where a crashed run stopped:
#   DATA=/data/imagenet VQGAN=/data/vqgan_jax_strongaug.ckpt N=8 bash runs/imagenet.sh all
#   bash runs/imagenet.sh tokenize | gpt | decoders | sample | probe | eval     # one step at a time
# Batches here are global: fairseq's batch_size is per GPU (256 x 4 GPUs = 1,024 for stage 1). The official
# stage 2 reads MAGE's VQGAN (vqgan_jax_strongaug.ckpt, the Google Drive link in github.com/LTH14/mage's README).
# docs/PAPER_SCALE.md: what each step costs, and where this still differs from the official code.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:?set DATA to an ImageNet ImageFolder (train/, val/)}"
VQGAN="${VQGAN:?set VQGAN to the vqgan_jax_strongaug.ckpt of MAGE}"
N="${N:-8}"
O="${OUT:-out_imagenet}"            # tokens, codebook, the decoders
C="$O/cond" U="$O/uncond"           # the class-conditional and the unconditional GPT share the tokens
RUN="torchrun --nproc_per_node $N"
CLASSES=$(seq -s, 0 999)
resume() { [ -e "$1" ] && echo --resume || true; }

# Official stage-1 settings: post-LN without a final norm, embeddings x sqrt(1024), dropout 0.1 on the embeddings
# and residual branches, label smoothing 0.1, Adam (0.9, 0.98) with decay 0.01 on every weight, inverse-sqrt from
# 1e-7 over 6,250 warm-up steps to 3e-4, clip 1.0, 1,024 images per update, 125k updates, no classifier-free
# guidance (no class dropout).
GPT="--model base --norm post --emb-scale --dropout 0.1 --label-smoothing 0.1 --beta2 0.98 --weight-decay 0.01
     --decay-on all --schedule inverse-sqrt --warmup-steps 6250 --warmup-init-lr 1e-7 --lr 3e-4 --grad-clip 1.0
     --batch-size 1024 --max-steps 125000 --class-dropout 0 --eval-interval 2500"
# Official stage-2 settings (config/stage2/dino_base{,_nar}.yaml): pre-LN 16 x 1024, dropout 0.1, label smoothing
# 0.1, Adam (0.9, 0.98), decay 0.01, inverse-sqrt from 1e-7 over 6,250 steps to 5e-4; the same crop of each image
# for MAGE's VQGAN (256 px) and the DiGIT tokens (resized to 224): the stored token views.
DEC="--vq $VQGAN --model base --dropout 0.1 --label-smoothing 0.1 --beta2 0.98 --weight-decay 0.01
     --schedule inverse-sqrt --warmup-steps 6250 --warmup-init-lr 1e-7 --lr 5e-4 --workers 8 --eval-interval 5000"

tokenize() {  # DiGIT's tokenizer: DINOv2 ViT-B/14 with registers (the official resize rule), block 9 after the final
              # norm, a 256 px crop resized to 224, K = 8192 from 2,097,152 patches; 10 stored crops + mirrors
    $RUN tokenize_kmeans.py --data "$DATA" --out "$O" --encoder digit_vitb14_reg --image-size 224 --crop-size 256 \
        --k 8192 --views 10 --batch-size 64 --workers 8   # 64 images = 640 crops per pass
    mkdir -p "$C" "$U"
    for f in codebook.pt tokens_train.pt tokens_val.pt; do ln -f "$O/$f" "$C/$f"; ln -f "$O/$f" "$U/$f"; done
}
gpt() {
    $RUN train_gpt.py --out "$C" $GPT $(resume "$C/gpt.pt")
    $RUN train_gpt.py --out "$U" $GPT --unconditional $(resume "$U/gpt.pt")
}
decoders() {  # MaskGIT: 1,024 per update (128 x 2 x 4 GPUs), 125k updates; AR: 512 (128 x 4), 250k updates
    $RUN train_decoder.py --stage maskgit --layout fairseq --out "$O" $DEC --batch-size 1024 --max-steps 125000 \
        $(resume "$O/decoder.pt")
    $RUN train_decoder.py --stage ar --out "$O" $DEC --batch-size 512 --max-steps 250000 $(resume "$O/decoder_ar.pt")
    for d in "$C" "$U"; do ln -f "$O/decoder.pt" "$d/decoder.pt"; ln -f "$O/decoder_ar.pt" "$d/decoder_ar.pt"; done
}
sample() {  # 50 per class; the official protocol: top-k 300 (conditional), 200 (unconditional), T = 1, no CFG;
            # stage 2: MaskGIT in 8 steps, or AR with top-p 0.8
    for dec in maskgit ar; do
        $RUN sample.py --out "$C" --class "$CLASSES" --num-samples 50 --top-k 300 --decoder $dec \
            --samples-dir "$C/samples_$dec" --batch-size 128
        $RUN sample.py --out "$U" --num-samples 50000 --top-k 200 --decoder $dec --samples-dir "$U/samples_$dec" \
            --batch-size 128
    done
}
probe() {  # the official probe: the unconditional GPT, embedding + blocks 1..15, SGD lr 0.4, batch 1024, 80 epochs
    $RUN probe.py --out "$U" --protocol official
}
evaluate() {  # FID / IS with torch-fidelity against the 50k val images (Resize(256) bilinear + centre crop)
    for d in "$C" "$U"; do
        for dec in maskgit ar; do
            $RUN eval.py --out "$d" --samples "$d/samples_$dec" --fd-encoder dinov2_vitl14 --fd-size 224 --inception on
        done
    done
}
case "${1:-all}" in
    all) tokenize; gpt; decoders; sample; probe; evaluate ;;
    tokenize|gpt|decoders|sample|probe) "$1" ;;
    eval) evaluate ;;
    *) echo "usage: bash runs/imagenet.sh [all|tokenize|gpt|decoders|sample|probe|eval]" >&2; exit 2 ;;
esac
