"""
Evaluate DiGIT: generative scores of samples against the real val images.

Scores of a folder of sample PNGs (sample.py's output), in the feature space of a DINOv2 encoder
(offline ViT-S/14 by default):
  - FD_DINOv2: Frechet distance of DINOv2 CLS features (Stein et al. 2023); the same formula as FID.
  - classifier score: exp(E KL(p(y|x) || p(y))) with a linear classifier on DINOv2 features trained
    on the real train set. It has the form of the Inception Score but is NOT the Inception Score.
    Also: how often that classifier agrees with the class a sample was generated for.
  - precision / recall of k-NN manifolds (Kynkaanniemi et al. 2019).
  - FID and Inception Score through torch-fidelity (what the paper's evaluation used): its port of the
    TF FID Inception-v3, weights downloaded once by torch-fidelity or --inception-weights FILE; skipped
    with a one-line note offline. The real set is the val images behind tokens_val.pt, resized (shorter
    side, bilinear, as the official prepare_imgnet_val.py) and centre-cropped to the samples' size;
    torch-fidelity resizes both to 299 as TF did.
A folder sample.py wrote says in manifest.json how many samples it should hold and whether it is
complete; an incomplete folder (a killed run) is refused unless --allow-incomplete. The latent-
stability experiment (paper Table 1) is stability.py; --report includes its results.

Run (reads out/; writes out/eval.json; --report also out/report.md):
    python eval.py --samples out/samples --report
    python eval.py --samples out/samples --vq-samples out/samples_vq --report   # + the same GPT on VQ tokens
    torchrun --nproc_per_node 8 eval.py --out out_imagenet --samples out_imagenet/samples   # features sharded

Under torchrun every collective (the DINOv2 features of every folder, the classifier's training) ends
before rank 0 alone computes the scores and runs torch-fidelity, so no rank waits on it.
"""
import glob
import json
import os
import re
import shutil
import sys

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms
from tqdm import tqdm

from artifacts import check_precision, load_artifact, prepare_out, read_manifest, write_json
from common import (add_system_args, autocast, autocast_dtype, fail, finish_distributed, fit_linear,
                    gather_rows, init_distributed, owned, parser, positive_int, rank_world)
from data import IMAGENET_MEAN, IMAGENET_STD, dataset_for_tokens, load_token_files, pixel_transform
from dinov2 import ENCODERS, dinov2_features, load_encoder

FOLDERS = (("rendered", "rendered"), ("rendered_vq", "vq_rendered"), ("generative", "samples"),
           ("generative_vq", "vq_samples"))  # (result key, flag): the order they are scored in


def get_args(argv=None):
    p = parser(__doc__)
    a = p.add_argument_group("generative scores").add_argument
    a("--samples", default=None, help="folder of generated images, e.g. out/samples")
    a("--vq-samples", default=None, help="samples of the same GPT on VQ tokens (the ablation)")
    a("--rendered", default=None, help="val images rendered from their real DiGIT tokens")
    a("--vq-rendered", default=None, help="val images rendered from their real VQ tokens")
    a("--allow-incomplete", action="store_true", help="score a sample folder a killed run left unfinished")
    a("--fd-encoder", default="dinov2_vits14_offline", choices=sorted(ENCODERS),
      help="(default: %(default)s)")
    a("--fd-size", type=positive_int, default=224,
      help="its input side, a multiple of 14 (default: %(default)s)")
    a("--nearest-k", type=positive_int, default=3, help="k of precision/recall (default: %(default)s)")
    a("--inception", default="auto", choices=["auto", "on", "off"],
      help="FID/IS with torch-fidelity (default: auto)")
    a("--inception-weights", default=None, help="a local weights-inception-2015-12-05-6726825d.pth")
    a = p.add_argument_group("sampling sweep").add_argument
    a("--sweep", choices=["top-k", "top-p", "cfg"], default=None, help="sample over --values and score each")
    a("--values", default=None, help="values for --sweep, comma-separated (default: per setting)")
    a("--sweep-samples", type=positive_int, default=10,
      help="samples per class and value (default: %(default)s)")
    a = p.add_argument_group("report").add_argument
    a("--report", action="store_true", help="also gather every stage's results into OUT/report.md")
    system = add_system_args(p, "where tokens/checkpoints are and results go")
    system.add_argument("--batch-size", type=positive_int, default=64,
                        help="images per batch (default: %(default)s)")
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


