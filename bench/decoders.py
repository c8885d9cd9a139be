""" The three stage-2 decoders side by side on a finished demo (the paper's "DiGIT (+MaskGIT)" and "DiGIT
(+VQGAN)", i.e. autoregressive, and the direct decoder): each trained on the demo's tokens and VQ with the
demo's batch and seed, then scored as demo.sh scores its renderer:
  - 500 val digits rendered from their real DiGIT tokens: recognised by the DINOv2 classifier, FD_DINOv2;
  - 100 samples of the demo's GPT (10 per class, top-k 100, CFG 2) rendered by it: class agreement, FD_DINOv2;
  - rendering speed (images/s, batch 64) and training time.

    python bench/decoders.py --demo-out out                     # writes bench/decoders.md
    python bench/decoders.py --demo-out out --steps 500 --only ar

Every run uses the demo's precision (--precision, default: the one gpt.pt records).
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

import eval as evaluate  # noqa: E402
import sample  # noqa: E402
import train_decoder  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--demo-out", default=os.path.join(ROOT, "out"), help="a finished demo (default: %(default)s)")
p.add_argument("--work", default=os.path.join(ROOT, "out_decoders"),
               help="where the runs go (default: %(default)s)")
p.add_argument("--steps", type=int, default=1000,
               help="training steps of each decoder (default: %(default)s)")
p.add_argument("--only", default="maskgit,ar,direct", help="comma-separated stages (default: %(default)s)")
p.add_argument("--extra", default="", help="extra train_decoder.py flags for every stage")
p.add_argument("--precision", default=None, help="default: gpt.pt's")
p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "decoders.md"))
args = p.parse_args()

gpt = torch.load(os.path.join(args.demo_out, "gpt.pt"), weights_only=True, mmap=True)
precision = args.precision or gpt.get("precision", "fp32")
FLAGS = {"maskgit": ["--lr", "1e-3"], "ar": ["--lr", "1e-3"],
         "direct": ["--lr", "1e-3", "--feature-noise", "0", "--perceptual", "0"]}
SAMPLE = ["--class", "0,1,2,3,4,5,6,7,8,9", "--num-samples", "10", "--top-k", "100", "--cfg-scale", "2"]
results = {}
for stage in args.only.split(","):
    out = os.path.join(args.work, f"{stage}_{args.steps}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    # the demo's tokens, VQ (and its codes), GPT, codebook, feature caches
    for f in os.listdir(args.demo_out):
        if f.endswith(".pt") and not f.startswith(("decoder", "direct")):
            os.link(os.path.join(args.demo_out, f), os.path.join(out, f))
    t = time.time()
    metrics = train_decoder.main(["--stage", stage, "--out", out, "--max-steps", str(args.steps),
                                  "--eval-interval", str(args.steps), "--ckpt-interval", str(args.steps),
                                  "--precision", precision, *FLAGS[stage], *args.extra.split()])
    train_s = time.time() - t
    common = ["--out", out, "--decoder", stage, "--precision", precision]
    t = time.time()
    sample.main([*common, "--from-tokens", os.path.join(out, "tokens_val.pt"), "--num-samples", "500",
                 "--samples-dir", os.path.join(out, "rendered_val"), "--no-npz"])
    render_s = time.time() - t
    sample.main([*common, *SAMPLE, "--samples-dir", os.path.join(out, "samples"), "--no-npz"])
    scores = evaluate.main(["--out", out, "--rendered", os.path.join(out, "rendered_val"), "--samples",
                            os.path.join(out, "samples"), "--fd-size", "112", "--inception", "off",
                            "--precision", precision])
    results[stage] = dict(train_s=train_s, render_per_s=500 / render_s, psnr=metrics["psnr"],
                          recognised=scores["rendered"]["class_agreement"],
                          fd_real=scores["rendered"]["fd_dinov2"],
                          agreement=scores["generative"]["class_agreement"],
                          fd_samples=scores["generative"]["fd_dinov2"])
    print(stage, results[stage], flush=True)

names = {"maskgit": "MaskGIT (8 steps) + VQ decoder", "ar": "autoregressive (top-p 0.8) + VQ decoder",
         "direct": "direct decoder (one pass)"}
lines = [f"Stage-2 decoders on the demo's tokens, {args.steps} training steps each, {precision} (`python "
         f"bench/decoders.py --steps {args.steps}`):", "",
         "| decoder | training s | val PSNR dB | real val tokens: recognised / FD_DINOv2 | GPT samples: "
         "agreement / FD_DINOv2 | renders/s (500 val, incl. PNGs) |", "|---|---|---|---|---|---|"]
lines += [f"| {names[k]} | {r['train_s']:.0f} | {r['psnr']:.2f} | {100 * r['recognised']:.1f}% / "
          f"{r['fd_real']:.1f} | {100 * r['agreement']:.1f}% / {r['fd_samples']:.1f} | "
          f"{r['render_per_s']:.1f} |" for k,
          r in results.items()]
with open(args.out, "a") as f:
    f.write("\n".join(lines) + "\n\n")
json.dump(results, open(os.path.join(args.work, f"decoders_{args.steps}.json"), "w"), indent=1)
print("\n".join(lines), f"\n-> {args.out}")
