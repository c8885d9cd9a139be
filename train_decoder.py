"""
Stage 2 of DiGIT: render DiGIT tokens as pixels (paper Sec. 3.3).

DiGIT tokens say *what* is in each patch, not its exact pixels, so a second model paints them: it
predicts the codes of a pixel VQ from the DiGIT tokens, and the VQ's decoder renders them. Two decoders,
one training loop (the STAGES table at the end says what differs):
  --stage maskgit  a bidirectional transformer over [DiGIT tokens | VQ codes, some masked], MaskGIT-style
                   (Chang et al. 2022), decoded in 8 parallel steps: the paper's "DiGIT (+MaskGIT)".
                   Writes decoder.pt and decoder_val.png (rows: original | VQ reconstruction | rendered).
  --stage ar       a causal transformer over [DiGIT tokens | BOS, VQ codes], one code at a time: the paper's
                   "DiGIT (+VQGAN)" (fairseq_user/image_generation_stage2/model.py: pre-LN, two learned
                   position tables; sampled with top-p 0.8). Writes decoder_ar.pt, decoder_ar_val.png.
The VQ is OUT/vq.pt (train_vq.py), or --vq FILE: a pretrained one, MAGE's VQGAN as the paper
(vqgan_jax_strongaug.ckpt), or LlamaGen's VQ-16. With OUT/vq.pt and its vq_tokens_*.pt the codes of the
train images are read from there, not encoded again at every step. With token views (tokenize_kmeans.py
--views) each step draws a view per image: its DiGIT tokens and the VQ's codes of the same crop.
The one-pass alternative, no VQ at all, is train_direct.py.

Run (after tokenize_kmeans.py, and train_vq.py or a pretrained --vq):
    python train_decoder.py --stage maskgit
    python train_decoder.py --stage ar
    torchrun --nproc_per_node 8 train_decoder.py --stage maskgit --vq vqgan_jax_strongaug.ckpt --model base
The official settings of both (--layout fairseq for MaskGIT, dropout, label smoothing, Adam betas, the
inverse-sqrt schedule, the batches) are in runs/imagenet.sh; docs/PAPER_SCALE.md lists them beside ours.
"""
import math
import os
import sys
from collections import namedtuple
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from artifacts import Checkpoint, lineage, load_model, prepare_out
from common import (StepSampler, add_system_args, all_reduce, autocast, autocast_dtype, fail,
                    finish_distributed, fraction, init_distributed, learning_rate, nonneg_float, nonneg_int,
                    parser, positive_float, positive_int, precision_name, seeded, stop_if_not_finite)
from data import CodesWithTokens, ImagesWithTokens, load_token_files, stored_codes, to_unit
from train_gpt import (Block, KVCache, add_compile_arg, add_size_args, ckpt_interval, make_optimizer,
                       maybe_compile, model_size, sample_token)
from train_vq import disc_step, eval_subset, psnr
from vqgan import load_vq, vq_decode, vq_encode