def precision_recall(real, fake, k=3, chunk=4096):
    """Kynkaanniemi et al. 2019: precision = share of fakes inside some real k-NN ball, recall = the reverse.
    Distances in chunks of rows: 50k x 50k samples never make an N x N matrix."""
    def radii(x):  # +1: the point itself is at distance 0; small sets use fewer neighbours
        kth = min(k, len(x) - 1) + 1
        return torch.cat([torch.cdist(c, x).kthvalue(kth, dim=1).values for c in x.split(chunk)])

    def inside(a, b, r_b):  # share of rows of a inside some ball of b
        return torch.cat([(torch.cdist(c, b) <= r_b[None]).any(1) for c in a.split(chunk)]).float().mean()
    r_real, r_fake = radii(real), radii(fake)
    return float(inside(fake, real, r_real)), float(inside(real, fake, r_fake))


class Featurizer:
    """DINOv2 CLS features (after the final norm) of images in [0, 1], resized to size x size."""

    def __init__(self, encoder, size, device, dtype):
        self.model = load_encoder(encoder).to(device)
        self.size, self.device, self.dtype = size, device, dtype
        self.norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    @torch.no_grad()
    def __call__(self, x):
        x = F.interpolate(x.to(self.device).float(), size=(self.size, self.size), mode="bicubic",
                          align_corners=False)
        with autocast(self.device, self.dtype):
            return self.model(self.norm(x.clamp(0, 1)))[:, 0].float().cpu()


def list_samples(folder, allow_incomplete=False):
    """Sample images of a folder (sample.py's grid/token pictures excluded), the class each was generated for
    (from sample.py's NNNNN_classK.png names; -1 if unknown), the size most of them have, and a note of how
    many of the samples sample.py meant to write are there. A folder sample.py left incomplete is refused."""
    if not os.path.isdir(folder):
        fail(f"{folder} is not a folder")
    pattern = os.path.join(glob.escape(folder), "*.{}")
    files = sorted(f for ext in ("png", "jpg", "jpeg") for f in glob.glob(pattern.format(ext)))
    files = [f for f in files if not os.path.basename(f).startswith(("grid", "tokens"))]
    manifest = read_manifest(folder)
    note = f"{len(files)} images (no manifest: not written by sample.py)"
    if manifest is not None:
        note = f"{len(files)} of the {manifest['n']} samples sample.py planned"
        if not manifest["complete"] or len(files) != manifest["n"]:
            if not allow_incomplete:
                fail(f"{folder} is incomplete ({note}; its sample.py run did not finish): run that sample.py "
                     "again to finish it, or pass --allow-incomplete")
            print(f"warning: {folder} is incomplete: scoring {note}", file=sys.stderr)
    if len(files) < 2:
        fail(f"{folder} holds {len(files)} sample image(s); at least 2 are needed")
    sizes = [image_size(f) for f in files]  # reads the header only
    common = max(set(sizes), key=sizes.count)
    if len(set(sizes)) > 1:
        print(f"warning: samples have {len(set(sizes))} different sizes; resizing all to {common}",
              file=sys.stderr)
    found = [re.search(r"_class(\d+)\.", os.path.basename(f)) for f in files]
    labels = [int(m.group(1)) if m else -1 for m in found]
    return files, torch.tensor(labels), common, note


def image_size(path):
    """(h, w) of an image file, or a one-line error naming it (e.g. a 0-byte file a killed writer left)."""
    try:
        with Image.open(path) as im:
            return im.size[::-1]
    except (OSError, UnidentifiedImageError) as e:
        fail(f"{path} is not a readable image ({type(e).__name__}): delete it, or sample again")


