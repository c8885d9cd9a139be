"""
Stage 2 of DiGIT: render DiGIT tokens as pixels (paper Sec. 3.3).

DiGIT tokens say *what* is in each patch, not its exact pixels, so a second model paints them:
  --stage vq       a small pixel VQ autoencoder (VQGAN-like; the model is in vqgan.py) whose latent grid
                   equals the DiGIT grid; its tokens are the "pixel tokens". MSE (+ DINOv2 perceptual,
                   + PatchGAN with --disc-weight). Writes vq.pt, and the VQ's codes of the same images as
                   vq_tokens_{train,val}.pt: the paper's baseline tokens, on which train_gpt.py
                   --tokenizer vq trains the same GPT.
  --stage maskgit  a bidirectional transformer that predicts an image's VQ tokens from its DiGIT
                   tokens, MaskGIT-style (Chang et al. 2022); the VQ decoder renders them. Writes
                   decoder.pt and decoder_val.png (rows: original | VQ reconstruction | from DiGIT).
                   The VQ is vq.pt, or with --vq PATH a pretrained one: MAGE's VQGAN, as the paper.
  --stage direct   pixels straight from DiGIT tokens, no VQ and no MaskGIT (the paper's future work,
                   RAE-style): each id -> its frozen K-means centroid (+ a learned residual), Gaussian
                   noise on those embeddings while training, a bidirectional transformer over the grid,
                   and a head that paints each token's patch. Writes direct.pt and direct_val.png.

Run (after tokenize_kmeans.py; reads out/tokens_*.pt and the images they came from):
    python train_decoder.py --stage vq
    python train_decoder.py --stage maskgit
    python train_decoder.py --stage direct      # needs no vq.pt
    python train_decoder.py --stage maskgit --vq vqgan_jax_strongaug.ckpt   # MAGE's VQGAN: no --stage vq
    torchrun --nproc_per_node 8 train_decoder.py --stage vq --batch-size 256   # paper scale
"""
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from common import (add_system_args, all_reduce, autocast, autocast_dtype, check_same, check_weights_finite, fail,
                    finish_distributed, init_distributed, learning_rate, load_model, new_fingerprint, nonneg_float, nonneg_int,
                    fraction, load_artifact, parser, positive_float, positive_int, prepare_out, refuse_overwrite, restore, rng_state, save_atomic, seeded,
                    StepSampler, stop_if_not_finite)
from data import ImagesWithTokens, check_tokens, dataset_for_tokens, load_codebook, load_tokens, to_unit, token_path
from dinov2 import DinoPerceptual, load_encoder
from train_gpt import Block, add_size_args, model_size
from vqgan import VQModel, load_vq, vq_decode, vq_encode