def decoder_parser(doc):
    """The flags every stage-2 trainer has (this script's and train_direct.py's): size, optimisation,
    evaluation and checkpoints, system. Returns (parser, its "model" group)."""
    p = parser(doc)
    a = p.add_argument_group("model").add_argument
    add_size_args(a, "transformer size preset")
    a("--pixel-size", type=positive_int, default=None, help="image side (default: grid x the VQ's factor)")
    a = p.add_argument_group("optimisation").add_argument
    a("--batch-size", type=positive_int, default=32, help="global batch (default: %(default)s)")
    a("--max-steps", type=positive_int, default=2000, help="optimizer steps (default: %(default)s)")
    a("--lr", type=positive_float, default=5e-4, help="peak learning rate (default: %(default)s)")
    a("--min-lr", type=nonneg_float, default=None, help="end of the cosine decay (default: lr / 10)")
    a("--warmup-steps", type=nonneg_int, default=50, help="linear warm-up steps (default: %(default)s)")
    a("--warmup-init-lr", type=nonneg_float, default=0.0,
      help="lr the warm-up starts at (default: %(default)s)")
    a("--schedule", default="cosine", choices=["cosine", "inverse-sqrt", "constant"],
      help="after warm-up (default: %(default)s)")
    a("--beta2", type=fraction, default=0.95, help="AdamW beta2 (default: %(default)s)")
    a("--weight-decay", type=nonneg_float, default=0.05,
      help="AdamW decay, all weights (default: %(default)s)")
    a = p.add_argument_group("evaluation and checkpoints").add_argument
    a("--eval-interval", type=positive_int, default=500,
      help="steps between evaluations (default: %(default)s)")
    a("--eval-images", type=positive_int, default=256,
      help="val images per evaluation (default: %(default)s)")
    a("--ckpt-interval", type=positive_int, default=None,
      help="steps between checkpoints (default: by preset)")
    a("--resume", action="store_true", help="continue this stage from its checkpoint")
    a("--force", action="store_true", help="start afresh over this stage's checkpoint")
    system = add_system_args(p, "reads tokens_*.pt (and vq.pt) from, writes the checkpoint to")
    add_compile_arg(system)
    system.add_argument("--workers", type=nonneg_int, default=2,
                        help="loader processes (default: %(default)s)")
    system.add_argument("--preload-gb", type=nonneg_float, default=4.0,
                        help="keep images in memory below this")
    return p, p._action_groups[2]


def finish_args(args):
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    args.ckpt_interval = args.ckpt_interval or ckpt_interval(args.model)
    args.decay_on = "all"
    return args


def get_args(argv=None):
    p, model = decoder_parser(__doc__)
    p.add_argument("--stage", required=True, choices=["maskgit", "ar"], help="which decoder to train")
    a = model.add_argument
    a("--vq", default=None, help="the VQ whose codes it learns (default: OUT/vq.pt)")
    a("--dropout", type=fraction, default=0.0, help="embedding and residual dropout (default: %(default)s)")
    a("--label-smoothing", type=fraction, default=0.0, help="cross-entropy smoothing (default: %(default)s)")
    a("--layout", default="ours", choices=["ours", "fairseq", "aligned"],
      help="maskgit: fairseq = the official model's, aligned = one position per patch (default: %(default)s)")
    a("--decode-steps", type=positive_int, default=8, help="maskgit: decoding steps T (default: %(default)s)")
    a("--top-p", type=fraction, default=0.8, help="ar: nucleus mass when rendering (default: %(default)s)")
    return finish_args(p.parse_args(argv))


def moved_stage(argv):
    """train_decoder.py --stage vq / direct of older commands: the script that trains it now, same flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    for stage, script in (("vq", "train_vq"), ("direct", "train_direct")):
        for i, a in enumerate(argv):
            if (a == "--stage" and argv[i + 1: i + 2] == [stage]) or a == f"--stage={stage}":
                print(f"note: train_decoder.py --stage {stage} is {script}.py now; running it")
                return __import__(script), argv[:i] + argv[i + (1 if "=" in a else 2):]
    return None, argv


# ----------------------------------------------------------------------------- MaskGIT (--stage maskgit)

class MaskGIT(nn.Module):
    """Bidirectional transformer over [DiGIT tokens (always visible), VQ tokens (some = [MASK])]
    -> logits of the VQ tokens. Blocks are train_gpt.Block with causal=False.

    layout "fairseq" is the official model's (fairseq_user/image_generation_stage2/model_nar.py): embeddings x
    sqrt(width) (initialised with std width^-1/2), a separator token between the two parts (fairseq's </s>)
    with the VQ part's first position, and an output projection without bias.
    layout "aligned" (the demo's) is not the paper's: the two grids are the same patches, so position i holds
    the sum of patch i's DiGIT embedding and its VQ code's (or [MASK]'s): half the sequence, half the cost."""

    def __init__(self, digit_vocab, vq_codes, length, n_layer, n_embd, n_head, dropout=0.0, layout="ours"):
        super().__init__()
        self.length, self.mask_id = length, vq_codes
        self.sep, self.aligned = layout == "fairseq", layout == "aligned"
        self.scale = math.sqrt(n_embd) if self.sep else 1.0
        self.digit_emb = nn.Embedding(digit_vocab, n_embd)
        self.vq_emb = nn.Embedding(vq_codes + 1 + self.sep, n_embd)  # + [MASK] (+ the separator)
        self.pos_emb = nn.Embedding((1 if self.aligned else 2) * length + self.sep, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, "pre", causal=False)
                                    for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vq_codes, bias=not self.sep)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                scaled = self.sep and isinstance(m, nn.Embedding)  # fairseq: scaled embeddings, unit std
                nn.init.normal_(m.weight, 0.0, n_embd ** -0.5 if scaled else 0.02)

    def forward(self, digit, vq):
        parts = [self.digit_emb(digit), self.vq_emb(vq)]
        if self.sep:
            parts.insert(1, self.vq_emb.weight[-1:].expand(len(digit), 1, -1))
        x = parts[0] + parts[1] if self.aligned else torch.cat(parts, dim=1)
        x = self.drop(x * self.scale + self.pos_emb.weight)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x[:, -self.length:]))


