"""
An independent judge of the demo's pictures: a small CNN trained on the pixels of the real train digits.

eval.py's judge (a linear classifier on DINOv2 features) shares its encoder with the DiGIT tokenizer, so a
digit DiGIT paints may look right to it for DINOv2's reasons. This judge never sees DINOv2: a LeNet-style CNN
(two 3x3 conv layers with max-pooling, two linear layers) trained on the real train images' grey pixels at the
samples' size (random shifts of up to 2 px), then asked which digit each picture of a sample folder shows.
It prints, per folder, how often it names the class the picture was made for, beside its own accuracy on the
real val digits.

    python bench/pixel_judge.py --out out out/samples out/rendered_val out/rendered_val_vq out/samples_vq
    # -> bench/pixel_judge.md (or --table FILE)
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import seeded  # noqa: E402
from data import base_view, dataset_for_tokens, load_token_files, pixel_transform  # noqa: E402
from eval import list_samples, load_images  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("folders", nargs="+", help="sample folders (sample.py's NNNNN_classK.png files)")
p.add_argument("--out", default="out", help="the run whose tokens_*.pt name the real digits")
p.add_argument("--epochs", type=int, default=12, help="(default: %(default)s)")
p.add_argument("--seeds", type=int, default=3, help="judges from different seeds (default: %(default)s)")
p.add_argument("--table", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "pixel_judge.md"))
args = p.parse_args()
torch.set_num_threads(os.cpu_count())


def grey(x):
    """[N, 3 or 1, H, W] in [0, 1] -> [N, 1, H, W] centred."""
    return x.float().mean(1, keepdim=True) - 0.5


def real_pixels(tok, size):
    ds = dataset_for_tokens(base_view(tok), transform=pixel_transform(size))
    return grey(torch.stack([ds[i][0] for i in range(len(ds))]) / 255.0), tok["labels"].long()


def cnn(n_classes):
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.LazyLinear(128), nn.ReLU(), nn.Linear(128, n_classes))


def shifted(x, gen, pad=2):
    """Each image moved by up to `pad` pixels in x and y (the background is the border's grey)."""
    xp = F.pad(x, (pad,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return xp[..., dy: dy + x.shape[-2], dx: dx + x.shape[-1]]


def train_judge(x, y, n_classes, seed):
    gen = seeded(seed)
    torch.manual_seed(seed)
    model = cnn(n_classes)
    model(x[:2])  # sizes the lazy layer
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = args.epochs * (len(x) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    for step in range(steps):
        i = torch.randint(len(x), (64,), generator=gen)
        loss = F.cross_entropy(model(shifted(x[i], gen)), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def agreement(model, x, wanted):
    return float((model(x).argmax(1) == wanted).float().mean())


train_tok, val_tok = load_token_files(args.out)
folders = {f: list_samples(f) for f in args.folders}
size = next(iter(folders.values()))[2]
x_train, y_train = real_pixels(train_tok, size[0])
x_val, y_val = real_pixels(val_tok, size[0])
n_classes = len(train_tok["classes"])
rows = {"real val digits": []}
rows.update({f: [] for f in folders})
t0 = time.time()
for seed in range(args.seeds):
    judge = train_judge(x_train, y_train, n_classes, seed)
    rows["real val digits"].append(agreement(judge, x_val, y_val))
    for f, (files, wanted, _, _) in folders.items():
        rows[f].append(agreement(judge, grey(load_images(files, size)), wanted))
    print(f"judge {seed}: real val {100 * rows['real val digits'][-1]:.1f}% "
          + " ".join(f"{os.path.basename(f)} {100 * r[-1]:.1f}%" for f, r in rows.items() if f in folders))
lines = [f"Pixel judge: a CNN on the grey pixels of the {len(x_train)} real train digits at {size[0]} px, "
         f"{args.epochs} epochs, {args.seeds} seeds ({time.time() - t0:.0f} s); the share of pictures it "
         f"names as the class they were made for. Command: `python bench/pixel_judge.py --out {args.out} "
         f"{' '.join(args.folders)}`", "",
         "| pictures | n | judged right, mean of the seeds | per seed |", "|---|---|---|---|"]
for f, r in rows.items():
    n = len(y_val) if f == "real val digits" else len(folders[f][0])
    lines.append(f"| {f} | {n} | {100 * sum(r) / len(r):.1f}% | {', '.join(f'{100 * v:.1f}' for v in r)} |")
open(args.table, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
