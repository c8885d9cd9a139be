"""
The paper's latent-stability experiment (Table 1), run fairly, and what decides how it comes out.

Claim (paper Sec. 2-3, Table 1): tokens from a discriminative latent space (K-means on DINOv2 features,
DiGIT) change less under pixel noise than tokens of a reconstructive one (a pixel VQ), and a stable
latent space is what lets an autoregressive model work.

Fair protocol: Gaussian noise is added ONCE per image, to the image's own pixels in [0, 1] before any
resize (for MNIST the 28x28 digit), at SNR = 10 log10(P_signal / P_noise) of those pixels (not clipped,
so the SNR is exact); the SAME noisy image goes to both tokenizers, and each resizes / normalises it as
it always does (DiGIT: bicubic to the tokenizer's image size, ImageNet normalisation, DINOv2, nearest
centroid; VQ: bicubic to its pixel size, [-1, 1], VQ encoder, nearest code). We report the fraction of
tokens that change and the cosine similarity of clean vs noisy latents (DINOv2 features / VQ encoder
outputs), beside the paper's ImageNet numbers.

What decides it (the analysis table):
  - where the noise is added: at the image's native resolution (fair) or at each tokenizer's own input
    resolution (on MNIST DINOv2 sees a 4x upsampled digit, so native-resolution noise arrives as
    stroke-sized blobs; on ImageNet both tokenizers work near the native 256 px and the two coincide);
  - foreground (stroke) vs background tokens.
The paper's theory in one picture (--toy, always written): two overlapping classes in 2-D projected to 1-D
by PCA (keeps variance, like a reconstructive tokenizer) and by LDA (keeps what separates the classes, like
a discriminative one), and how accurate each projection stays as noise grows.
 The paper's own setting in miniature (runs/photos_stability.sh): natural photographs that ship offline (the
sample images inside the scikit-image wheel, read with zipfile, nothing installed), cut into 128 px crops; a
K-means and a small VQ fitted on crops of some photos, the stability table measured on crops of the others,
with the noise at native resolution: there DINOv2 is in its own domain and both tokenizers work near the
native size.

Run (reads out/codebook.pt, out/vq.pt, out/tokens_val.pt; writes out/stability.md, out/stability.json,
out/stability.png, out/toy.png):
    python stability.py
    python stability.py --images 500 --snrs 30,20,10,1
    python stability.py --write-photos out_photos/crops   # only write the photo crops as an ImageFolder
"""
import json
import math
import os

import torch
import torch.nn.functional as F
from torchvision import transforms
from torchvision.transforms import functional as TF
from tqdm import tqdm

from artifacts import lineage, prepare_out
from common import (add_system_args, autocast, autocast_dtype, bounded, fail, init_distributed, parser,
                    positive_int, seeded)
from data import (DEFAULT_CACHE, IMAGENET_MEAN, IMAGENET_STD, check_token_file, dataset_for_tokens,
                  load_codebook, load_tokens, token_path, wheel_member)
from dinov2 import load_encoder
from tokenize_kmeans import nearest_centroid
from vqgan import load_vq

SNRS = [30, 25, 20, 15, 10, 5, 1, 0.01]
# The paper's Table 1 (ImageNet): fraction of tokens changed at each SNR above
PAPER_CHANGE = {"VQ": [.187, .284, .421, .578, .738, .857, .928, .956],
                "DiGIT": [.114, .160, .228, .320, .443, .571, .673, .721]}
ANALYSIS_SNRS = [20, 10, 1]


def get_args(argv=None):
    p = parser(__doc__)
    a = p.add_argument_group("experiment").add_argument
    a("--images", type=positive_int, default=200, help="val images (default: %(default)s)")
    a("--snrs", default=",".join(map(str, SNRS)), help="SNRs in dB, comma-separated (default: the paper's)")
    a("--write-photos", default=None, metavar="DIR", help="only write the photo crops to DIR and stop")
    a("--foreground", type=bounded(0, 1), default=0.1,
      help="mean clean pixel of a foreground cell (default: %(default)s)")
    a("--vq", default=None, help="the pixel tokenizer compared (default: OUT/vq.pt)")
    a("--pixel-size", type=positive_int, default=None,
      help="image side a pretrained --vq sees (default: fitted)")
    add_system_args(p, "reads codebook.pt, vq.pt, tokens_val.pt from and writes stability.* to")
    args = p.parse_args(argv)
    try:
        args.snrs = [float(s) for s in args.snrs.split(",")]
    except ValueError:
        fail(f"--snrs {args.snrs!r}: expected comma-separated numbers")
    if not all(math.isfinite(s) for s in args.snrs):
        fail(f"--snrs {','.join(map(str, args.snrs))}: every SNR must be a finite number of dB")
    return args


