"""
The first thing to run on a GPU machine: every stage at tiny size on the GPU, in one process or under
torchrun, in a few minutes; one table of stage, ok/fail, seconds and peak GPU memory. Without a GPU it runs
the same stages on the CPU (peak RSS instead), so the script cannot rot where no GPU is lent.

    bash bench/gpu_smoke.sh                    # 1 process, then 2 (torchrun); writes bench/gpu_smoke.md
    python bench/gpu_smoke.py                  # 1 process
    torchrun --nproc_per_node 2 bench/gpu_smoke.py

Each stage runs in this process through its main(argv) (so its peak memory can be read), on a synthetic
ImageFolder with the offline DINOv2 ViT-S/14: tokenize, the GPT, the pixel VQ, the three stage-2 decoders,
sampling through each, both probe protocols, eval and stability. A failing stage is reported and the
run goes on with the next one (the later ones may then fail for want of its output).
"""
import argparse
import os
import resource
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import eval as evaluate  # noqa: E402
import probe  # noqa: E402
import sample  # noqa: E402
import stability  # noqa: E402
import tokenize_kmeans  # noqa: E402
import train_decoder  # noqa: E402
import train_direct  # noqa: E402
import train_gpt  # noqa: E402
import train_vq  # noqa: E402


def synthetic_imagefolder(root, n_train=24, n_val=8, seed=0):
    """Smooth random pictures of two 'classes' at mixed sizes (a stand-in for ImageNet)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(2):
            os.makedirs(os.path.join(root, split, f"class{c}"), exist_ok=True)
            for i in range(n // 2):
                h, w = int(rng.integers(56, 80)), int(rng.integers(56, 80))
                small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8) // (2 - c)
                Image.fromarray(small).resize((w, h), Image.BICUBIC).save(
                    os.path.join(root, split, f"class{c}", f"{i:04d}.png"))
    open(os.path.join(root, ".ready"), "w").close()  # the other ranks wait for this
    return root


def stages(data, out, device):
    """(name, main, argv) of every stage at tiny size, in pipeline order."""
    sys_args = ["--out", out, "--device", device, "--precision", "auto"]
    tiny = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2"]
    steps = [*sys_args, "--batch-size", "4", "--max-steps", "4", "--workers", "0", "--eval-interval", "4",
             "--eval-images", "4"]
    dec = [*steps, *tiny]
    samp = [*sys_args, "--class", "0,1", "--num-samples", "2", "--batch-size", "2"]
    return [
        ("tokenize (ViT-S/14, 56 px, K=16, 3 views)", tokenize_kmeans.main,
         ["--data", data, *sys_args, "--encoder", "dinov2_vits14_offline", "--image-size", "56",
          "--crop-size", "64", "--k", "16", "--iters", "3", "--workers", "0", "--batch-size", "8",
          "--views", "3"]),
        ("train_gpt (post-LN, emb-scale, dropout)", train_gpt.main,
         [*sys_args, "--max-steps", "4", "--batch-size", "8", "--eval-interval", "4", "--eval-batches", "1",
          *tiny, "--norm", "post", "--emb-scale", "--dropout", "0.1", "--force"]),
        ("train_vq (+ PatchGAN)", train_vq.main,
         [*steps, "--vq-channels", "16", "--vq-codes", "32", "--perceptual", "0.1", "--disc-weight", "0.5",
          "--disc-layers", "1", "--force"]),
        ("train_decoder --stage maskgit", train_decoder.main, ["--stage", "maskgit", *dec, "--force"]),
        ("train_decoder --stage ar", train_decoder.main,
         ["--stage", "ar", *dec, "--dropout", "0.1", "--force"]),
        ("train_direct", train_direct.main, [*dec, "--perceptual", "0", "--force"]),
        ("sample (MaskGIT, CFG 2)", sample.main, [*samp, "--decoder", "maskgit", "--cfg-scale", "2",
                                                  "--samples-dir", os.path.join(out, "s_maskgit")]),
        ("sample (AR, top-k 5)", sample.main, [*samp, "--decoder", "ar", "--top-k", "5",
                                               "--samples-dir", os.path.join(out, "s_ar")]),
        ("sample (direct)", sample.main,
         [*samp, "--decoder", "direct", "--samples-dir", os.path.join(out, "s_direct")]),
        ("probe (demo protocol)", probe.main, [*sys_args, "--epochs", "2"]),
        ("probe (official protocol)", probe.main, [*sys_args, "--epochs", "2", "--protocol", "official"]),
        ("eval", evaluate.main, [*sys_args, "--samples", os.path.join(out, "s_maskgit"), "--fd-size", "56",
                                 "--inception", "off"]),
        ("stability", stability.main, [*sys_args, "--images", "4", "--snrs", "20,1"]),
    ]


def peak_memory(device):
    """GB: peak GPU memory allocated since the last reset, or this process's peak RSS (CPU: never reset)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_smoke.md"))
    p.add_argument("--work", default=None, help="keep the run's files here (default: a temporary folder)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", 1))
    # every rank: the same path (torchrun sets it)
    work = args.work or tempfile.mkdtemp(prefix="digit_smoke_")
    if "RANK" in os.environ and args.work is None:
        work = os.path.join(tempfile.gettempdir(), f"digit_smoke_{os.environ.get('MASTER_PORT', '0')}")
    data, out = os.path.join(work, "data"), os.path.join(work, "out")
    if int(os.environ.get("RANK", 0)) == 0 and not os.path.exists(os.path.join(data, ".ready")):
        synthetic_imagefolder(data)
    while not os.path.exists(os.path.join(data, ".ready")):
        time.sleep(0.2)  # the other ranks wait for rank 0's pictures
    if "RANK" in os.environ:  # one process group for every stage (re-creating it on torchrun's one store
        if device == "cuda":  # per stage hung gloo's rendezvous at the fifth stage)
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rows = []
    for name, fn, argv in stages(data, out, device):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.time()
        try:
            fn(argv)
            status = "ok"
        except BaseException as e:  # SystemExit from fail() included: report it and go on
            status = f"FAIL: {str(e).splitlines()[0][:80] if str(e) else type(e).__name__}"
            if not isinstance(e, SystemExit):
                traceback.print_exc()
        if dist.is_initialized():
            dist.barrier()  # a stage ends when every rank is done: rank 0 may still be writing its files
        rows.append((name, status, time.time() - t, peak_memory(device)))
        print(f"== {name}: {status}, {rows[-1][2]:.1f} s, peak {rows[-1][3]:.2f} GB", flush=True)
    if int(os.environ.get("RANK", 0)) != 0:
        return
    gpu = torch.cuda.get_device_name() if device == "cuda" else "no GPU: the CPU fallback"
    table = [f"### {world} process(es), {gpu}, torch {torch.__version__}", "",
             f"| stage | result | seconds | peak {'GPU memory' if device == 'cuda' else 'RSS'} GB |",
             "|---|---|---|---|"]
    table += [f"| {n} | {s} | {t:.1f} | {m:.2f} |" for n, s, t, m in rows]
    print("\n".join(table))
    with open(args.out, "a") as f:
        f.write("\n".join(table) + "\n\n")
    print(f"-> {args.out}")
    if any(s != "ok" for _, s, _, _ in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
