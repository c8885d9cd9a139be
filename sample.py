"""
Generate images with DiGIT: the GPT samples DiGIT tokens (KV cache, top-k/top-p, classifier-free
guidance), then a stage-2 decoder renders them: MaskGIT or the autoregressive decoder turn them into VQ
codes and the VQ decoder paints pixels, or the direct decoder paints pixels in one pass (--decoder).

Run (reads out/gpt.pt and a decoder; writes out/samples/: NNNNN_classK.png, grid.png, tokens.pt,
samples.npz, manifest.json):
    python sample.py --class 7                       # 8 samples of class 7
    python sample.py --class 1,7,9 --num-samples 4   # one row per class
    python sample.py --class 207 --top-k 300 --out out_imagenet      # the paper's protocol: no CFG
    python sample.py                                 # unconditional (or a random class)
    python sample.py --tokenizer vq --class 7        # the GPT on the pixel VQ's tokens (gpt_vq.pt): its
                                                     # VQ ids painted by the VQ decoder -> out/samples_vq/
    python sample.py --from-tokens out/tokens_val.pt # render real tokens (the decoder alone, no GPT)
    torchrun --nproc_per_node 8 sample.py --class $(seq -s, 0 999) --num-samples 50 --out out_imagenet  # 50k

--decoder auto takes decoder.pt (MaskGIT), else decoder_ar.pt, else direct.pt, and says which. The
VQ a decoder learned is found where train_decoder.py recorded it (also relative to out/, so a moved
folder works); --vq points at a moved pretrained VQ (checked to be the same one). Sampling runs in bf16
on a GPU (and on a CPU with bf16 units), KV cache included (--precision).

Batches are spread over the ranks and each has its own seed, so the images are the same for any number
of processes; a batch is finished when its part file (samples/parts/) exists, so an interrupted run
continues. manifest.json says what the folder holds and whether it is complete (eval.py reads it).
"""
import math
import os
import re
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from artifacts import (TMP_TAG, SampleFolder, check_lineage, expect, load_artifact, save_atomic,
                       tensor_fingerprint)
from common import (add_system_args, autocast, autocast_dtype, bounded, fail, finish_distributed,
                    init_distributed, mass, nonneg_int, parser, positive_int, precision_name, seeded)
from data import add_tokenizer_arg, base_view
from train_decoder import ar_decode, decode, load_decoder
from train_direct import direct_render, load_direct
from train_gpt import KVCache, gpt_path, load_gpt, sample_token
from vqgan import load_vq, vq_decode

# --decoder auto: this order
DECODERS = {"maskgit": "decoder.pt", "ar": "decoder_ar.pt", "direct": "direct.pt"}


def get_args(argv=None):
    p = parser(__doc__)
    a = p.add_argument_group("what to generate").add_argument
    a("--class", dest="classes", default=None, help="class index or name, or several: 1,7,9 (one row each)")
    a("--num-samples", type=positive_int, default=8, help="images per class (default: %(default)s)")
    a("--from-tokens", default=None, help="render the first rows of this token file instead of sampling")
    a("--tokens-only", action="store_true", help="only sample DiGIT tokens, no rendering")
    a = p.add_argument_group("sampling").add_argument
    a("--temperature", type=bounded(0.01, 100), default=1.0,
      help="softmax temperature (default: %(default)s)")
    a("--top-k", type=nonneg_int, default=0, help="keep the k likeliest, 0 = all (default: %(default)s)")
    a("--top-p", type=mass, default=1.0, help="nucleus mass, 1 = off (default: %(default)s)")
    a("--cfg-scale", type=bounded(0, 100), default=1.0,
      help="guidance u + s(c - u), 1 = off (default: %(default)s)")
    a("--decoder", default="auto", choices=["auto", *DECODERS], help="renderer (default: %(default)s)")
    a("--vq", default=None, help="the decoder's VQ, if it moved (default: as recorded)")
    a("--decode-steps", type=positive_int, default=8, help="MaskGIT steps (default: %(default)s)")
    a("--decode-temperature", type=bounded(0.01, 100), default=1.0,
      help="stage-2 temperature (default: %(default)s)")
    a("--decode-top-p", type=mass, default=0.8, help="AR stage 2: nucleus mass (default: %(default)s)")
    a("--no-cache", action="store_true", help="recompute the whole prefix every step (checks, benchmarks)")
    a = p.add_argument_group("output").add_argument
    a("--samples-dir", default=None, help="where images go (default: OUT/samples or OUT/samples_vq)")
    a("--show-tokens", action="store_true", help="also draw the token ids (one colour per id)")
    a("--no-npz", action="store_true", help="do not write samples.npz (all samples as one uint8 array)")
    system = add_system_args(p, "reads gpt.pt and the decoders from here")
    system.add_argument("--batch-size", type=positive_int, default=64,
                        help="images at once (default: %(default)s)")
    add_tokenizer_arg(system)
    return p.parse_args(argv)


