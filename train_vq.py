"""
A small pixel VQ tokenizer for stage 2 (paper Sec. 3.3), trained here because the demo has no
pretrained one; at ImageNet scale the paper uses MAGE's VQGAN instead (train_decoder.py --vq FILE).

DiGIT tokens say *what* is in each patch, not its pixels; stage 2 predicts the codes of a pixel VQ
autoencoder from them, and the VQ's decoder paints the image. This script trains that VQ (the model is
vqgan.VQModel): a conv encoder whose latent grid equals the DiGIT grid, L2-normalised codes with a
straight-through gradient, a conv decoder. Loss: MSE + codebook + commitment terms, optionally a
DINOv2 perceptual term and a PatchGAN (VQGAN's adversarial loss, taming's adaptive weight).

When it ends it also writes the VQ's codes of the same images as vq_tokens_{train,val}.pt: the
paper's baseline tokens, on which train_gpt.py --tokenizer vq trains the same GPT (the ablation).

Run (after tokenize_kmeans.py: reads out/tokens_*.pt and the images behind them; writes out/vq.pt,
out/vq_tokens_{train,val}.pt):
    python train_vq.py
    python train_vq.py --tokens-only          # only (re)write vq_tokens_*.pt from the finished vq.pt
    torchrun --nproc_per_node 8 train_vq.py --vq-codes 8192 --batch-size 256 --max-steps 100000 \\
        --workers 8 --disc-weight 0.5 --disc-start 20000     # + PatchGAN from step 20k, as LlamaGen

--pixel-size: the side the images are made at; default 4 x the grid side for small grids (the demo:
8x8 tokens, 32 px), 256 for 16x16. --disc-weight W adds a PatchGAN (taming's NLayerDiscriminator with
--disc-layers strided convs, GroupNorm where taming has BatchNorm so that a run is the same for any
number of ranks) with a hinge loss, from --disc-start on; the generator's adversarial term is weighted
by taming's adaptive weight |grad nll| / |grad g| at the decoder's last layer (Esser et al. 2021).
"""
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from artifacts import Checkpoint, lineage, prepare_out, save_atomic
from common import (StepSampler, add_system_args, all_reduce, autocast, autocast_dtype, fail,
                    finish_distributed, init_distributed, learning_rate, nonneg_float, nonneg_int, parser,
                    positive_float, positive_int, precision_name, seeded, stop_if_not_finite)
from data import ImagesWithTokens, load_token_files, to_unit, token_path
from dinov2 import DinoPerceptual
from vqgan import VQModel, load_vq, vq_encode


def get_args(argv=None):
    p = parser(__doc__)
    a = p.add_argument_group("pixel VQ").add_argument
    a("--pixel-size", type=positive_int, default=None, help="image side (default: see the docstring)")
    a("--vq-channels", type=positive_int, default=64, help="base channel count (default: %(default)s)")
    a("--vq-codes", type=positive_int, default=1024, help="codebook size (default: %(default)s)")
    a("--code-dim", type=positive_int, default=32, help="code dimension (default: %(default)s)")
    a("--commit", type=nonneg_float, default=0.25, help="commitment loss weight (default: %(default)s)")
    a("--perceptual", type=nonneg_float, default=0.1,
      help="DINOv2 feature loss weight (default: %(default)s)")
    a("--perceptual-layer", type=positive_int, default=3, help="DINOv2 block compared (default: %(default)s)")
    a("--restart-interval", type=positive_int, default=50,
      help="steps between dead-code restarts (default: %(default)s)")
    a("--disc-weight", type=nonneg_float, default=0.0, help="PatchGAN weight, 0 = off (default: %(default)s)")
    a("--disc-start", type=nonneg_int, default=0, help="step the GAN starts at (default: %(default)s)")
    a("--disc-layers", type=positive_int, default=3,
      help="strided convs of the PatchGAN (default: %(default)s)")
    a = p.add_argument_group("optimisation").add_argument
    a("--batch-size", type=positive_int, default=32, help="global batch (default: %(default)s)")
    a("--max-steps", type=positive_int, default=2000, help="optimizer steps (default: %(default)s)")
    a("--lr", type=positive_float, default=2e-4, help="learning rate (default: %(default)s)")
    a("--warmup-steps", type=nonneg_int, default=50, help="linear warm-up steps (default: %(default)s)")
    a("--schedule", default="cosine", choices=["cosine", "constant"],
      help="after warm-up (default: %(default)s)")
    a("--min-lr", type=nonneg_float, default=None, help="end of the cosine decay (default: lr / 10)")
    a = p.add_argument_group("evaluation and checkpoints").add_argument
    a("--eval-interval", type=positive_int, default=500,
      help="steps between evaluations (default: %(default)s)")
    a("--eval-images", type=positive_int, default=256,
      help="val images per evaluation (default: %(default)s)")
    a("--ckpt-interval", type=positive_int, default=500,
      help="steps between checkpoints (default: %(default)s)")
    a("--resume", action="store_true", help="continue from OUT/vq.pt")
    a("--force", action="store_true", help="start afresh over an existing OUT/vq.pt")
    a("--tokens-only", action="store_true", help="no training: write vq_tokens_*.pt from OUT/vq.pt")
    system = add_system_args(p, "reads tokens_*.pt from, writes vq.pt and vq_tokens_*.pt to")
    system.add_argument("--workers", type=nonneg_int, default=2,
                        help="loader processes (default: %(default)s)")
    system.add_argument("--preload-gb", type=nonneg_float, default=4.0,
                        help="keep images in memory below this")
    args = p.parse_args(argv)
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    return args


