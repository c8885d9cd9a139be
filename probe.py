"""
Linear probing of the DiGIT GPT (paper Sec. 4.2): how much does each layer know about the class?

For every layer of the frozen GPT: its hidden states averaged over positions (the GPT sees the null
class or its BOS, never the label), then one linear classifier per layer, all trained together. Two
baselines in the same table:
  - DINOv2: mean-pooled patch features of the tokenizer's encoder block (what the tokens came from)
  - bag of tokens: the histogram of token ids (what the ids alone say, with no model)

Run (reads out/gpt.pt, out/tokens_{train,val}.pt; writes out/probe.md, out/probe.json):
    python probe.py
    python probe.py --no-dinov2          # skip the DINOv2 baseline
    python probe.py --tokenizer vq       # the GPT on the pixel VQ's tokens (gpt_vq.pt) -> probe_vq.md/json
    torchrun --nproc_per_node 8 probe.py --out out_imagenet --protocol official   # the paper's protocol
    python probe.py --compare out_k/64 out_k/256 out_k/1024   # finished probes in one table (runs/k_sweep.sh)

Protocols (--protocol):
  demo      blocks 1..L, each LayerNormed (no affine) and averaged over the image-token positions; features
            standardised; SGD lr 0.1, weight decay 1e-4, batch 256, 100 epochs, cosine.
  official  the official probe (config/stage1/dino_base_linearprobe_sgd.yaml, model_linearprobe.py): the
            embedding output and blocks 1..L-1, raw, averaged over every position (the BOS included);
            Linear init N(0, 0.01); SGD momentum 0.9, lr 0.4, no weight decay, batch 1024, cosine, 80
            epochs. The paper probes the unconditional GPT (train_gpt.py --unconditional). Not replicated:
            its train-time RandomResizedCrop + flip, tokenized anew each epoch; here the features are those
            of the stored tokens (view 0), computed once.
Scale: features are computed in batches on the device (bf16 autocast where the run is bf16), leave it as
float16 and stay sharded over the ranks (1.28M ImageNet images x 16 layers x 1024 = 42 GB in all, 1/W of
it per rank); the classifiers train on the device with gradients summed over the ranks; the bag of tokens
is built per batch from the ids, never as an [N, K] matrix.
"""
import json
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

from artifacts import check_lineage, prepare_out, write_json
from common import (add_system_args, autocast, autocast_dtype, fail, finish_distributed, fit_linear,
                    init_distributed, owned, parser, positive_float, positive_int, rank_world,
                    sharded_accuracy)
from data import add_tokenizer_arg, load_token_files
from dinov2 import dinov2_features
from train_gpt import gpt_path, load_gpt

PROTOCOLS = {
    "demo": dict(epochs=100, lr=0.1, batch_size=256, weight_decay=1e-4, standardize=True, init_std=0.0),
    "official": dict(epochs=80, lr=0.4, batch_size=1024, weight_decay=0.0, standardize=False, init_std=0.01),
}


def get_args(argv=None):
    p = parser(__doc__)
    a = p.add_argument_group("probe").add_argument
    a("--protocol", default="demo", choices=list(PROTOCOLS), help="see the docstring (default: %(default)s)")
    a("--epochs", type=positive_int, default=None, help="classifier epochs (default: the protocol's)")
    a("--lr", type=positive_float, default=None, help="SGD learning rate (default: the protocol's)")
    a("--batch-size", type=positive_int, default=None, help="classifier batch (default: the protocol's)")
    a("--no-dinov2", action="store_true", help="skip the DINOv2 baseline")
    a("--compare", nargs="+", metavar="DIR", default=None,
      help="only gather these runs' probe.json into a table")
    add_tokenizer_arg(add_system_args(p, "reads gpt.pt and tokens from, writes probe.md/json to"))
    args = p.parse_args(argv)
    for key, value in PROTOCOLS[args.protocol].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


@torch.no_grad()
def gpt_features(model, tokens, batch_size, device, protocol="demo", dtype=None):
    """[N, n_features, C] float16 on the CPU: the features of each token grid of tokens [N, h*w] (this rank's
    rows), computed on the device one batch at a time. The condition is the null class (or BOS), so no label
    leaks in. demo: blocks 1..L, LayerNormed, mean over the image positions; official: the embedding output
    and blocks 1..L-1, raw, mean over every position."""
    feats = []
    for chunk in tokens.split(batch_size):
        chunk = chunk.long().to(device)
        with autocast(device, dtype):
            _, hidden = model(chunk[:, : model.block_size - 1], None, return_hidden=True)
        if protocol == "official":
            f = [h.float().mean(1) for h in hidden[:-1]]
        else:
            f = [F.layer_norm(h[:, 1:].float(), h.shape[-1:]).mean(1) for h in hidden[1:]]
        feats.append(torch.stack(f, dim=1).half().cpu())
    width = model.tok_emb.weight.shape[1]
    return torch.cat(feats) if feats else torch.zeros(0, len(model.blocks), width, dtype=torch.half)


def bag_of_tokens(ids, vocab_size):
    """Normalised histogram of token ids per image [N, K], built for a batch of id rows [N, h*w]."""
    t = ids.long()
    counts = torch.zeros(len(t), vocab_size, device=t.device)
    return counts.scatter_add_(1, t, torch.ones(t.shape, device=t.device)) / t.shape[1]


def probe_accuracy(train_x, train_y, val_x, val_y, n_classes, epochs, lr, batch_size, seed=0, **protocol):
    """Val top-1 [G] of linear classifiers trained on G feature sets at once (train_x [G, N, D], one
    process)."""
    classify = fit_linear(lambda i: train_x[:, i], train_x.shape[1], train_y, n_classes, epochs, lr,
                          batch_size, seed, **protocol)
    return sharded_accuracy(classify, lambda i: val_x[:, i], val_y, len(train_x), torch.device("cpu"))


