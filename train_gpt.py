"""
Stage 1b of DiGIT: a GPT that learns to generate DiGIT token grids (paper Sec. 3.2).

Each image is h*w tokens in raster order (from tokenize_kmeans.py). The sequence fed to the model is
[class token, t_0, ..., t_{T-2}] and it predicts t_0 ... t_{T-1}: next-token prediction, conditioned
on the class (or on a BOS token with --unconditional). A learned "null class" and --class-dropout
make classifier-free guidance possible at sampling time.

Run (reads out/tokens_{train,val}.pt, writes out/gpt.pt):
    python train_gpt.py                                   # demo: tiny GPT on MNIST tokens, CPU
    python train_gpt.py --tokenizer vq                    # the GPT on the pixel VQ's tokens -> out/gpt_vq.pt
    torchrun --nproc_per_node 8 train_gpt.py --model base --batch-size 1024 --max-steps 125000
    python train_gpt.py --resume                          # continue from out/gpt.pt

Defaults are nanoGPT's (pre-LN, AdamW with decay on matrices, cosine); the official DiGIT settings
(config/stage1/dino_base.yaml with fairseq's transformer_lm defaults) are all flags, see runs/official.sh:
    --norm post --emb-scale --dropout 0.1 --label-smoothing 0.1 --schedule inverse-sqrt
    --warmup-steps 6250 --warmup-init-lr 1e-7 --lr 3e-4 --beta2 0.98 --weight-decay 0.01 --decay-on all
    --class-dropout 0 --batch-size 1024 (fairseq's batch_size 256 is per GPU, x 4 GPUs; ours is global)
--dropout acts where fairseq puts it: on the embeddings and on each residual branch (attention output,
MLP output), never on the attention probabilities. --emb-scale multiplies token and class embeddings
by sqrt(width) and initialises them with std width^-1/2, as fairseq.
"""
import contextlib
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from artifacts import Checkpoint, lineage, load_model, prepare_out
from common import (add_system_args, autocast, autocast_dtype, batch_indices, fail, finish_distributed,
                    fraction, init_distributed, learning_rate, matmul_flops, nonneg_float, nonneg_int, parser,
                    positive_float, positive_int, precision_name, seeded, stop_if_not_finite)
from data import add_tokenizer_arg, load_token_files

# n_layer x n_embd x n_head. base = DiGIT-base (~219M with K=8192), large = DiGIT-large (~732M).
MODELS = {
    "tiny": dict(n_layer=4, n_embd=192, n_head=4),
    "small": dict(n_layer=8, n_embd=384, n_head=6),
    "base": dict(n_layer=16, n_embd=1024, n_head=16),
    "large": dict(n_layer=24, n_embd=1536, n_head=24),
}


