"""
Evaluate DiGIT: generative scores of samples, and the paper's latent-stability experiment (Table 1).

Generative scores of a folder of sample PNGs (sample.py's output) against the real val images, in
the feature space of a DINOv2 encoder (offline ViT-S/14 by default):
  - FD_DINOv2: Frechet distance of DINOv2 CLS features (Stein et al. 2023); the same formula as FID.
  - classifier score: exp(E KL(p(y|x) || p(y))) with a linear classifier on DINOv2 features trained
    on the real train set. It has the form of the Inception Score but is NOT the Inception Score.
    Also: how often that classifier agrees with the class a sample was generated for.
  - precision / recall of k-NN manifolds (Kynkaanniemi et al. 2019).
  - FID and Inception Score through torch-fidelity (what the paper's evaluation used): its port of the
    TF FID Inception-v3, weights downloaded once by torch-fidelity or --inception-weights FILE; skipped with
    a one-line note offline. The real set is the val images behind tokens_val.pt, resized (shorter side,
    bicubic) and centre-cropped to the samples' size; torch-fidelity resizes both to 299 as TF did.

The latent-stability experiment (paper Table 1) is stability.py; --report includes its results.

Run (reads out/; writes out/eval.json; --report also out/report.md):
    python eval.py --samples out/samples --report
    python eval.py --samples out/samples --vq-samples out/samples_vq --report   # + the same GPT on VQ tokens
    torchrun --nproc_per_node 8 eval.py --out out_imagenet --samples out_imagenet/samples   # features sharded
"""
import glob
import json
import os
import re
import shutil
import sys

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from tqdm import tqdm

from artifacts import load_artifact, prepare_out
from common import (add_system_args, autocast, autocast_dtype, fail, finish_distributed, fit_linear, gather_rows,
                    init_distributed, parser, positive_int, rank_world)
from data import IMAGENET_MEAN, IMAGENET_STD, dataset_for_tokens, load_token_files, pixel_transform
from dinov2 import ENCODERS, dinov2_features, load_encoder