def get_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--stage", required=True, choices=["vq", "maskgit", "direct"], help="which model to train")
    a = p.add_argument_group("pixel VQ (--stage vq)").add_argument
    a("--pixel-size", type=positive_int, default=None, help="image side the pixels are made at (default: 4 x grid side, 256 for a "
      "16x16 grid; with a pretrained --vq: grid side x its downsampling, 256 for MAGE's VQGAN on 16x16 DiGIT tokens)")
    a("--vq-channels", type=positive_int, default=64, help="VQ base channel count (default: %(default)s)")
    a("--vq-codes", type=positive_int, default=1024, help="VQ codebook size (default: %(default)s)")
    a("--code-dim", type=positive_int, default=32, help="VQ code dimension (L2-normalised codes) (default: %(default)s)")
    a("--commit", type=nonneg_float, default=0.25, help="commitment loss weight beta (default: %(default)s)")
    a("--perceptual", type=nonneg_float, default=0.1, help="weight of the DINOv2 feature loss (0: off) (default: %(default)s)")
    a("--perceptual-layer", type=positive_int, default=3, help="DINOv2 block whose features the perceptual loss compares (default: %(default)s)")
    a("--restart-interval", type=positive_int, default=50, help="steps between restarts of unused VQ codes (default: %(default)s)")
    a("--disc-weight", type=nonneg_float, default=0.0, help="vq and direct: weight of the adversarial term, a PatchGAN with a hinge "
      "loss, scaled by taming's adaptive weight (VQGAN, Esser et al. 2021; RAE uses one too); 0: off (default: %(default)s)")
    a("--disc-start", type=nonneg_int, default=0, help="step at which the discriminator starts to train and to count (default: %(default)s)")
    a("--disc-layers", type=positive_int, default=3, help="strided conv layers of the PatchGAN (its receptive field) (default: %(default)s)")
    a = p.add_argument_group("MaskGIT decoder (--stage maskgit) and direct decoder (--stage direct)").add_argument
    a("--vq", default=None, help="maskgit: the pixel VQ whose codes it learns: OUT/vq.pt (default), or a pretrained one in its "
      "published layout, MAGE's VQGAN (the paper's, vqgan_jax_strongaug.ckpt) or LlamaGen's VQ-16 (vq_ds16_c2i.pt)")
    add_size_args(a, "transformer size preset")
    a("--decode-steps", type=positive_int, default=8, help="MaskGIT decoding steps T (default: %(default)s)")
    a("--feature-noise", type=nonneg_float, default=0.8, help="direct: Gaussian noise on the input embeddings while training, "
      "std ~ U(0, this) x the centroids' std (RAE's augmentation: it copes with imperfect tokens) (default: %(default)s)")
    a("--token-corruption", type=fraction, default=0.0, help="direct: fraction of input ids replaced by random ids while training (default: %(default)s)")
    a("--pixel-loss", default="l1", choices=["l1", "mse"], help="direct: pixel loss (+ --perceptual) (default: %(default)s)")
    a("--direct-input", default="tokens", choices=["tokens", "features"], help="direct: DiGIT tokens, or the continuous DINOv2 "
      "features they were quantised from (the upper bound: what K-means costs in pixels; encodes every image once, held in "
      "memory: demo scale only); features write direct_features.pt (default: %(default)s)")
    a = p.add_argument_group("optimisation").add_argument
    a("--batch-size", type=positive_int, default=32, help="global batch (default: %(default)s)")
    a("--max-steps", type=positive_int, default=2000, help="optimizer steps (default: %(default)s)")
    a("--lr", type=positive_float, default=None, help="learning rate (default: 2e-4 for vq, 5e-4 for maskgit)")
    a("--warmup-steps", type=nonneg_int, default=50, help="linear warm-up steps (default: %(default)s)")
    a("--schedule", default="cosine", choices=["cosine", "constant"], help="after warm-up: cosine decay to --min-lr, or constant (default: %(default)s)")
    a("--min-lr", type=nonneg_float, default=None, help="final learning rate of the cosine decay (default: lr / 10)")
    a = p.add_argument_group("evaluation and checkpoints").add_argument
    a("--eval-interval", type=positive_int, default=500, help="steps between val evaluations (default: %(default)s)")
    a("--eval-images", type=positive_int, default=256, help="val images per evaluation (default: %(default)s)")
    a("--ckpt-interval", type=positive_int, default=500, help="steps between checkpoints (default: %(default)s)")
    a("--resume", action="store_true", help="continue this stage from its checkpoint")
    a("--force", action="store_true", help="start afresh even though this stage's checkpoint exists (it is overwritten)")
    system = add_system_args(p, "reads tokens_*.pt (and vq.pt) from, writes vq.pt / decoder.pt / direct.pt to")
    system.add_argument("--workers", type=nonneg_int, default=2, help="data loader processes when images are streamed (default: %(default)s)")
    system.add_argument("--preload-gb", type=nonneg_float, default=4.0, help="hold the images in memory (uint8) if they take less than this (default: %(default)s)")
    args = p.parse_args(argv)
    args.lr = args.lr or {"vq": 2e-4, "maskgit": 5e-4, "direct": 5e-4}[args.stage]
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    return args


def psnr(a, b):
    """Peak signal-to-noise ratio (dB) per image of two [-1, 1] batches, measured on [0, 1]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


# ----------------------------------------------------------------------------- part 1: the pixel VQ (its model: vqgan.py)
# What its training adds to MSE (for the direct decoder too): a PatchGAN, as VQGAN (Esser et al. 2021).

def patch_discriminator(layers, channels=64):
    """PatchGAN (pix2pix, Isola et al. 2017; taming's NLayerDiscriminator): strided 4x4 convs, one real/fake
    logit per image patch, so it judges texture and edges that an MSE loss leaves blurry."""
    mods, c = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)], channels
    for i in range(1, layers + 1):
        c_out = channels * min(2 ** i, 8)
        # GroupNorm where taming has BatchNorm: per-image statistics keep a run the same for any number of ranks
        mods += [nn.Conv2d(c, c_out, 4, 2 if i < layers else 1, 1, bias=False), nn.GroupNorm(32, c_out), nn.LeakyReLU(0.2)]
        c = c_out
    return nn.Sequential(*mods, nn.Conv2d(c, 1, 4, 1, 1))


def adversarial_term(nll, rec, last_layer, args, parts, step):
    """The generator's share of the GAN (--disc-weight, from --disc-start on): -D(rec), weighted adaptively."""
    if parts.get("disc") is None or step < args.disc_start:
        return 0.0
    parts["disc"].requires_grad_(False)  # gradients reach the generator through D, not D itself
    g_loss = -parts["disc"](rec).mean()
    parts["disc"].requires_grad_(True)
    return args.disc_weight * adaptive_weight(nll, g_loss, last_layer) * g_loss


def adaptive_weight(nll, g_loss, last_layer):
    """taming's balance of the two losses: the ratio of their gradient norms at the decoder's last layer, so
    the adversarial term never swamps reconstruction whatever the scale of either (Esser et al. 2021, Eq. 7)."""
    g1 = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g2 = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    if dist.is_initialized():  # the whole global batch's gradients: the same weight for any number of ranks
        dist.all_reduce(g1)
        dist.all_reduce(g2)
    return (g1.norm() / (g2.norm() + 1e-4)).clamp(0, 1e4).detach()


def disc_loss(disc, x, rec):
    """Hinge loss of the discriminator on real images and (detached) reconstructions."""
    return 0.5 * (F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec.detach())).mean())