def mask_count(u, length):
    """MaskGIT's cosine schedule: ceil(cos(u * pi / 2) * L) tokens masked for u in [0, 1), at least 1."""
    return torch.ceil(torch.cos(u * math.pi / 2) * length).long().clamp(1, length)


def random_mask(batch, length, gen=None):
    """A boolean mask [B, L] with a cosine-schedule number of random positions per row (on gen's device)."""
    dev = gen.device if gen is not None else "cpu"
    n = mask_count(torch.rand(batch, generator=gen, device=dev), length)
    order = torch.rand(batch, length, generator=gen, device=dev).argsort(1).argsort(1)  # a random rank each
    return order < n[:, None]


@torch.no_grad()
def decode(model, digit, steps=8, temperature=1.0, noise=4.5, vq=None, gen=None):
    """MaskGIT decoding: start from all [MASK] (or the given vq with some [MASK]s); at each step t
    predict every position, sample, keep the most confident (log-prob + Gumbel noise of temperature
    noise * (1 - t/T)) and re-mask the rest along the cosine schedule. Known tokens never change and
    every position is filled after `steps` steps. gen: a generator on digit's device (CPU or CUDA)."""
    B, L = digit.shape
    dev = digit.device
    vq = torch.full((B, L), model.mask_id, device=dev) if vq is None else vq.clone()
    for t in range(steps):
        unknown = vq == model.mask_id
        if not unknown.any():
            break
        logp = F.log_softmax(model(digit, vq).float() / temperature, dim=-1)
        sampled = torch.multinomial(logp.exp().flatten(0, 1), 1, generator=gen).view(B, L)
        sampled = torch.where(unknown, sampled, vq)
        u = torch.rand(B, L, generator=gen, device=dev).clamp(1e-20, 1 - 1e-7)
        gumbel = -torch.log(-u.log())
        conf = logp.gather(-1, sampled[..., None]).squeeze(-1) + noise * (1 - (t + 1) / steps) * gumbel
        conf = torch.where(unknown, conf, torch.full_like(conf, float("inf")))
        # how many stay masked after this step: the schedule, but always at least one fewer than now
        n_next = int(math.floor(math.cos(math.pi / 2 * (t + 1) / steps) * L)) if t < steps - 1 else 0
        n_next = torch.minimum(torch.full((B,), n_next, device=dev), unknown.sum(1) - 1).clamp_min(0)
        rank = conf.argsort(1).argsort(1)  # 0 = least confident
        vq = torch.where(rank < n_next[:, None], torch.full_like(sampled, model.mask_id), sampled)
    return vq


