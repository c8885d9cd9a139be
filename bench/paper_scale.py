"""
Paper-scale smoke run: every stage at the ImageNet recipe's shapes, a couple of steps each, on CPU.

The recipe (runs/imagenet.sh, docs/PAPER_SCALE.md) is DINOv2 ViT-B/14 with registers at 224 px (16x16
tokens), K = 8192, the GPT "base" preset (16 x 1024), the pixel VQ and decoder at 256 px. The hub weights
cannot be downloaded here, so DIGIT_RANDOM_ENCODER=1 gives the encoder random weights: the numbers the
stages print mean nothing, but every shape, flag and file contract of the recipe is exercised, and the peak
memory and time per step of each stage are measured. A synthetic ImageFolder (random pictures, 2 classes,
mixed sizes) stands in for ImageNet.

    python bench/paper_scale.py              # ~10 min on 2 CPU cores; writes bench/paper_scale.md
    python bench/paper_scale.py --nproc 2    # the training stages under torchrun with 2 gloo processes
    python bench/paper_scale.py --vq-only    # only the pretrained VQs' table (MAGE's VQGAN, LlamaGen's)
    python bench/paper_scale.py --device cuda --train-images 256   # a GPU: rate, peak memory per stage

The second table: encode and decode images/s and peak memory of the two pretrained pixel tokenizers at 256 px
(full size, random weights: speed does not depend on their values), each in its own process, with the FLOP/s
they reach as a fraction of this machine's fp32 matmul peak measured in the same process.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--nproc", type=int, default=1,
               help="processes for the torchrun-capable stages (default: %(default)s)")
p.add_argument("--train-images", type=int, default=40,
               help="synthetic train images (>= 32: K = 8192 needs 8192 patches) (default: %(default)s)")
p.add_argument("--keep", default=None,
               help="keep the run's files here (default: a temporary folder)")
p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_scale.md"))
p.add_argument("--vq-only", action="store_true",
               help="only the pretrained VQs' table (the stage table is kept)")
# the child process of one row
p.add_argument("--measure-vq", choices=["mage", "llamagen", "direct"], help=argparse.SUPPRESS)
p.add_argument("--vq-batch", type=int, default=4, help="images per encode/decode call (default: %(default)s)")
p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
               help="cuda: stages run in this process, peak GPU memory per stage (default: "
                    "%(default)s)")
args = p.parse_args()
VQ_TITLE = "## Pretrained pixel tokenizers at 256 px"


def measure_vq(kind, batch, reps=3):
    """One pretrained VQ at full size: encode and decode images/s, GFLOP per image, and the fraction of the
    fp32 matmul peak (measured here) that it reaches. Prints one line the parent parses."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    sys.path.insert(0, ROOT)
    from common import matmul_flops
    from train_direct import DirectDecoder, direct_render
    from train_gpt import MODELS
    from vqgan import LlamaGenVQ, MageVQGAN, vq_decode, vq_encode
    torch.manual_seed(0)
    # the direct decoder's base configuration: 16x16 DiGIT tokens (K = 8192, ViT-B 768-d) -> 256 px
    if kind == "direct":
        vq = DirectDecoder(vocab=8192, dim=768, grid=(16, 16), patch=16,
                           **MODELS["base"]).eval().requires_grad_(False)
    else:
        vq = (MageVQGAN() if kind == "mage" else LlamaGenVQ()).eval().requires_grad_(False)
    x = torch.rand(batch, 3, 256, 256) * 2 - 1
    result = {"encode": (float("nan"), float("nan"))}
    with torch.no_grad():
        ids = torch.randint(8192, (batch, 256)) if kind == "direct" else vq_encode(vq, x)
        steps = [("decode", lambda: direct_render(vq, ids))] if kind == "direct" else \
            [("encode", lambda: vq_encode(vq, x)), ("decode", lambda: vq_decode(vq, ids, (16, 16)))]
        for name, fn in steps:
            with FlopCounterMode(display=False) as fc:
                fn()
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            sec = (time.perf_counter() - t) / reps
            result[name] = (batch / sec, fc.get_total_flops() / batch / 1e9)
    # the reference: the best of three matmul measurements (one alone varies by ~30% on a shared machine)
    peak = max(matmul_flops(torch.device("cpu"), torch.float32) for _ in range(3))
    params = sum(p.numel() for p in vq.parameters()) / 1e6
    enc, dec = result["encode"], result["decode"]
    print(f"RESULT {params:.1f} {enc[0]:.2f} {enc[1]:.1f} {dec[0]:.2f} {dec[1]:.1f} {peak / 1e9:.0f} "
          f"{enc[0] * enc[1] / (peak / 1e9):.3f} {dec[0] * dec[1] / (peak / 1e9):.3f}")