# ----------------------------------------------------------------------------- part 2: the MaskGIT-style decoder

class MaskGIT(nn.Module):
    """Bidirectional transformer over [DiGIT tokens (always visible), VQ tokens (some = [MASK])]
    -> logits of the VQ tokens. Blocks are train_gpt.Block with causal=False."""

    def __init__(self, digit_vocab, vq_codes, length, n_layer, n_embd, n_head, dropout=0.0):
        super().__init__()
        self.length, self.mask_id = length, vq_codes
        self.digit_emb = nn.Embedding(digit_vocab, n_embd)
        self.vq_emb = nn.Embedding(vq_codes + 1, n_embd)  # + [MASK]
        self.pos_emb = nn.Embedding(2 * length, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, "pre", causal=False) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vq_codes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, digit, vq):
        x = torch.cat([self.digit_emb(digit), self.vq_emb(vq)], dim=1) + self.pos_emb.weight
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x[:, self.length:]))


def mask_count(u, length):
    """MaskGIT's cosine schedule: ceil(cos(u * pi / 2) * L) tokens masked for u in [0, 1), at least 1."""
    return torch.ceil(torch.cos(u * math.pi / 2) * length).long().clamp(1, length)


def random_mask(batch, length, gen=None, device="cpu"):
    """A boolean mask [B, L] with a cosine-schedule number of random positions per row."""
    n = mask_count(torch.rand(batch, generator=gen), length)
    order = torch.rand(batch, length, generator=gen).argsort(1).argsort(1)  # a random rank per position
    return (order < n[:, None]).to(device)


@torch.no_grad()
def decode(model, digit, steps=8, temperature=1.0, noise=4.5, vq=None, gen=None):
    """MaskGIT decoding: start from all [MASK] (or the given vq with some [MASK]s); at each step t
    predict every position, sample, keep the most confident (log-prob + Gumbel noise of temperature
    noise * (1 - t/T)) and re-mask the rest along the cosine schedule. Known tokens never change and
    every position is filled after `steps` steps."""
    B, L = digit.shape
    vq = torch.full((B, L), model.mask_id, device=digit.device) if vq is None else vq.clone()
    for t in range(steps):
        unknown = vq == model.mask_id
        if not unknown.any():
            break
        logp = F.log_softmax(model(digit, vq).float() / temperature, dim=-1)
        sampled = torch.multinomial(logp.exp().flatten(0, 1), 1, generator=gen).view(B, L).to(vq.device)
        sampled = torch.where(unknown, sampled, vq)
        gumbel = -torch.log(-torch.log(torch.rand(B, L, generator=gen).clamp(1e-20, 1 - 1e-7))).to(vq.device)
        conf = logp.gather(-1, sampled[..., None]).squeeze(-1) + noise * (1 - (t + 1) / steps) * gumbel
        conf = torch.where(unknown, conf, torch.full_like(conf, float("inf")))
        # how many stay masked after this step: the schedule, but always at least one fewer than now
        n_next = int(math.floor(math.cos(math.pi / 2 * (t + 1) / steps) * L)) if t < steps - 1 else 0
        n_next = torch.minimum(torch.full((B,), n_next, device=vq.device), unknown.sum(1) - 1).clamp_min(0)
        rank = conf.argsort(1).argsort(1)  # 0 = least confident
        vq = torch.where(rank < n_next[:, None], torch.full_like(sampled, model.mask_id), sampled)
    return vq


# ----------------------------------------------------------------------------- part 3: the direct decoder