def get_args(argv=None):
    p = parser(__doc__)
    a = p.add_argument_group("generative scores").add_argument
    a("--samples", default=None, help="folder of generated images (PNG/JPEG), e.g. out/samples")
    a("--vq-samples", default=None, help="samples of the same GPT trained on the pixel VQ's tokens (sample.py --tokenizer vq), "
      "scored the same way and set beside the DiGIT samples in the report (the paper's VQ-vs-DiGIT ablation)")
    a("--vq-rendered", default=None, help="val images rendered from their real VQ tokens (sample.py --tokenizer vq --from-tokens "
      "OUT/vq_tokens_val.pt): the VQ path's floor, beside --rendered in the side-by-side table")
    a("--rendered", default=None, help="folder of val images rendered from their real DiGIT tokens (sample.py --from-tokens): scored the same way")
    a("--fd-encoder", default="dinov2_vits14_offline", choices=sorted(ENCODERS), help="DINOv2 variant for FD and the classifier (default: %(default)s)")
    a("--fd-size", type=positive_int, default=224, help="image side fed to that encoder, multiple of 14 (default: %(default)s)")
    a("--nearest-k", type=positive_int, default=3, help="k of the precision/recall manifolds (default: %(default)s)")
    a("--inception", default="auto", choices=["auto", "on", "off"], help="FID and IS with torch-fidelity: auto = when the Inception "
      "weights load (--inception-weights, or torch-fidelity's download), on = required, off = skip (default: %(default)s)")
    a("--inception-weights", default=None, help="local copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    a = p.add_argument_group("sampling sweep").add_argument
    a("--sweep", choices=["top-k", "top-p", "cfg"], default=None, help="sample with sample.py over --values and score each (the paper's top-k/top-p figure)")
    a("--values", default=None, help="comma-separated values for --sweep (default: top-k 10,50,100,200,0; top-p 0.6,0.8,0.9,1; cfg 1,1.5,2,3,4)")
    a("--sweep-samples", type=positive_int, default=10, help="samples per class for each --sweep value (default: %(default)s)")
    a = p.add_argument_group("report").add_argument
    a("--report", action="store_true", help="also gather every stage's results into OUT/report.md")
    system = add_system_args(p, "where tokens/checkpoints are and results go")
    system.add_argument("--batch-size", type=positive_int, default=64, help="images per encoder batch (default: %(default)s)")
    args = p.parse_args(argv)
    if args.fd_size % 14:
        fail(f"--fd-size {args.fd_size} is not a multiple of 14")
    return args


# ----------------------------------------------------------------------------- features and distances

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64 via symmetric eigendecompositions
    (no scipy.linalg.sqrtm, no complex parts: both square roots are of symmetric PSD matrices)."""
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    ev, V = torch.linalg.eigh(s1)
    s1_half = V @ torch.diag(ev.clamp_min(0).sqrt()) @ V.T
    cross = torch.linalg.eigvalsh(s1_half @ s2 @ s1_half).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross)


def gaussian_stats(x):
    x = x.double()
    return x.mean(0), torch.cov(x.T)


def precision_recall(real, fake, k=3):
    """Kynkaanniemi et al. 2019: precision = share of fakes inside some real k-NN ball, recall = the reverse."""
    def radii(x):  # +1: the point itself is at distance 0; small sets use fewer neighbours
        return torch.cdist(x, x).kthvalue(min(k, len(x) - 1) + 1, dim=1).values
    r_real, r_fake = radii(real), radii(fake)
    precision = (torch.cdist(fake, real) <= r_real[None]).any(1).float().mean()
    recall = (torch.cdist(real, fake) <= r_fake[None]).any(1).float().mean()
    return float(precision), float(recall)


class Featurizer:
    """DINOv2 CLS features (after the final norm) of images in [0, 1], resized to size x size."""

    def __init__(self, encoder, size, device, dtype):
        self.model = load_encoder(encoder).to(device)
        self.size, self.device, self.dtype = size, device, dtype
        self.norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    @torch.no_grad()
    def __call__(self, x):
        x = F.interpolate(x.to(self.device).float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        with autocast(self.device, self.dtype):
            return self.model(self.norm(x.clamp(0, 1)))[:, 0].float().cpu()


def list_samples(folder):
    """Sample images of a folder (sample.py's grid/token pictures excluded), the class each was generated
    for (from sample.py's NNNNN_classK.png names; -1 if unknown) and the size most of them have."""
    files = sorted(f for ext in ("png", "jpg", "jpeg") for f in glob.glob(os.path.join(folder, f"*.{ext}")))
    files = [f for f in files if not os.path.basename(f).startswith(("grid", "tokens"))]
    if len(files) < 2:
        fail(f"{folder} holds {len(files)} sample image(s); at least 2 are needed")
    sizes = [Image.open(f).size[::-1] for f in files]  # reads the header only
    common = max(set(sizes), key=sizes.count)
    if len(set(sizes)) > 1:
        print(f"warning: samples have {len(set(sizes))} different sizes; resizing all to {common}", file=sys.stderr)
    labels = [int(m.group(1)) if (m := re.search(r"_class(\d+)\.", os.path.basename(f))) else -1 for f in files]
    return files, torch.tensor(labels), common


def load_images(files, size):
    """[N, 3, H, W] in [0, 1], each resized to size (h, w) if it differs."""
    imgs = [transforms.functional.to_tensor(Image.open(f).convert("RGB")) for f in files]
    return torch.stack([i if tuple(i.shape[1:]) == size else
                        F.interpolate(i[None], size=size, mode="bilinear", align_corners=False)[0] for i in imgs])


def sample_features(extract, files, size, batch_size, device):
    """extract(images) of sample files; under torchrun each rank reads and encodes every world-th file."""
    rank, world = rank_world()
    if len(files) < world:
        fail(f"{len(files)} samples for {world} processes")
    mine = torch.arange(rank, len(files), world)
    out = torch.cat([extract(load_images([files[i] for i in chunk], size).to(device)) for chunk in
                     tqdm(mine.split(batch_size), desc="features of samples", leave=False, disable=rank != 0)])
    return gather_rows(out.to(device), mine.to(device))[0].cpu()  # device tensors: NCCL gathers on the GPU


def reference(args, train_tok, val_tok, device):
    """DINOv2 CLS features of the real train and val images (probe.py's cached features when the
    extractor is the tokenizer's encoder at its image size, as in the demo)."""
    same = args.fd_encoder == train_tok["encoder"]
    layer = train_tok["layer"] if same else ENCODERS[args.fd_encoder]["depth"] - 1
    ref = {}
    for split, tok in (("train", train_tok), ("val", val_tok)):
        ref[split] = dinov2_features(tok, args.fd_encoder, args.fd_size, layer, batch_size=args.batch_size, device=device,
                                     out=args.out, dtype=args.dtype)["cls"]
        ref[f"{split}_labels"] = tok["labels"]
    return ref


def generative_scores(args, folder, train_tok, val_tok, device):
    """FD_DINOv2, the DINOv2 classifier's score and class agreement, precision/recall of the samples in
    folder against the real val images (+ FID and IS through torch-fidelity where its weights load)."""
    files, wanted, size = list_samples(folder)
    ref = reference(args, train_tok, val_tok, device)
    fake = sample_features(Featurizer(args.fd_encoder, args.fd_size, device, args.dtype), files, size, args.batch_size, device)
    real = ref["val"]
    if len(fake) < fake.shape[1]:
        print(f"warning: {len(fake)} samples for {fake.shape[1]}-dim features: the covariance is singular and FD is "
              f"biased upwards; compare FDs only at equal sample counts", file=sys.stderr)
    fd = frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))
    # a linear classifier on real train features (probe.py's recipe): classifier score + agreement with the requested class
    classify = fit_linear(ref["train"][None], ref["train_labels"], len(train_tok["classes"]), epochs=50, seed=0)
    with torch.no_grad():
        real_acc = float((classify(real[None])[0].argmax(1) == ref["val_labels"]).float().mean())
        p = classify(fake[None])[0].softmax(1)
    score = inception_score(p)
    known = wanted >= 0
    agree = float((p.argmax(1)[known] == wanted[known]).float().mean()) if known.any() else float("nan")
    prec, rec = precision_recall(real, fake, args.nearest_k)
    result = dict(n_samples=len(fake), n_real=len(real), fd_dinov2=fd, classifier_score=score, classifier_val_acc=real_acc,
                  class_agreement=agree, precision=prec, recall=rec, feature=f"{args.fd_encoder} CLS at {args.fd_size}px")
    if args.inception != "off" and rank_world()[0] == 0:  # the standard metrics, comparable with published ones at 50k samples
        result.update(inception_metrics(args, files, size, val_tok, device))
    return result


def inception_score(p, splits=1):
    """exp(E_x KL(p(y|x) || p(y))) of class probabilities p [N, C], mean over `splits` equal parts (IS uses 10)."""
    scores = []
    for q in p.double().chunk(splits):
        kl = (q * (q.clamp_min(1e-12).log() - q.mean(0, keepdim=True).clamp_min(1e-12).log())).sum(1)
        scores.append(float(kl.mean().exp()))
    return sum(scores) / len(scores)


# ----------------------------------------------------------------------------- FID / IS through torch-fidelity

class SampleImages(Dataset):
    """uint8 [3, H, W] of sample files, each resized to `size` if it differs (what torch-fidelity reads)."""

    def __init__(self, files, size):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return (load_images([self.files[i]], self.size)[0] * 255).round().to(torch.uint8)


class RealImages(Dataset):
    """uint8 [3, S, S] of the real images behind a token file: shorter side resized to S (bicubic), centre crop."""

    def __init__(self, tok, size):
        self.images = dataset_for_tokens(tok, transform=pixel_transform(size))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i][0]


