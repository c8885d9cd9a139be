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
    python probe.py --tokenizer vq       # the same GPT trained on the pixel VQ's tokens (gpt_vq.pt) -> probe_vq.md/json
    torchrun --nproc_per_node 8 probe.py --out out_imagenet   # features sharded over ranks, gathered in order
    python probe.py --compare out_k/64 out_k/256 out_k/1024   # one table + plot of finished probes (k_sweep.sh)
"""
import json
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

from artifacts import check_lineage, prepare_out
from common import (add_system_args, autocast_dtype, fail, finish_distributed, fit_linear, gather_rows,
                    init_distributed, parser, positive_float, positive_int, rank_world)
from data import add_tokenizer_arg, load_token_files
from dinov2 import dinov2_features
from train_gpt import gpt_path, load_gpt


def get_args(argv=None):
    p = parser(__doc__)
    a = p.add_argument_group("probe").add_argument
    a("--epochs", type=positive_int, default=100, help="epochs of the linear classifiers (default: %(default)s)")
    a("--lr", type=positive_float, default=0.1, help="SGD learning rate, cosine-decayed (default: %(default)s)")
    a("--batch-size", type=positive_int, default=256, help="batch for features and classifiers (default: %(default)s)")
    a("--no-dinov2", action="store_true", help="skip the DINOv2 baseline (it encodes every image once; eval.py reuses the features)")
    a("--compare", nargs="+", metavar="DIR", default=None, help="only gather the probe.json of these finished runs into OUT/probe_compare.md "
      "and .png: accuracy per layer, one line per run (the paper's probe figure; k_sweep.sh runs it over K)")
    add_tokenizer_arg(add_system_args(p, "reads gpt.pt and tokens from, writes probe.md/json to"))
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


def bag_of_tokens(tok):
    """Normalised histogram of token ids per image [N, K]."""
    t = tok["tokens"].long()
    return torch.zeros(len(t), tok["vocab_size"]).scatter_add_(1, t, torch.ones(t.shape)) / t.shape[1]


def probe_accuracy(train_x, train_y, val_x, val_y, n_classes, epochs, lr, batch_size, seed=0):
    """Val top-1 [G] of linear classifiers trained on G feature sets at once (train_x [G, N, D])."""
    classify = fit_linear(train_x, train_y, n_classes, epochs, lr, batch_size, seed)
    with torch.no_grad():
        return (classify(val_x).argmax(-1) == val_y).float().mean(1)


def compare(dirs, out):
    """The paper's probe figure from finished runs: val top-1 of every GPT layer, one row / line per run (labelled by K
    and tokenizer). Writes OUT/probe_compare.md and OUT/probe_compare.png."""
    runs = []
    for d in dirs:
        path = os.path.join(d, "probe.json")
        if not os.path.exists(path):
            fail(f"{path} not found: run probe.py --out {d} first")
        r = json.load(open(path))
        if "per_layer" not in r:
            fail(f"{path} was written by an older probe.py (no per-layer list): run probe.py --out {d} again")
        runs.append((f"K={r['k']} ({r.get('tokenizer', 'digit')})", r))
    depth = max(len(r["per_layer"]) for _, r in runs)
    lines = ["| run | " + " | ".join(f"layer {i + 1}" for i in range(depth)) + " | best |", "|---" * (depth + 2) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in r["per_layer"]) + " |" * (depth - len(r["per_layer"]) + 1) +
              f" {100 * r['best_top1']:.1f} (layer {r['best_layer']}) |" for name, r in runs]
    table = "\n".join(["Linear probe, val top-1 (%) per GPT layer:", ""] + lines)
    print(table)
    with open(os.path.join(out, "probe_compare.md"), "w") as f:
        f.write(table + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, r in runs:
        ax.plot(range(1, len(r["per_layer"]) + 1), [100 * a for a in r["per_layer"]], "o-", label=name)
    ax.set_xlabel("GPT layer")
    ax.set_ylabel("linear probe top-1 (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "probe_compare.png"), dpi=100)
    print(f"-> {out}/probe_compare.md, {out}/probe_compare.png")
    return runs


def main(argv=None):
    args = get_args(argv)
    if args.compare:
        return compare(args.compare, prepare_out(args.out))
    rank, world, device = init_distributed(args.device, args.dist_timeout)
    prepare_out(args.out)
    path = gpt_path(args.out, args.tokenizer)
    model, ck = load_gpt(path, device)
    train, val = load_token_files(args.out, args.tokenizer)
    if train.get("labels") is None:
        fail("the token files have no labels: a linear probe needs classes")
    check_lineage(path, ck, f"the {args.tokenizer} token files in {args.out}", train)
    if train["vocab_size"] != ck["vocab_size"] or tuple(train["grid"]) != tuple(ck["grid"]):
        fail(f"{path} (vocab {ck['vocab_size']}, grid {ck['grid']}) was not trained on these tokens "
             f"(vocab {train['vocab_size']}, grid {train['grid']})")
    n_classes = len(train["classes"])
    names = [f"GPT layer {i + 1}" for i in range(len(model.blocks))]
    sets = [(gpt_features(model, train["tokens"], args.batch_size, device), gpt_features(model, val["tokens"], args.batch_size, device))]
    sets.append((bag_of_tokens(train)[None], bag_of_tokens(val)[None]))
    names.append(f"baseline: bag of tokens (K={train['vocab_size']})")
    if not args.no_dinov2 and train["encoder"] is not None:  # VQ token files have no encoder: the baseline is DiGIT's
        dtype = autocast_dtype(args.precision, device)
        feats = [dinov2_features(t, t["encoder"], t["image_size"], t["layer"], batch_size=args.batch_size, device=device,
                                 out=args.out, dtype=dtype)["pooled"] for t in (train, val)]
        sets.append((feats[0][None], feats[1][None]))
        names.append(f"baseline: DINOv2 {train['encoder']} block {train['layer']}, mean-pooled")
    finish_distributed()  # features are gathered on every rank; the small classifiers train on rank 0
    if rank != 0:
        return None
    acc = []
    for tr, va in sets:  # one joint run per feature width
        acc += probe_accuracy(tr, train["labels"], va, val["labels"], n_classes,
                              epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed).tolist()
    n_layer = len(model.blocks)
    best = max(range(n_layer), key=lambda i: acc[i])
    rows = [f"| {n} | {100 * a:.1f} |" + (" best GPT layer |" if i == best else " |") for i, (n, a) in enumerate(zip(names, acc))]
    table = "\n".join([f"Linear probe, val top-1 (%), {len(train['tokens'])} train / {len(val['tokens'])} val images, "
                       f"GPT {n_layer}x{model.tok_emb.weight.shape[1]} on {args.tokenizer} tokens, K={train['vocab_size']}:", "",
                       "| features | top-1 | |", "|---|---|---|", *rows])
    print(table)
    name = "probe" if args.tokenizer == "digit" else f"probe_{args.tokenizer}"
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    result = dict(top1=dict(zip(names, acc)), per_layer=acc[:n_layer], best_layer=best + 1, best_top1=acc[best],
                  k=train["vocab_size"], tokenizer=args.tokenizer, gpt=ck["model_args"], val_loss=ck["best_val"])
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"-> {args.out}/{name}.md, {args.out}/{name}.json")
    return result


if __name__ == "__main__":
    main()