# ----------------------------------------------------------------------------- noise on pixels in [0, 1]

def add_noise(x, snr_db, gen):
    """x [3, H, W] in [0, 1] + Gaussian noise of power P_signal / 10^(SNR/10), P_signal = mean(x^2) of this
    image."""
    power = x.pow(2).mean()
    return x + torch.randn(x.shape, generator=gen) * (power / 10 ** (snr_db / 10)).sqrt()


def resize(x, size):
    """What the tokenizers' transforms do (data.image_transform / pixel_transform), on a float tensor that may
    hold noise outside [0, 1]: shorter side to size (bicubic, antialiased), centre crop."""
    return TF.center_crop(TF.resize(x, size, interpolation=transforms.InterpolationMode.BICUBIC,
                                    antialias=True), size)


# ----------------------------------------------------------------------------- the two tokenizers

class DiGITTokenizer:
    """Pixels in [0, 1] at any size -> (DINOv2 features [N*h*w, D], K-means ids [N*h*w]) as tokenize_kmeans.py
    makes them (the encoder in the run's precision, the nearest centroid in fp32)."""

    def __init__(self, cb, device, dtype, batch_size=64):
        self.encoder = load_encoder(cb["encoder"]).to(device)
        self.layer, self.size = cb["layer"], cb["image_size"]
        self.centroids = cb["centroids"].to(device)
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def prepare(self, x):
        return resize(x, self.size)

    @torch.no_grad()
    def __call__(self, x):  # x: [N, 3, S, S] already at self.size, in [0, 1] (+ noise)
        with autocast(self.device, self.dtype):
            f = torch.cat([self.encoder.get_intermediate_layers(self.norm(c).to(self.device), [self.layer])[0]
                           for c in x.split(self.batch_size)]).float().flatten(0, 1)
        mu = self.centroids.mean(0)  # centred, as tokenize_kmeans.py assigns (float32 precision)
        return f, nearest_centroid(f - mu, self.centroids - mu)[0]


class VQTokenizer:
    """Pixels in [0, 1] -> (unit-norm VQ encoder outputs [N*h*w, D], VQ code ids [N*h*w]) of vq.pt."""

    def __init__(self, vq, size, device, dtype, batch_size=64):
        self.vq, self.size = vq, size
        self.device, self.dtype, self.batch_size = device, dtype, batch_size

    def prepare(self, x):
        return resize(x, self.size)

    @torch.no_grad()
    def __call__(self, x):
        x = (x * 2 - 1).to(self.device)
        with autocast(self.device, self.dtype):  # one encoder pass per chunk: the latents and their codes
            parts = [self.vq.encode_latents(c) for c in x.split(self.batch_size)]
        return torch.cat([p[0].float() for p in parts]), torch.cat([p[1] for p in parts]).flatten()


def load_tokenizers(out, val_tok, device, dtype, vq_path=None, pixel_size=None):
    """The DiGIT tokenizer of codebook.pt (checked against tokens_val.pt) and the pixel VQ of vq.pt (or --vq),
    and the VQ's lineage."""
    cb = load_codebook(out, val_tok, "val")
    path = vq_path or os.path.join(out, "vq.pt")
    vq, vq_ck = load_vq(path, device, grid=tuple(val_tok["grid"]), pixel_size=pixel_size)
    tokenizers = {"VQ": VQTokenizer(vq, vq_ck["pixel_size"], device, dtype),
                  "DiGIT": DiGITTokenizer(cb, device, dtype)}
    return tokenizers, vq_ck


def native_images(val_tok, n):
    """The first n val images as float [3, H, W] in [0, 1] at their own resolution (MNIST: 28x28)."""
    ds = dataset_for_tokens(val_tok, transform=transforms.ToTensor())
    return [ds[i][0] for i in tqdm(range(n), desc="load val images", leave=False)]


# ----------------------------------------------------------------------------- natural photos, offline

