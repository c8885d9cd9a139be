"""
Makes tests/fixtures/official_*.pt: what the *official* DiGIT code (fairseq) computes on fixed weights, so
tests/test_official.py can check convert_official.py and this project's models against it offline.

Run once, in a virtual environment with fairseq (the tests never need it):
    python3.11 -m venv /tmp/fairseq_env && . /tmp/fairseq_env/bin/activate
    pip install torch==2.14.1 cython "numpy<2" && pip install fairseq-fixed==0.12.3.1 timm einops
    git clone https://github.com/DAMO-NLP-SG/DiGIT /tmp/digit && git -C /tmp/digit checkout cd6d8ca
    python tests/make_official_fixtures.py --digit /tmp/digit

Four tiny models, each built from the official classes (fairseq_user/image_generation_stage{1,2}/model*.py)
with a tiny DINOv2 of DiGIT's vits.py (4 blocks of 128, 4 registers: the tokens come from block 1, the
third from the end) and K = 16 centroids: the unconditional and the class-conditional stage-1 GPT (post-LN,
2 x 128), the autoregressive and the MaskGIT-style stage 2 (pre-LN, 2 x 128) with a tiny VQGAN of DiGIT's
taming copy (MAGE's layout, 16x downsampling, 32 codes). Inputs: two 256 px pictures. Stored per model:
the key names and shapes of its state dict and the seed its weights are drawn from (not the weights:
make_vq_fixtures.fixed_weights draws them again in the test), the official tokens of the pictures (DiGIT
ids, VQ codes), the official logits, and for stage 1 the official linear probe's features. The
class-conditional model is also stored as the official code saves it (a fairseq checkpoint with an
omegaconf config, weights rounded to fp16 to keep it small: the outputs were computed with the rounded
weights): convert_official.py must read that format without fairseq and without running any code.
pytorch_lightning (for the VQGAN's base class), cv2 and pandas (imported by unused data code) are
stood in for; prepare_semantic's .cuda() calls are no-ops on the CPU.
"""
import argparse
import builtins
import dataclasses
import importlib.machinery
import os
import sys
import types
from functools import partial

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_vq_fixtures import FIXTURES, fixed_weights  # noqa: E402

SEED, K, N_CLS = 0, 16, 1000


def empty_module(name):
    """A stand-in module with a spec (torch._dynamo asks every loaded module for one)."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


def stand_ins():
    sys.modules["pytorch_lightning"] = empty_module("pytorch_lightning")
    sys.modules["pytorch_lightning"].LightningModule = nn.Module
    sys.modules["cv2"] = empty_module("cv2")
    sys.modules.setdefault("pandas", empty_module("pandas"))
    # dino/vits.py subclasses xformers' SwiGLU at import (DINOv2's own code falls back to SwiGLUFFN); the
    # ViT-B and the tiny ViT use the plain MLP, so the class is never built
    builtins.SwiGLU = nn.Module
    torch.Tensor.cuda = lambda self, *a, **k: self  # prepare_semantic moves its mean/std with .cuda()


def images():
    gen = torch.Generator().manual_seed(SEED + 2)
    small = torch.rand(2, 3, 16, 16, generator=gen)  # smooth pictures: neighbouring patches share tokens
    big = torch.nn.functional.interpolate(small, size=256, mode="bicubic", align_corners=False)
    return (big.clamp(0, 1) * 255).round() / 255


def fill(model, seed, half=False):
    """Weights drawn from the seed (fixed_weights); rounded to fp16 and back when the model is stored
    whole."""
    # the version buffers keep their value: fairseq drops the final norm of a decoder whose version is
    # <= 2 (an old checkpoint) when it loads one, so a random version would change the model under test
    own = model.state_dict()
    shapes = {k: list(v.shape) for k, v in own.items()
              if v.is_floating_point() and not k.endswith(".version")}
    sd = fixed_weights(shapes, seed)
    if half:
        sd = {k: v.half().float() for k, v in sd.items()}
    model.load_state_dict(dict(sd, **{k: v for k, v in own.items() if k.endswith(".version")}), strict=False)
    return shapes


def lm_args(config_class, **extra):
    """The model's args as fairseq's hydra path builds them: the model's own dataclass defaults
    (STLMConfig: post-LN; ST2VTLMConfig: pre-LN), the fields the task and common configs fill
    (max_target_positions and tokens_per_sample 1024, no BOS token, no TPU), and the yaml's model section
    (config/stage{1,2}/dino_base*.yaml) at a tiny size. Not base_lm_architecture: the official models
    never call it, and it would force pre-LN."""
    fields = {}
    for f in dataclasses.fields(config_class):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        fields[f.name] = None if default is dataclasses.MISSING else default
    fields.update(tpu=False, max_target_positions=1024, tokens_per_sample=1024, add_bos_token=False)
    fields.update(decoder_embed_dim=128, decoder_output_dim=128, decoder_input_dim=128,
                  decoder_ffn_embed_dim=512, decoder_layers=2, decoder_attention_heads=2,
                  activation_fn="gelu", decoder_learned_pos=True, **extra)
    return argparse.Namespace(**fields)


def dictionary(n):
    from fairseq.data import Dictionary
    d = Dictionary(extra_special_symbols=["<n>"])
    for i in range(n):
        d.add_symbol(str(i))
    return d


def tiny_dinov2():
    from fairseq_user.pretrained_enc.dino import vits
    enc = vits.DinoVisionTransformer(patch_size=14, embed_dim=128, depth=4, num_heads=2, mlp_ratio=4,
                                     block_fn=partial(vits.NestedTensorBlock,
                                                      attn_class=vits.MemEffAttention),
                                     num_register_tokens=4, init_values=1, block_chunks=0)
    return enc.eval()


def centroids_of(encoder, x):
    """[D, K] centroids (the official layout: transposed km_*.npy) near the pictures' patch features."""
    with torch.no_grad():
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        x = (x - mean[:, None, None]) / std[:, None, None]
        x = torch.nn.functional.interpolate(x, scale_factor=224 / 256, mode="bicubic")
        rep = encoder.get_intermediate_layers(x, 3)[0].flatten(0, 1)
    gen = torch.Generator().manual_seed(SEED + 1)
    return rep[torch.randperm(len(rep), generator=gen)[:K]].t().contiguous()


