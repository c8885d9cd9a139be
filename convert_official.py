"""
The paper's released model in plain torch: reads the authors' fairseq checkpoints and K-means centroids
(no fairseq needed, and no code from the files runs) and writes this project's own artifacts, after which
every script works on the paper's model, as nanoGPT's GPT.from_pretrained("gpt2") does for GPT-2:

    python convert_official.py --out out_official --stage1 STAGE1.pt --stage2 STAGE2.pt \
        [--kmeans km_8k.npy]
    python sample.py --out out_official --class 207 --top-k 300   # golden retrievers, the paper's protocol

The files: the official README's "Checkpoints" section (https://huggingface.co/DAMO-NLP-SG/DiGIT): a stage-1
checkpoint (class-conditional or unconditional GPT; it holds the frozen DINOv2 and the centroids), a stage-2
checkpoint (autoregressive "DiGIT (+VQGAN)" or MaskGIT-style; it also holds MAGE's VQGAN), km_8k.npy.
Writes into --out:
  codebook.pt     the centroids (from --kmeans, else from the checkpoint), with DiGIT's tokenizer settings:
                  block depth-3 after the final norm, a 256 px crop resized to 224 px (tokenize_kmeans.py
                  --crop-size 256 reuses it to tokenize ImageNet: then probe.py and eval.py work too)
  gpt.pt          the stage-1 GPT as train_gpt.GPT: post-LN, no final norm, embeddings x sqrt(width),
                  fairseq's learned positions (which start at row padding_idx + 1 = 2), token id = K-means
                  id + 5 specials
  decoder_ar.pt   the AR stage 2 (train_decoder.ARDecoder), or decoder.pt for the MaskGIT-style one
                  (train_decoder.MaskGIT with layout "fairseq")
  vqgan.pt        MAGE's VQGAN as the stage-2 checkpoint holds it, in MAGE's published layout (vqgan.py)
and the DINOv2 encoder (ViT/14 with registers, DiGIT's position-embedding resize: offset 0.1, no
antialiasing) into the weights cache as digit_vit{b,l}14_reg.pt, the encoder name codebook.pt records.

Reading a fairseq checkpoint safely: it is a pickle with the weights next to omegaconf / argparse config
objects. Before anything is unpickled, the pickle's global names are listed (pickletools, no execution);
config classes (omegaconf, fairseq, numpy scalars, typing) get a stand-in that only records its state, a
file that names anything else (e.g. os.system) is refused in one line naming it, and torch.load then reads
it with weights_only=True. tests/test_official.py checks the converted models against fixtures that the
official code computed (tests/make_official_fixtures.py): the same tokens, logits and probe features.
"""
import os
import pickletools
import zipfile

import numpy as np
import torch

from artifacts import (check_regular_file, expect, load_artifact, new_fingerprint, prepare_out, save_atomic,
                       tensor_fingerprint)
from common import fail, parser
from data import DEFAULT_CACHE
from train_decoder import ARDecoder, MaskGIT
from train_gpt import GPT
from vqgan import MageVQGAN, mage_args

# The dictionary DiGIT's tasks build in code: <s> <pad> </s> <unk> + "<n>", then "0" ... "K-1".
NSPECIAL, PAD, EOS, UNK = 5, 1, 2, 3
FAIRSEQ_POS = PAD + 1  # fairseq's learned positions of a sequence start at row padding_idx + 1
SAFE_PREFIXES = ("omegaconf.", "fairseq.", "numpy.", "typing.", "collections.", "enum.", "pathlib.",
                 "argparse.", "_codecs.encode")
# builtin types a config names (omegaconf records object_type = dict); protocol-2 pickles spell the module
# __builtin__. Exact names: setattr or getattr must not pass as "set..." or "get...".
SAFE_NAMES = {f"{m}.{t}" for m in ("builtins", "__builtin__") for t in ("dict", "list", "set", "frozenset",
                                                                        "tuple", "slice", "int", "float",
                                                                        "str", "bool")}