def psnr(a, b):
    """Peak signal-to-noise ratio (dB) per image of two [-1, 1] batches, measured on [0, 1]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def default_pixel_size(grid):
    return 256 if grid[0] >= 16 else 4 * grid[0]  # the demo: 8x8 tokens, 32 px (MNIST digits are 28 px)


def vq_levels(pixel_size, grid):
    """How many stride-2 levels turn pixel_size pixels into the DiGIT grid (a power of two is needed)."""
    levels = math.log2(pixel_size / grid[0]) if pixel_size % grid[0] == 0 else -1
    if levels != int(levels) or levels < 1 or grid[0] != grid[1]:
        fail(f"--pixel-size {pixel_size} is not a power-of-two multiple of the DiGIT grid "
             f"{grid[0]}x{grid[1]}")
    return int(levels)


def eval_subset(val, n):
    """n val images spread evenly over the set (val sets are often sorted by class)."""
    return torch.utils.data.Subset(val, torch.linspace(0, len(val) - 1, min(n, len(val))).long().tolist())


# ---------------------------------------------------------- the GAN (VQGAN's; train_direct.py uses it too)

def patch_discriminator(layers, channels=64):
    """PatchGAN (pix2pix, Isola et al. 2017; taming's NLayerDiscriminator): strided 4x4 convs, one real/fake
    logit per image patch, so it judges texture and edges that an MSE loss leaves blurry."""
    mods, c = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)], channels
    for i in range(1, layers + 1):
        c_out = channels * min(2 ** i, 8)
        # GroupNorm where taming has BatchNorm: per-image statistics keep a run the same for any number
        # of ranks
        mods += [nn.Conv2d(c, c_out, 4, 2 if i < layers else 1, 1, bias=False), nn.GroupNorm(32, c_out),
                 nn.LeakyReLU(0.2)]
        c = c_out
    return nn.Sequential(*mods, nn.Conv2d(c, 1, 4, 1, 1))


def adversarial_term(nll, rec, last_layer, args, disc, step):
    """The generator's share of the GAN (--disc-weight, from --disc-start on): -D(rec), weighted
    adaptively."""
    if disc is None or step < args.disc_start:
        return 0.0
    disc.requires_grad_(False)  # gradients reach the generator through D, not D itself
    g_loss = -disc(rec).mean()
    disc.requires_grad_(True)
    return args.disc_weight * adaptive_weight(nll, g_loss, last_layer) * g_loss


def adaptive_weight(nll, g_loss, last_layer):
    """taming's balance of the two losses: the ratio of their gradient norms at the decoder's last layer, so
    the adversarial term never swamps reconstruction whatever the scale of either (Esser et al. 2021, Eq.
    7)."""
    g1 = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g2 = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    if dist.is_initialized():  # the whole global batch's gradients: the same weight for any number of ranks
        dist.all_reduce(g1)
        dist.all_reduce(g2)
    return (g1.norm() / (g2.norm() + 1e-4)).clamp(0, 1e4).detach()


def disc_loss(disc, x, rec):
    """Hinge loss of the discriminator on real images and (detached) reconstructions."""
    return 0.5 * (F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec.detach())).mean())


def disc_step(disc, disc_opt, x, rec, device, dtype):
    """One discriminator update on this batch (taming's alternation); returns its loss on this rank."""
    with autocast(device, dtype):
        d_loss = disc_loss(disc, x, rec)
    d_loss.backward()
    disc_opt.step()
    disc_opt.zero_grad(set_to_none=True)
    return d_loss.detach()


# ------------------------------------------------------------------- the VQ's loss, restarts, evaluation

def vq_loss(model, raw, x, args, parts, usage, step):
    """Reconstruction (+ perceptual) + codebook + commitment loss (+ the adversarial term from --disc-start);
    counts the codes used (for restarts). Returns the loss, the latents and the reconstructions."""
    rec, ids, cb_loss, commit_loss, z = model(x)
    rec = rec.float()
    nll = F.mse_loss(rec, x)
    if parts["perceptual"] is not None:
        nll = nll + args.perceptual * parts["perceptual"](rec, x)
    adv = adversarial_term(nll, rec, raw.decoder[-1].weight, args, parts["disc"], step)
    usage.index_add_(0, ids.flatten(), torch.ones(ids.numel(), device=usage.device))
    return nll + cb_loss + args.commit * commit_loss + adv, z, rec


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


@torch.no_grad()
def evaluate_vq(vq, val, args, device, dtype):
    """Val PSNR of the reconstructions and codebook usage (codes used, perplexity)."""
    vq.eval()
    psnrs, ids = [], []
    with autocast(device, dtype):
        for x, _, _ in DataLoader(eval_subset(val, args.eval_images), batch_size=64,
                                     generator=torch.Generator()):
            x = to_unit(x.to(device))
            rec, i, *_ = vq(x)
            psnrs.append(psnr(rec.float(), x))
            ids.append(i.flatten())
    vq.train()
    counts = torch.bincount(torch.cat(ids), minlength=vq.num_codes).float()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    return dict(psnr=float(torch.cat(psnrs).mean()), codes_used=int((counts > 0).sum()),
                perplexity=perplexity)


@torch.no_grad()
def write_vq_tokens(vq, vq_ck, images, tok, split, out, device):
    """The VQ's codes of the images behind a DiGIT token file (ImagesWithTokens), as a token file of the same
    contract and rows (labels, classes, data) with tokenizer "vq": the paper's VQ baseline tokens, for the
    same GPT (train_gpt.py --tokenizer vq). fp32 (nearest codes in fp32), so the ids are the machine's own."""
    vq.eval()
    loader = DataLoader(images, batch_size=64)
    ids = torch.cat([vq_encode(vq, to_unit(x.to(device))).cpu() for x, _, _ in
                     tqdm(loader, desc=f"VQ tokens of {split}", leave=False)])
    codes = vq.num_codes
    path = token_path(out, split, "vq")
    save_atomic(dict(tokens=ids.to(torch.int16 if codes <= 32767 else torch.int32), grid=tok["grid"],
                     vocab_size=codes, labels=tok.get("labels"), classes=tok["classes"], data=tok["data"],
                     tokenizer="vq", encoder=None, layer=None, image_size=vq_ck["pixel_size"],
                     lineage={**lineage(vq_ck), **lineage(tok), "tokenizer": "vq"}), path)
    print(f"VQ tokens [{len(ids)}, {ids.shape[1]}] of the {split} images -> {path}")


def write_token_files(args, device):
    """--tokens-only (and the end of training): vq_tokens_{train,val}.pt from OUT/vq.pt as saved."""
    train_tok, val_tok = load_token_files(args.out)
    vq, vq_ck = load_vq(os.path.join(args.out, "vq.pt"), device, grid=tuple(train_tok["grid"]))
    for split, tok in (("train", train_tok), ("val", val_tok)):
        write_vq_tokens(vq, vq_ck, ImagesWithTokens(tok, vq_ck["pixel_size"]), tok, split, args.out, device)


# ----------------------------------------------------------------------------- training

def main(argv=None):
    args = get_args(argv)
    rank, world, device = init_distributed(args.device, args.dist_timeout)
    prepare_out(args.out)
    if args.tokens_only:
        return write_token_files(args, device) if rank == 0 else None
    dtype = autocast_dtype(args.precision, device)
    torch.manual_seed(args.seed)
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} is not divisible by {world} ranks")

    # -- the images behind the DiGIT token files, at a size whose VQ latent grid is the DiGIT grid
    train_tok, val_tok = load_token_files(args.out)
    grid = tuple(train_tok["grid"])
    pixel_size = args.pixel_size or default_pixel_size(grid)
    train = ImagesWithTokens(train_tok, pixel_size).preload(args.workers, args.preload_gb, "train")
    val = ImagesWithTokens(val_tok, pixel_size).preload(args.workers, args.preload_gb, "val")

    # -- the VQ, its optional perceptual loss and PatchGAN, fresh or restored (--resume)
    model_args = dict(levels=vq_levels(pixel_size, grid), channels=args.vq_channels, codes=args.vq_codes,
                      code_dim=args.code_dim)
    model = VQModel(**model_args).to(device)
    perceptual = DinoPerceptual(train_tok["encoder"],
                                args.perceptual_layer).to(device) if args.perceptual else None
    disc = patch_discriminator(args.disc_layers).to(device) if args.disc_weight > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0,
                                  fused=device.type == "cuda")
    disc_opt = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9)) if disc is not None else None
    tokenizer = {k: v for k, v in lineage(train_tok).items() if k != "tokenizer"}  # the DiGIT grid it serves
    ckpt = Checkpoint(os.path.join(args.out, "vq.pt"), args, model_args,
                      dict(tokenizer, vq_codes=args.vq_codes),
                      precision_name(dtype), identity="vq", pixel_size=pixel_size, grid=grid,
                      digit_vocab=train_tok["vocab_size"])
    state = ckpt.start(device, model=model, optimizer=optimizer, disc=disc, disc_optimizer=disc_opt)
    step = state.get("step", 0)
    history, disc_history = state.get("history", []), state.get("disc_history", [])
    usage = torch.zeros(args.vq_codes, device=device)  # code use since the last restart of dead codes
    if "usage" in state and rank == 0:  # the whole batch's counts; without them a resumed run restarts others
        usage.copy_(state["usage"])
    raw, ddp_disc = model, disc
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        ddp_disc = DDP(disc, device_ids=[device.index] if device.type == "cuda" else None) if disc else None
    parts = dict(perceptual=perceptual, disc=disc)  # the generator's term goes through D itself, not its DDP
    if rank == 0:
        print(f"pixel VQ: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters, {pixel_size}px "
              f"images, grid {grid[0]}x{grid[1]}, {args.vq_codes} codes, {world} process(es) on {device} in "
              f"{precision_name(dtype)}")

    # -- the training loop: global batches by step (StepSampler), each rank loads its slice
    workers = 0 if train.cached is not None else args.workers
    sampler = StepSampler(len(train), args.batch_size, args.seed, step, rank, world)
    loader = DataLoader(train, batch_size=args.batch_size // world, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                        generator=torch.Generator())  # the global RNG: untouched
    bar = tqdm(total=args.max_steps, initial=step, desc="train VQ", unit="step", disable=rank != 0,
               dynamic_ncols=True)
    metrics = state.get("metrics", {})
    for x, _, _ in loader:
        if step >= args.max_steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        x = to_unit(x.to(device, non_blocking=True))
        with autocast(device, dtype):
            loss, z, rec = vq_loss(model, raw, x, args, parts, usage, step)
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
        if step % args.restart_interval == 0:  # codes nobody used move onto live encoder outputs
            restart_dead_codes(raw, usage, z.detach(), seeded(args.seed, step))
            usage.zero_()
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if rank == 0 and (step % args.eval_interval == 0 or step == args.max_steps):
            metrics = evaluate_vq(raw, val, args, device, dtype)
            bar.write(f"step {step}: val PSNR {metrics['psnr']:.2f} dB, codes used "
                      f"{metrics['codes_used']}/{args.vq_codes}, perplexity {metrics['perplexity']:.0f}")
        if step % args.ckpt_interval == 0 or step == args.max_steps:
            counts = all_reduce(usage.clone())  # every rank's code use since the last restart (all ranks)
            if rank == 0:
                ckpt.save(step=step, history=history, disc_history=disc_history, metrics=metrics,
                          usage=counts.cpu())
    bar.close()
    if rank == 0:
        print(f"done at step {step}: {ckpt.path} {metrics}")
        write_token_files(args, device)  # the baseline tokenizer's token files, from the weights just saved
    finish_distributed()
    return metrics


if __name__ == "__main__":
    main()