@torch.no_grad()
def generate(model, labels, temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0, gen=None, use_cache=True,
             progress=False, dtype=None, length=None):
    """DiGIT tokens [B, T] for class labels [B] (model.null_class: unconditional), one token per step, drawn
    on the model's device (gen: a generator there). With cfg_scale != 1 the conditional rows and their
    null-class twins run as one batch of 2B and the logits are mixed as uncond + s * (cond - uncond) (Ho &
    Salimans 2022). dtype: the KV cache's (the autocast dtype sampling runs in). length: tokens to draw
    (default: the block size; a converted official GPT has one position more than its h*w tokens)."""
    B, T = len(labels), length or model.block_size
    device = model.tok_emb.weight.device
    guided = cfg_scale != 1.0
    rows = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    cache = KVCache(model, len(rows), dtype=dtype or torch.float32) if use_cache else None
    tokens = torch.zeros(len(rows), 0, dtype=torch.long, device=device)
    for t in tqdm(range(T), desc="tokens", unit="tok", leave=False, disable=not progress):
        inp = tokens if (cache is None or t == 0) else tokens[:, -1:]
        logits = model(inp, rows, cache=cache)[:, -1].float()
        if guided:
            c, u = logits.chunk(2)
            logits = u + cfg_scale * (c - u)
        nxt = sample_token(logits, temperature, top_k, top_p, gen)
        tokens = torch.cat([tokens, nxt.repeat(2, 1) if guided else nxt], dim=1)
    return tokens[:B]


def parse_classes(spec, classes):
    """'7' / 'tench' / '1,7,9' -> list of class indices, checked against the model's classes."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if re.fullmatch(r"-?[0-9]+", item):
            idx = int(item)
            if not 0 <= idx < len(classes):
                fail(f"class {idx} is out of range: the model knows {len(classes)} classes "
                     f"(0..{len(classes) - 1})")
        elif item in classes:
            idx = classes.index(item)
        else:
            fail(f"unknown class {item!r}: use an index 0..{len(classes) - 1} or a name like {classes[0]!r}")
        out.append(idx)
    return out


def token_picture(tokens, grid, size, vocab):
    """Paint each token id as a fixed pseudo-random colour, upsampled to the image size."""
    palette = torch.rand(vocab, 3, generator=seeded(0))
    img = palette[tokens.cpu()].view(len(tokens), grid[0], grid[1], 3).permute(0, 3, 1, 2)
    return F.interpolate(img, size=(size, size), mode="nearest") * 2 - 1


def real_tokens(path, n, gpt_path_, gpt_ck, device):
    """The first n rows of a token file, spread over it (their labels as the 'requested' classes), checked to
    be the GPT's kind of tokens."""
    tok = base_view(load_artifact(path, "--from-tokens takes a token file such as OUT/tokens_val.pt"))
    expect(isinstance(tok, dict) and isinstance(tok.get("tokens"), torch.Tensor) and "grid" in tok, path,
           "not a token file (no tokens / grid): give one such as OUT/tokens_val.pt")
    check_lineage(path, tok, gpt_path_, gpt_ck)
    if tok["vocab_size"] != gpt_ck["vocab_size"] or tuple(tok["grid"]) != tuple(gpt_ck["grid"]):
        fail(f"{path} (vocab {tok['vocab_size']}, grid {tuple(tok['grid'])}) does not match {gpt_path_} "
             f"(vocab {gpt_ck['vocab_size']}, grid {tuple(gpt_ck['grid'])})")
    rows = torch.linspace(0, len(tok["tokens"]) - 1, min(n, len(tok["tokens"]))).long()
    labels = tok["labels"][rows].to(device) if tok.get("labels") is not None else None
    return tok["tokens"][rows].long().to(device), labels