def maskgit_loss(model, raw, batch, parts, args, step):
    """Cross-entropy on the masked VQ tokens, given the DiGIT tokens and the unmasked VQ tokens (MaskGIT);
    the masks are drawn for the global batch (this rank uses its rows), the mean is over its masked tokens."""
    target = vq_targets(batch, parts)
    masks = random_mask(batch.size, target.shape[1], batch.gen)
    mine = masks[batch.mine]
    logits = model(batch.digit, torch.where(mine, torch.full_like(target, raw.mask_id), target))
    return global_mean_ce(logits[mine], target[mine], batch, args.label_smoothing, masks.sum()), None


# ----------------------------------------------------------------------------- autoregressive (--stage ar)

class ARDecoder(nn.Module):
    """Causal transformer over [d_0 .. d_{L-1} | BOS, v_0 .. v_{L-2}] -> logits of v_0 .. v_{L-1}: the VQ
    codes one by one, each seeing every DiGIT token and the codes before it (the official stage-2 AR model:
    pre-LN with a final norm, embeddings x sqrt(width), one learned position table for the DiGIT prefix and
    one for the VQ part, untied output projection)."""

    def __init__(self, digit_vocab, vq_codes, length, n_layer, n_embd, n_head, dropout=0.0):
        super().__init__()
        self.length, self.bos = length, vq_codes
        self.scale = math.sqrt(n_embd)
        self.digit_emb = nn.Embedding(digit_vocab, n_embd)
        self.vq_emb = nn.Embedding(vq_codes + 1, n_embd)  # + BOS (fairseq's </s> between the two parts)
        self.digit_pos, self.vq_pos = nn.Embedding(length, n_embd), nn.Embedding(length, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, "pre") for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vq_codes, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
        for emb in (self.digit_emb, self.vq_emb):  # fairseq: scaled embeddings start at unit std
            nn.init.normal_(emb.weight, 0.0, n_embd ** -0.5)

    def embed(self, digit, vq, start):
        """The embeddings of [digit | BOS, vq] from position 0 (digit given), or of vq alone at `start`."""
        parts = []
        if digit is not None:
            pos = torch.arange(self.length, device=digit.device)
            parts.append(self.digit_emb(digit) * self.scale + self.digit_pos(pos))
            vq = torch.cat([vq.new_full((len(vq), 1), self.bos), vq], dim=1)
        at = max(0, start - self.length)  # the VQ part's own positions
        pos = torch.arange(at, at + vq.shape[1], device=vq.device)
        parts.append(self.vq_emb(vq) * self.scale + self.vq_pos(pos))
        return self.drop(torch.cat(parts, dim=1))

    def forward(self, digit, vq, cache=None):
        """digit [B, L], vq [B, T] (T < L) -> logits [B, T+1, codes] for v_0 .. v_T. With a KVCache: the first
        call takes the DiGIT tokens and vq [B, 0]; later calls digit=None and the newest code [B, 1]."""
        start = cache.pos if cache is not None else 0
        x = self.embed(digit, vq, start)
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layers[i] if cache is not None else None, start)
        if cache is not None:
            cache.pos += x.shape[1]
        return self.head(self.ln_f(x[:, self.length:] if digit is not None else x))


@torch.no_grad()
def ar_decode(model, digit, temperature=1.0, top_k=0, top_p=0.8, gen=None, dtype=None):
    """The VQ codes [B, L] of DiGIT tokens [B, L], one code per step with a KV cache (the official sampling:
    top-p 0.8, temperature 1). gen: a generator on digit's device."""
    B, L = digit.shape
    cache = KVCache(model, B, dtype=dtype or torch.float32, length=2 * L)
    logits = model(digit, digit.new_zeros(B, 0), cache=cache)[:, -1]
    codes = []
    for t in range(L):
        codes.append(sample_token(logits, temperature, top_k, top_p, gen))
        if t < L - 1:
            logits = model(None, codes[-1], cache=cache)[:, -1]
    return torch.cat(codes, dim=1)


