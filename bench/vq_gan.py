"""
Does the adversarial term (train_vq.py --disc-weight) make the demo's rendered digits more recognisable?

Trains the demo's pixel VQ (demo.sh stage 3 settings, same seed, same steps) with and without the PatchGAN +
hinge + adaptive weight, paints the first 500 val digits (spread over the classes, as demo.sh's render_vq
stage) from their VQ codes, and scores both sets with eval.py exactly as the demo scores its renders: the
DINOv2 linear classifier's recognition of the intended digit, FD_DINOv2, plus the VQ's val PSNR.

    python bench/vq_gan.py --demo-out out   # needs a finished demo's out/ (tokens, features); ~15 min fp32
Writes bench/vq_gan.md.
"""
import argparse
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

import eval as evaluate  # noqa: E402
import train_vq  # noqa: E402
from data import ImagesWithTokens, load_tokens, to_unit  # noqa: E402
from vqgan import load_vq, vq_decode, vq_encode  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--demo-out", default=os.path.join(ROOT, "out"),
               help="a finished demo's output folder (default: %(default)s)")
p.add_argument("--work", default=os.path.join(ROOT, "out_gan"),
               help="where the two VQs and their renders go (default: %(default)s)")
p.add_argument("--disc-weight", type=float, default=0.5, help="(default: %(default)s, LlamaGen's)")
p.add_argument("--disc-start", type=int, default=150,
               help="(default: %(default)s of the demo's 450 VQ steps)")
p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "vq_gan.md"))
args = p.parse_args()

DEMO_VQ = ["--max-steps", "450", "--lr", "1e-3", "--vq-channels", "32", "--perceptual", "0",
           "--eval-interval", "450",
           "--ckpt-interval", "150", "--precision", "fp32", "--force"]  # demo.sh stage 3


@torch.no_grad()
def render_val(out, folder, n=500):
    """The VQ's reconstructions of n val digits spread over the file (sample.py --from-tokens picks them so),
    as NNNNN_classK.png: what eval.py --vq-rendered scores."""
    vq, ck = load_vq(os.path.join(out, "vq.pt"), "cpu")
    tok = load_tokens(out, "val")
    images = ImagesWithTokens(tok, ck["pixel_size"])
    rows = torch.linspace(0, len(images) - 1, min(n, len(images))).long().tolist()
    os.makedirs(folder, exist_ok=True)
    for i, r in enumerate(rows):
        x, _, label = images[r]
        rec = vq_decode(vq, vq_encode(vq, to_unit(x[None])), tuple(ck["grid"]))
        save_image(rec * 0.5 + 0.5, os.path.join(folder, f"{i:05d}_class{label}.png"))


results = {}
for name, extra in (("MSE only (the demo)", []),
                    (f"+ GAN (weight {args.disc_weight}, from step {args.disc_start})",
                     ["--disc-weight", str(args.disc_weight), "--disc-start", str(args.disc_start)])):
    out = os.path.join(args.work, "gan" if extra else "plain")
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(args.demo_out):  # the demo's tokens and its cached DINOv2 features of the real images
        if f.startswith(("tokens_", "features_", "codebook")) and not os.path.exists(os.path.join(out, f)):
            os.link(os.path.join(args.demo_out, f), os.path.join(out, f))
    t = time.time()
    metrics = train_vq.main([*DEMO_VQ, "--out", out, *extra])
    seconds = time.time() - t
    folder = os.path.join(out, "rendered_val_vq")
    shutil.rmtree(folder, ignore_errors=True)
    render_val(out, folder)
    score = evaluate.main(["--out", out, "--vq-rendered", folder, "--fd-size", "112", "--inception",
                           "off"])["rendered_vq"]
    results[name] = dict(psnr=metrics["psnr"], recognised=score["class_agreement"], fd=score["fd_dinov2"],
                         seconds=seconds)
    print(name, results[name], flush=True)

lines = ["The demo's pixel VQ (450 steps, seed 0) with and without the adversarial term; 500 val digits "
         "painted from their VQ codes, scored as demo.sh scores its renders (`python bench/vq_gan.py`).", "",
         "| VQ loss | val PSNR dB | recognised by the DINOv2 classifier | FD_DINOv2 | training s |",
         "|---|---|---|---|---|"]
lines += [f"| {k} | {v['psnr']:.2f} | {100 * v['recognised']:.1f}% | {v['fd']:.1f} | {v['seconds']:.0f} |"
          for k, v in results.items()]
with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
json.dump(results, open(os.path.join(args.work, "vq_gan.json"), "w"), indent=1)
print("\n".join(lines), f"\n-> {args.out}")