def sampling_plan(args, gpt, gpt_ck, device):
    """Class label of every sample ([n], or None for an unconditional model), the given DiGIT tokens
    (--from-tokens) or None, and a line describing it."""
    classes, gen = gpt_ck["classes"], seeded(args.seed)
    if args.from_tokens:  # render real tokens: what the decoder alone can do, no GPT involved
        tokens, labels = real_tokens(args.from_tokens, args.num_samples, gpt_path(args.out, args.tokenizer),
                                     gpt_ck, device)
        return labels, tokens, f"rendering {len(tokens)} real token grids of {args.from_tokens}"
    if gpt.n_classes == 0:
        return None, None, f"{args.num_samples} unconditional samples"
    if args.classes is None:
        rows = torch.randint(gpt.n_classes, (1,), generator=gen).tolist()
        note = f"no --class given: a random class ({classes[rows[0]]})"
    else:
        rows = parse_classes(args.classes, classes)
        note = "classes " + ", ".join(f"{c} ({classes[c]})" for c in rows)
    labels = torch.tensor(rows, device=device).repeat_interleave(args.num_samples)
    return labels, None, f"{args.num_samples} per class, {note}"


def decoder_vq(dec_ck, dec_path, device, vq_path=None):
    """The VQ a MaskGIT/AR checkpoint learned: --vq given to sample.py, else the file it recorded (as
    recorded, then relative to the checkpoint's folder: a moved out/ still finds it), else OUT/vq.pt; checked
    to be the same VQ (fingerprint) whatever the path."""
    folder = os.path.dirname(os.path.abspath(dec_path))
    candidates = [vq_path] if vq_path else [dec_ck.get("vq_path"), dec_ck.get("vq_relpath") and os.path.join(
        folder, dec_ck["vq_relpath"]), os.path.join(folder, "vq.pt")]
    path = next((p for p in candidates if p and os.path.exists(p)), None)
    if path is None:
        recorded = dec_ck.get("vq_path") or os.path.join(folder, "vq.pt")
        fail(f"{dec_path} was trained on the VQ {recorded}, which is not there: give its new place with --vq")
    vq, vq_ck = load_vq(path, device, grid=tuple(dec_ck["grid"]), pixel_size=dec_ck.get("pixel_size"))
    check_lineage(dec_path, dec_ck, path, vq_ck)
    return vq, vq_ck, path


def load_renderer(args, gpt_ck, device, dtype):
    """render(tokens, gen) -> images in [-1, 1] for the GPT's kind of tokens, the checkpoints it uses
    ({name: dict}) and its name: VQ tokens -> the VQ decoder; DiGIT tokens -> the direct decoder, or
    MaskGIT / AR + the VQ decoder. Every checkpoint is checked against the GPT (lineage)."""
    gpt_file = gpt_path(args.out, args.tokenizer)
    if gpt_ck.get("tokenizer", "digit") == "vq":  # VQ ids straight from the GPT: no stage 2
        path = args.vq or os.path.join(args.out, "vq.pt")
        vq, vq_ck = load_vq(path, device, grid=tuple(gpt_ck["grid"]))
        check_lineage(gpt_file, gpt_ck, path, vq_ck)
        return (lambda t, gen: vq_decode(vq, t, tuple(vq_ck["grid"]))), {path: vq_ck}, "the VQ decoder"
    choice = args.decoder
    if choice == "auto":
        choice = next((k for k, f in DECODERS.items() if os.path.exists(os.path.join(args.out, f))),
                      "maskgit")
    path = os.path.join(args.out, DECODERS[choice])
    if choice == "direct":
        direct, d_ck = load_direct(path, device)
        check_lineage(gpt_file, gpt_ck, path, d_ck)
        return (lambda t, gen: direct_render(direct, t)), {path: d_ck}, f"the direct decoder ({path})"
    dec, dec_ck = load_decoder(path, device, choice)
    check_lineage(gpt_file, gpt_ck, path, dec_ck)
    vq, vq_ck, vq_path = decoder_vq(dec_ck, path, device, args.vq)
    grid = tuple(vq_ck["grid"])
    if choice == "ar":
        def to_codes(t, gen):
            return ar_decode(dec, t, args.decode_temperature, top_p=args.decode_top_p, gen=gen, dtype=dtype)
        name = f"the AR decoder (top-p {args.decode_top_p}, {path})"
    else:
        def to_codes(t, gen):
            return decode(dec, t, args.decode_steps, args.decode_temperature, gen=gen)
        name = f"MaskGIT ({args.decode_steps} steps, {path})"
    return (lambda t, gen: vq_decode(vq, to_codes(t, gen), grid)), {path: dec_ck, vq_path: vq_ck}, \
        f"{name} + the VQ decoder ({vq_path})"