class DirectDecoder(nn.Module):
    """DiGIT token ids [B, h*w] -> pixels [B, 3, h*p, w*p] in one forward pass.

    The ids become their K-means centroids (a frozen buffer copied from codebook.pt: the tokens keep the
    meaning the tokenizer gave them) plus a learned residual embedding (zero at start); a linear map to the
    transformer width, learned positions, bidirectional Blocks (train_gpt.Block, causal=False: every token
    sees the whole grid), and a linear head that paints each token's p x p x 3 patch (as RAE's ViT decoder)."""

    def __init__(self, vocab, dim, grid, patch, n_layer, n_embd, n_head):
        super().__init__()
        self.grid, self.patch = tuple(grid), patch
        self.register_buffer("centroids", torch.zeros(vocab, dim))
        self.residual = nn.Embedding(vocab, dim)
        nn.init.zeros_(self.residual.weight)
        self.proj = nn.Linear(dim, n_embd)
        self.pos = nn.Parameter(torch.randn(1, grid[0] * grid[1], n_embd) * 0.02)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, 0.0, "pre", causal=False) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, patch * patch * 3)

    def embed(self, ids):
        return self.centroids[ids] + self.residual(ids)

    def forward(self, ids=None, emb=None):
        """Pixels in [-1, 1] (unclamped while training) from ids, or from given embeddings emb [B, h*w, D]
        (the ids' embeddings plus training noise, or continuous DINOv2 features for the upper bound)."""
        x = self.proj(self.embed(ids) if emb is None else emb) + self.pos
        for block in self.blocks:
            x = block(x)
        (h, w), p = self.grid, self.patch
        x = self.head(self.ln_f(x)).view(len(x), h, w, 3, p, p)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(len(x), 3, h * p, w * p)


def direct_render(model, ids):
    """What sample.py calls: DiGIT ids [B, h*w] -> images in [-1, 1] (or continuous features [B, h*w, D]: the upper bound)."""
    return (model(emb=ids) if ids.is_floating_point() else model(ids)).clamp(-1, 1)


@torch.no_grad()
def patch_features(tok, device, dtype, batch_size=64):
    """[N, h*w, D] DINOv2 patch features of the images behind a token file: what tokenize_kmeans.py quantised
    (same encoder, block, image size, final norm), for the direct decoder's continuous upper bound."""
    model = load_encoder(tok["encoder"]).to(device)
    feats = []
    for x, _ in tqdm(DataLoader(dataset_for_tokens(tok), batch_size=batch_size), desc="DINOv2 patch features", leave=False):
        with autocast(device, dtype):
            feats.append(model.get_intermediate_layers(x.to(device), [tok["layer"]])[0].float().cpu())
    return torch.cat(feats)


# ----------------------------------------------------------------------------- training (shared by the stages)

def default_pixel_size(grid):
    return 256 if grid[0] >= 16 else 4 * grid[0]  # the demo: 8x8 tokens, 32 px (MNIST digits are 28 px)


def vq_levels(pixel_size, grid):
    levels = math.log2(pixel_size / grid[0]) if pixel_size % grid[0] == 0 else -1
    if levels != int(levels) or levels < 1 or grid[0] != grid[1]:
        fail(f"--pixel-size {pixel_size} is not a power-of-two multiple of the DiGIT grid {grid[0]}x{grid[1]}")
    return int(levels)


def load_decoder(path, device):
    return load_model(path, MaskGIT, "run train_decoder.py --stage maskgit first", device)


def load_direct(path, device):
    return load_model(path, DirectDecoder, "run train_decoder.py --stage direct first", device)


def eval_subset(val, n):
    """n val images spread evenly over the set (val sets are often sorted by class)."""
    return torch.utils.data.Subset(val, torch.linspace(0, len(val) - 1, min(n, len(val))).long().tolist())


def evaluate_vq(vq, val, args, device, dtype):
    """Val PSNR of the reconstructions and codebook usage (codes used, perplexity)."""
    vq.eval()
    psnrs, ids = [], []
    with torch.no_grad(), autocast(device, dtype):
        for x, _, _ in DataLoader(eval_subset(val, args.eval_images), batch_size=64):
            x = to_unit(x.to(device))
            rec, i, *_ = vq(x)
            psnrs.append(psnr(rec.float(), x))
            ids.append(i.flatten())
    vq.train()
    counts = torch.bincount(torch.cat(ids), minlength=vq.num_codes).float()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    return dict(psnr=float(torch.cat(psnrs).mean()), codes_used=int((counts > 0).sum()), perplexity=perplexity)