def load_images(files, size):
    """[N, 3, H, W] in [0, 1], each resized to size (h, w) if it differs."""
    imgs = [transforms.functional.to_tensor(Image.open(f).convert("RGB")) for f in files]
    return torch.stack([i if tuple(i.shape[1:]) == size else
                        F.interpolate(i[None], size=size, mode="bilinear",
                                      align_corners=False)[0] for i in imgs])


def sample_features(extract, files, size, batch_size, device):
    """extract(images) of sample files: each rank reads and encodes every world-th file; rank 0 gets all rows
    (the other ranks None)."""
    rank, world = rank_world()
    mine = owned(len(files), rank, world)
    out = [extract(load_images([files[i] for i in chunk], size).to(device))
           for chunk in tqdm(mine.split(batch_size), desc="features of samples", leave=False,
                             disable=rank != 0)]
    dim = out[0].shape[1] if out else 0
    wire = device if device.type == "cuda" else torch.device("cpu")  # NCCL gathers GPU tensors
    x = torch.cat(out).to(wire) if out else torch.zeros(0, dim, device=wire)
    return gather_rows(x, mine.to(wire), dst=0)[0]


def reference(args, train_tok, val_tok, device):
    """DINOv2 CLS features of the real train and val images (tokenize_kmeans.py's cached features when the
    extractor is the tokenizer's encoder at its image size, as in the demo)."""
    same = args.fd_encoder == train_tok["encoder"]
    layer = train_tok["layer"] if same else ENCODERS[args.fd_encoder]["depth"] - 1
    return [dinov2_features(tok, args.fd_encoder, args.fd_size, layer, batch_size=args.batch_size,
                            device=device,
                            out=args.out, dtype=args.dtype)["cls"] for tok in (train_tok, val_tok)]


def train_classifier(train_feats, labels, n_classes, device):
    """A linear classifier on DINOv2 CLS features of the real train images (probe.py's recipe), trained once
    per run with the train rows sharded over the ranks."""
    mine = owned(len(labels))
    classify = fit_linear(lambda i: train_feats[mine[i]].to(device)[None], len(labels), labels[mine],
                          n_classes, epochs=50, seed=0, device=device)
    return lambda x: classify(x[None].to(device))[0].cpu()


def generative_scores(args, feats, real, classify, val_labels):
    """FD_DINOv2, the classifier's score and class agreement, precision/recall of one folder's features."""
    fake, wanted = feats["fake"], feats["wanted"]
    if len(fake) < fake.shape[1]:
        print(f"warning: {len(fake)} samples for {fake.shape[1]}-dim features: the covariance is singular "
              "and FD is biased upwards; compare FDs only at equal sample counts", file=sys.stderr)
    fd = frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))
    with torch.no_grad():
        real_acc = float((classify(real).argmax(1) == val_labels).float().mean())
        p = classify(fake).softmax(1)
    known = wanted >= 0
    agree = float((p.argmax(1)[known] == wanted[known]).float().mean()) if known.any() else float("nan")
    prec, rec = precision_recall(real, fake, args.nearest_k)
    return dict(n_samples=len(fake), n_real=len(real), fd_dinov2=fd, classifier_score=inception_score(p),
                classifier_val_acc=real_acc, class_agreement=agree, precision=prec, recall=rec,
                scored=feats["note"], feature=f"{args.fd_encoder} CLS at {args.fd_size}px")


def inception_score(p, splits=1):
    """exp(E_x KL(p(y|x) || p(y))) of class probabilities p [N, C], mean over `splits` equal parts (IS uses
    10)."""
    scores = []
    for q in p.double().chunk(splits):
        kl = (q * (q.clamp_min(1e-12).log() - q.mean(0, keepdim=True).clamp_min(1e-12).log())).sum(1)
        scores.append(float(kl.mean().exp()))
    return sum(scores) / len(scores)


# ------------------------------------------------------------------------ FID / IS through torch-fidelity