def sample_batch(args, models, labels, tokens, n, gen, dtype):
    """One batch: tokens from the GPT (unless given), then pixels [b, 3, H, W] in [-1, 1] (None with
    --tokens-only)."""
    gpt, render = models
    device = gpt.tok_emb.weight.device
    with autocast(device, dtype):
        if tokens is None:
            # an unconditional model sees its BOS row (= the null class); guidance needs a class to guide to
            rows = torch.full((n,), gpt.null_class, device=device) if labels is None else labels
            cfg = args.cfg_scale if labels is not None else 1.0
            tokens = generate(gpt, rows, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              cfg_scale=cfg, gen=gen, use_cache=not args.no_cache, progress=True, dtype=dtype,
                              length=args.length)
        if args.tokens_only:
            return tokens, None
        return tokens, render(tokens, gen).float().cpu()


def png_name(folder, i, labels, n):
    tag = "uncond" if labels is None else f"class{int(labels[i])}"
    return os.path.join(folder, f"{i:0{max(5, len(str(n - 1)))}d}_{tag}.png")


def save_png(img, path):
    """An image in [-1, 1] as a PNG, written to a temp name first: a killed run never leaves half a PNG."""
    tmp = f"{path}{TMP_TAG}{os.getpid()}"
    save_image(img, tmp, format="png", normalize=True, value_range=(-1, 1))
    os.replace(tmp, path)


def read_pngs(paths):
    """uint8 [N, H, W, 3] of saved samples (what FID tools read: the .npz layout of OpenAI's evaluator),
    filled into one preallocated array (50k ImageNet samples at 256 px are ~10 GB)."""
    first = np.asarray(Image.open(paths[0]).convert("RGB"))
    out = np.empty((len(paths), *first.shape), dtype=np.uint8)
    for i, p in enumerate(tqdm(paths, desc="read PNGs", leave=False)):
        out[i] = np.asarray(Image.open(p).convert("RGB"))
    return out


def finish(args, folder, labels, n, gpt_ck, starts):
    """Rank 0, after every batch is done: tokens.pt, grid.png, tokens.png and samples.npz from the saved parts
    and PNGs."""
    parts = [load_artifact(folder.part(s), "a part of this sampling run")["tokens"] for s in starts]
    tokens = torch.cat(parts)
    out = folder.folder
    save_atomic(dict(tokens=tokens, labels=None if labels is None else labels.cpu(), grid=gpt_ck["grid"],
                     vocab_size=gpt_ck["vocab_size"], classes=gpt_ck["classes"], config=vars(args)),
                os.path.join(out, "tokens.pt"))
    print(f"tokens [{n}, {tokens.shape[1]}] -> {out}/tokens.pt")
    if args.tokens_only:
        return tokens, None
    nrow = args.num_samples if not args.from_tokens else math.ceil(math.sqrt(min(n, 256)))
    shown = min(n, 16 * nrow)  # the picture shows at most 16 rows (classes); every sample is a PNG
    pixels = read_pngs([png_name(out, i, labels, n) for i in range(n if not args.no_npz else shown)])  # once
    images = torch.from_numpy(pixels[:shown]).permute(0, 3, 1, 2).float() / 255
    save_image(make_grid(images, nrow=nrow, padding=2), os.path.join(out, "grid.png"))
    print(f"{n} images -> {out}/NNNNN_*.png, first {shown} in {out}/grid.png")
    if args.show_tokens:
        pic = token_picture(tokens[:shown], tuple(gpt_ck["grid"]), images.shape[-1],
                            gpt_ck["vocab_size"]) / 2 + 0.5
        save_image(make_grid(torch.cat([pic, images]), nrow=nrow), os.path.join(out, "tokens.png"))
        print(f"token picture (top: token ids as colours, bottom: images) -> {out}/tokens.png")
    if not args.no_npz:
        tmp = os.path.join(out, "samples.tmp.npz")
        np.savez(tmp, arr_0=pixels)
        os.replace(tmp, os.path.join(out, "samples.npz"))
        print(f"all {n} samples as uint8 [N, H, W, 3] (key arr_0) -> {out}/samples.npz")
    return tokens, images