def evaluate_maskgit(model, vq, val, grid, args, device, dtype, png=None):
    """VQ-token accuracy of decode() from the real DiGIT tokens, and PSNR of the rendered pixels."""
    model.eval()
    acc, psnrs, rows = [], [], []
    gen = seeded(0)
    subset = eval_subset(val, args.eval_images)
    show = set(torch.linspace(0, len(subset) - 1, 8).long().tolist())  # 8 pictures spread over the classes
    seen = 0
    with torch.no_grad(), autocast(device, dtype):
        for x, digit, _ in DataLoader(subset, batch_size=64):
            x, digit = to_unit(x.to(device)), digit.to(device)
            target = vq_encode(vq, x)
            pred = decode(model, digit, args.decode_steps, gen=gen)
            rendered = vq_decode(vq, pred, grid).float()
            acc.append((pred == target).float().mean(1))
            psnrs.append(psnr(rendered, x))
            pick = [i for i in range(len(x)) if seen + i in show]
            rows.append(torch.stack([x[pick], vq_decode(vq, target[pick], grid).float(), rendered[pick]]))
            seen += len(x)
    model.train()
    if png:
        rows = torch.cat(rows, dim=1)  # [3, 8, C, H, W]: original | VQ reconstruction | rendered from DiGIT
        save_image(make_grid(rows.flatten(0, 1), nrow=rows.shape[1], normalize=True, value_range=(-1, 1)), png)
    return dict(vq_token_acc=float(torch.cat(acc).mean()), psnr=float(torch.cat(psnrs).mean()))


def evaluate_direct(model, val, args, device, dtype, png=None):
    """PSNR of the pictures the direct decoder paints from the real DiGIT tokens of val images (noise off: eval mode)."""
    model.eval()
    psnrs, rows, seen = [], [], 0
    subset = eval_subset(val, args.eval_images)
    show = set(torch.linspace(0, len(subset) - 1, 8).long().tolist())
    with torch.no_grad(), autocast(device, dtype):
        for x, digit, _ in DataLoader(subset, batch_size=64):
            x = to_unit(x.to(device))
            rendered = direct_render(model, digit.to(device)).float()
            psnrs.append(psnr(rendered, x))
            pick = [i for i in range(len(x)) if seen + i in show]
            rows.append(torch.stack([x[pick], rendered[pick]]))
            seen += len(x)
    model.train()
    if png:
        rows = torch.cat(rows, dim=1)  # [2, 8, C, H, W]: original | painted from its DiGIT tokens
        save_image(make_grid(rows.flatten(0, 1), nrow=rows.shape[1], normalize=True, value_range=(-1, 1)), png)
    return dict(psnr=float(torch.cat(psnrs).mean()))


def build_vq(args, grid, encoder, device):
    """Stage vq: a fresh VQ whose latent grid is the DiGIT grid, and the optional DINOv2 perceptual loss."""
    pixel_size = args.pixel_size or default_pixel_size(grid)
    model_args = dict(levels=vq_levels(pixel_size, grid), channels=args.vq_channels, codes=args.vq_codes, code_dim=args.code_dim)
    perceptual = DinoPerceptual(encoder, args.perceptual_layer).to(device) if args.perceptual > 0 else None
    disc = patch_discriminator(args.disc_layers).to(device) if args.disc_weight > 0 else None
    return VQModel(**model_args).to(device), model_args, pixel_size, dict(perceptual=perceptual, disc=disc)


def build_maskgit(args, grid, digit_vocab, device):
    """Stage maskgit: the frozen VQ (its codes are the targets) and a fresh MaskGIT over both token kinds. The VQ is
    OUT/vq.pt, or with --vq a pretrained one (MAGE's VQGAN, as the paper; LlamaGen's VQ-16): no --stage vq needed."""
    vq, vq_ck = load_vq(args.vq or os.path.join(args.out, "vq.pt"), device, grid=grid, pixel_size=args.pixel_size if args.vq else None)
    size = model_size(args)
    model_args = dict(digit_vocab=digit_vocab, vq_codes=vq_ck["model_args"]["codes"], length=grid[0] * grid[1], **size)
    # a pretrained VQ lives outside OUT: decoder.pt records where, so sample.py renders through the same one
    parts = dict(vq=vq, vq_fingerprint=vq_ck.get("fingerprint"), vq_path=vq_ck.get("path") if args.vq else None)
    return MaskGIT(**model_args).to(device), model_args, vq_ck["pixel_size"], parts


