"""
The pixel tokenizers that stage 2 renders through (paper Sec. 3.3): images <-> a grid of VQ code ids.

Three kinds, one interface (`vq_encode`, `vq_decode`, `load_vq`):
  VQModel     ours, small, trained by `train_vq.py` (vq.pt); L2-normalised codes.
  MageVQGAN   MAGE's VQGAN (github LTH14/mage, `vqgan_jax_strongaug.ckpt`), the one the paper's stage 2
              uses: 1,024 codes of 256 dims, 16x16 latents at 256 px, images in [0, 1].
  LlamaGenVQ  LlamaGen's VQ-16 (github FoundationVision/LlamaGen, `vq_ds16_c2i.pt`): 16,384 codes of
              8 dims, L2-normalised, 16x16 latents at 256 px, images in [-1, 1].

The two pretrained ones are rebuilt here module for module, so their published state_dicts load with
strict key and shape checks; every size (channels, levels, codes) is read from the checkpoint's shapes.
tests/make_vq_fixtures.py ran the official modules on fixed weights; tests/test_vqgan.py checks that
these give the same ids and pixels. Nothing here imports a stage.

    from vqgan import load_vq, vq_encode, vq_decode
    vq, info = load_vq("vqgan_jax_strongaug.ckpt", "cpu", grid=(16, 16))
    ids = vq_encode(vq, images)                      # images [B, 3, 256, 256] in [-1, 1] -> [B, 256]
    pixels = vq_decode(vq, ids, info["grid"])        # -> [B, 3, 256, 256] in [-1, 1]
"""
import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from artifacts import lineage, load_artifact, load_model, tensor_fingerprint
from common import fail


def vq_encode(vq, images):
    """Images [B, 3, S, S] in [-1, 1] -> VQ token ids [B, h*w] (raster order), for any of the three kinds."""
    return vq.encode_latents(images)[1]


def vq_decode(vq, ids, grid):
    """VQ token ids [B, h*w] -> images [B, 3, S, S] in [-1, 1]."""
    return vq.decode(ids, grid).clamp(-1, 1)


def nearest_code(z, codes):
    """Rows of z [N, D] -> the index of the nearest code (squared Euclidean distance, as taming and LlamaGen
    compute it: |z|^2 + |e|^2 - 2 z.e, then argmin; the same formula gives the same ties). Always in fp32,
    also under bf16 autocast: bf16 rounding would flip near-ties, i.e. noisy targets for stage 2."""
    with torch.autocast(z.device.type, enabled=False):
        z, codes = z.float(), codes.float()
        d = z.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * z @ codes.t()
        return d.argmin(1)


# ----------------------------------------------------------------------------- ours (vq.pt)

class ResBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(min(32, c_in // 4), c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.GroupNorm(min(32, c_out // 4), c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.body(x)


class VQModel(nn.Module):
    """Conv encoder (levels x stride-2) -> L2-normalised vector quantizer -> conv decoder (VQGAN-like, small).

    Codes and encoder outputs live on the unit sphere (as ViT-VQGAN, Yu et al. 2022): the lookup is a
    cosine similarity and every code stays in use far more easily than with raw Euclidean codes."""

    def __init__(self, levels, channels=64, codes=1024, code_dim=32):
        super().__init__()
        chs = [channels * m for m in (1, 2, 2, 4, 4)[: levels + 1]]
        enc = [nn.Conv2d(3, chs[0], 3, padding=1)]
        for i in range(levels):
            enc += [ResBlock(chs[i], chs[i + 1]), nn.Conv2d(chs[i + 1], chs[i + 1], 4, stride=2, padding=1)]
        enc += [ResBlock(chs[-1], chs[-1]), nn.GroupNorm(32 if chs[-1] >= 128 else 8, chs[-1]), nn.SiLU(),
                nn.Conv2d(chs[-1], code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.codebook = nn.Embedding(codes, code_dim)
        dec = [nn.Conv2d(code_dim, chs[-1], 3, padding=1), ResBlock(chs[-1], chs[-1])]
        for i in reversed(range(levels)):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(chs[i + 1], chs[i + 1], 3, padding=1), ResBlock(chs[i + 1], chs[i])]
        dec += [nn.GroupNorm(8, chs[0]), nn.SiLU(), nn.Conv2d(chs[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.num_codes, self.factor = codes, 2 ** levels

    def codes(self):
        return F.normalize(self.codebook.weight, dim=1)

    def quantize(self, z):
        """z [B, D, h, w] -> (quantized with straight-through gradient, ids [B, h*w], codebook loss,
        commitment loss, the unit-norm latents [B*h*w, D])."""
        B, D, h, w = z.shape
        z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, D).float(), dim=1)
        e = self.codes().float()
        with torch.autocast(z.device.type, enabled=False):
            ids = (z @ e.t()).argmax(1)  # nearest on the sphere = largest cosine, in fp32 (see nearest_code)
        q = e[ids]
        codebook_loss, commit_loss = F.mse_loss(q, z.detach()), F.mse_loss(z, q.detach())
        q = z + (q - z).detach()  # straight-through: the decoder's gradient flows to the encoder unchanged
        return q.view(B, h, w, D).permute(0, 3, 1, 2), ids.view(B, h * w), codebook_loss, commit_loss, z

    def forward(self, x):
        q, ids, cb, cm, z = self.quantize(self.encoder(x))
        return self.decoder(q), ids, cb, cm, z

    def encode_latents(self, x):
        """[-1, 1] images -> (the latents the codes were picked for [B*h*w, D], ids [B, h*w])."""
        _, ids, _, _, z = self.quantize(self.encoder(x))
        return z, ids

    def decode(self, ids, grid):
        return self.decoder(self.codes()[ids].view(len(ids), *grid, -1).permute(0, 3, 1, 2))


# ----------------------------------------------------------------------- the taming family (MAGE, LlamaGen)
# Both descend from taming-transformers (Esser et al. 2021) but differ in details that change every output,
# so each flag below is one of those differences, read off their code:
#   MAGE (a port of the JAX MaskGIT VQGAN): no attention anywhere, no biases in the residual convs, the
#     1x1 shortcut applied to the block's *output* (x = nin_shortcut(h); return x + h), average-pool
#     downsampling, 1x1 encoder output, num_res_blocks blocks per decoder level, no quant_conv.
#   LlamaGen: attention after every block of the lowest level and in the middle, biases everywhere, the
#     usual shortcut on the input, strided-conv downsampling, 3x3 encoder output, num_res_blocks + 1 blocks
#     per decoder level, 1x1 quant_conv / post_quant_conv around an L2-normalised codebook.

def group_norm(c):
    return nn.GroupNorm(32, c, eps=1e-6)


class TamingResBlock(nn.Module):
    def __init__(self, c_in, c_out, bias, mage_shortcut):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        # MAGE's shortcut maps the output (c_out -> c_out); LlamaGen's the input (c_in -> c_out)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_out if mage_shortcut else c_in, c_out, 1, bias=bias)
        self.mage_shortcut = mage_shortcut

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(h if self.mage_shortcut else x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions (1x1 convs for q, k, v and the output)."""

    def __init__(self, c):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2) for m in (self.q, self.k, self.v))  # [B, C, HW]
        w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * C ** -0.5, dim=2)  # [B, HW(query), HW(key)]
        return x + self.proj_out(torch.bmm(v, w.transpose(1, 2)).view(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c, with_conv):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        if hasattr(self, "conv"):
            return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding
        return F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def holder(**modules):
    """An empty nn.Module holding named children: the official code's `nn.Module()` containers, so keys
    match."""
    m = nn.Module()
    for k, v in modules.items():
        setattr(m, k, v)
    return m


class MageVQGAN(nn.Module):
    """MAGE's VQGAN (taming/models/vqgan.py + diffusionmodules/model.py + VectorQuantizer2 of LTH14/mage)."""

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, codes=1024):
        super().__init__()
        block = lambda a, b: TamingResBlock(a, b, bias=False, mage_shortcut=True)
        chs, n = [ch * m for m in ch_mult], len(ch_mult)
        down, c = nn.ModuleList(), ch
        for i in range(n):
            blocks = nn.ModuleList([block(c if j == 0 else chs[i], chs[i]) for j in range(num_res_blocks)])
            c = chs[i]
            down.append(holder(block=blocks, **({"downsample": Downsample(c, False)} if i < n - 1 else {})))
        self.encoder = holder(conv_in=nn.Conv2d(3, ch, 3, padding=1, bias=False), down=down,
                              mid=holder(block_1=block(c, c), block_2=block(c, c)),
                              norm_out=group_norm(c), conv_out=nn.Conv2d(c, z_channels, 1))
        up = [None] * n
        for i in reversed(range(n)):
            blocks = nn.ModuleList([block(c if j == 0 else chs[i], chs[i]) for j in range(num_res_blocks)])
            c = chs[i]
            up[i] = holder(block=blocks, **({"upsample": Upsample(c)} if i > 0 else {}))
        self.decoder = holder(conv_in=nn.Conv2d(z_channels, chs[-1], 3, padding=1),
                              mid=holder(block_1=block(chs[-1], chs[-1]), block_2=block(chs[-1], chs[-1])),
                              up=nn.ModuleList(up), norm_out=group_norm(c),
                              conv_out=nn.Conv2d(c, 3, 3, padding=1))
        self.quantize = holder(embedding=nn.Embedding(codes, z_channels))
        self.num_codes, self.factor = codes, 2 ** (n - 1)

    def encode_latents(self, x):
        e = self.encoder
        h = e.conv_in((x + 1) / 2)  # MAGE feeds its VQGAN images in [0, 1]
        for level in e.down:
            for b in level.block:
                h = b(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = e.conv_out(F.silu(e.norm_out(e.mid.block_2(e.mid.block_1(h)))))
        B, D, H, W = h.shape
        z = h.permute(0, 2, 3, 1).reshape(-1, D)
        return z, nearest_code(z, self.quantize.embedding.weight).view(B, H * W)

    def decode(self, ids, grid):
        d = self.decoder
        h = d.conv_in(self.quantize.embedding.weight[ids].view(len(ids), *grid, -1).permute(0, 3, 1, 2))
        h = d.mid.block_2(d.mid.block_1(h))
        for level in reversed(d.up):
            for b in level.block:
                h = b(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return d.conv_out(F.silu(d.norm_out(h))) * 2 - 1  # its [0, 1] -> our [-1, 1]


class LlamaGenVQ(nn.Module):
    """LlamaGen's VQ (tokenizer/tokenizer_image/vq_model.py of FoundationVision/LlamaGen; VQ_16 at full
    size)."""

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, codes=16384,
                 code_dim=8):
        super().__init__()
        block = lambda a, b: TamingResBlock(a, b, bias=True, mage_shortcut=False)
        chs, n = [ch * m for m in ch_mult], len(ch_mult)
        levels, c = nn.ModuleList(), ch
        for i in range(n):
            res, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                res.append(block(c, chs[i]))
                c = chs[i]
                if i == n - 1:
                    attn.append(AttnBlock(c))
            down = {"downsample": Downsample(c, True)} if i < n - 1 else {}
            levels.append(holder(res=res, attn=attn, **down))
        self.encoder = holder(conv_in=nn.Conv2d(3, ch, 3, padding=1), conv_blocks=levels,
                              mid=nn.ModuleList([block(c, c), AttnBlock(c), block(c, c)]),
                              norm_out=group_norm(c), conv_out=nn.Conv2d(c, z_channels, 3, padding=1))
        levels = nn.ModuleList()
        for i in reversed(range(n)):
            res, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                res.append(block(c, chs[i]))
                c = chs[i]
                if i == n - 1:
                    attn.append(AttnBlock(c))
            levels.append(holder(res=res, attn=attn, **({"upsample": Upsample(c)} if i > 0 else {})))
        self.decoder = holder(conv_in=nn.Conv2d(z_channels, chs[-1], 3, padding=1),
                              mid=nn.ModuleList([block(chs[-1], chs[-1]), AttnBlock(chs[-1]),
                                                 block(chs[-1], chs[-1])]),
                              conv_blocks=levels, norm_out=group_norm(c),
                              conv_out=nn.Conv2d(c, 3, 3, padding=1))
        self.quant_conv = nn.Conv2d(z_channels, code_dim, 1)
        self.post_quant_conv = nn.Conv2d(code_dim, z_channels, 1)
        self.quantize = holder(embedding=nn.Embedding(codes, code_dim))
        self.num_codes, self.factor = codes, 2 ** (n - 1)

    @staticmethod
    def run_levels(levels, h):
        for level in levels:
            for i, b in enumerate(level.res):
                h = b(h)
                if len(level.attn):
                    h = level.attn[i](h)
            for resample in ("downsample", "upsample"):
                if hasattr(level, resample):
                    h = getattr(level, resample)(h)
        return h

    def codes(self):
        return F.normalize(self.quantize.embedding.weight, dim=-1)

    def encode_latents(self, x):
        e = self.encoder
        h = self.run_levels(e.conv_blocks, e.conv_in(x))  # LlamaGen's images are in [-1, 1], as ours
        for m in e.mid:
            h = m(h)
        h = self.quant_conv(e.conv_out(F.silu(e.norm_out(h))))
        B, D, H, W = h.shape
        z = F.normalize(h.permute(0, 2, 3, 1).reshape(-1, D), dim=-1)
        return z, nearest_code(z, self.codes()).view(B, H * W)

    def decode(self, ids, grid):
        d = self.decoder
        h = d.conv_in(self.post_quant_conv(self.codes()[ids].view(len(ids), *grid, -1).permute(0, 3, 1, 2)))
        for m in d.mid:
            h = m(h)
        return d.conv_out(F.silu(d.norm_out(self.run_levels(d.conv_blocks, h))))


# ----------------------------------------------------------------------------- one loader for the three kinds

def count(sd, prefix):
    """How many numbered children prefix.0, prefix.1, ... the state_dict has."""
    n = 0
    while any(k.startswith(f"{prefix}.{n}.") for k in sd):
        n += 1
    return n


def mage_args(sd):
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = count(sd, "encoder.down")
    return dict(ch=ch, num_res_blocks=count(sd, "encoder.down.0.block"),
                z_channels=sd["encoder.conv_out.weight"].shape[0],
                ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch
                              for i in range(levels)),
                codes=sd["quantize.embedding.weight"].shape[0])


def llamagen_args(sd):
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = count(sd, "encoder.conv_blocks")
    codes, code_dim = sd["quantize.embedding.weight"].shape
    return dict(ch=ch, num_res_blocks=count(sd, "encoder.conv_blocks.0.res"),
                z_channels=sd["encoder.conv_out.weight"].shape[0],
                ch_mult=tuple(sd[f"encoder.conv_blocks.{i}.res.0.conv2.weight"].shape[0] // ch
                              for i in range(levels)),
                codes=codes, code_dim=code_dim)


def pretrained_state_dict(ck):
    """The weights inside a published checkpoint: MAGE's {"state_dict": ...}, LlamaGen's {"model"/"ema":
    ...}."""
    # LlamaGen's own loaders prefer ema, then model, then state_dict
    for key in ("ema", "model", "state_dict"):
        if isinstance(ck, dict) and isinstance(ck.get(key), dict):
            return ck[key]
    return ck


def read_pretrained(path, hint):
    """torch.load(weights_only=True) that also allows argparse.Namespace (LlamaGen's training checkpoints keep
    their args in one); nothing else beyond plain data."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_artifact(path, hint, mmap=True)


def load_vq(path, device, grid=None, pixel_size=None):
    """(frozen pixel tokenizer, info) from vq.pt, MAGE's VQGAN checkpoint or a LlamaGen VQ checkpoint, told
    apart by their keys. info has kind, grid, pixel_size, model_args["codes"], a fingerprint and the lineage
    record. grid (the DiGIT grid) and pixel_size, when given, are checked: a pretrained VQ's latent grid is
    pixel_size / its downsampling. Any malformed file is one line naming it."""
    hint = "run train_vq.py first, or give a pretrained VQ (MAGE's VQGAN, LlamaGen's VQ-16)"
    ck = read_pretrained(path, hint)
    if isinstance(ck, dict) and "model_args" in ck:  # ours
        vq, info = load_model(path, VQModel, hint, device)
        info = dict(info, kind="ours", lineage=lineage(info))
        if grid is not None and tuple(info["grid"]) != tuple(grid):
            fail(f"{path} has a {tuple(info['grid'])} latent grid but the DiGIT tokens are {tuple(grid)}: "
                 "retrain the VQ")
        return vq, info
    sd = pretrained_state_dict(ck)
    keys = list(sd)[:6] if isinstance(sd, dict) else type(sd).__name__
    if not isinstance(sd,
                      dict) or "quantize.embedding.weight" not in sd or "encoder.conv_in.weight" not in sd:
        fail(f"{path} is none of vq.pt, MAGE's VQGAN, LlamaGen's VQ (keys found: {keys})")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        fail(f"{path} is malformed: {bad[0]} is a {type(sd[bad[0]]).__name__}, not a tensor")
    mage = "encoder.down.0.block.0.conv1.weight" in sd and "quant_conv.weight" not in sd
    if mage and "encoder.mid.attn_1.q.weight" not in sd:
        kind, build = "mage", lambda: MageVQGAN(**mage_args(sd))
    elif "encoder.conv_blocks.0.res.0.conv1.weight" in sd and "quant_conv.weight" in sd:
        kind, build = "llamagen", lambda: LlamaGenVQ(**llamagen_args(sd))
        sd = {k: v for k, v in sd.items() if k != "quantize.codebook_used"}  # a training-time usage log
    else:
        fail(f"{path} looks like a taming VQGAN but not MAGE's nor LlamaGen's layout (keys found: {keys})")
    try:
        model = build()
        model.load_state_dict(sd)
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        fail(f"{path}: a {kind} layout that is incomplete or malformed ({type(e).__name__}: {str(e)[:120]})")
    except RuntimeError as e:
        fail(f"{path}: a {kind} layout whose weights do not fit it ({str(e).splitlines()[-1].strip()[:160]})")
    nonfinite = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        fail(f"{path} is malformed: {nonfinite[0]} holds NaN/inf")
    side = pixel_size or (grid[0] * model.factor if grid else 256)
    if side % model.factor:
        fail(f"--pixel-size {side} is not a multiple of {path}'s downsampling ({model.factor}x)")
    latent = (side // model.factor, side // model.factor)
    if grid is not None and latent != tuple(grid):
        fail(f"{path} ({kind}, downsamples {model.factor}x) gives a {latent[0]}x{latent[1]} latent grid at "
             f"{side} px but the DiGIT grid is {grid[0]}x{grid[1]}: use --pixel-size "
             f"{grid[0] * model.factor}")
    fingerprint = tensor_fingerprint(model.quantize.embedding.weight)
    info = dict(kind=kind, grid=latent, pixel_size=side, model_args=dict(codes=model.num_codes),
                path=os.path.abspath(path), fingerprint=fingerprint,
                lineage=dict(vq=fingerprint, vq_codes=model.num_codes, grid=latent))
    return model.to(device).eval().requires_grad_(False), info