def main(argv=None):
    args = get_args(argv)
    rank, world, device = init_distributed(args.device, args.dist_timeout)
    dtype = autocast_dtype(args.precision, device)
    gpt, gpt_ck = load_gpt(gpt_path(args.out, args.tokenizer), device)
    if args.from_tokens and args.tokens_only:
        fail("--from-tokens renders given tokens; --tokens-only would do nothing")
    if args.classes is not None and gpt.n_classes == 0:
        fail("--class given, but gpt.pt is an unconditional model (trained with --unconditional or without "
             "labels)")
    if args.cfg_scale != 1.0 and gpt_ck["config"].get("class_dropout", 0) == 0 and rank == 0:
        print("warning: --cfg-scale on a model trained without --class-dropout: its null class was never "
              "trained",
              file=sys.stderr)
    args.length = gpt_ck["grid"][0] * gpt_ck["grid"][1]  # h*w tokens per image
    labels, given, note = sampling_plan(args, gpt, gpt_ck, device)  # checks --class and --from-tokens first
    render, used, renderer = (None, {}, "none (--tokens-only)") if args.tokens_only else \
        load_renderer(args, gpt_ck, device, dtype)
    n = len(given) if given is not None else len(labels) if labels is not None else args.num_samples
    if rank == 0:
        print(f"sampling {note}; temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}, cfg "
              f"{args.cfg_scale}, {'no ' if args.no_cache else ''}KV cache, {precision_name(dtype)}; "
              f"rendered by {renderer}; {world} process(es)")

    # What the folder holds: the settings and the checkpoints' fingerprints (no paths: a moved folder
    # resumes). Work comes in batches of global sample indices; batch s has its own random stream (seeded
    # by s), so the images do not depend on the number of ranks, and a batch whose part file exists is done.
    skip = ("out", "samples_dir", "device", "show_tokens", "no_npz", "from_tokens", "vq", "dist_timeout",
            "precision", "length")
    settings = {k: v for k, v in vars(args).items() if k not in skip}
    settings.update(precision=precision_name(dtype), models=[gpt_ck.get("fingerprint")] + [
        ck.get("fingerprint") for ck in used.values()],
                    given=tensor_fingerprint(given) if given is not None else None)
    default = "samples" if args.tokenizer == "digit" else f"samples_{args.tokenizer}"
    folder = SampleFolder(args.samples_dir or os.path.join(args.out, default), settings, n,
                          "--samples-dir" if args.samples_dir else "--out")
    folder.claim(rank)
    if dist.is_initialized():
        dist.barrier()  # no rank writes before rank 0 has checked the folder
    starts = list(range(0, n, args.batch_size))
    mine = starts[rank::world]
    todo = [s for s in mine if not folder.done(s)]
    for s in tqdm(todo, desc="batches", unit="batch", disable=rank != 0):
        e = min(s + args.batch_size, n)
        gen = seeded(args.seed, s, device=device)
        tokens, images = sample_batch(args, (gpt, render), None if labels is None else labels[s:e],
                                      None if given is None else given[s:e], e - s, gen, dtype)
        for i, img in enumerate(images if images is not None else []):
            save_png(img, png_name(folder.folder, s + i, labels, n))
        save_atomic(dict(tokens=tokens.cpu()), folder.part(s))  # written last: the batch is complete
    if rank == 0 and len(todo) < len(mine):
        print(f"resumed: {len(mine) - len(todo)} of this process's batches were already in {folder.folder}")
    result = None
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        result = finish(args, folder, labels, n, gpt_ck, starts)
        folder.finish()
    if dist.is_initialized():
        dist.barrier()
    finish_distributed()  # eval.py --sweep calls us inside its own process group: that one stays
    return result


if __name__ == "__main__":
    main()