def get_args(argv=None):
    p = parser(__doc__)
    a = p.add_argument_group("model").add_argument
    add_size_args(a, "size preset")
    a("--dropout", type=fraction, default=0.0, help="embedding and residual dropout (default: %(default)s)")
    a("--norm", default="pre", choices=["pre", "post"],
      help="pre-LN, or post-LN as fairseq (default: %(default)s)")
    a("--emb-scale", action="store_true", help="embeddings x sqrt(width), as fairseq")
    a("--tie-embeddings", action="store_true", help="share input and output token embeddings")
    a("--unconditional", action="store_true", help="ignore labels: a BOS token instead of the class")
    a("--class-dropout", type=fraction, default=0.1, help="null-class rate, for CFG (default: %(default)s)")
    a = p.add_argument_group("optimisation").add_argument
    a("--batch-size", type=positive_int, default=64, help="global batch, all ranks (default: %(default)s)")
    a("--grad-accum", type=positive_int, default=1,
      help="micro-batches per step and rank (default: %(default)s)")
    a("--max-steps", type=positive_int, default=2000, help="optimizer steps (default: %(default)s)")
    a("--lr", type=positive_float, default=1e-3, help="peak learning rate (default: %(default)s)")
    a("--min-lr", type=nonneg_float, default=1e-4, help="end of the cosine decay (default: %(default)s)")
    a("--warmup-steps", type=nonneg_int, default=100, help="linear warm-up steps (default: %(default)s)")
    a("--warmup-init-lr", type=nonneg_float, default=0.0,
      help="lr the warm-up starts at (default: %(default)s)")
    a("--schedule", default="cosine", choices=["cosine", "inverse-sqrt"],
      help="after warm-up (default: %(default)s)")
    a("--weight-decay", type=nonneg_float, default=0.05, help="AdamW weight decay (default: %(default)s)")
    a("--decay-on", default="matrices", choices=["matrices", "all"],
      help="what decays (default: %(default)s)")
    a("--beta2", type=fraction, default=0.95, help="AdamW beta2 (default: %(default)s)")
    a("--label-smoothing", type=fraction, default=0.0, help="cross-entropy smoothing (default: %(default)s)")
    a("--grad-clip", type=nonneg_float, default=1.0,
      help="gradient-norm clip, 0 = off (default: %(default)s)")
    a = p.add_argument_group("evaluation and checkpoints").add_argument
    a("--eval-interval", type=positive_int, default=250,
      help="steps between loss estimates (default: %(default)s)")
    a("--eval-batches", type=positive_int, default=4,
      help="fixed batches per estimate (default: %(default)s)")
    a("--ckpt-interval", type=positive_int, default=None,
      help="steps between checkpoints (default: by preset)")
    a("--stop-after", type=nonneg_int, default=0, help="stop after this many steps of this run (a job limit)")
    a("--resume", action="store_true", help="continue from OUT/gpt.pt: model, optimizer, step, RNG")
    a("--force", action="store_true", help="start afresh over an existing OUT/gpt.pt")
    system = add_system_args(p, "reads tokens_*.pt from and writes gpt.pt to this directory")
    add_compile_arg(system)
    add_tokenizer_arg(system)
    args = p.parse_args(argv)
    args.ckpt_interval = args.ckpt_interval or ckpt_interval(args.model)
    return args


# ----------------------------------------------------------------------------- the model