def build_direct(args, grid, train_tok, device):
    """Stage direct: the codebook's centroids as frozen input embeddings, a fresh transformer, the optional perceptual loss."""
    cb = load_codebook(args.out, train_tok, "train")
    pixel_size = args.pixel_size or default_pixel_size(grid)
    vq_levels(pixel_size, grid)  # the same rule as the VQ: a power-of-two multiple of the grid
    size = model_size(args)
    model_args = dict(vocab=len(cb["centroids"]), dim=cb["centroids"].shape[1], grid=grid, patch=pixel_size // grid[0], **size)
    model = DirectDecoder(**model_args)
    model.centroids.copy_(cb["centroids"])
    perceptual = DinoPerceptual(train_tok["encoder"], args.perceptual_layer).to(device) if args.perceptual > 0 else None
    disc = patch_discriminator(args.disc_layers).to(device) if args.disc_weight > 0 else None
    return model.to(device), model_args, pixel_size, dict(perceptual=perceptual, disc=disc, scale=float(cb["centroids"].std()))


def direct_loss(model, raw, x, digit, gen, args, parts, rank, world, step):
    """Pixel loss (+ perceptual, + adversarial) of the picture painted from the DiGIT tokens, with the training
    augmentations drawn for the whole global batch (this rank uses its slice): Gaussian noise of std ~ U(0,
    --feature-noise) x the centroids' std on the embeddings, and --token-corruption of the ids replaced by random
    ids. Returns the loss and the picture (for the discriminator's step)."""
    B, L = args.batch_size, digit.shape[1]
    sigma = torch.rand(B, 1, 1, generator=gen) * args.feature_noise * parts["scale"]
    noise = torch.randn(B, L, raw.centroids.shape[1], generator=gen) * sigma
    corrupt = torch.rand(B, L, generator=gen) < args.token_corruption
    random_ids = torch.randint(raw.centroids.shape[0], (B, L), generator=gen)
    mine = slice(rank * len(x), (rank + 1) * len(x))
    if digit.is_floating_point():  # continuous features (--direct-input features): noise, no id corruption
        emb = digit
    else:
        emb = raw.embed(torch.where(corrupt[mine].to(x.device), random_ids[mine].to(x.device), digit))
    rec = model(emb=emb + noise[mine].to(x.device)).float()
    loss = F.l1_loss(rec, x) if args.pixel_loss == "l1" else F.mse_loss(rec, x)
    if parts["perceptual"] is not None:
        loss = loss + args.perceptual * parts["perceptual"](rec, x)
    return loss + adversarial_term(loss, rec, raw.head.weight, args, parts, step), rec


def vq_loss(model, raw, x, args, parts, usage, step):
    """Reconstruction (+ perceptual) + codebook + commitment loss (+ the adversarial term from --disc-start on);
    counts the codes used (for restarts). Returns the loss, the latents and the reconstructions."""
    rec, ids, cb_loss, commit_loss, z = model(x)
    rec = rec.float()
    nll = F.mse_loss(rec, x)
    if parts["perceptual"] is not None:
        nll = nll + args.perceptual * parts["perceptual"](rec, x)
    loss = nll + cb_loss + args.commit * commit_loss + adversarial_term(nll, rec, raw.decoder[-1].weight, args, parts, step)
    usage.index_add_(0, ids.flatten(), torch.ones(ids.numel(), device=usage.device))
    return loss, z, rec


def maskgit_loss(model, mask_id, vq, x, digit, gen, batch_size, rank, world):
    """Cross-entropy on the masked VQ tokens, given the DiGIT tokens and the unmasked VQ tokens (MaskGIT)."""
    with torch.no_grad():
        target = vq_encode(vq, x)
    masks = random_mask(batch_size, target.shape[1], gen)  # the global batch's masks; ours is a slice
    mask = masks[rank * len(x): (rank + 1) * len(x)].to(x.device)
    logits = model(digit, torch.where(mask, torch.full_like(target, mask_id), target))
    # mean over the masked tokens of the whole global batch (x world: DDP averages the ranks' gradients)
    return F.cross_entropy(logits[mask].float(), target[mask], reduction="sum") * world / masks.sum()


def main(argv=None):
    args = get_args(argv)
    rank, world, device = init_distributed(args.device, args.dist_timeout)
    prepare_out(args.out)
    dtype = autocast_dtype(args.precision, device)
    torch.manual_seed(args.seed)
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} is not divisible by {world} ranks")

    # -- the DiGIT tokens, and the model this stage trains (the VQ, or the MaskGIT with its frozen VQ)
    train_tok, val_tok = load_tokens(args.out, "train"), load_tokens(args.out, "val")
    check_tokens(train_tok, val_tok, args.out)
    grid = tuple(train_tok["grid"])
    if args.stage == "vq":
        model, model_args, pixel_size, parts = build_vq(args, grid, train_tok["encoder"], device)
        ckpt_path = os.path.join(args.out, "vq.pt")
        refuse_overwrite(ckpt_path, args)
    elif args.stage == "maskgit":
        model, model_args, pixel_size, parts = build_maskgit(args, grid, train_tok["vocab_size"], device)
        ckpt_path = os.path.join(args.out, "decoder.pt")
        refuse_overwrite(ckpt_path, args)
    else:
        model, model_args, pixel_size, parts = build_direct(args, grid, train_tok, device)
        ckpt_path = os.path.join(args.out, "direct.pt" if args.direct_input == "tokens" else "direct_features.pt")
        refuse_overwrite(ckpt_path, args)

    # -- the images behind the token files, at the VQ's pixel size (decoded once into memory when small)
    train = ImagesWithTokens(train_tok, pixel_size).preload(args.workers, args.preload_gb, "train")
    val = ImagesWithTokens(val_tok, pixel_size).preload(args.workers, args.preload_gb, "val")
    if args.stage == "direct" and args.direct_input == "features":  # the upper bound: items carry features, not ids
        for ds, tok in ((train, train_tok), (val, val_tok)):
            ds.tok = dict(tok, tokens=patch_features(tok, device, dtype))

    # -- optimizer, fresh or restored (--resume); DDP averages the ranks' gradients
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99 if args.stage == "vq" else 0.95),
                                  weight_decay=0.0 if args.stage == "vq" else 0.05)
    disc = parts.get("disc")  # --disc-weight: the PatchGAN and its own optimizer (taming's Adam betas)
    disc_opt = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9)) if disc is not None else None
    step, history, disc_history = 0, [], []
    usage = torch.zeros(args.vq_codes, device=device)  # VQ code use since the last restart of dead codes
    if args.resume:
        ck = restore(ckpt_path, model, optimizer, model_args, device)
        if disc is not None:
            if "disc" not in ck:
                fail(f"--resume: {ckpt_path} was trained without --disc-weight; give the same settings")
            disc.load_state_dict(ck["disc"])
            disc_opt.load_state_dict(ck["disc_optimizer"])
            disc_history = ck["disc_history"]
        check_same("codebooks", ckpt_path, ck.get("tokens"), f"{args.out}/tokens_train.pt", train_tok.get("codebook"))
        check_same("VQs", ckpt_path, ck.get("vq"), args.vq or f"{args.out}/vq.pt", parts.get("vq_fingerprint"))
        step, history = ck["step"], ck["history"]
        if "usage" in ck and rank == 0:  # the whole batch's counts; without them a resumed VQ would restart other codes
            usage.copy_(ck["usage"])
    raw, disc_ddp = model, disc
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if disc is not None:
            disc_ddp = DDP(disc, device_ids=[device.index] if device.type == "cuda" else None)
    if rank == 0:
        n = sum(p.numel() for p in raw.parameters())
        print(f"stage {args.stage}: {n / 1e6:.2f}M parameters, {pixel_size}px images, DiGIT grid {grid[0]}x{grid[1]}, "
              f"{world} process(es) on {device} in {'bf16' if dtype else 'fp32'}")

    def checkpoint(metrics, usage):  # with what the tokens and the pixels were, so sample.py can check the models fit together
        check_weights_finite(raw, ckpt_path)
        extra = dict(pixel_size=pixel_size, grid=grid, digit_vocab=train_tok["vocab_size"], encoder=train_tok["encoder"],
                     layer=train_tok["layer"], image_size=train_tok["image_size"], metrics=metrics, usage=usage.cpu(),
                     tokens=train_tok.get("codebook"), vq=parts.get("vq_fingerprint"), vq_path=parts.get("vq_path"),
                     fingerprint=new_fingerprint())
        if disc is not None:
            extra.update(disc=disc.state_dict(), disc_optimizer=disc_opt.state_dict(), disc_history=disc_history)
        save_atomic(dict(model=raw.state_dict(), model_args=model_args, optimizer=optimizer.state_dict(), step=step,
                         config=vars(args), history=history, rng=rng_state(device), **extra), ckpt_path)

    # -- the training loop: global batches by step (StepSampler), each rank loads its slice
    loader = DataLoader(train, batch_size=args.batch_size // world, num_workers=0 if train.cached is not None else args.workers,
                        sampler=StepSampler(len(train), args.batch_size, args.seed, step, rank, world))
    bar = tqdm(total=args.max_steps, initial=step, desc=f"train {args.stage}", unit="step", disable=rank != 0, dynamic_ncols=True)
    metrics = {}
    for x, digit, _ in loader:
        if step >= args.max_steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        x, digit = to_unit(x.to(device)), digit.to(device)
        # the step's random draws (masks, code restarts) come from the step, not the rank: any world size, same run
        gen = seeded(args.seed, step)
        with autocast(device, dtype):
            if args.stage == "vq":
                loss, z, rec = vq_loss(model, raw, x, args, parts, usage, step)
            elif args.stage == "maskgit":
                loss = maskgit_loss(model, raw.mask_id, parts["vq"], x, digit, gen, args.batch_size, rank, world)
            else:
                loss, rec = direct_loss(model, raw, x, digit, gen, args, parts, rank, world, step)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        history.append(float(all_reduce(loss.detach().clone())) / world)
        stop_if_not_finite(step, ckpt_path, loss=history[-1], grad_norm=float(grad_norm))  # before the update
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if disc is not None and step >= args.disc_start:  # then the discriminator, on this batch (taming's alternation)
            with autocast(device, dtype):
                d_loss = disc_loss(disc_ddp, x, rec)
            d_loss.backward()
            disc_opt.step()
            disc_opt.zero_grad(set_to_none=True)
            disc_history.append(float(all_reduce(d_loss.detach().clone())) / world)
        step += 1
        if args.stage == "vq" and step % args.restart_interval == 0:  # codes nobody used move onto live encoder outputs
            restart_dead_codes(raw, usage, z.detach(), gen)
            usage.zero_()
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]:.4f}")

        # evaluation on val images (rank 0) and checkpoints
        if rank == 0 and (step % args.eval_interval == 0 or step == args.max_steps):
            if args.stage == "vq":
                metrics = evaluate_vq(raw, val, args, device, dtype)
                bar.write(f"step {step}: val PSNR {metrics['psnr']:.2f} dB, codes used {metrics['codes_used']}/{args.vq_codes}, "
                          f"perplexity {metrics['perplexity']:.0f}")
            elif args.stage == "maskgit":
                png = os.path.join(args.out, "decoder_val.png")
                metrics = evaluate_maskgit(raw, parts["vq"], val, grid, args=args, device=device, dtype=dtype, png=png)
                bar.write(f"step {step}: val VQ-token accuracy {metrics['vq_token_acc']:.3f}, PSNR from DiGIT tokens "
                          f"{metrics['psnr']:.2f} dB -> {png}")
            else:
                png = ckpt_path.replace(".pt", "_val.png")  # direct_val.png, or direct_features_val.png for the upper bound
                metrics = evaluate_direct(raw, val, args, device, dtype, png=png)
                bar.write(f"step {step}: val PSNR painted from DiGIT tokens {metrics['psnr']:.2f} dB -> {png}")
        if step % args.ckpt_interval == 0 or step == args.max_steps:
            counts = all_reduce(usage.clone())  # every rank's code use since the last restart (a collective: all ranks)
            if rank == 0:
                checkpoint(metrics, counts)
    bar.close()
    if rank == 0:
        print(f"done at step {step}: {ckpt_path} {metrics}")
        if args.stage == "vq":  # the baseline tokenizer's token files, from the weights just saved
            fingerprint = load_artifact(ckpt_path, "the checkpoint this run saved").get("fingerprint")
            for split, images, tok in (("train", train, train_tok), ("val", val, val_tok)):
                write_vq_tokens(raw, images, tok, split, fingerprint, pixel_size, args.out, device)
    finish_distributed()
    return metrics