def ar_loss(model, raw, batch, parts, args, step):
    """Next-code cross-entropy over the VQ part (the DiGIT prefix is given, never predicted)."""
    target = vq_targets(batch, parts)
    logits = model(batch.digit, target[:, :-1])
    n = batch.size * target.shape[1]  # every code of the global batch is predicted
    return global_mean_ce(logits.flatten(0, 1), target.flatten(), batch, args.label_smoothing, n), None


# ----------------------------------------------------------------------------- what MaskGIT and AR share

def vq_targets(batch, parts):
    """The VQ codes [B, L] a stage-2 decoder learns: read from vq_tokens_train.pt when they are there
    (batch.x holds them), else the frozen VQ's codes of the images (nearest codes in fp32)."""
    if not batch.x.is_floating_point() and batch.x.ndim == 2:
        return batch.x.long()
    with torch.no_grad():
        return vq_encode(parts["vq"], batch.x)


def global_mean_ce(logits, target, batch, label_smoothing, total):
    """Cross-entropy summed over this rank's tokens, divided by the mean token count per rank of the global
    batch (total: the global batch's count): DDP then averages the ranks' gradients into the mean over the
    whole global batch, so any number of ranks trains the same model."""
    per_rank = total * len(batch.digit) / batch.size
    return F.cross_entropy(logits.float(), target, reduction="sum",
                           label_smoothing=label_smoothing) / per_rank


def token_decoder(cls):
    """build() of maskgit and ar: the frozen VQ (its codes are the targets), a fresh decoder over both kinds
    of tokens. The VQ is OUT/vq.pt, or --vq: a pretrained one (MAGE's VQGAN, as the paper's)."""
    def build(args, train_tok, device):
        path = args.vq or os.path.join(args.out, "vq.pt")
        vq, vq_ck = load_vq(path, device, grid=tuple(train_tok["grid"]),
                            pixel_size=args.pixel_size if args.vq else None)
        h, w = train_tok["grid"]
        model_args = dict(digit_vocab=train_tok["vocab_size"], vq_codes=vq_ck["model_args"]["codes"],
                          length=h * w, dropout=args.dropout, **model_size(args))
        if cls is MaskGIT and args.layout != "ours":
            model_args["layout"] = args.layout
        record = dict(vq_path=os.path.abspath(path) if args.vq else None, pixel_size=vq_ck["pixel_size"])
        if args.vq:  # a VQ outside OUT: also where it is relative to OUT, so a moved folder still finds it
            record["vq_relpath"] = os.path.relpath(os.path.abspath(path), os.path.abspath(args.out))
        # the tokens' lineage wins (vq.pt records the tokens it was trained beside); the VQ adds its own id
        parts = dict(vq=vq, vq_ck=vq_ck, record=record, lineage=dict(lineage(vq_ck), **lineage(train_tok)))
        return cls(**model_args).to(device), model_args, parts
    return build


@torch.no_grad()
def evaluate_rendering(model, val, parts, args, device, dtype, png, predict):
    """VQ-token accuracy of predict(digit, gen) from the real DiGIT tokens, PSNR of the rendered pixels, and a
    picture: rows original | VQ reconstruction | rendered from DiGIT tokens (8 images spread over the set)."""
    model.eval()
    vq, grid = parts["vq"], tuple(parts["vq_ck"]["grid"])
    gen = seeded(0, device=device)
    acc, psnrs, rows, seen = [], [], [], 0
    subset = eval_subset(val, args.eval_images)
    show = set(torch.linspace(0, len(subset) - 1, 8).long().tolist())
    with autocast(device, dtype):
        for x, digit, _ in DataLoader(subset, batch_size=64, generator=torch.Generator()):
            x, digit = to_unit(x.to(device)), digit.to(device)
            target = vq_encode(vq, x)
            pred = predict(model, digit, gen, args, dtype)
            rendered = vq_decode(vq, pred, grid).float()
            acc.append((pred == target).float().mean(1))
            psnrs.append(psnr(rendered, x))
            pick = [i for i in range(len(x)) if seen + i in show]
            rows.append(torch.stack([x[pick], vq_decode(vq, target[pick], grid).float(), rendered[pick]]))
            seen += len(x)
    model.train()
    save_rows(rows, png)
    m = dict(vq_token_acc=float(torch.cat(acc).mean()), psnr=float(torch.cat(psnrs).mean()))
    return m, (f"val VQ-token accuracy {m['vq_token_acc']:.3f}, PSNR from DiGIT tokens {m['psnr']:.2f} dB "
               f"-> {png}")