# photographs and natural textures inside the scikit-image wheel: K-means and VQ are fitted on crops of the
# first group, stability is measured on crops of the second (other scenes, other textures)
PHOTOS = {"train": ["astronaut.png", "coffee.png", "motorcycle_left.png", "hubble_deep_field.jpg",
                    "grass.png", "brick.png", "retina.jpg", "camera.png"],
          "val": ["chelsea.png", "rocket.jpg", "motorcycle_right.png", "gravel.png", "coins.png", "ihc.png"]}


def write_photo_crops(root, n=dict(train=800, val=200), size=128, seed=0, cache=DEFAULT_CACHE):
    """Random size x size crops at native resolution of the wheel's photos, as an ImageFolder with one
    class."""
    from PIL import Image
    import io
    gen = seeded(seed)
    for split, names in PHOTOS.items():
        files = [wheel_member("scikit-image", "0.25.2", f"skimage/data/{name}", cache) for name in names]
        photos = [Image.open(io.BytesIO(f)).convert("RGB") for f in files]
        folder = os.path.join(root, split, "photo")
        os.makedirs(folder, exist_ok=True)
        for i in range(n[split]):
            photo = photos[i % len(photos)]
            top, left = (int(torch.randint(s - size + 1, (1,), generator=gen))
                         for s in (photo.height, photo.width))
            photo.crop((left, top, left + size, top + size)).save(os.path.join(folder, f"{i:05d}.png"))
    print(f"{n['train']} train crops of {len(PHOTOS['train'])} photos, {n['val']} val crops of "
          f"{len(PHOTOS['val'])} others ({size} px) -> {root}/{{train,val}}/photo/")


# ----------------------------------------------------------------------------- the experiment

def measure(tokenizers, images, snrs, gen, where="native"):
    """Per tokenizer and SNR: per-token 'changed' flags [N*h*w] and latent cosines [N*h*w].

    where='native': noise once per image on its native pixels, the same noisy image to both tokenizers (fair).
    where='input': noise on each tokenizer's own resized input (SNR measured there), drawn separately."""
    clean = {name: tok(torch.stack([tok.prepare(x) for x in images])) for name, tok in tokenizers.items()}
    result = {name: [] for name in tokenizers}
    for snr in tqdm(snrs, desc=f"noise at {where} resolution", leave=False):
        noisy = [add_noise(x, snr, gen) for x in images] if where == "native" else None
        for name, tok in tokenizers.items():
            x = torch.stack([tok.prepare(y) for y in noisy]) if noisy is not None else \
                torch.stack([add_noise(tok.prepare(y), snr, gen) for y in images])
            f, ids = tok(x)
            result[name].append(dict(snr=snr, changed=(ids != clean[name][1]).cpu(),
                                     cosine=F.cosine_similarity(f, clean[name][0], dim=1).cpu()))
    return result, clean


def foreground_mask(images, grid, threshold):
    """[N*h*w] bool: the token's cell of the clean image (native pixels averaged over it) is brighter than
    threshold."""
    cells = torch.stack([F.adaptive_avg_pool2d(x.mean(0, keepdim=True), grid).flatten() for x in images])
    return (cells > threshold).flatten()


def agreement(ids, tokens):
    """Fraction of ids [N*L] (recomputed here) equal to the stored token rows [N, L]."""
    return float((ids.view(len(tokens), -1).cpu() == tokens.long()).float().mean())


def summary(rows, mask=None):
    keep = (lambda t: t) if mask is None else (lambda t: t[mask])
    return [dict(snr=r["snr"], changed=float(keep(r["changed"]).float().mean()),
                 cosine=float(keep(r["cosine"]).mean())) for r in rows]


def analysis(fair, at_input, fg):
    """Rows of the 'what decides it' table: change rate at the SNRs both protocols ran (ANALYSIS_SNRS)."""
    snrs = [r["snr"] for r in at_input["VQ"]]
    rows = []
    for name in ("VQ", "DiGIT"):
        for label, res, mask in (("at native res., all tokens", fair, None),
                                 ("at native res., foreground", fair, fg),
                                 ("at native res., background", fair, ~fg),
                                 ("at its own input res., all tokens", at_input, None)):
            s = {r["snr"]: r["changed"] for r in summary(res[name], mask)}
            rows.append(dict(tokenizer=name, setting=label, changed=[s[x] for x in snrs]))
    return dict(snrs=snrs, rows=rows, foreground_share=float(fg.float().mean()))