@torch.no_grad()
def write_vq_tokens(vq, images, tok, split, fingerprint, pixel_size, out, device):
    """The VQ's codes of the images behind a DiGIT token file (ImagesWithTokens), as a token file of the same
    contract and rows (labels, classes, data) with tokenizer = "vq": the tokens of the paper's VQ baseline,
    for the same GPT (train_gpt.py --tokenizer vq). fp32, so the ids do not depend on the machine's precision."""
    vq.eval()
    ids = torch.cat([vq_encode(vq, to_unit(x.to(device))).cpu() for x, _, _ in
                     tqdm(DataLoader(images, batch_size=64), desc=f"VQ tokens of {split}", leave=False)])
    vq.train()
    codes = vq.num_codes
    path = token_path(out, split, "vq")
    save_atomic(dict(tokens=ids.to(torch.int16 if codes <= 32767 else torch.int32), grid=tok["grid"], vocab_size=codes,
                     labels=tok.get("labels"), classes=tok["classes"], data=tok["data"], tokenizer="vq",
                     encoder=None, layer=None, image_size=pixel_size,  # the tokenizer's input: pixels, no encoder
                     codebook=fingerprint, digit_tokens=tok.get("codebook")), path)
    print(f"VQ tokens [{len(ids)}, {ids.shape[1]}] of the {split} images -> {path}")


def restart_dead_codes(vq, usage, z, gen):
    """Codes no encoder output picked since the last restart move onto random current encoder outputs
    (those of the whole global batch, so every rank restarts the same codes to the same vectors)."""
    if dist.is_initialized():
        dist.all_reduce(usage)
        zs = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(zs, z)
        z = torch.cat(zs)  # rank order = the order of the global batch
    dead = torch.nonzero(usage == 0).flatten()
    if len(dead):
        pick = torch.randint(len(z), (len(dead),), generator=gen).to(z.device)
        with torch.no_grad():
            vq.codebook.weight[dead] = z[pick].to(vq.codebook.weight.dtype)


if __name__ == "__main__":
    main()