class SampleImages(Dataset):
    """uint8 [3, H, W] of sample files, each resized to `size` if it differs (what torch-fidelity reads)."""

    def __init__(self, files, size):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return (load_images([self.files[i]], self.size)[0] * 255).round().to(torch.uint8)


class RealImages(Dataset):
    """uint8 [3, S, S] of the real images behind a token file: the shorter side resized to S with
    torchvision's default (bilinear, as the official prepare_imgnet_val.py: Resize(256) + CenterCrop(256)),
    centre crop."""

    def __init__(self, tok, size):
        self.images = dataset_for_tokens(tok, transform=pixel_transform(size, resample="bilinear"))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i][0]


def inception_metrics(args, files, size, val_tok, device):
    """FID (pool3 features, 2048-d) and Inception Score (10 splits from 1,000 samples on) with torch-fidelity.
    {} with a one-line note when the Inception weights cannot be had (--inception auto, e.g. offline)."""
    import torch_fidelity
    weights = args.inception_weights
    # torch-fidelity unpickles the file freely; accept it only if it loads as plain tensors
    if weights is not None:
        load_artifact(weights,
                      "--inception-weights takes torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    spec = "_".join([val_tok["data"]["name"], val_tok["data"]["split"], str(len(val_tok["tokens"])),
                     f"{size[0]}x{size[1]}", "bilinear"])
    try:
        m = torch_fidelity.calculate_metrics(
            input1=SampleImages(files, size), input2=RealImages(val_tok, size), fid=True, isc=True,
            isc_splits=10 if len(files) >= 1000 else 1, feature_extractor_weights_path=weights,
            batch_size=args.batch_size, cuda=device.type == "cuda", save_cpu_ram=True, verbose=False,
            cache_root=os.path.join(args.out, "fidelity_cache"),
            input2_cache_name=f"real_{spec}_{os.path.basename(str(weights))}")
    except (OSError, RuntimeError) as e:  # no internet (URLError is an OSError) / weights of another network
        if args.inception == "on" or weights is not None:
            fail(f"FID/IS: the Inception weights did not load ({str(e)[:120]})")
        print("note: FID/IS skipped: torch-fidelity could not download its Inception weights "
              f"({str(e)[:80]}); give --inception-weights FILE", file=sys.stderr)
        args.inception = "off"  # once is enough: the other sample folders of this run would fail the same way
        return {}
    return dict(fid=m["frechet_inception_distance"], inception_score=m["inception_score_mean"])


# ----------------------------------------------------------------------------- the sweep and the two phases

def sweep_folders(args, train_tok):
    """--sweep: sample with sample.py at each value of one setting; {value: folder} to score the same way."""
    import sample
    defaults = {"top-k": "10,50,100,200,0", "top-p": "0.6,0.8,0.9,1", "cfg": "1,1.5,2,3,4"}
    flag = {"top-k": "--top-k", "top-p": "--top-p", "cfg": "--cfg-scale"}[args.sweep]
    classes = ",".join(str(c) for c in range(len(train_tok["classes"])))
    try:  # numbers first: folder names are made from them, never from the raw text
        values = [float(v) for v in (args.values or defaults[args.sweep]).split(",")]
    except ValueError:
        fail(f"--values {args.values!r}: expected comma-separated numbers")
    folders = {}
    for value in (f"{v:g}" for v in values):
        folder = os.path.join(args.out, "sweep", f"{args.sweep}_{value}")
        if rank_world()[0] == 0:
            shutil.rmtree(folder, ignore_errors=True)  # only this value's images may be scored
        sample.main(["--out", args.out, "--samples-dir", folder, "--class", classes, "--num-samples",
                     str(args.sweep_samples), flag, value, "--seed", str(args.seed), "--precision",
                     args.precision])
        folders[float(value)] = folder
    return folders


def encode_folders(args, folders, device):
    """Phase 1, every rank: the DINOv2 features of every folder's samples, gathered on rank 0."""
    featurizer = Featurizer(args.fd_encoder, args.fd_size, device, args.dtype)
    feats = {}
    for key, folder in folders.items():
        files, wanted, size, note = list_samples(folder, args.allow_incomplete)
        feats[key] = dict(fake=sample_features(featurizer, files, size, args.batch_size, device),
                          wanted=wanted, files=files, size=size, note=note)
    return feats