# ----------------------------------------------------------------------------- the toy: PCA vs LDA

def toy_pca_lda(n=2000, noises=(0, 0.5, 1, 1.5, 2, 3), seed=0):
    """Two classes in 2-D with a long shared axis of variance (x) and the class difference on the short one
    (y). PCA's 1-D projection keeps x (the variance), LDA's keeps what separates the classes. Accuracy of a
    threshold classifier on each projection, fitted on clean points, as Gaussian noise of growing std is added
    to the points."""
    g = seeded(seed)
    y = torch.arange(n) % 2
    sign = y[:, None] * 2 - 1
    x = torch.randn(n, 2, generator=g) * torch.tensor([3.0, 0.6]) + sign * torch.tensor([0.6, 1.0])
    # rotated a little: neither axis is trivially "the" answer
    x = x @ torch.tensor([[0.94, 0.34], [-0.34, 0.94]])
    xc = x - x.mean(0)
    pca = torch.linalg.eigh(xc.T @ xc / n).eigenvectors[:, -1]  # largest-variance direction
    m0, m1 = x[y == 0].mean(0), x[y == 1].mean(0)
    sw = torch.cov(x[y == 0].T) + torch.cov(x[y == 1].T)
    lda = F.normalize(torch.linalg.solve(sw, m1 - m0), dim=0)  # Fisher's direction
    acc = {"PCA": [], "LDA": []}
    for name, w in (("PCA", pca), ("LDA", lda)):
        p = x @ w
        t = (p[y == 0].mean() + p[y == 1].mean()) / 2
        sign = 1 if p[y == 1].mean() > t else -1
        for s in noises:
            q = (x + torch.randn(x.shape, generator=g) * s) @ w
            acc[name].append(float((((q - t) * sign > 0).long() == y).float().mean()))
    return dict(points=x, labels=y, directions=dict(PCA=pca, LDA=lda), noises=list(noises), accuracy=acc)