def save_rows(rows, png):
    """Picture rows [R, n, C, H, W] (one entry per batch) as one grid, each row one kind of image."""
    rows = torch.cat(rows, dim=1)
    save_image(make_grid(rows.flatten(0, 1), nrow=rows.shape[1], normalize=True, value_range=(-1, 1)), png)


def render_maskgit(model, digit, gen, args, dtype):
    return decode(model, digit, args.decode_steps, gen=gen)


def render_ar(model, digit, gen, args, dtype):
    return ar_decode(model, digit, top_p=args.top_p, gen=gen, dtype=dtype)


# ----------------------------------------------------------------------------- loading for sample.py

def load_decoder(path, device, kind="maskgit"):
    """(frozen MaskGIT or AR decoder, checkpoint dict) of decoder.pt / decoder_ar.pt."""
    cls = ARDecoder if kind == "ar" else MaskGIT
    return load_model(path, cls, f"run train_decoder.py --stage {kind} first", device)


# ----------------------------------------------------------------------------- the training loop

# What differs between the decoders; train() runs the same loop for each (train_direct.py's too).
# build(args, train tok, device) -> model, model_args, parts (its lineage, what the checkpoint records, ...);
# loss(model, raw, batch, parts, args, step) -> (loss, picture or None); evaluate(...) -> (metrics, a line).
Stage = namedtuple("Stage", "build loss evaluate file")
STAGES = {
    "maskgit": Stage(token_decoder(MaskGIT), maskgit_loss,
                     partial(evaluate_rendering, predict=render_maskgit), "decoder.pt"),
    "ar": Stage(token_decoder(ARDecoder), ar_loss,
                partial(evaluate_rendering, predict=render_ar), "decoder_ar.pt"),
}
Batch = namedtuple("Batch", "x digit gen mine size")  # this rank's rows `mine` of a global batch of `size`


def training_data(args, parts, train_tok, val_tok):
    """(train, val) datasets: images at the VQ's pixel size with their DiGIT tokens (with token views: each
    view the crop its tokens were made from); to train, the stored VQ codes instead of images when
    vq_tokens_train.pt holds them. parts["prepare"], if any, adapts them (train_direct.py's features)."""
    pixel_size = parts["record"]["pixel_size"]
    val = ImagesWithTokens(val_tok, pixel_size).preload(args.workers, args.preload_gb, "val")
    train = stored_codes(args.out, parts["vq_ck"], train_tok) if "vq" in parts and not args.vq else None
    if train is None:
        train = ImagesWithTokens(train_tok, pixel_size).preload(args.workers, args.preload_gb, "train")
    if parts.get("prepare"):
        parts["prepare"](train, val)
    return train, val


def main(argv=None):
    script, argv = moved_stage(argv)
    if script is not None:
        return script.main(argv)
    args = get_args(argv)
    return train(args, STAGES[args.stage], args.stage)