def score_folders(args, folders, sweep, train_tok, val_tok, device):
    """Phase 1, every rank: the DINOv2 features of the real images and of every folder, the classifier.
    Phase 2, rank 0 alone, once no collective is left to time out behind it: the scores, FID/IS.
    Returns {result key: scores} (and "sweep": its rows) on rank 0, None elsewhere."""
    rank = rank_world()[0]
    feats = encode_folders(args, {**folders, **{("sweep", v): f for v, f in sweep.items()}}, device)
    train_real, val_real = reference(args, train_tok, val_tok, device)
    classify = train_classifier(train_real, train_tok["labels"], len(train_tok["classes"]), device)
    finish_distributed()
    if rank != 0:
        return None
    results = {}
    for key, f in feats.items():
        g = generative_scores(args, f, val_real, classify, val_tok["labels"])
        if args.inception != "off":  # the standard metrics, comparable with published ones at 50k samples
            g.update(inception_metrics(args, f["files"], f["size"], val_tok, device))
        name = f"{key[0]} {key[1]:g}" if isinstance(key, tuple) else folders[key]
        print(f"{name}: FD_DINOv2 {g['fd_dinov2']:.2f}, classifier score {g['classifier_score']:.2f} (DINOv2 "
              f"linear classifier, not IS), class agreement {100 * g['class_agreement']:.1f}%, precision "
              f"{g['precision']:.3f}, recall {g['recall']:.3f} ({g['scored']}, {g['n_real']} real)"
              + (f"; FID {g['fid']:.2f}, IS {g['inception_score']:.2f}" if "fid" in g else ""))
        if isinstance(key, tuple):
            sweep_rows = results.setdefault("sweep", dict(setting=args.sweep, rows=[]))["rows"]
            sweep_rows.append(dict(value=key[1], **g))
        else:
            results[key] = g
    return results


def main(argv=None):
    args = get_args(argv)
    rank, world, device = init_distributed(args.device, args.dist_timeout)
    prepare_out(args.out)
    train_tok, val_tok = load_token_files(args.out)
    args.dtype = autocast_dtype(args.precision, device)
    folders = {key: getattr(args, flag) for key, flag in FOLDERS if getattr(args, flag)}
    sweep = sweep_folders(args, train_tok) if args.sweep else {}
    if not folders and not sweep and not args.report:
        fail("nothing to do: give --samples, --vq-samples, --rendered, --vq-rendered and/or --sweep (see "
             "--help)")
    if folders or sweep:  # ends the process group itself, before rank 0 scores alone
        results = score_folders(args, folders, sweep, train_tok, val_tok, device)
    else:
        results = {}
        finish_distributed()
    if rank != 0:
        return None
    path = os.path.join(args.out, "eval.json")
    earlier = json.load(open(path)) if os.path.exists(path) else {}
    if results:  # merged: a run that scores only the samples keeps the rendered results of earlier runs
        # stability.json has it
        results = {k: v for k, v in {**earlier, **results}.items() if k != "stability"}
        write_json(results, path)
        print(f"-> {path} ({', '.join(results)})")
    if args.report:
        write_report(args, results or earlier)
    return results


# ----------------------------------------------------------------------------- report