def inception_metrics(args, files, size, val_tok, device):
    """FID (pool3 features, 2048-d) and Inception Score (10 splits from 1,000 samples on) with torch-fidelity.
    {} with a one-line note when the Inception weights cannot be had (--inception auto, e.g. offline)."""
    import torch_fidelity
    weights = args.inception_weights
    if weights is not None:  # torch-fidelity unpickles the file freely; accept it only if it loads as plain tensors
        load_artifact(weights, "--inception-weights takes torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    spec = "_".join([val_tok["data"]["name"], val_tok["data"]["split"], str(len(val_tok["tokens"])), f"{size[0]}x{size[1]}"])
    try:
        m = torch_fidelity.calculate_metrics(
            input1=SampleImages(files, size), input2=RealImages(val_tok, size), fid=True, isc=True,
            isc_splits=10 if len(files) >= 1000 else 1, feature_extractor_weights_path=weights, batch_size=args.batch_size,
            cuda=device.type == "cuda", save_cpu_ram=True, verbose=False,  # save_cpu_ram: no extra loader processes
            cache_root=os.path.join(args.out, "fidelity_cache"), input2_cache_name=f"real_{spec}_{os.path.basename(str(weights))}")
    except (OSError, RuntimeError) as e:  # no internet (URLError is an OSError) / weights of another network
        if args.inception == "on" or weights is not None:
            fail(f"FID/IS: the Inception weights did not load ({str(e)[:120]})")
        print(f"note: FID/IS skipped: torch-fidelity could not download its Inception weights ({str(e)[:80]}); "
              f"give --inception-weights FILE", file=sys.stderr)
        args.inception = "off"  # once is enough: the other sample folders of this run would fail the same way
        return {}
    return dict(fid=m["frechet_inception_distance"], inception_score=m["inception_score_mean"])


def sweep(args, train_tok, val_tok, device):
    """Generate with sample.py at each value of one sampling setting and score every set the same way."""
    import sample
    defaults = {"top-k": "10,50,100,200,0", "top-p": "0.6,0.8,0.9,1", "cfg": "1,1.5,2,3,4"}
    flag = {"top-k": "--top-k", "top-p": "--top-p", "cfg": "--cfg-scale"}[args.sweep]
    classes = ",".join(str(c) for c in range(len(train_tok["classes"])))
    try:  # numbers first: folder names are made from them, never from the raw text
        values = [float(v) for v in (args.values or defaults[args.sweep]).split(",")]
    except ValueError:
        fail(f"--values {args.values!r}: expected comma-separated numbers")
    rows = []
    for value in (f"{v:g}" for v in values):
        folder = os.path.join(args.out, "sweep", f"{args.sweep}_{value}")
        shutil.rmtree(folder, ignore_errors=True)  # only this value's images may be scored
        sample.main(["--out", args.out, "--samples-dir", folder, "--class", classes, "--num-samples", str(args.sweep_samples),
                     flag, value, "--seed", str(args.seed)])
        g = generative_scores(args, folder, train_tok, val_tok, device)
        rows.append(dict(value=float(value), **g))
        print(f"{args.sweep} {value}: FD_DINOv2 {g['fd_dinov2']:.2f}, classifier score {g['classifier_score']:.2f}, "
              f"agreement {100 * g['class_agreement']:.1f}%, precision {g['precision']:.3f}, recall {g['recall']:.3f}")
    return dict(setting=args.sweep, rows=rows)


# ----------------------------------------------------------------------------- report

def side_by_side(out, results, load):
    """The paper's ablation on the demo: the same GPT (preset, steps, batch, seed) on DiGIT tokens and on the pixel
    VQ's tokens of the same images, each sampled and scored the same way."""
    cols = []
    for tok, gen, ren, ck, probe in (("DiGIT", "generative", "rendered", "gpt.pt", "probe.json"),
                                     ("VQ", "generative_vq", "rendered_vq", "gpt_vq.pt", "probe_vq.json")):
        g, r, c = results.get(gen), results.get(ren), load(ck)
        p = json.load(open(os.path.join(out, probe))) if os.path.exists(os.path.join(out, probe)) else None
        cols.append(dict(
            tokens=f"{tok}, {c['vocab_size']} ids" if c else "-",
            gpt=f"{c['model_args']['n_layer']} x {c['model_args']['n_embd']}, {c['step']} steps" if c else "-",
            val=f"{c['best_val']:.3f}" if c else "-",
            probe=f"{100 * p['best_top1']:.1f}% (layer {p['best_layer']})" if p and "best_top1" in p else "-",
            fd=f"{g['fd_dinov2']:.1f}" if g else "-", score=f"{g['classifier_score']:.2f}" if g else "-",
            agree=f"{100 * g['class_agreement']:.1f}%" if g else "-", pr=f"{g['precision']:.3f} / {g['recall']:.3f}" if g else "-",
            path="GPT -> MaskGIT -> VQ decoder" if tok == "DiGIT" else "GPT -> VQ decoder",
            floor=f"{r['fd_dinov2']:.1f} / {100 * r['class_agreement']:.1f}%" if r else "-"))
    rows = [("tokens", "tokens"), ("GPT", "gpt"), ("val loss, nats/token (NOT comparable: different vocabularies)", "val"),
            ("linear probe, best GPT layer, val top-1", "probe"), ("FD_DINOv2 of the samples (lower is better)", "fd"),
            ("classifier score (not IS)", "score"), ("class agreement of the samples", "agree"), ("precision / recall", "pr"),
            ("pixels come from", "path"),
            ("the renderer's floor: val images rendered from their REAL tokens, FD_DINOv2 / recognised", "floor")]
    n = results["generative_vq"]["n_samples"]
    return (["## Same GPT, two tokenizers (the paper's VQ-vs-DiGIT ablation)",
             f"The same GPT preset, steps, batch and seed, trained on DiGIT's tokens and on the pixel VQ's tokens of the same "
             f"images; {n} class-conditional samples each, same sampling settings, scored with the same DINOv2 features.", "",
             "| | DiGIT tokens | VQ tokens |", "|---|---|---|"] + [f"| {name} | {cols[0][k]} | {cols[1][k]} |" for name, k in rows] +
            ["", "| samples of the GPT on DiGIT tokens | samples of the GPT on VQ tokens |", "|---|---|",
             "| ![DiGIT](samples/grid.png) | ![VQ](samples_vq/grid.png) |"])


def write_report(args, results):
    """out/report.md: every stage's numbers in one place."""
    out, lines = args.out, ["# DiGIT demo report", ""]

    def load(name):
        path = os.path.join(out, name)
        return load_artifact(path, "the stage that writes it") if os.path.exists(path) else None
    cb, gpt, vq, dec = load("codebook.pt"), load("gpt.pt"), load("vq.pt"), load("decoder.pt")
    if cb is not None:
        c = cb["cluster_sizes"]
        lines += ["## Tokenizer", f"{cb['encoder']} block {cb['layer']}, {cb['image_size']} px, K = {len(cb['centroids'])}: "
                  f"K-means on {cb['n_points']:,} patches, {cb['iters']} iterations, inertia {cb['inertia'] / cb['n_points']:.4g} per "
                  f"patch, cluster sizes {int(c.min())} / {int(c.median())} / {int(c.max())} (min / median / max).", ""]
    if gpt is not None:
        lines += ["## GPT", f"{gpt['model_args']['n_layer']} x {gpt['model_args']['n_embd']}, {gpt['step']} steps. Loss (nats/token):", "",
                  "| step | train | val |", "|---|---|---|"] + [f"| {e['step']} | {e['train']:.4f} | {e['val']:.4f} |" for e in gpt["evals"]] + [""]
    if vq is not None:
        m = vq["metrics"]
        lines += ["## Pixel VQ", f"{vq['pixel_size']} px, grid {tuple(vq['grid'])}, {vq['step']} steps: val PSNR {m['psnr']:.2f} dB, "
                  f"{m['codes_used']} / {vq['model_args']['codes']} codes used, perplexity {m['perplexity']:.0f}.", ""]
    if dec is not None:
        m = dec["metrics"]
        vq_note = f" (pretrained VQ: {dec['vq_path']})" if dec.get("vq_path") else ""
        lines += ["## MaskGIT decoder", f"{dec['step']} steps{vq_note}: val VQ-token accuracy {m['vq_token_acc']:.3f}, PSNR of images "
                  f"rendered from the real DiGIT tokens {m['psnr']:.2f} dB.", "", "Rows: original | VQ reconstruction | rendered from DiGIT tokens:",
                  "", "![decoder](decoder_val.png)", ""]
    if os.path.exists(os.path.join(out, "samples", "grid.png")):
        lines += ["## Samples", "One row per class:", "", "![samples](samples/grid.png)", ""]
    if os.path.exists(os.path.join(out, "probe.md")):
        lines += ["## Linear probe", open(os.path.join(out, "probe.md")).read(), ""]
    if "generative" in results:
        g = results["generative"]
        lines += ["## Generative scores", f"{g['n_samples']} samples vs {g['n_real']} real val images, features: {g['feature']}.", "",
                  "| FD_DINOv2 | classifier score (not IS) | class agreement | precision | recall |", "|---|---|---|---|---|",
                  f"| {g['fd_dinov2']:.2f} | {g['classifier_score']:.2f} | {100 * g['class_agreement']:.1f}% | {g['precision']:.3f} | {g['recall']:.3f} |",
                  "", f"The classifier (linear, on DINOv2 features of real train images) scores {100 * g['classifier_val_acc']:.1f}% on real val images.", ""]
        lines += [f"torch-fidelity (Inception-v3): FID {g['fid']:.2f}, IS {g['inception_score']:.2f}.", ""] if "fid" in g else \
            ["FID/IS: not computed (torch-fidelity's Inception weights were not available; see eval.py --inception-weights).", ""]
    if "generative_vq" in results:
        lines += side_by_side(out, results, load) + [""]
    if "rendered" in results:
        r = results["rendered"]
        lines += ["## Decoder check: val images rendered from their real DiGIT tokens",
                  f"{r['n_samples']} images: the DINOv2 linear classifier gives the true label for {100 * r['class_agreement']:.1f}% "
                  f"of them (real val images: {100 * r['classifier_val_acc']:.1f}%); FD_DINOv2 to the real val set {r['fd_dinov2']:.2f}.", ""]
    if "sweep" in results:
        sw = results["sweep"]
        lines += [f"## Sampling sweep: {sw['setting']}", "", f"| {sw['setting']} | FD_DINOv2 | classifier score | agreement | precision | recall |",
                  "|---|---|---|---|---|---|"] + [f"| {r['value']:g} | {r['fd_dinov2']:.2f} | {r['classifier_score']:.2f} | "
                                                  f"{100 * r['class_agreement']:.1f}% | {r['precision']:.3f} | {r['recall']:.3f} |" for r in sw["rows"]] + [""]
    if os.path.exists(os.path.join(out, "stability.md")):  # stability.py
        lines += ["## Latent stability (paper Table 1), fair protocol", open(os.path.join(out, "stability.md")).read(), "",
                  "![stability](stability.png)", "", "The paper's argument as a toy (PCA keeps variance, LDA keeps the classes):", "",
                  "![toy](toy.png)", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"-> {out}/report.md")


def main(argv=None):
    args = get_args(argv)
    rank, world, device = init_distributed(args.device, args.dist_timeout)
    prepare_out(args.out)
    train_tok, val_tok = load_token_files(args.out)
    results = {}
    args.dtype = autocast_dtype(args.precision, device)
    for key, folder in (("rendered", args.rendered), ("rendered_vq", args.vq_rendered), ("generative", args.samples),
                        ("generative_vq", args.vq_samples)):
        if not folder:
            continue
        if not os.path.isdir(folder):
            fail(f"{folder} is not a folder")
        g = results[key] = generative_scores(args, folder, train_tok, val_tok, device)
        if rank == 0:
            print(f"{folder}: FD_DINOv2 {g['fd_dinov2']:.2f}, classifier score {g['classifier_score']:.2f} (DINOv2 linear classifier, not IS), "
                  f"class agreement {100 * g['class_agreement']:.1f}%, precision {g['precision']:.3f}, recall {g['recall']:.3f} "
                  f"({g['n_samples']} samples, {g['n_real']} real)" + (f"; FID {g['fid']:.2f}, IS {g['inception_score']:.2f}" if "fid" in g else ""))
    if args.sweep:
        results["sweep"] = sweep(args, train_tok, val_tok, device)
    finish_distributed()  # features were sharded; what follows is small and runs on rank 0
    if rank != 0:
        return None
    if not results and not args.report:
        fail("nothing to do: give --samples DIR, --vq-samples DIR, --rendered DIR, --vq-rendered DIR and/or --sweep (see --help)")
    path = os.path.join(args.out, "eval.json")
    earlier = json.load(open(path)) if os.path.exists(path) else {}
    if results:  # merged: a run that scores only the samples keeps the stability and rendered results of earlier runs
        results = {k: v for k, v in {**earlier, **results}.items() if k != "stability"}  # stability.json holds it now
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"-> {path} ({', '.join(results)})")
    if args.report:
        write_report(args, results or earlier)
    return results


if __name__ == "__main__":
    main()
