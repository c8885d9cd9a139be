"""
Makes tests/fixtures/{mage,llamagen}_vq.pt: what the *official* code of MAGE's VQGAN and of LlamaGen's VQ
computes on fixed weights, so tests/test_vqgan.py can check vqgan.py against it offline.

Run once, with checkouts of the two repositories (the network is needed only for those, never by the tests):
    git clone https://github.com/LTH14/mage /tmp/mage                    # checked: 1becb14 (2023-03-10)
    git clone https://github.com/FoundationVision/LlamaGen /tmp/llamagen # checked: ce98ec4 (2024-06-30)
    pip install einops                                                   # MAGE's quantize.py imports it
    python tests/make_vq_fixtures.py --mage /tmp/mage --llamagen /tmp/llamagen

Each architecture is built by its own classes in a tiny configuration (MAGE: its VQModel with ch 32,
ch_mult [1, 2, 2], 2 blocks, z 16, 64 codes; LlamaGen: its VQModel with ch_mult [1, 2, 2], z 32, 64 codes
of 8 dims; ch is fixed at 128 in LlamaGen's code). The weights are not stored: `fixed_weights` draws every
tensor from one seed in sorted key order, and the test draws them again, so the fixture holds only the key
names and shapes, the seed, the codebook (set to encoder outputs of the inputs, so that the ids are varied),
two 32 px input images in [-1, 1], the official ids of those images and the official pixels decoded from
them. MAGE's VQModel subclasses pytorch_lightning.LightningModule only for training; an nn.Module stands in
for it here (inference does not touch Lightning).
"""
import argparse
import math
import os
import sys
import types

import torch
import torch.nn as nn

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
SEED = 0


def fixed_weights(shapes, seed=SEED):
    """A state_dict drawn from one seed, key by key in sorted order: conv/linear weights ~ N(0, 1/fan_in),
    norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2), LlamaGen's codebook_used log zeros."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k in sorted(shapes):
        s = tuple(shapes[k])
        if k.endswith("codebook_used"):
            sd[k] = torch.zeros(s)
        elif len(s) == 1:
            base = 1.0 if "norm" in k and k.endswith("weight") else 0.0
            sd[k] = base + 0.1 * torch.randn(s, generator=gen)
        else:
            sd[k] = torch.randn(s, generator=gen) / math.sqrt(math.prod(s[1:]))
    return sd


def codebook_from(latents, n, seed=SEED):
    """n rows of the encoder's latents [N, D] (+ a little noise): codes that the inputs' latents are near."""
    gen = torch.Generator().manual_seed(seed + 1)
    pick = torch.randperm(len(latents), generator=gen)[:n]
    return latents[pick] + 0.01 * latents.std() * torch.randn(n, latents.shape[1], generator=gen)


def inputs():
    gen = torch.Generator().manual_seed(SEED + 2)
    return torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1


@torch.no_grad()
def mage(root):
    sys.path.insert(0, root)
    sys.modules["pytorch_lightning"] = types.SimpleNamespace(LightningModule=nn.Module)
    from taming.models.vqgan import VQModel
    ddconfig = dict(double_z=False, z_channels=16, resolution=32, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2, 2], num_res_blocks=2, attn_resolutions=[8], dropout=0.0)
    model = VQModel(ddconfig=ddconfig, n_embed=64, embed_dim=16).eval()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(fixed_weights(shapes))
    x = inputs()
    x01 = (x + 1) / 2  # MAGE feeds its VQGAN images in [0, 1]
    z = model.encoder(x01).permute(0, 2, 3, 1).reshape(-1, 16)
    codebook = codebook_from(z, 64)
    model.quantize.embedding.weight.copy_(codebook)
    quant, _, (_, _, ids) = model.encode(x01)
    ids = ids.view(2, -1)
    # decoding as MAGE's gen_img_uncond.py does: get_codebook_entry, then decode (its output is in [0, 1])
    pixels = model.decode(model.quantize.get_codebook_entry(ids.flatten(), shape=(2, 8, 8, 16)))
    return dict(shapes=shapes, seed=SEED, codebook_key="quantize.embedding.weight", codebook=codebook,
                images=x,
                ids=ids, pixels=pixels * 2 - 1, grid=(8, 8),
                source="LTH14/mage 1becb14, taming.models.vqgan.VQModel")


@torch.no_grad()
def llamagen(root):
    sys.path.insert(0, os.path.join(root, "tokenizer", "tokenizer_image"))
    from vq_model import ModelArgs, VQModel
    model = VQModel(ModelArgs(codebook_size=64, codebook_embed_dim=8, encoder_ch_mult=[1, 2, 2],
                              decoder_ch_mult=[1, 2, 2], z_channels=32)).eval()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(fixed_weights(shapes))
    x = inputs()
    z = torch.nn.functional.normalize(model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, 8),
                                      dim=-1)
    codebook = codebook_from(z, 64)
    model.quantize.embedding.weight.copy_(codebook)
    quant, _, (_, _, ids) = model.encode(x)
    ids = ids.view(2, -1)
    pixels = model.decode_code(ids.flatten(), shape=(2, 8, 8, 8))  # as LlamaGen's samplers call it
    return dict(shapes=shapes, seed=SEED, codebook_key="quantize.embedding.weight", codebook=codebook,
                images=x,
                ids=ids, pixels=pixels, grid=(8, 8),
                source="FoundationVision/LlamaGen ce98ec4, tokenizer_image/vq_model.py")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mage", required=True, help="a checkout of github.com/LTH14/mage")
    p.add_argument("--llamagen", required=True, help="a checkout of github.com/FoundationVision/LlamaGen")
    args = p.parse_args()
    os.makedirs(FIXTURES, exist_ok=True)
    for name, make, root in (("mage", mage, args.mage), ("llamagen", llamagen, args.llamagen)):
        fixture = make(root)
        path = os.path.join(FIXTURES, f"{name}_vq.pt")
        torch.save(fixture, path)
        print(f"{path}: {os.path.getsize(path) / 1e3:.0f} kB, {len(fixture['ids'].unique())} distinct ids of "
              f"{fixture['ids'].numel()}")


if __name__ == "__main__":
    main()