def train(args, stage, name):
    """The loop every stage-2 decoder trains in."""
    rank, world, device = init_distributed(args.device, args.dist_timeout)
    prepare_out(args.out)
    dtype = autocast_dtype(args.precision, device)
    torch.manual_seed(args.seed)
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} is not divisible by {world} ranks")

    # -- the model this stage trains, its data, its optimizer; fresh or restored (--resume)
    train_tok, val_tok = load_token_files(args.out, views=True)  # views: a crop of each image per step
    model, model_args, parts = stage.build(args, train_tok, device)
    ckpt = Checkpoint(os.path.join(args.out, parts.get("file", stage.file)), args, model_args,
                      parts["lineage"],
                      precision_name(dtype), grid=tuple(train_tok["grid"]),
                      digit_vocab=train_tok["vocab_size"],
                      encoder=train_tok["encoder"], layer=train_tok["layer"],
                      image_size=train_tok["image_size"], **parts["record"])
    train_set, val = training_data(args, parts, train_tok, val_tok)
    optimizer = make_optimizer(model, args, device)
    disc = parts.get("disc")  # --disc-weight: the PatchGAN and its own optimizer (taming's Adam betas)
    disc_opt = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9)) if disc is not None else None
    state = ckpt.start(device, model=model, optimizer=optimizer, disc=disc, disc_optimizer=disc_opt)
    step = state.get("step", 0)
    history, disc_history = state.get("history", []), state.get("disc_history", [])
    raw, ddp_disc = model, disc
    model = maybe_compile(model, args, device)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        ddp_disc = DDP(disc, device_ids=[device.index] if device.type == "cuda" else None) if disc else None
    if rank == 0:
        print(f"stage {name}: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters, "
              f"{parts['record']['pixel_size']}px images, DiGIT grid "
              f"{train_tok['grid'][0]}x{train_tok['grid'][1]}, "
              f"{'stored VQ codes' if isinstance(train_set, CodesWithTokens) else 'images'} for training, "
              f"{world} process(es) on {device} in {precision_name(dtype)}")

    # -- the training loop: global batches by step (StepSampler), each rank loads its slice
    share = args.batch_size // world
    sampler = StepSampler(len(train_tok["tokens"]), args.batch_size, args.seed, step, rank, world,
                          getattr(train_set, "views", 1))
    workers = 0 if train_set.cached is not None else args.workers
    loader = DataLoader(train_set, batch_size=share, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                        generator=torch.Generator())  # the global RNG: untouched
    bar = tqdm(total=args.max_steps, initial=step, desc=f"train {name}", unit="step", disable=rank != 0,
               dynamic_ncols=True)
    metrics = state.get("metrics", {})
    png = ckpt.path.replace(".pt", "_val.png")
    for x, digit, _ in loader:
        if step >= args.max_steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        x = x.to(device, non_blocking=True)
        x = to_unit(x) if x.ndim == 4 else x  # images to [-1, 1]; stored VQ codes stay ids
        # the step's random draws come from (seed, step), not the rank: any world size, the same run
        batch = Batch(x, digit.to(device, non_blocking=True), seeded(args.seed, step, device=device),
                      slice(rank * share, (rank + 1) * share), args.batch_size)
        with autocast(device, dtype):
            loss, rec = stage.loss(model, raw, batch, parts, args, step)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        history.append(float(all_reduce(loss.detach().clone())) / world)
        stop_if_not_finite(step, ckpt.path, loss=history[-1], grad_norm=float(grad_norm))  # before the update
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if disc is not None and step >= args.disc_start:
            d_loss = disc_step(ddp_disc, disc_opt, x, rec, device, dtype)
            disc_history.append(float(all_reduce(d_loss)) / world)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if rank == 0 and (step % args.eval_interval == 0 or step == args.max_steps):
            metrics, line = stage.evaluate(raw, val, parts, args, device, dtype, png)
            bar.write(f"step {step}: {line}")
        if rank == 0 and (step % args.ckpt_interval == 0 or step == args.max_steps):
            ckpt.save(step=step, history=history, disc_history=disc_history, metrics=metrics)
    bar.close()
    if rank == 0:
        print(f"done at step {step}: {ckpt.path} {metrics}")
    finish_distributed()
    return metrics


if __name__ == "__main__":
    main()
