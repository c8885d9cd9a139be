"""
What one image from the paper's model costs: the models convert_official.py writes, at their real sizes with
random weights (the class-conditional GPT: post-LN 16 x 1024, K = 8192; the autoregressive stage 2: pre-LN
16 x 1024 over 256 DiGIT ids + 256 VQ codes; MAGE's VQGAN decoder at 256 px), sampled as the official
protocol does (top-k 300, no CFG; stage 2 top-p 0.8), each with its KV cache. Writes bench/official_sample.md.

    python bench/official_sample.py                 # 1 image, CPU, fp32 and (where the CPU has bf16) bf16
    python bench/official_sample.py --batch 4 --device cuda
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import autocast, cpu_has_bf16, positive_int  # noqa: E402
from sample import generate  # noqa: E402
from train_decoder import ARDecoder, ar_decode  # noqa: E402
from train_gpt import GPT  # noqa: E402
from vqgan import MageVQGAN, vq_decode  # noqa: E402


def models(device):
    gpt = GPT(vocab_size=8192, block_size=257, n_classes=1000, n_layer=16, n_embd=1024, n_head=16,
              norm="post", emb_scale=True)
    ar = ARDecoder(digit_vocab=8192, vq_codes=1024, length=256, n_layer=16, n_embd=1024, n_head=16)
    return [m.to(device).eval() for m in (gpt, ar, MageVQGAN())]


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


@torch.no_grad()
def one_run(gpt, ar, vq, batch, device, dtype):
    gen = torch.Generator(device).manual_seed(0)
    labels = torch.full((batch,), 207, device=device)
    with autocast(device, dtype):
        digit, t_gpt = timed(lambda: generate(gpt, labels, top_k=300, gen=gen, dtype=dtype, length=256),
                             device)
        codes, t_ar = timed(lambda: ar_decode(ar, digit, top_p=0.8, gen=gen, dtype=dtype), device)
        _, t_vq = timed(lambda: vq_decode(vq, codes, (16, 16)), device)
    return t_gpt, t_ar, t_vq


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=positive_int, default=1, help="images per batch (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "official_sample.md"), help="the table")
    args = p.parse_args()
    device = torch.device(args.device)
    gpt, ar, vq = models(device)
    fast = device.type == "cuda" or cpu_has_bf16()
    rows = []
    for dtype in [None] + ([torch.bfloat16] if fast else []):  # None: plain fp32
        one_run(gpt, ar, vq, args.batch, device, dtype)  # warm-up: kernels, bf16 JIT, allocator
        t = one_run(gpt, ar, vq, args.batch, device, dtype)
        per = [x / args.batch for x in t]
        rows.append(f"| {'bf16' if dtype else 'fp32'} | {per[0]:.1f} | {per[1]:.1f} | {per[2]:.1f} | "
                    f"**{sum(per):.1f}** |")
        print(rows[-1], flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{torch.get_num_threads()} CPU threads, {'with' if fast else 'without'} bf16 instructions"
    with open(args.out, "w") as f:
        f.write(f"# One image from the paper's model (`python bench/official_sample.py --batch {args.batch} "
                f"--device {args.device}`)\n\n{where}, torch {torch.__version__}, random weights at the "
                "converted models' sizes (GPT 16 x 1024 post-LN, K = 8192; AR stage 2 16 x 1024; MAGE's "
                f"VQGAN), batch {args.batch}, each model warm; seconds per image:\n\n"
                "| precision | GPT: 256 DiGIT tokens (top-k 300) | AR stage 2: 256 VQ codes (top-p 0.8) | "
                "VQGAN decode | total |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