if args.measure_vq:
    measure_vq(args.measure_vq, args.vq_batch)
    sys.exit(0)


def synthetic_imagefolder(root, n_train, n_val):
    """Random smooth pictures of two 'classes' at ImageNet-like, mixed sizes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(2):
            os.makedirs(os.path.join(root, split, f"class{c}"), exist_ok=True)
            for i in range(n // 2):
                h, w = int(rng.integers(240, 320)), int(rng.integers(240, 320))
                small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
                img.save(os.path.join(root, split, f"class{c}", f"{i:04d}.jpg"), quality=90)


def run(name, script, *flags, nproc=1):
    """Run one stage; return (seconds, peak RSS in GB of the largest process, the stage's last rate, log)."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--standalone", "--nproc_per_node", str(nproc)]
    cmd = launcher + [os.path.join(ROOT, script), *map(str, flags)]
    print(f"== {name}: {' '.join(cmd[len(launcher):])}", flush=True)
    env = dict(os.environ, DIGIT_RANDOM_ENCODER="1", OMP_NUM_THREADS=str(max(1, os.cpu_count() // nproc)))
    t = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=ROOT)
    log = proc.stdout.read()
    # ru_maxrss: the largest of the process and its waited-for children (KB)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.time() - t
    if status != 0:
        print(log[-4000:])
        sys.exit(f"{name} failed")
    rates = re.findall(r"(\d+\.?\d*)(s/step|step/s|s/img|img/s|s/it|it/s|s/batch|batch/s)[,\]]", log)
    rate = ""
    if rates:
        v, unit = float(rates[-1][0]), rates[-1][1]
        rate = f"{v:.2f} {unit}" if unit.startswith("s/") else f"{1 / v:.2f} s/{unit.split('/')[0]}"
    print(f"   {seconds:.0f} s, peak RSS {usage.ru_maxrss / 2**20:.2f} GB, {rate}", flush=True)
    return seconds, usage.ru_maxrss / 2**20, rate, log


def vq_table():
    """Rows of the pretrained-VQ table, each VQ measured in a child process (its own peak RSS)."""
    rows = ["| pixel tokenizer (full size, 256 px, 16x16 codes) | parameters | encode img/s | GFLOP/img | "
            "decode img/s | GFLOP/img | peak RSS GB | fraction of fp32 matmul peak (enc / dec) |",
            "|---|---|---|---|---|---|---|---|"]
    for kind, name in (("mage", "MAGE's VQGAN (the paper's; 1,024 x 256-d codes)"),
                       ("llamagen", "LlamaGen's VQ-16 (16,384 x 8-d codes)"),
                       ("direct", "for comparison: the direct decoder, base (16 x 1024), ids -> pixels")):
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--measure-vq", kind,
                                 "--vq-batch", str(args.vq_batch)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        log = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        line = [s for s in log.splitlines() if s.startswith("RESULT ")]
        if status != 0 or not line:
            print(log[-3000:])
            sys.exit(f"measuring {kind} failed")
        params, enc, enc_gf, dec, dec_gf, peak, enc_frac, dec_frac = line[0].split()[1:]
        enc, enc_gf, enc_frac = ("-", "-", "-") if enc == "nan" else (enc, enc_gf, f"{float(enc_frac):.0%}")
        rows.append(f"| {name} | {params}M | {enc} | {enc_gf} | {dec} | {dec_gf} | "
                    f"{usage.ru_maxrss / 2**20:.2f} | {enc_frac} / {float(dec_frac):.0%} of {peak} GFLOP/s |")
        print(rows[-1], flush=True)
    import torch
    return [VQ_TITLE, "",
            f"Batch {args.vq_batch}, {os.cpu_count()} CPU threads, fp32, torch {torch.__version__}, random "
            "weights (`python bench/paper_scale.py --vq-only`). Encode = encoder + nearest code; decode = "
            "code lookup + decoder (for the direct decoder: ids -> pixels in one pass, what replaces "
            "MaskGIT + VQ decoder).", "",
            *rows]


if args.vq_only:
    old = open(args.out).read().split(VQ_TITLE)[0].rstrip("\n") if os.path.exists(args.out) else ""
    with open(args.out, "w") as f:
        f.write((old + "\n\n" if old else "") + "\n".join(vq_table()) + "\n")
    print(f"-> {args.out}")
    sys.exit(0)

work = args.keep or tempfile.mkdtemp(prefix="digit_paper_")
data, out = os.path.join(work, "imagenet_standin"), os.path.join(work, "out")
shutil.rmtree(out, ignore_errors=True)
if not os.path.isdir(data):
    synthetic_imagefolder(data, args.train_images, 8)
n = args.nproc
dec = ["--out", out, "--workers", "0", "--max-steps", "2", "--batch-size", str(2 * n), "--eval-interval",
       "2", "--eval-images", "4"]
STAGES = [  # (name, script, flags): runs/imagenet.sh's settings, steps and batches cut to a couple
    ("tokenize_kmeans.py (ViT-B/14 reg, 256 px crops to 224, K=8192, 2 views)", "tokenize_kmeans.py",
     ["--data", data, "--out", out, "--iters", "2", "--workers", "0", "--batch-size", "8", "--crop-size",
      "256", "--views", "2"]),
    ("train_gpt.py --model base (official settings)", "train_gpt.py",
     ["--out", out, "--model", "base", "--max-steps", "2", "--batch-size", str(4 * n), "--eval-interval", "2",
      "--eval-batches", "1", "--norm", "post", "--emb-scale", "--dropout", "0.1", "--label-smoothing",
      "0.1"]),
    ("train_vq.py (256 px, 8192 codes)", "train_vq.py", ["--vq-codes", "8192", *dec]),
    ("train_decoder.py --stage maskgit --model base --layout fairseq", "train_decoder.py",
     ["--stage", "maskgit", "--model", "base", "--layout", "fairseq", "--dropout", "0.1", *dec]),
    ("train_decoder.py --stage ar --model base", "train_decoder.py",
     ["--stage", "ar", "--model", "base", "--dropout", "0.1", *dec]),
    ("train_direct.py --model base (256 px)", "train_direct.py", ["--model", "base", *dec]),
    ("sample.py (2 classes x 1, top-k 300, MaskGIT)", "sample.py",
     ["--out", out, "--class", "0,1", "--num-samples", "1", "--top-k", "300", "--batch-size", "1",
      "--decoder", "maskgit"]),
    ("sample.py (2 classes x 1, top-k 300, AR)", "sample.py",
     ["--out", out, "--class", "0,1", "--num-samples", "1", "--top-k", "300", "--batch-size", "1",
      "--decoder", "ar", "--samples-dir", os.path.join(out, "samples_ar")]),
    ("probe.py --protocol official", "probe.py", ["--out", out, "--epochs", "2", "--protocol", "official"]),
    ("eval.py (FD_DINOv2 ViT-L/14 at 224)", "eval.py",
     ["--out", out, "--samples", os.path.join(out, "samples"), "--fd-encoder", "dinov2_vitl14", "--fd-size",
      "224"]),
    ("stability.py (4 images, 8 SNRs)", "stability.py", ["--out", out, "--images", "4"]),
]


def run_on_cuda(name, script, *flags):
    """One stage in this process on the GPU: (seconds, peak GPU memory GB, '')."""
    import importlib
    import torch
    sys.path.insert(0, ROOT)
    torch.cuda.reset_peak_memory_stats()
    print(f"== {name}", flush=True)
    t = time.time()
    importlib.import_module(script[:-3]).main([*map(str, flags), "--device", "cuda"])
    return time.time() - t, torch.cuda.max_memory_allocated() / 2 ** 30, "", ""


rows = []
for name, script, flags in STAGES:
    if args.device == "cuda":
        os.environ["DIGIT_RANDOM_ENCODER"] = "1"
        seconds, gb, rate, _ = run_on_cuda(name, script, *flags)
    else:
        seconds, gb, rate, _ = run(name, script, *flags, nproc=n)
    rows.append(f"| {name} | {seconds:.0f} | {gb:.2f} | {rate} |")

import torch  # noqa: E402  (only for the version line)
lines = [f"Paper-scale smoke run ({os.cpu_count()} CPU threads, {n} process(es), torch {torch.__version__}, "
         f"random-weight encoder, {args.train_images} synthetic train images): every stage at the ImageNet "
         "recipe's shapes for a couple of steps.", "",
         f"| stage | wall s (incl. start-up) | peak {'GPU memory' if args.device == 'cuda' else 'RSS'} GB "
         "(largest process) | rate, as tqdm last showed it |", "|---|---|---|---|", *rows,
         "",
         "Rates of the training stages are over their 2 steps, so they include the first step's warm-up "
         "and the evaluation at the last step; bench/train_gpt.md has clean per-step figures for the base "
         "GPT.", "",
         *vq_table()]
with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"-> {args.out}")
if not args.keep:
    shutil.rmtree(work)