def side_by_side(out, results, load):
    """The paper's ablation on the demo: the same GPT (preset, steps, batch, seed) on DiGIT tokens and on the
    pixel VQ's tokens of the same images, each sampled and scored the same way, in one precision."""
    cols, files = [], {}
    for tok, gen, ren, ck, probe in (("DiGIT", "generative", "rendered", "gpt.pt", "probe.json"),
                                     ("VQ", "generative_vq", "rendered_vq", "gpt_vq.pt", "probe_vq.json")):
        g, r, c = results.get(gen), results.get(ren), load(ck)
        files[ck] = c
        p = json.load(open(os.path.join(out, probe))) if os.path.exists(os.path.join(out, probe)) else None
        cols.append(dict(
            tokens=f"{tok}, {c['vocab_size']} ids" if c else "-",
            gpt=f"{c['model_args']['n_layer']} x {c['model_args']['n_embd']}, {c['step']} steps"
            if c else "-",
            precision=(c or {}).get("precision", "-"), val=f"{c['best_val']:.3f}" if c else "-",
            probe=f"{100 * p['best_top1']:.1f}% (layer {p['best_layer']})" if p and "best_top1" in p else "-",
            fd=f"{g['fd_dinov2']:.1f}" if g else "-", score=f"{g['classifier_score']:.2f}" if g else "-",
            agree=f"{100 * g['class_agreement']:.1f}%" if g else "-",
            pr=f"{g['precision']:.3f} / {g['recall']:.3f}" if g else "-",
            path="GPT -> stage-2 decoder -> VQ decoder" if tok == "DiGIT" else "GPT -> VQ decoder",
            floor=f"{r['fd_dinov2']:.1f} / {100 * r['class_agreement']:.1f}%" if r else "-"))
    for name in ("vq.pt", "decoder.pt", "decoder_ar.pt"):
        files[name] = load(name)
    check_precision({f"{out}/{k}": v for k, v in files.items()})  # a fair ablation: one precision throughout
    rows = [("tokens", "tokens"), ("GPT", "gpt"), ("precision", "precision"),
            ("val loss, nats/token (NOT comparable: different vocabularies)", "val"),
            ("linear probe, best GPT layer, val top-1", "probe"),
            ("FD_DINOv2 of the samples (lower is better)", "fd"),
            ("classifier score (not IS)", "score"), ("class agreement of the samples", "agree"),
            ("precision / recall", "pr"), ("pixels come from", "path"),
            ("the renderer's floor: val images rendered from their REAL tokens, FD_DINOv2 / recognised",
             "floor")]
    n = results["generative_vq"]["n_samples"]
    return (["## Same GPT, two tokenizers (the paper's VQ-vs-DiGIT ablation)",
             "The same GPT preset, steps, batch and seed, trained on DiGIT's tokens and on the pixel VQ's "
             f"tokens of the same images; {n} class-conditional samples each, same sampling settings, scored "
             "with the same DINOv2 features.", "", "| | DiGIT tokens | VQ tokens |", "|---|---|---|"]
            + [f"| {name} | {cols[0][k]} | {cols[1][k]} |" for name, k in rows]
            + ["", "| samples of the GPT on DiGIT tokens | samples of the GPT on VQ tokens |", "|---|---|",
               "| ![DiGIT](samples/grid.png) | ![VQ](samples_vq/grid.png) |"])