class SelfAttention(nn.Module):
    """Multi-head self-attention; causal for the GPT, bidirectional for the MaskGIT decoder (stage 2).
    Dropout on its output (the residual branch), as fairseq; the attention probabilities are not dropped."""

    def __init__(self, n_embd, n_head, dropout, causal=True):
        super().__init__()
        self.n_head, self.causal = n_head, causal
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, kv=None, pos=0):
        """kv: this layer's (keys, values) cache [B, H, block_size, Q] for sampling; x holds the tokens
        at positions pos .. pos+T-1, whose keys/values are written into it before attending."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        causal = self.causal
        if kv is not None:
            if pos and T > 1:
                raise ValueError("the cache takes a prefix at position 0, then one token at a time")
            kv[0][:, :, pos: pos + T] = k
            kv[1][:, :, pos: pos + T] = v
            k, v = kv[0][:, :, : pos + T], kv[1][:, :, : pos + T]
            causal = causal and T > 1  # one new token may see every cached one
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=causal)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    """Transformer block. Pre-LN (default) trains stably at any depth without tuning the warm-up;
    post-LN (the paper's stage 1, fairseq's default) normalises after each residual add."""

    def __init__(self, n_embd, n_head, dropout, norm="pre", causal=True):
        super().__init__()
        self.pre = norm == "pre"
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, dropout, causal)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(dropout))

    def forward(self, x, kv=None, pos=0):
        if self.pre:
            x = x + self.attn(self.ln1(x), kv, pos)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, kv, pos))
        return self.ln2(x + self.mlp(x))


class GPT(nn.Module):
    """Decoder-only transformer over [condition, t_0 .. t_{T-2}] -> logits for t_0 .. t_{T-1}.

    The condition embedding table has n_classes + 1 rows: one per class and a last "null class" row
    used for class dropout and the unconditional branch of classifier-free guidance. With
    n_classes = 0 the model is unconditional and row 0 is a BOS token. Post-LN has no final norm
    (fairseq's decoder); emb_scale multiplies the token and condition embeddings by sqrt(n_embd)."""

    def __init__(self, vocab_size, block_size, n_classes, n_layer, n_embd, n_head, dropout=0.0, norm="pre",
                 tie_embeddings=False, emb_scale=False):
        super().__init__()
        self.vocab_size, self.block_size, self.n_classes = vocab_size, block_size, n_classes
        self.scale = math.sqrt(n_embd) if emb_scale else 1.0
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.cls_emb = nn.Embedding(n_classes + 1, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, norm) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd) if norm == "pre" else nn.Identity()
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))
        if emb_scale:  # fairseq: scaled embeddings start at unit std
            for emb in (self.tok_emb, self.cls_emb):
                nn.init.normal_(emb.weight, 0.0, n_embd ** -0.5)
        if tie_embeddings:
            self.head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def null_class(self):
        return self.n_classes  # the last row of cls_emb

    def embed(self, tokens, labels, start=0):
        """[cond, tokens] + positions from position 0, or (start > 0, sampling) tokens alone at `start`."""
        B, L = tokens.shape
        if start + L + (start == 0) > self.block_size:
            fail(f"{L} input tokens do not fit the block size {self.block_size}")
        x = self.tok_emb(tokens)
        if start == 0:
            if labels is None:
                labels = torch.full((B,), self.null_class, dtype=torch.long, device=tokens.device)
            x = torch.cat([self.cls_emb(labels)[:, None], x], dim=1)
        pos = torch.arange(start, start + x.shape[1], device=tokens.device)
        return self.drop(x * self.scale + self.pos_emb(pos))

    def forward(self, tokens, labels=None, return_hidden=False, cache=None):
        """logits [B, L+1, V] (position i predicts token i); with return_hidden also the embedding output and
        the output of every block [(1 + n_layer) x (B, L+1, C)], which the linear probe reads.

        cache (a KVCache, for sampling): the first call embeds [cond, tokens] from position 0, later
        calls take only the next token ([B, 1]) and return its logits [B, 1, V]."""
        pos = cache.pos if cache is not None else 0
        x = self.embed(tokens, labels, pos)
        hidden = [x]
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layers[i] if cache is not None else None, pos)
            hidden.append(x)
        if cache is not None:
            cache.pos += x.shape[1]
        logits = self.head(self.ln_f(x))
        return (logits, hidden) if return_hidden else logits

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - (self.pos_emb.weight.numel() + self.cls_emb.weight.numel() if non_embedding else 0)