def get_args(argv=None):
    p = parser(__doc__)
    a = p.add_argument
    a("--stage1", default=None, help="the official stage-1 checkpoint (a GPT)")
    a("--stage2", default=None, help="the official stage-2 checkpoint (AR or MaskGIT-style)")
    a("--stage2-kind", default="auto", choices=["auto", "ar", "nar"], help="if the file's config cannot say")
    a("--kmeans", default=None, help="km_*.npy (default: the centroids inside the checkpoints)")
    a("--out", default="out_official", help="where the artifacts go (default: %(default)s)")
    a("--cache", default=DEFAULT_CACHE, help="where the encoder's weights go (default: %(default)s)")
    a("--force", action="store_true", help="replace artifacts already in --out")
    args = p.parse_args(argv)
    if not args.stage1 and not args.stage2:
        p.error("give --stage1 and/or --stage2")
    return args


# ----------------------------------------------------------------------------- reading fairseq pickles safely

class Recorded:
    """A stand-in for a config object of a foreign pickle: it keeps what the pickle gives it as plain data and
    runs no code of the class it stands for."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __iter__(self):  # a stand-in used as a REDUCE argument list elsewhere: nothing inside
        return iter(())


def pickle_globals(path):
    """Every 'module.name' a torch checkpoint's pickle refers to, listed without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            data = z.read(name) if name else b""
    except zipfile.BadZipFile:
        fail(f"{path} is not a torch checkpoint of the zip format (what fairseq writes)")
    found, strings, memo = set(), [], {}
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif isinstance(arg, str) and "UNICODE" in op.name:
            strings.append(arg)
        elif op.name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg if op.name != "MEMOIZE" else len(memo)] = strings[-1] if strings else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(arg), str):
            strings.append(memo[arg])
        elif op.name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]))
    return found


def read_fairseq(path):
    """(state dict, config as recorded plain data) of a fairseq checkpoint, read safely (see the
    docstring)."""
    check_regular_file(path, "give the official checkpoint file")
    names = pickle_globals(path)
    safe = [n for n in names if n.startswith(SAFE_PREFIXES) or n in SAFE_NAMES]
    refused = sorted(n for n in set(names) - set(safe) if not n.startswith("torch."))
    if refused:
        fail(f"{path} needs {refused[0]}, which no fairseq checkpoint needs: refused, nothing of it was run")
    stand_ins = [(Recorded, n.replace("__builtin__.", "builtins.", 1)) for n in safe]  # torch's spelling
    with torch.serialization.safe_globals(stand_ins):
        ck = load_artifact(path, "give the official checkpoint file")
    expect(isinstance(ck, dict) and isinstance(ck.get("model"), dict), path,
           "no 'model' state dict: not fairseq's")
    return ck["model"], ck.get("cfg", ck.get("args"))


def config_value(cfg, key):
    """A value of a recorded fairseq config (omegaconf DictConfig or argparse Namespace), or None."""
    seen = set()

    def walk(node):  # omegaconf nodes point back at their parent: visit each container once
        if isinstance(node, (Recorded, dict, list, tuple)) or hasattr(node, "__dict__"):
            if id(node) in seen:
                return
            seen.add(id(node))
        if isinstance(node, Recorded):
            yield from walk(node.state)
            yield from walk(node.args)
        elif isinstance(node, dict):
            if key in node:
                yield node[key]
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                yield from walk(v)
        elif hasattr(node, "__dict__") and not isinstance(node, type):
            yield from walk(vars(node))
    for value in walk(cfg):
        while isinstance(value, Recorded):  # an omegaconf node: its value is in its state
            value = (value.state or {}).get("_val") if isinstance(value.state, dict) else None
        if value is not None:
            return value
    return None


# ----------------------------------------------------------------------------- the pieces

def fairseq_layers(sd, prefix="decoder.layers"):
    """Our Block keys from fairseq's TransformerDecoderLayer keys (q, k, v projections fused as one qkv)."""
    out, i = {}, 0
    while f"{prefix}.{i}.fc1.weight" in sd:
        p, q = f"{prefix}.{i}.", f"blocks.{i}."
        for t in ("weight", "bias"):
            out[q + f"attn.qkv.{t}"] = torch.cat([sd[p + f"self_attn.{n}_proj.{t}"] for n in "qkv"])
            out[q + f"attn.proj.{t}"] = sd[p + f"self_attn.out_proj.{t}"]
            out[q + f"ln1.{t}"] = sd[p + f"self_attn_layer_norm.{t}"]
            out[q + f"ln2.{t}"] = sd[p + f"final_layer_norm.{t}"]
            out[q + f"mlp.0.{t}"] = sd[p + f"fc1.{t}"]
            out[q + f"mlp.2.{t}"] = sd[p + f"fc2.{t}"]
        i += 1
    return out, i