def write_report(args, results):
    """out/report.md: every stage's numbers in one place."""
    out, lines = args.out, ["# DiGIT demo report", ""]

    def load(name):
        path = os.path.join(out, name)
        return load_artifact(path, "the stage that writes it") if os.path.exists(path) else None
    cb, gpt, vq = load("codebook.pt"), load("gpt.pt"), load("vq.pt")
    dec = load("decoder.pt") or load("decoder_ar.pt")
    if cb is not None:
        c = cb["cluster_sizes"]
        lines += ["## Tokenizer", f"{cb['encoder']} block {cb['layer']}, {cb['image_size']} px, K = "
                  f"{len(cb['centroids'])}: K-means on {cb['n_points']:,} patches, {cb['iters']} iterations, "
                  f"inertia {cb['inertia'] / cb['n_points']:.4g} per patch, cluster sizes {int(c.min())} / "
                  f"{int(c.median())} / {int(c.max())} (min / median / max).", ""]
    if gpt is not None:
        lines += ["## GPT",
                  f"{gpt['model_args']['n_layer']} x {gpt['model_args']['n_embd']}, {gpt['step']} steps, "
                  f"{gpt.get('precision', 'fp32')}. Loss (nats/token):", "", "| step | train | val |",
                  "|---|---|---|"]
        lines += [f"| {e['step']} | {e['train']:.4f} | {e['val']:.4f} |" for e in gpt["evals"]] + [""]
    if vq is not None:
        m = vq["metrics"]
        lines += ["## Pixel VQ",
                  f"{vq['pixel_size']} px, grid {tuple(vq['grid'])}, {vq['step']} steps: val PSNR "
                  f"{m['psnr']:.2f} dB, {m['codes_used']} / {vq['model_args']['codes']} codes used, "
                  f"perplexity {m['perplexity']:.0f}.", ""]
    if dec is not None:
        m = dec["metrics"]
        vq_note = f" (pretrained VQ: {dec['vq_path']})" if dec.get("vq_path") else ""
        lines += ["## Stage-2 decoder",
                  f"{dec['step']} steps{vq_note}: val VQ-token accuracy {m['vq_token_acc']:.3f}, PSNR of "
                  f"images rendered from the real DiGIT tokens {m['psnr']:.2f} dB.", "",
                  "Rows: original | VQ reconstruction | rendered from DiGIT tokens:", "",
                  f"![decoder]({'decoder_val.png' if load('decoder.pt') else 'decoder_ar_val.png'})", ""]
    if os.path.exists(os.path.join(out, "samples", "grid.png")):
        lines += ["## Samples", "One row per class:", "", "![samples](samples/grid.png)", ""]
    if os.path.exists(os.path.join(out, "probe.md")):
        lines += ["## Linear probe", open(os.path.join(out, "probe.md")).read(), ""]
    if "generative" in results:
        g = results["generative"]
        lines += ["## Generative scores",
                  f"{g['n_samples']} samples vs {g['n_real']} real val images, features: {g['feature']}.", "",
                  "| FD_DINOv2 | classifier score (not IS) | class agreement | precision | recall |",
                  "|---|---|---|---|---|", f"| {g['fd_dinov2']:.2f} | {g['classifier_score']:.2f} | "
                  f"{100 * g['class_agreement']:.1f}% | {g['precision']:.3f} | {g['recall']:.3f} |", "",
                  "The classifier (linear, on DINOv2 features of real train images) scores "
                  f"{100 * g['classifier_val_acc']:.1f}% on real val images.", ""]
        lines += [f"torch-fidelity (Inception-v3): FID {g['fid']:.2f}, IS {g['inception_score']:.2f}.",
                  ""] if "fid" in g \
            else ["FID/IS: not computed (torch-fidelity's Inception weights were not available).", ""]
    if "generative_vq" in results:
        lines += side_by_side(out, results, load) + [""]
    if "rendered" in results:
        r = results["rendered"]
        lines += ["## Decoder check: val images rendered from their real DiGIT tokens",
                  f"{r['n_samples']} images: the DINOv2 linear classifier gives the true label for "
                  f"{100 * r['class_agreement']:.1f}% of them (real val images: "
                  f"{100 * r['classifier_val_acc']:.1f}%); FD_DINOv2 to the real val set "
                  f"{r['fd_dinov2']:.2f}.", ""]
    if "sweep" in results:
        sw = results["sweep"]
        lines += [f"## Sampling sweep: {sw['setting']}", "",
                  f"| {sw['setting']} | FD_DINOv2 | classifier score | agreement | precision | recall |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['value']:g} | {r['fd_dinov2']:.2f} | {r['classifier_score']:.2f} | "
                  f"{100 * r['class_agreement']:.1f}% | {r['precision']:.3f} | {r['recall']:.3f} |"
                  for r in sw["rows"]]
        lines += [""]
    if os.path.exists(os.path.join(out, "stability.md")):  # stability.py
        with open(os.path.join(out, "stability.md")) as f:
            stability_table = f.read()
        lines += ["## Latent stability (paper Table 1), fair protocol", stability_table,
                  "", "![stability](stability.png)", "",
                  "The paper's argument as a toy (PCA keeps variance, LDA keeps the classes):", "",
                  "![toy](toy.png)", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"-> {out}/report.md")


if __name__ == "__main__":
    main()
