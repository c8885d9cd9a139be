"""Shared fixtures: a tiny ImageFolder with a corrupt file, and a helper to run a script as a user would."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_script(*args, nproc=None, check=True, env=None):
    """Run a project script in a fresh process (optionally under torchrun with gloo, with extra environment
    variables env); return the CompletedProcess."""
    launcher = [sys.executable] if nproc is None else [sys.executable, "-m", "torch.distributed.run",
                                                       "--standalone", "--nproc_per_node", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    p = subprocess.run(launcher + [os.path.join(ROOT, args[0]), *map(str, args[1:])], capture_output=True,
                       text=True, env=env, cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def make_image_folder(root, n_train=12, n_val=4, size=40, seed=0, corrupt=True):
    """Two classes of synthetic pictures (bright disc / dark bars), different sizes, one corrupt file in
    train."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(["bars", "disc"]):
            d = os.path.join(root, split, name)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                h, w = size + int(rng.integers(0, 12)), size + int(rng.integers(0, 12))
                yy, xx = np.mgrid[:h, :w]
                if c:
                    img = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 3) ** 2) * 200
                else:
                    img = ((xx // 5) % 2) * 180
                img = np.clip(img[..., None] + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(d, f"{i:03d}.png"))
    if corrupt:
        with open(os.path.join(root, "train", "disc", "999_corrupt.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("imgs")))


def make_token_files(out, n_train=64, n_val=16, grid=(4, 4), vocab=32, n_classes=3, seed=0):
    """Token files in the docs/FILES.md format with learnable structure (each class has its own pattern)."""
    import torch
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(vocab, (n_classes, grid[0] * grid[1]), generator=g)
    for split, n in (("train", n_train), ("val", n_val)):
        labels = torch.arange(n) % n_classes
        tokens = patterns[labels].clone()
        noise = torch.rand(tokens.shape, generator=g) < 0.1
        tokens[noise] = torch.randint(vocab, (int(noise.sum()),), generator=g)
        torch.save(dict(tokens=tokens.to(torch.int16), grid=grid, vocab_size=vocab, labels=labels,
                        classes=[f"c{i}" for i in range(n_classes)],
                        data=dict(name="synthetic", root=None, split=split, index=torch.arange(n)),
                        skipped=[],
                        encoder="dinov2_vits14_offline", layer=9, image_size=14 * grid[0]),
                   os.path.join(out, f"tokens_{split}.pt"))
    return out