class KVCache:
    """Keys and values of every layer, preallocated for a whole sequence: each sampling step then
    computes only the newest token instead of re-running the prefix. dtype: bf16 halves its memory
    (and the attention's reads) where sampling runs under bf16 autocast."""

    def __init__(self, model, batch_size, dtype=torch.float32, length=None):
        attn = model.blocks[0].attn
        shape = (batch_size, attn.n_head, length or model.block_size, attn.qkv.in_features // attn.n_head)
        device = attn.qkv.weight.device
        self.layers = [tuple(torch.zeros(shape, dtype=dtype,
                                         device=device) for _ in "kv") for _ in model.blocks]
        self.pos = 0


def filter_logits(logits, top_k=0, top_p=1.0):
    """Keep the top-k tokens and/or the smallest set whose probability reaches top_p; the rest -> -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # tokens entirely beyond the nucleus (the top one always stays)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_token(logits, temperature=1.0, top_k=0, top_p=1.0, gen=None):
    """One id per row of logits [B, V], drawn on their device (gen: a generator on that device, or None)."""
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)


def gpt_path(out, tokenizer="digit"):
    """gpt.pt: the GPT on DiGIT tokens; gpt_vq.pt: the same GPT on the pixel VQ's tokens (--tokenizer vq)."""
    return os.path.join(out, "gpt.pt" if tokenizer == "digit" else f"gpt_{tokenizer}.pt")


def load_gpt(path, device):
    """(frozen GPT, checkpoint dict) from gpt.pt."""
    return load_model(path, GPT, "run train_gpt.py first", device)


def add_size_args(a, what):
    """--model and its overrides: the GPT's, and those of stage 2's transformers (train_decoder.py)."""
    a("--model", default="tiny", choices=list(MODELS), help=f"{what} (default: %(default)s)")
    a("--n-layer", type=positive_int, help="override the preset's layer count")
    a("--n-embd", type=positive_int, help="override the preset's width")
    a("--n-head", type=positive_int, help="override the preset's head count")


def ckpt_interval(preset):
    """Steps between checkpoints: 500 for the small presets; 5,000 for base and large, whose checkpoints are
    2.6 and 8.5 GB (nanoGPT and LlamaGen save every 2,000-5,000 steps)."""
    return 5000 if preset in ("base", "large") else 500


def add_compile_arg(group):
    """--compile auto|on|off, declared once (the GPT and the stage-2 decoders)."""
    group.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                       help="torch.compile the model; auto: on a GPU (default: %(default)s)")


def maybe_compile(model, args, device):
    """torch.compile where --compile asks for it (auto: on CUDA, where nanoGPT measured 1.85x; on 2 CPU cores
    the compile time outweighs what it saves on the demo's runs)."""
    if args.compile == "on" or (args.compile == "auto" and device.type == "cuda"):
        return torch.compile(model)
    return model


def model_size(args):
    """n_layer / n_embd / n_head: the --model preset with the command line's overrides."""
    m = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in MODELS[args.model].items()}
    if m["n_embd"] % m["n_head"]:
        fail(f"--n-embd {m['n_embd']} is not divisible by --n-head {m['n_head']}")
    return m


def model_args_from(args, vocab_size, block_size, n_classes):
    return dict(vocab_size=vocab_size, block_size=block_size, n_classes=n_classes, dropout=args.dropout,
                norm=args.norm, tie_embeddings=args.tie_embeddings, emb_scale=args.emb_scale,
                **model_size(args))


def flops_per_token(model_args, n_params):
    """Training FLOPs per token: 6N for the matmuls with weights, 12 L H Q T for attention (nanoGPT /
    PaLM)."""
    L, C, T = model_args["n_layer"], model_args["n_embd"], model_args["block_size"]
    return 6 * n_params + 12 * L * C * T  # H * Q = C


# Dense bf16 tensor-core peaks (FLOP/s) for MFU on GPUs; on CPU the peak is measured at start-up.
GPU_PEAK_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "L40S": 362e12, "A10": 125e12,
                 "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def device_peak(device, dtype):
    """(FLOP/s of one device, how it was found) for MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{name}: {peak / 1e12:.0f} TFLOP/s bf16 dense (datasheet)"
    peak = matmul_flops(device, dtype or torch.float32)
    return peak, f"measured {precision_name(dtype)} matmul on {device}: {peak / 1e9:.0f} GFLOP/s"


# ----------------------------------------------------------------------------- training pieces

def drop_classes(labels, p, null_class, step, seed):
    """Replace a fraction p of the class labels by the null class (CFG training), seeded by the step."""
    if p <= 0:
        return labels
    drop = (torch.rand(len(labels), generator=seeded(seed, step, 1)) < p).to(labels.device)
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def pick_views(tokens, rows, step, seed):
    """The step's token grids [B, h*w] as int64: rows of tokens [N, h*w], or of tokens [N, V, h*w] with one
    view per row drawn from (seed, step), so a resumed run and any number of ranks see the same views."""
    rows = rows.to(tokens.device)
    if tokens.ndim == 2:
        return tokens[rows].long()
    v = torch.randint(tokens.shape[1], (len(rows),), generator=seeded(seed, step, 2))
    return tokens[rows, v.to(tokens.device)].long()


def make_optimizer(model, args, device):
    """AdamW; weight decay on matrices only (not on biases and LayerNorm gains), or on all parameters
    (--decay-on all: fairseq's Adam, whose decay is decoupled as AdamW's)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for p in params if p.dim() >= 2 or getattr(args, "decay_on", "matrices") == "all"]
    groups = [dict(params=decayed, weight_decay=args.weight_decay),
              dict(params=[p for p in params if all(p is not q for q in decayed)], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=device.type == "cuda")


def loss_fn(model, tokens, labels, label_smoothing=0.0):
    logits = model(tokens[:, :-1], labels)
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), label_smoothing=label_smoothing)