def compare(dirs, out):
    """The paper's probe figure from finished runs: val top-1 of every GPT layer, one row / line per run
    (labelled by K and tokenizer). Writes OUT/probe_compare.md and OUT/probe_compare.png."""
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
    lines = ["| run | " + " | ".join(f"layer {i + 1}" for i in range(depth)) + " | best |",
             "|---" * (depth + 2) + "|"]
    for name, r in runs:
        cells = " | ".join(f"{100 * a:.1f}" for a in r["per_layer"])
        cells += " |" * (depth - len(r["per_layer"]) + 1)
        lines.append(f"| {name} | {cells} {100 * r['best_top1']:.1f} (layer {r['best_layer']}) |")
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


def feature_sets(args, model, train, val, device, dtype):
    """(names, train features(local), val features(local), width) of every set probed: the GPT's layers, the
    bag of tokens, and DINOv2. Each rank holds its rows only (owned); features(local) builds a batch on the
    device."""
    rank, world = rank_world()
    splits = (train, val)
    mine = [owned(len(t["tokens"]), rank, world) for t in splits]
    ids = [t["tokens"][m] for t, m in zip(splits, mine)]
    per_split = [gpt_features(model, t, 64, device, args.protocol, dtype) for t in ids]
    official = args.protocol == "official"
    names = ["embedding" if official else "GPT layer 1"]
    names += [f"GPT layer {i}" for i in range(2 - official, per_split[0].shape[1] + 1)]
    k = train["vocab_size"]

    def layers(f):  # f [N, G, D] float16 on the host -> a batch [G, n, D] on the device
        return lambda i: f[i].to(device).float().transpose(0, 1)

    def bag(t):
        return lambda i: bag_of_tokens(t[i].to(device), k)[None]

    sets = [(names, *map(layers, per_split)), ([f"baseline: bag of tokens (K={k})"], *map(bag, ids))]
    if not args.no_dinov2 and train.get("encoder") is not None:  # VQ token files have no encoder
        pooled = [dinov2_features(t, t["encoder"], t["image_size"], t["layer"], batch_size=64, device=device,
                                  out=args.out, dtype=dtype)["pooled"] for t in splits]

        def dino(f, m):  # the cache holds every row: this rank's are m
            return lambda i: f[m[i]].to(device).float()[None]

        sets.append(([f"baseline: DINOv2 {train['encoder']} block {train['layer']}, mean-pooled"],
                     *map(dino, pooled, mine)))
    return sets, mine


def main(argv=None):
    args = get_args(argv)
    if args.compare:
        return compare(args.compare, prepare_out(args.out))
    rank, world, device = init_distributed(args.device, args.dist_timeout)
    prepare_out(args.out)
    dtype = autocast_dtype(args.precision, device)
    path = gpt_path(args.out, args.tokenizer)
    model, ck = load_gpt(path, device)
    train, val = load_token_files(args.out, args.tokenizer)
    if train.get("labels") is None:
        fail("the token files have no labels: a linear probe needs classes")
    check_lineage(path, ck, f"the {args.tokenizer} token files in {args.out}", train)
    if train["vocab_size"] != ck["vocab_size"] or tuple(train["grid"]) != tuple(ck["grid"]):
        fail(f"{path} (vocab {ck['vocab_size']}, grid {ck['grid']}) was not trained on these tokens (vocab "
             f"{train['vocab_size']}, grid {train['grid']})")
    sets, (mine_train, mine_val) = feature_sets(args, model, train, val, device, dtype)
    names, acc = [], []
    protocol = {k: v for k, v in vars(args).items() if k in ("weight_decay", "standardize", "init_std")}
    for set_names, train_f, val_f in tqdm(sets, desc="linear classifiers", leave=False, disable=rank != 0):
        classify = fit_linear(train_f, len(train["tokens"]), train["labels"][mine_train],
                              len(train["classes"]),
                              args.epochs, args.lr, args.batch_size, args.seed, device, **protocol)
        acc += sharded_accuracy(classify, val_f, val["labels"][mine_val], len(set_names), device).tolist()
        names += set_names
    finish_distributed()
    if rank != 0:
        return None
    n_layer = len(sets[0][0])
    best = max(range(n_layer), key=lambda i: acc[i])
    rows = [f"| {n} | {100 * a:.1f} |" + (" best GPT layer |" if i == best else " |")
            for i, (n, a) in enumerate(zip(names, acc))]
    table = "\n".join([f"Linear probe ({args.protocol} protocol), val top-1 (%), {len(train['tokens'])} "
                       f"train / {len(val['tokens'])} val images, GPT "
                       f"{len(model.blocks)}x{model.tok_emb.weight.shape[1]} on {args.tokenizer} tokens, "
                       f"K={train['vocab_size']}:", "",
                       "| features | top-1 | |", "|---|---|---|", *rows])
    print(table)
    name = "probe" if args.tokenizer == "digit" else f"probe_{args.tokenizer}"
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    result = dict(top1=dict(zip(names, acc)), per_layer=acc[:n_layer], best_layer=best + 1,
                  best_top1=acc[best], best_features=names[best],
                  k=train["vocab_size"], tokenizer=args.tokenizer, protocol=args.protocol,
                  gpt=ck["model_args"], val_loss=ck["best_val"], precision=ck.get("precision"))
    write_json(result, os.path.join(args.out, f"{name}.json"))
    print(f"-> {args.out}/{name}.md, {args.out}/{name}.json")
    return result


if __name__ == "__main__":
    main()