def plot_toy(toy, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    x, y = toy["points"], toy["labels"]
    axes[0].scatter(x[y == 0, 0], x[y == 0, 1], s=2, alpha=0.4, color="tab:orange", label="class 0")
    axes[0].scatter(x[y == 1, 0], x[y == 1, 1], s=2, alpha=0.4, color="tab:green", label="class 1")
    for name, color in (("PCA", "tab:red"), ("LDA", "tab:blue")):
        d = toy["directions"][name] * 6
        axes[0].plot([-d[0], d[0]], [-d[1], d[1]], color=color, lw=2, label=f"{name} direction")
        axes[1].plot(toy["noises"], toy["accuracy"][name], "o-", color=color, label=f"{name} projection")
    axes[0].set_aspect("equal")
    axes[0].set_title("2-D data, two 1-D projections")
    axes[0].legend(fontsize=7, loc="lower right")
    axes[1].set_xlabel("std of Gaussian noise added to the points")
    axes[1].set_ylabel("accuracy on the 1-D projection")
    axes[1].set_title("PCA keeps variance, LDA keeps the classes")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- tables and plot

def row(cells, values, fmt=".3f"):
    """One markdown table row: the leading cells, then the values formatted."""
    return "| " + " | ".join(list(cells) + [f"{v:{fmt}}" for v in values]) + " |"


def stability_table(st):
    snrs = [r["snr"] for r in st["VQ"]]
    lines = [row(["SNR (dB)"], snrs, "g"), "|---" * (len(snrs) + 1) + "|"]
    for name in ("VQ", "DiGIT"):
        lines.append(row([f"{name}: tokens changed (ours)"], [r["changed"] for r in st[name]]))
        if snrs == SNRS:
            lines.append(row([f"{name}: tokens changed (paper, ImageNet)"], PAPER_CHANGE[name]))
        lines.append(row([f"{name}: latent cosine similarity (ours)"], [r["cosine"] for r in st[name]]))
    return "\n".join(lines)


def analysis_table(an):
    lines = [row(["tokenizer", "noise added ..."], [f"{s:g} dB" for s in an["snrs"]], "s"),
             "|---|---|" + "---|" * len(an["snrs"])]
    lines += [row([r["tokenizer"], r["setting"]], r["changed"]) for r in an["rows"]]
    return "\n".join(lines)


def plot_stability(st, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    snrs = [r["snr"] for r in st["VQ"]]
    xs = range(len(snrs))
    for name, color in (("VQ", "tab:red"), ("DiGIT", "tab:blue")):
        axes[0].plot(xs, [r["changed"] for r in st[name]], "o-", color=color, label=f"{name} (ours)")
        if snrs == SNRS:
            axes[0].plot(xs, PAPER_CHANGE[name], "x--", color=color, alpha=0.5,
                         label=f"{name} (paper, ImageNet)")
        axes[1].plot(xs, [r["cosine"] for r in st[name]], "o-", color=color, label=name)
    for ax, title in zip(axes, ("fraction of tokens changed", "cosine similarity of latents")):
        ax.set_xticks(list(xs), [f"{s:g}" for s in snrs])
        ax.set_xlabel("SNR (dB)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = get_args(argv)
    if args.write_photos:
        return write_photo_crops(args.write_photos, seed=args.seed)
    out = prepare_out(args.out)
    rank, _, device = init_distributed(args.device, args.dist_timeout)
    # a small experiment: one process does it (under torchrun the others just wait for it to end)
    if rank != 0:
        return None
    dtype = autocast_dtype(args.precision, device)
    val_tok = load_tokens(out, "val")
    check_token_file(val_tok, f"{out}/tokens_val.pt")
    tokenizers, vq_ck = load_tokenizers(out, val_tok, device, dtype, args.vq, args.pixel_size)
    images = native_images(val_tok, min(args.images, len(val_tok["tokens"])))
    n = len(images)

    fair, clean = measure(tokenizers, images, args.snrs, seeded(args.seed), "native")
    analysis_snrs = [s for s in args.snrs if s in ANALYSIS_SNRS]
    at_input, _ = measure(tokenizers, images, analysis_snrs, seeded(args.seed, 1), "input")
    fg = foreground_mask(images, tuple(val_tok["grid"]), args.foreground)
    result = dict(images=n, fair={name: summary(fair[name]) for name in fair},
                  at_input={name: summary(at_input[name]) for name in at_input},
                  analysis=analysis(fair, at_input, fg),
                  # the clean ids recomputed here (float tensor resize) vs the token files (PIL resize of
                  # uint8 images): a perturbation far below any SNR above, and how many ids it already changes
                  resize_agreement=dict(DiGIT=agreement(clean["DiGIT"][1], val_tok["tokens"][:n])))
    vq_tok = load_tokens(out, "val", "vq") if os.path.exists(token_path(out, "val", "vq")) else None
    if vq_tok is not None and lineage(vq_tok).get("vq") == lineage(vq_ck).get("vq"):  # that VQ's own ids only
        result["resize_agreement"]["VQ"] = agreement(clean["VQ"][1], vq_tok["tokens"][:n])
    toy = toy_pca_lda(seed=args.seed)
    result["toy"] = dict(noises=toy["noises"], accuracy=toy["accuracy"])

    text = "\n".join([
        "Latent stability, fair protocol: noise once per image on its native pixels "
        f"({tuple(images[0].shape[1:])} for the first), the same noisy image to both tokenizers; {n} val "
        f"images; DiGIT sees {tokenizers['DiGIT'].size} px, the VQ {tokenizers['VQ'].size} px.", "",
        stability_table(result["fair"]), "", "What decides it (fraction of tokens changed; foreground = "
        f"{100 * result['analysis']['foreground_share']:.0f}% of the tokens):", "",
        analysis_table(result["analysis"]), "",
        "Clean images, only the resize differs (float tensor bicubic here vs PIL bicubic of uint8 in the "
        "token files): ids equal for "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in result["resize_agreement"].items()) + ".", "",
        f"Toy (PCA vs LDA): accuracy at noise std {toy['noises']}: PCA "
        f"{[round(a, 3) for a in toy['accuracy']['PCA']]}, LDA "
        f"{[round(a, 3) for a in toy['accuracy']['LDA']]}.", ""])
    print(text)
    with open(os.path.join(out, "stability.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "stability.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_stability(result["fair"], os.path.join(out, "stability.png"))
    plot_toy(toy, os.path.join(out, "toy.png"))
    print(f"-> {out}/stability.md, stability.json, stability.png, toy.png")
    return result


if __name__ == "__main__":
    main()
