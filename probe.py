"""
Linear probing of the DiGIT GPT (paper Sec. 4.2): how much does each layer know about the class?

For every layer of the frozen GPT: the hidden states of the image tokens (the GPT sees the null
class, never the label), layer-normed and mean-pooled over positions, then one linear classifier
per layer, all trained together on cached features. Two baselines in the same table:
  - DINOv2: mean-pooled patch features of the tokenizer's encoder layer (what the tokens came from)
  - bag of tokens: the histogram of token ids (what the ids alone say, with no model)

Run (reads out/gpt.pt, out/tokens_{train,val}.pt; writes out/probe.md, out/probe.json):
    python probe.py
    python probe.py --no-dinov2          # skip the (slower) DINOv2 baseline
    torchrun --nproc_per_node 8 probe.py --out out_imagenet   # features sharded over ranks, gathered in order
"""
import argparse
import hashlib
import json
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from sample import load_gpt
from tokenize_kmeans import (autocast_dtype, dataset_for_tokens, fail, gather_rows, image_transform, init_distributed, load_encoder,
                             rank_world, save_atomic)
from train_gpt import load_tokens


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out", default="out", help="reads gpt.pt and tokens from, writes probe.md/json to (default: %(default)s)")
    a("--epochs", type=int, default=100, help="epochs of the linear classifiers (default: %(default)s)")
    a("--lr", type=float, default=0.1, help="SGD learning rate, cosine-decayed (default: %(default)s)")
    a("--batch-size", type=int, default=256, help="batch for features and classifiers (default: %(default)s)")
    a("--no-dinov2", action="store_true", help="skip the DINOv2 baseline (it encodes every image once; eval.py reuses the features)")
    a("--device", default="auto", help="'auto', 'cpu', 'cuda' (default: %(default)s)")
    a("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return p.parse_args(argv)


@torch.no_grad()
def gpt_features(model, tokens, batch_size, device):
    """[n_layer, N, C]: per layer, LayerNorm (no affine) of the hidden states at the image-token
    positions, averaged over positions. The condition is the null class, so no label leaks in.
    Under torchrun each rank runs every world-th image; the result is gathered in order on every rank."""
    rank, world = rank_world()
    mine = torch.arange(rank, len(tokens), world)
    feats = []
    for chunk in tqdm(tokens[mine].split(batch_size), desc="GPT features", leave=False, disable=rank != 0):
        chunk = chunk.long().to(device)
        _, hidden = model(chunk[:, :-1], None, return_hidden=True)
        feats.append(torch.stack([F.layer_norm(h[:, 1:].float(), h.shape[-1:]).mean(1) for h in hidden], dim=1))
    feats = torch.cat(feats) if feats else torch.zeros(0, len(model.blocks), model.tok_emb.weight.shape[1], device=device)
    return gather_rows(feats, mine.to(device))[0].transpose(0, 1).contiguous().cpu()


@torch.no_grad()
def real_features(tok, key, transform, make_extractor, batch_size, device, out):
    """extract(images) [B, F] for every real image behind a token file (extract = make_extractor(), built only
    when needed), cached in OUT under a name keyed by the data and `key` (the extractor), so later runs and
    other stages reuse it. Under torchrun each rank encodes every world-th image; rows come back in dataset order."""
    spec = json.dumps([tok["data"]["name"], tok["data"]["root"], tok["data"]["split"], len(tok["tokens"]), key])
    path = os.path.join(out, f"features_{tok['data']['split']}_{hashlib.sha1(spec.encode()).hexdigest()[:10]}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=True)["features"]
    rank, world = rank_world()
    extract, images = make_extractor(), dataset_for_tokens(tok, transform=transform)
    mine = list(range(rank, len(images), world))
    feats = [extract(x.to(device)).float() for x, _ in tqdm(DataLoader(Subset(images, mine), batch_size=batch_size),
                                                           desc=f"features of real {tok['data']['split']} ({key[0]})", leave=False, disable=rank != 0)]
    feats = gather_rows(torch.cat(feats), torch.tensor(mine, device=device))[0].cpu()
    if rank == 0:
        save_atomic(dict(features=feats, key=key), path)
    return feats


def dinov2_features(tok, encoder, size, layer, batch_size, device, out):
    """Global DINOv2 descriptors of the real images, from one encoder pass: 'pooled' (mean-pooled patch
    features of block `layer`: this probe's baseline) and 'cls' (eval.py's FD_DINOv2 feature). Cached,
    so probe.py and eval.py encode the real images once."""
    def make_extractor():
        model, dtype = load_encoder(encoder).to(device), autocast_dtype("auto", device)

        def extract(x):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                return torch.cat(model.pooled_and_cls(x, layer), dim=1)
        return extract

    f = real_features(tok, [encoder, size, layer], image_transform(size), make_extractor, batch_size, device, out)
    return dict(pooled=f[:, : f.shape[1] // 2], cls=f[:, f.shape[1] // 2:])


def bag_of_tokens(tok):
    """Normalised histogram of token ids per image [N, K]."""
    t = tok["tokens"].long()
    return torch.zeros(len(t), tok["vocab_size"]).scatter_add_(1, t, torch.ones(t.shape)) / t.shape[1]


def train_linear(train_x, train_y, val_x, val_y, n_classes, epochs, lr, batch_size, seed=0):
    """Linear classifiers on several feature sets at once: train_x [G, N, D] -> val top-1 per set [G].

    Features are standardised with train statistics; SGD + momentum with cosine decay (as the paper's probe)."""
    mean, std = train_x.mean(1, keepdim=True), train_x.std(1, keepdim=True) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    G, N, D = train_x.shape
    g = torch.Generator().manual_seed(seed)
    W, b = torch.zeros(G, D, n_classes, requires_grad=True), torch.zeros(G, 1, n_classes, requires_grad=True)
    opt = torch.optim.SGD([W, b], lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = epochs * math.ceil(N / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(epochs):
        for idx in torch.randperm(N, generator=g).split(batch_size):
            logits = torch.baddbmm(b, train_x[:, idx], W)
            loss = F.cross_entropy(logits.flatten(0, 1), train_y[idx].repeat(G))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        pred = torch.baddbmm(b, val_x, W).argmax(-1)
    return (pred == val_y).float().mean(1)


def main(argv=None):
    args = get_args(argv)
    rank, world, device = init_distributed(args.device)
    model, ck = load_gpt(os.path.join(args.out, "gpt.pt"), device)
    train, val = load_tokens(args.out, "train"), load_tokens(args.out, "val")
    if train.get("labels") is None:
        fail("the token files have no labels: a linear probe needs classes")
    if train["vocab_size"] != ck["vocab_size"] or tuple(train["grid"]) != tuple(ck["grid"]):
        fail(f"gpt.pt (vocab {ck['vocab_size']}, grid {ck['grid']}) was not trained on these tokens "
             f"(vocab {train['vocab_size']}, grid {train['grid']})")
    n_classes = len(train["classes"])
    names = [f"GPT layer {i + 1}" for i in range(len(model.blocks))]
    sets = [(gpt_features(model, train["tokens"], args.batch_size, device), gpt_features(model, val["tokens"], args.batch_size, device))]
    sets.append((bag_of_tokens(train)[None], bag_of_tokens(val)[None]))
    names.append(f"baseline: bag of tokens (K={train['vocab_size']})")
    if not args.no_dinov2:
        feats = [dinov2_features(t, t["encoder"], t["image_size"], t["layer"], args.batch_size, device, args.out)["pooled"] for t in (train, val)]
        sets.append((feats[0][None], feats[1][None]))
        names.append(f"baseline: DINOv2 {train['encoder']} block {train['layer']}, mean-pooled")
    if dist.is_initialized():  # features are gathered on every rank; the small classifiers train on rank 0
        dist.destroy_process_group()
    if rank != 0:
        return None
    acc = []
    for tr, va in sets:  # one joint run per feature width
        acc += train_linear(tr, train["labels"], va, val["labels"], n_classes, args.epochs, args.lr, args.batch_size, args.seed).tolist()
    n_layer = len(model.blocks)
    best = max(range(n_layer), key=lambda i: acc[i])
    rows = [f"| {n} | {100 * a:.1f} |" + (" best GPT layer |" if i == best else " |") for i, (n, a) in enumerate(zip(names, acc))]
    table = "\n".join([f"Linear probe, val top-1 (%), {len(train['tokens'])} train / {len(val['tokens'])} val images, "
                       f"GPT {n_layer}x{model.tok_emb.weight.shape[1]}, K={train['vocab_size']}:", "",
                       "| features | top-1 | |", "|---|---|---|", *rows])
    print(table)
    with open(os.path.join(args.out, "probe.md"), "w") as f:
        f.write(table + "\n")
    result = dict(top1=dict(zip(names, acc)), best_layer=best + 1, k=train["vocab_size"], gpt=ck["model_args"])
    with open(os.path.join(args.out, "probe.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"-> {args.out}/probe.md, {args.out}/probe.json")
    return result


if __name__ == "__main__":
    main()