@torch.no_grad()
def estimate_loss(model, data, args, dtype, device):
    """Mean loss on fixed batches (the same ones at every evaluation, so the curve is comparable)."""
    model.eval()
    tokens, labels = data
    rows = torch.randperm(len(tokens), generator=seeded(1))[: args.eval_batches * args.batch_size]
    losses = []
    for chunk in rows.split(args.batch_size):
        with autocast(device, dtype):
            y = None if labels is None else labels[chunk.to(labels.device)]
            losses.append(loss_fn(model, tokens[chunk.to(tokens.device)].long(), y).item())
    model.train()
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------- training

def main(argv=None):
    args = get_args(argv)
    rank, world, device = init_distributed(args.device, args.dist_timeout)
    prepare_out(args.out)
    dtype = autocast_dtype(args.precision, device)

    # -- data: every token grid of both splits on the device in its stored dtype (int16 for K = 8192:
    #    1.28M ImageNet images x 256 tokens = 0.66 GB, x views); batches become int64 one at a time.
    #    DiGIT's tokens, or the pixel VQ's codes of the same images (--tokenizer vq): one GPT learns either.
    train, val = load_token_files(args.out, args.tokenizer, views=True)
    conditional = not args.unconditional and train.get("labels") is not None
    n_classes = len(train["classes"]) if conditional else 0
    if conditional and len(train["labels"]) and int(train["labels"].max()) >= n_classes:
        fail(f"labels go up to {int(train['labels'].max())} but tokens_train.pt names {n_classes} classes")
    h, w = train["grid"]
    if args.batch_size % (world * args.grad_accum):
        fail(f"--batch-size {args.batch_size} is not divisible by {world} ranks x --grad-accum "
             f"{args.grad_accum}")
    micro = args.batch_size // (world * args.grad_accum)  # sequences per forward pass on this rank
    if len(train["tokens"]) < args.batch_size:
        fail(f"--batch-size {args.batch_size} is larger than the train set ({len(train['tokens'])} images)")
    tokens = train["tokens"].to(device)
    labels = train["labels"].to(device) if conditional else None
    views = tokens.shape[1] if tokens.ndim == 3 else 1
    train_data = (tokens[:, 0] if tokens.ndim == 3 else tokens, labels)  # the train loss: on the plain view
    val_data = (val["tokens"].to(device), val["labels"].to(device) if conditional else None)

    # -- model and optimizer, fresh or restored (--resume); DDP averages the gradients of the ranks
    model_args = model_args_from(args, train["vocab_size"], h * w, n_classes)
    torch.manual_seed(args.seed)
    model = GPT(**model_args).to(device)
    optimizer = make_optimizer(model, args, device)
    ckpt = Checkpoint(gpt_path(args.out, args.tokenizer), args, model_args, lineage(train),
                      precision_name(dtype),
                      vocab_size=train["vocab_size"], grid=train["grid"],
                      classes=train["classes"] if conditional else [],
                      encoder=train.get("encoder"), layer=train.get("layer"),
                      image_size=train.get("image_size"),
                      tokenizer=train.get("tokenizer", "digit"), views=views)
    state = ckpt.start(device, model=model, optimizer=optimizer)
    step, best_val = state.get("step", 0), state.get("best_val", float("inf"))
    losses, evals = state.get("losses", []), state.get("evals", [])
    raw = model  # the module whose weights are saved and evaluated
    model = maybe_compile(model, args, device)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # -- the peak that MFU is measured against: one device's (each rank runs 1/world of the FLOPs)
    n_params = raw.num_params()
    flops_step = flops_per_token(model_args, n_params) * args.batch_size * h * w / world
    peak, peak_note = device_peak(device, dtype)
    if rank == 0:
        print(f"GPT {model_args['n_layer']}x{model_args['n_embd']} ({n_params / 1e6:.2f}M parameters), vocab "
              f"{model_args['vocab_size']}, {h * w} "
              f"tokens/image{f' ({views} views each)' if views > 1 else ''}, "
              f"{f'class-conditional ({n_classes} classes)' if conditional else 'unconditional'}, {world} "
              f"process(es) on {device} in {precision_name(dtype)}; MFU per device against {peak_note}")

    # -- the training loop: the global batch of a step is a pure function of (seed, step), so a resumed
    #    run and a run on any number of ranks see the same batches; each rank takes its slice of it
    last_step = args.max_steps if not args.stop_after else min(args.max_steps, step + args.stop_after)
    bar = tqdm(total=args.max_steps, initial=step, desc="train GPT", unit="step", disable=rank != 0,
               dynamic_ncols=True)
    t0, steps_timed = time.perf_counter(), 0
    while step < last_step:
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = batch_indices(step, args.batch_size, len(tokens), args.seed)
        batch = pick_views(tokens, rows, step, args.seed)
        y = drop_classes(labels[rows.to(device)], args.class_dropout, n_classes, step,
                         args.seed) if conditional \
            else None
        # this rank's
        mine = torch.arange(rank * micro * args.grad_accum, (rank + 1) * micro * args.grad_accum)

        # forward/backward over the micro-batches; gradients are all-reduced once, on the last one
        loss_sum = torch.zeros((), device=device)
        for a in range(args.grad_accum):
            part = mine[a * micro: (a + 1) * micro].to(device)
            sync = a == args.grad_accum - 1 or world == 1
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast(device, dtype):
                loss = loss_fn(model, batch[part], None if y is None else y[part], args.label_smoothing)
                (loss / args.grad_accum).backward()
            loss_sum += loss.detach() / args.grad_accum
        if world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= world
        step_loss = loss_sum.item()

        # the update, unless the loss or the gradient is NaN/inf (then stop: the last checkpoint stays good)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        stop_if_not_finite(step, ckpt.path, loss=step_loss, grad_norm=float(grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_timed += 1
        losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")

        # evaluation on fixed batches (rank 0), throughput and MFU since the last one; checkpoints
        if rank == 0 and (step % args.eval_interval == 0 or step == last_step):
            dt = time.perf_counter() - t0
            tl = estimate_loss(raw, train_data, args, dtype, device)
            vl = estimate_loss(raw, val_data, args, dtype, device)
            best_val = min(best_val, vl)
            evals.append(dict(step=step, train=tl, val=vl))
            bar.write(f"step {step}: train loss {tl:.4f}, val loss {vl:.4f}, "
                      f"{steps_timed * args.batch_size * h * w / dt:,.0f} tokens/s, MFU "
                      f"{100 * flops_step * steps_timed / dt / peak:.1f}%")
            t0, steps_timed = time.perf_counter(), 0
        if rank == 0 and (step % args.ckpt_interval == 0 or step == last_step):
            ckpt.save(step=step, best_val=best_val, losses=losses, evals=evals)
    bar.close()
    if rank == 0:
        print(f"{'stopped' if step < args.max_steps else 'done'} at step {step}: {ckpt.path}, best val loss "
              f"{best_val:.4f}")
    finish_distributed()
    return losses


if __name__ == "__main__":
    main()