def centroids_of(sd, kmeans, path):
    """[K, D] float32: km_*.npy ([K, D], as the official preprocess writes it), else the checkpoint's own
    (stored transposed, [D, K])."""
    if kmeans:
        try:
            c = torch.from_numpy(np.load(kmeans, allow_pickle=False)).float()
        except (OSError, ValueError) as e:
            fail(f"{kmeans} cannot be read as a .npy array ({e})")
        expect(c.ndim == 2, kmeans, f"centroids of shape {tuple(c.shape)}, not [K, D]")
        return c
    expect("centroids" in sd, path, "no centroids in the checkpoint: give --kmeans km_*.npy")
    return sd["centroids"].t().float().contiguous()


def encoder_of(sd, path):
    """(name, architecture, state dict) of the DINOv2 inside an official checkpoint (DiGIT's vits.py
    names)."""
    enc = {k[len("pretrained_encoder."):]: v for k, v in sd.items() if k.startswith("pretrained_encoder.")}
    expect("pos_embed" in enc and "patch_embed.proj.weight" in enc, path,
           "no pretrained_encoder (DINOv2) weights")
    enc.pop("mask_token", None)  # used only by DINOv2's own training
    depth = len({k.split(".")[1] for k in enc if k.startswith("blocks.")})
    dim = enc["pos_embed"].shape[-1]
    registers = enc["register_tokens"].shape[1] if "register_tokens" in enc else 0
    grid = int(round((enc["pos_embed"].shape[1] - 1) ** 0.5))
    arch = dict(dim=dim, depth=depth, heads=dim // 64,
                ffn="swiglu" if any("w12" in k for k in enc) else "mlp",
                registers=registers, interp_offset=0.1, interp_antialias=False, grid=grid)
    letter = {384: "s", 768: "b", 1024: "l", 1536: "g"}.get(dim, f"{dim}x{depth}")
    return f"digit_vit{letter}14_reg", arch, enc


def write_encoder(name, arch, weights, cache):
    """The encoder into the weights cache, with its architecture (dinov2.load_encoder reads both)."""
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"{name}.pt")
    save_atomic(dict(arch=arch, model=weights), path)
    return path


def check_version(sd, path):
    """fairseq loads a decoder whose "version" buffer is <= 2 (checkpoints older than its final norm)
    without the final norm it holds (TransformerDecoderBase.upgrade_state_dict_named); DiGIT's own are 3."""
    version = float(sd["decoder.version"].flatten()[0]) if "decoder.version" in sd else 3.0
    expect(version > 2 or "decoder.layer_norm.weight" not in sd, path,
           f"decoder version {version:g}: an old fairseq layout that fairseq runs without its final norm, "
           "which this converter does not handle")


def convert_gpt(sd, cfg, path, k):
    """train_gpt.GPT (model_args, state dict) of an official stage-1 model: unconditional (</s> first) or
    class-conditional (class id + len(dictionary) first, 1,000 extra embedding rows)."""
    expect("decoder.embed_tokens.weight" in sd and "decoder.embed_positions_1.weight" not in sd, path,
           "not a stage-1 checkpoint (no GPT decoder, or a stage-2 one)")
    emb, width = sd["decoder.embed_tokens.weight"], sd["decoder.embed_tokens.weight"].shape[1]
    n_dict = NSPECIAL + k
    expect(emb.shape[0] in (n_dict, n_dict + 1000), path, f"{emb.shape[0]} embedding rows for K = {k}")
    classes = 1000 if emb.shape[0] == n_dict + 1000 else 0
    check_version(sd, path)
    blocks, n_layer = fairseq_layers(sd)
    post = "decoder.layer_norm.weight" not in sd  # fairseq: a final norm only with normalize_before
    heads = config_value(cfg, "decoder_attention_heads") or width // 64
    cond = emb[n_dict: n_dict + classes] if classes else emb[EOS: EOS + 1]
    if classes:  # our null class (CFG): never trained by the official model (it was trained without dropout)
        cond = torch.cat([cond, torch.zeros(1, width)])
    block_size = 1 + 16 * 16  # [condition, t_0 .. t_255]: every position the official model has
    model_args = dict(vocab_size=k, block_size=block_size, n_classes=classes, n_layer=n_layer, n_embd=width,
                      n_head=int(heads), dropout=0.0, norm="post" if post else "pre", tie_embeddings=False,
                      emb_scale=True)
    positions = sd["decoder.embed_positions.weight"][FAIRSEQ_POS: FAIRSEQ_POS + block_size]
    state = dict(blocks, **{"tok_emb.weight": emb[NSPECIAL: n_dict], "cls_emb.weight": cond,
                            "pos_emb.weight": positions,
                            "head.weight": sd["decoder.output_projection.weight"][NSPECIAL: n_dict]})
    if not post:
        state.update({"ln_f.weight": sd["decoder.layer_norm.weight"],
                      "ln_f.bias": sd["decoder.layer_norm.bias"]})
    GPT(**model_args).load_state_dict(state)  # every key and shape, or an error here rather than later
    return model_args, state