@torch.no_grad()
def stage1(class_conditional, half):
    from fairseq.models.transformer import Embedding, TransformerDecoder
    from fairseq_user.image_generation_stage1.model import STLMConfig, STTransformerLanguageModel
    d = dictionary(K)
    args = lm_args(STLMConfig, class_conditional=class_conditional,
                   pretrained_enc_config=types.SimpleNamespace(layer=3))
    emb = Embedding(len(d) + (N_CLS if class_conditional else 0), 128, d.pad())
    encoder = tiny_dinov2()
    x = images()
    model = STTransformerLanguageModel(args, TransformerDecoder(args, d, emb, no_encoder_attn=True), encoder,
                                       torch.zeros(128, K)).eval()
    seed = SEED + 10 + class_conditional
    shapes = fill(model, seed, half)
    model.centroids.copy_(centroids_of(model.pretrained_encoder, x))
    model.centroid_norm.copy_((model.centroids ** 2).sum(0, keepdims=True))
    labels = torch.tensor([207, 3])
    sample = dict(net_input=dict(imgs=x, img_sizes=torch.tensor([[256, 256]] * 2), cls_ids=labels))
    out, extra = model(sample)
    sem = model.prepare_semantic(x, None)
    src = torch.cat([torch.full((2, 1), d.eos()), sem], dim=1)
    if class_conditional:
        src[:, 0] = labels + len(d)
    inner = model.decoder(src, features_only=True)[1]["inner_states"]
    probe = torch.stack([inner[n].mean(0) for n in range(args.decoder_layers)], dim=1)  # model_linearprobe.py
    return model, dict(shapes=shapes, seed=seed, centroids=model.centroids.clone(), labels=labels,
                       tokens=sem - d.nspecial, logits=out["word_ins_visual"]["out"], probe=probe, half=half)