def convert_stage2(sd, cfg, path, k, kind):
    """(class, model_args, state dict) of an official stage-2 model: ARDecoder or MaskGIT (layout "fairseq").
    Its embedding table is [target dictionary (5 + VQ codes) | source dictionary (5 + K)]."""
    expect("decoder.embed_positions_1.weight" in sd, path,
           "not a stage-2 checkpoint (no second position table)")
    name = config_value(cfg, "_name")
    if kind == "auto":
        expect(name in ("st2vtlm", "st2vtlm_nar"), path,
               f"its config does not say AR or NAR (model {name!r}): give --stage2-kind ar|nar")
        kind = "ar" if name == "st2vtlm" else "nar"
    emb, width = sd["decoder.embed_tokens.weight"], sd["decoder.embed_tokens.weight"].shape[1]
    n_tgt = sd["decoder.output_projection.weight"].shape[0]
    codes = n_tgt - NSPECIAL
    expect(emb.shape[0] == n_tgt + NSPECIAL + k, path,
           f"{emb.shape[0]} embedding rows for {codes} codes, K = {k}")
    check_version(sd, path)
    blocks, n_layer = fairseq_layers(sd)
    heads = int(config_value(cfg, "decoder_attention_heads") or width // 64)
    length = 16 * 16
    digit = emb[n_tgt + NSPECIAL: n_tgt + NSPECIAL + k]
    first, main = sd["decoder.embed_positions_1.weight"], sd["decoder.embed_positions.weight"]
    args = dict(digit_vocab=k, vq_codes=codes, length=length, n_layer=n_layer, n_embd=width, n_head=heads,
                dropout=0.0)
    state = dict(blocks, **{"digit_emb.weight": digit, "ln_f.weight": sd["decoder.layer_norm.weight"],
                            "ln_f.bias": sd["decoder.layer_norm.bias"],
                            "head.weight": sd["decoder.output_projection.weight"][NSPECIAL:]})
    vq_rows = emb[NSPECIAL: n_tgt]
    if kind == "ar":  # [d | </s>, v_0 .. v_{L-2}]: </s> is our BOS, at the VQ part's first position
        state.update({"vq_emb.weight": torch.cat([vq_rows, emb[EOS: EOS + 1]]),
                      "digit_pos.weight": first[FAIRSEQ_POS: FAIRSEQ_POS + length],
                      "vq_pos.weight": main[FAIRSEQ_POS: FAIRSEQ_POS + length]})
        cls = ARDecoder
    else:  # [d | </s> | v (<unk> = [MASK])]: the separator is </s>, the mask token <unk>
        args["layout"] = "fairseq"
        state.update({"vq_emb.weight": torch.cat([vq_rows, emb[UNK: UNK + 1], emb[EOS: EOS + 1]]),
                      "pos_emb.weight": torch.cat([first[FAIRSEQ_POS: FAIRSEQ_POS + length],
                                                   main[FAIRSEQ_POS: FAIRSEQ_POS + length + 1]])})
        cls = MaskGIT
    cls(**args).load_state_dict(state)
    return cls, args, state


def vqgan_of(sd, path):
    """MAGE's VQGAN inside a stage-2 checkpoint, as MAGE publishes it ({"state_dict": ...})."""
    vq = {k[len("vqgan."):]: v for k, v in sd.items() if k.startswith("vqgan.")}
    expect("quantize.embedding.weight" in vq, path, "no vqgan weights")
    MageVQGAN(**mage_args(vq)).load_state_dict(vq)
    return vq


# ----------------------------------------------------------------------------- writing our artifacts

def main(argv=None):
    args = get_args(argv)
    out = prepare_out(args.out)
    for name in ("codebook.pt", "gpt.pt", "decoder.pt", "decoder_ar.pt", "vqgan.pt"):
        if os.path.exists(os.path.join(out, name)) and not args.force:
            fail(f"{out}/{name} exists: --force to replace the artifacts in {out}")
    sources = [(p, *read_fairseq(p)) for p in (args.stage1, args.stage2) if p]
    centroids = centroids_of(sources[0][1], args.kmeans, sources[0][0])
    fp, k = tensor_fingerprint(centroids), len(centroids)
    for p, sd, _ in sources:  # both stages were trained on the tokens of one codebook
        if "centroids" in sd and tensor_fingerprint(sd["centroids"].t().float().contiguous()) != fp:
            fail(f"{p} holds other centroids than {args.kmeans or sources[0][0]}: they are not one model")
    name, arch, enc = encoder_of(sources[0][1], sources[0][0])
    enc_path = write_encoder(name, arch, enc, args.cache)
    layer = arch["depth"] - 3  # DiGIT: get_intermediate_layers(x, 3)[0], the 3rd block from the end
    lineage = dict(encoder=name, layer=layer, image_size=224, grid=(16, 16), digit_vocab=k, codebook=fp)
    source = dict(converted_from=[os.path.abspath(p) for p, _, _ in sources], kmeans=args.kmeans)
    save_atomic(dict(centroids=centroids, encoder=name, layer=layer, image_size=224, crop=256, patch_size=14,
                     fit_config=dict(official=True, **source), fingerprint=fp, lineage=lineage,
                     precision="fp16",
                     n_points=0, iters=0, inertia=float("nan"), cluster_sizes=torch.zeros(k)),
                os.path.join(out, "codebook.pt"))
    print(f"codebook: K = {k} centroids of {centroids.shape[1]} dims -> {out}/codebook.pt; encoder {name} "
          f"({arch['depth']} blocks, tokens from block {layer}) -> {enc_path}")
    common = dict(lineage=dict(lineage, tokenizer="digit"), grid=(16, 16), encoder=name, layer=layer,
                  image_size=224, precision="fp16", step=0, history=[], metrics={}, **source)
    if args.stage1:
        sd, cfg = sources[0][1], sources[0][2]
        model_args, state = convert_gpt(sd, cfg, args.stage1, k)
        classes = [str(c) for c in range(model_args["n_classes"])]  # ImageNet's class indices
        save_atomic(dict(model=state, model_args=model_args, vocab_size=k, classes=classes, tokenizer="digit",
                         config=dict(class_dropout=0.0), best_val=float("nan"), losses=[], evals=[], views=1,
                         fingerprint=new_fingerprint(), **common), os.path.join(out, "gpt.pt"))
        print(f"stage 1: GPT {model_args['n_layer']}x{model_args['n_embd']}, "
              f"{'class-conditional' if classes else 'unconditional'}, {model_args['norm']}-LN -> "
              f"{out}/gpt.pt")
    if args.stage2:
        sd, cfg = sources[-1][1], sources[-1][2]
        cls, model_args, state = convert_stage2(sd, cfg, args.stage2, k, args.stage2_kind)
        vq = vqgan_of(sd, args.stage2)
        save_atomic({"state_dict": vq}, os.path.join(out, "vqgan.pt"))
        vq_fp = tensor_fingerprint(vq["quantize.embedding.weight"])
        file = "decoder_ar.pt" if cls is ARDecoder else "decoder.pt"
        dec_lineage = dict(common["lineage"], vq=vq_fp, vq_codes=model_args["vq_codes"])
        save_atomic(dict(model=state, model_args=model_args, digit_vocab=k,
                         vq_path=os.path.abspath(f"{out}/vqgan.pt"),
                         vq_relpath="vqgan.pt", pixel_size=256, fingerprint=new_fingerprint(),
                         **dict(common, lineage=dec_lineage)), os.path.join(out, file))
        print(f"stage 2: {'autoregressive' if cls is ARDecoder else 'MaskGIT-style'} decoder "
              f"{model_args['n_layer']}x{model_args['n_embd']} -> {out}/{file}; MAGE's VQGAN -> "
              f"{out}/vqgan.pt")
    print(f"sample: python sample.py --out {out} --class 207 --top-k 300" if args.stage1 else "")


if __name__ == "__main__":
    main()