def tiny_vqgan():
    from fairseq_user.image_generation_stage2.taming.models.vqgan import VQModel
    ddconfig = dict(double_z=False, z_channels=32, resolution=256, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
    return VQModel(ddconfig=ddconfig, n_embed=32, embed_dim=32).eval()


@torch.no_grad()
def stage2(nar):
    from fairseq.models.transformer import Embedding
    from fairseq_user.image_generation_stage2 import model as ar_module, model_nar
    module = model_nar if nar else ar_module
    cls = module.ST2VTTransformerLanguageModelNAR if nar else module.ST2VTTransformerLanguageModel
    src_d, tgt_d = dictionary(K), dictionary(32)
    args = lm_args(module.ST2VTLMConfig, pretrained_enc_config=types.SimpleNamespace(layer=3))
    emb = Embedding(len(tgt_d) + len(src_d), 128, tgt_d.pad())
    model = cls(args, module.TransformerDecoder2pos(args, tgt_d, emb, no_encoder_attn=True), tiny_vqgan(),
                tiny_dinov2(), torch.zeros(128, K)).eval()
    seed = SEED + 20 + nar
    shapes = fill(model, seed)
    x = images()
    model.centroids.copy_(centroids_of(model.pretrained_encoder, x))
    model.centroid_norm.copy_((model.centroids ** 2).sum(0, keepdims=True))
    # codes near the pictures' latents: varied ids
    z = model.vqgan.encoder(x).permute(0, 2, 3, 1).reshape(-1, 32)
    pick = torch.randperm(len(z), generator=torch.Generator().manual_seed(5))[:32]
    model.vqgan.quantize.embedding.weight.copy_(z[pick])
    sem = model.prepare_semantic(x, None)
    codes = model.vqgan.encode(x)[2][2].reshape(2, -1)
    if nar:
        torch.manual_seed(SEED + 3)  # random_mask draws with the global generator
        src, tgt = model.random_mask(codes, None)
        logits = model.decoder(torch.cat([sem, src], dim=1), full_context_alignment=True)[0][:, sem.shape[1]:]
        masked = src[:, 1:] == tgt_d.unk()
    else:
        src, tgt = model.add_eos_shift(codes, None)
        logits = model.decoder(torch.cat([sem, src], dim=1))[0][:, sem.shape[1]:]
        masked = None
    return model, dict(shapes=shapes, seed=seed, centroids=model.centroids.clone(),
                       vq_codebook=model.vqgan.quantize.embedding.weight.clone(),
                       tokens=sem - len(tgt_d) - src_d.nspecial, codes=codes, logits=logits, masked=masked,
                       nar=nar)


def fairseq_checkpoint(model, name, path):
    """A checkpoint as fairseq's checkpoint_utils.save_state writes it: the state dict beside an omegaconf
    config (DictConfig), optimizer history and extra state holding numpy scalars."""
    import numpy as np
    from omegaconf import OmegaConf
    cfg = OmegaConf.create({"model": {"_name": name, "decoder_attention_heads": 2, "decoder_layers": 2},
                            "task": {"_name": "image_generation_stage1", "target_vocab_size": K}})
    torch.save({"args": None, "cfg": cfg, "model": {k: v.half() if v.is_floating_point() else v
                                                    for k, v in model.state_dict().items()},
                "optimizer_history": [{"criterion_name": "CE_Loss_LS", "num_updates": 10}],
                "extra_state": {"epoch": 1, "val_loss": np.float64(3.25)}, "last_optimizer_state": None},
               path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--digit", required=True, help="a checkout of github.com/DAMO-NLP-SG/DiGIT")
    args = p.parse_args()
    stand_ins()
    sys.path.insert(0, args.digit)
    import fairseq_user  # noqa: F401  (registers the official tasks and models)
    os.makedirs(FIXTURES, exist_ok=True)
    results = {}
    for name, make in (("stage1_uncond", lambda: stage1(False, False)),
                       ("stage1_cls", lambda: stage1(True, True)),
                       ("stage2_ar", lambda: stage2(False)), ("stage2_nar", lambda: stage2(True))):
        model, fixture = make()
        results[name] = fixture
        if name == "stage1_cls":
            fairseq_checkpoint(model, "stlm", os.path.join(FIXTURES, "official_stage1_cls_fairseq.pt"))
        print(f"{name}: {len(fixture['shapes'])} tensors, tokens {fixture['tokens'].unique().numel()} "
              f"distinct of {fixture['tokens'].numel()}, logits {tuple(fixture['logits'].shape)}")
    results["images"] = (images() * 255).round().to(torch.uint8)  # the inputs of every model, exactly
    results["source"] = "DAMO-NLP-SG/DiGIT cd6d8ca with fairseq-fixed 0.12.3.1"
    torch.save(results, os.path.join(FIXTURES, "official_digit.pt"))
    for f in ("official_digit.pt", "official_stage1_cls_fairseq.pt"):
        print(f"{f}: {os.path.getsize(os.path.join(FIXTURES, f)) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
