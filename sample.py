"""
Generate images with DiGIT: GPT samples DiGIT tokens (KV cache, top-k/top-p, classifier-free
guidance), then a renderer paints them: the MaskGIT decoder turns them into VQ tokens and the VQ
decoder paints pixels, or the direct decoder paints pixels from the tokens in one pass (--decoder).

Run (reads out/gpt.pt, out/decoder.pt, out/vq.pt; writes out/samples/: NNNNN_classK.png, grid.png,
tokens.pt, samples.npz):
    python sample.py --class 7                       # 8 samples of class 7
    python sample.py --class 1,7,9 --num-samples 4   # one row per class
    python sample.py --class 207 --cfg-scale 4 --top-k 300 --out out_imagenet
    python sample.py                                 # unconditional (or a random class)
    python sample.py --tokenizer vq --class 7        # the same GPT trained on the pixel VQ's tokens (gpt_vq.pt):
                                                     # its VQ ids are painted by the VQ decoder directly -> out/samples_vq/
    torchrun --nproc_per_node 8 sample.py --class $(seq -s, 0 999) --num-samples 50 --out out_imagenet   # 50k for FID

Batches are spread over the ranks and each has its own seed, so the images are the same for any number of
processes; a batch is finished when its part file (samples/parts/) exists, so an interrupted run continues.
"""
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from common import (add_system_args, check_same, fail, init_distributed, load_artifact, mass, nonneg_float, nonneg_int, parser,
                    positive_float, positive_int, prepare_out, save_atomic, seeded)
from train_decoder import decode, direct_render, load_decoder, load_direct
from vqgan import load_vq, vq_decode
from data import add_tokenizer_arg, base_view
from train_gpt import KVCache, gpt_path, load_gpt


def get_args(argv=None):
    p = parser(__doc__)
    a = p.add_argument_group("what to generate").add_argument
    a("--class", dest="classes", default=None, help="class index or name, or several: 1,7,9 (one row each)")
    a("--num-samples", type=positive_int, default=8, help="images per class (default: %(default)s)")
    a("--from-tokens", default=None, help="render the DiGIT tokens of this token file (e.g. out/tokens_val.pt) instead of sampling; --num-samples of them")
    a("--tokens-only", action="store_true", help="only sample DiGIT tokens, no rendering")
    a = p.add_argument_group("sampling").add_argument
    a("--temperature", type=positive_float, default=1.0, help="softmax temperature (default: %(default)s)")
    a("--top-k", type=nonneg_int, default=0, help="sample among the k most likely tokens (0: all; paper 200-400) (default: %(default)s)")
    a("--top-p", type=mass, default=1.0, help="nucleus sampling mass (1: off) (default: %(default)s)")
    a("--cfg-scale", type=nonneg_float, default=1.0, help="classifier-free guidance: uncond + s * (cond - uncond) (1: off) (default: %(default)s)")
    a("--decoder", default="auto", choices=["auto", "direct", "maskgit"], help="renderer of DiGIT tokens: maskgit (decoder.pt + "
      "vq.pt) or direct (direct.pt); auto = direct only when direct.pt exists and decoder.pt does not (on the demo MaskGIT's "
      "samples are recognised more often) (default: %(default)s)")
    a("--decode-steps", type=positive_int, default=8, help="MaskGIT steps of the renderer (default: %(default)s)")
    a("--decode-temperature", type=positive_float, default=1.0, help="sampling temperature of the renderer's VQ tokens (default: %(default)s)")
    a("--no-cache", action="store_true", help="recompute the whole prefix every step (for checking / benchmarking)")
    a = p.add_argument_group("output").add_argument
    a("--samples-dir", default=None, help="where images go (default: OUT/samples, OUT/samples_vq with --tokenizer vq)")
    a("--show-tokens", action="store_true", help="also write a picture of the token ids (one colour per id)")
    a("--no-npz", action="store_true", help="do not write samples.npz (all samples as one uint8 array, for FID tools)")
    system = add_system_args(p, "reads gpt.pt, decoder.pt, vq.pt from here", precision=False)
    system.add_argument("--batch-size", type=positive_int, default=64, help="images generated at once (default: %(default)s)")
    add_tokenizer_arg(system)
    return p.parse_args(argv)


def filter_logits(logits, top_k=0, top_p=1.0):
    """Keep the top-k tokens and/or the smallest set whose probability reaches top_p; the rest -> -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # tokens entirely beyond the nucleus (the top one always stays)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(model, labels, temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0, gen=None, use_cache=True, progress=False):
    """DiGIT tokens [B, T] for class labels [B] (model.null_class: unconditional), one token per step.

    With cfg_scale != 1 the conditional rows and their null-class twins run as one batch of 2B and
    the logits are mixed as uncond + s * (cond - uncond) (Ho & Salimans 2022)."""
    B, T = len(labels), model.block_size
    device = model.tok_emb.weight.device
    guided = cfg_scale != 1.0
    rows = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    cache = KVCache(model, len(rows)) if use_cache else None
    tokens = torch.zeros(len(rows), 0, dtype=torch.long, device=device)
    for t in tqdm(range(T), desc="tokens", unit="tok", leave=False, disable=not progress):
        inp = tokens if (cache is None or t == 0) else tokens[:, -1:]
        logits = model(inp, rows, cache=cache)[:, -1].float()
        if guided:
            c, u = logits.chunk(2)
            logits = u + cfg_scale * (c - u)
        logits = filter_logits(logits / temperature, top_k, top_p)
        nxt = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=gen).to(device)
        if guided:
            nxt = nxt.repeat(2, 1)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens[:B]


def parse_classes(spec, classes):
    """'7' / 'tench' / '1,7,9' -> list of class indices, checked against the model's classes."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if item.lstrip("-").isdigit():
            idx = int(item)
            if not 0 <= idx < len(classes):
                fail(f"class {idx} is out of range: the model knows {len(classes)} classes (0..{len(classes) - 1})")
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


def check_fit(gpt_ck, dec_ck, vq_ck, out):
    """The three checkpoints must describe the same tokens and grids; name both files on a mismatch."""
    pairs = [("gpt.pt", "vocab_size", gpt_ck["vocab_size"], "decoder.pt", "digit_vocab", dec_ck["digit_vocab"]),
             ("gpt.pt", "grid", tuple(gpt_ck["grid"]), "decoder.pt", "grid", tuple(dec_ck["grid"])),
             ("gpt.pt", "encoder", gpt_ck["encoder"], "decoder.pt", "encoder", dec_ck["encoder"]),
             ("decoder.pt", "vq codes", dec_ck["model_args"]["vq_codes"], "vq.pt", "codes", vq_ck["model_args"]["codes"]),
             ("decoder.pt", "grid", tuple(dec_ck["grid"]), "vq.pt", "grid", tuple(vq_ck["grid"]))]
    for f1, k1, v1, f2, k2, v2 in pairs:
        if v1 != v2:
            fail(f"{out}/{f1} ({k1} {v1}) does not fit {out}/{f2} ({k2} {v2}): they were trained on different tokens")
    check_same("codebooks", f"{out}/gpt.pt", gpt_ck.get("tokens"), f"{out}/decoder.pt", dec_ck.get("tokens"))
    check_same("VQs", f"{out}/decoder.pt", dec_ck.get("vq"), f"{out}/vq.pt", vq_ck.get("fingerprint"))


def check_fit_vq(gpt_ck, vq_ck, out):
    """A GPT on VQ tokens (gpt_vq.pt) must have learned the codes of this vq.pt: same code count, grid and fingerprint."""
    if gpt_ck["vocab_size"] != vq_ck["model_args"]["codes"] or tuple(gpt_ck["grid"]) != tuple(vq_ck["grid"]):
        fail(f"{out}/gpt_vq.pt (vocab {gpt_ck['vocab_size']}, grid {tuple(gpt_ck['grid'])}) does not fit {out}/vq.pt "
             f"({vq_ck['model_args']['codes']} codes, grid {tuple(vq_ck['grid'])})")
    check_same("VQs", f"{out}/gpt_vq.pt", gpt_ck.get("tokens"), f"{out}/vq.pt", vq_ck.get("fingerprint"))


def real_tokens(path, n, gpt_ck, device):
    """The first n rows of a token file (their labels as the 'requested' classes), checked against gpt.pt."""
    tok = base_view(load_artifact(path, "--from-tokens takes a token file such as OUT/tokens_val.pt"))
    if not isinstance(tok, dict) or "tokens" not in tok or "grid" not in tok:
        fail(f"--from-tokens {path} is not a token file (no tokens/grid): give one such as OUT/tokens_val.pt")
    check_same("codebooks", path, tok.get("codebook"), "gpt.pt", gpt_ck.get("tokens"))
    if tok["vocab_size"] != gpt_ck["vocab_size"] or tuple(tok["grid"]) != tuple(gpt_ck["grid"]):
        fail(f"{path} (vocab {tok['vocab_size']}, grid {tuple(tok['grid'])}) does not match the models "
             f"(vocab {gpt_ck['vocab_size']}, grid {tuple(gpt_ck['grid'])})")
    # spread the n rows over the file so that every class appears
    rows = torch.linspace(0, len(tok["tokens"]) - 1, min(n, len(tok["tokens"]))).long()
    labels = tok["labels"][rows].to(device) if tok.get("labels") is not None else None
    return tok["tokens"][rows].long().to(device), labels, len(rows)


def sampling_plan(args, gpt, gpt_ck, device):
    """Class label of every sample ([n], or None for an unconditional model), the given DiGIT tokens
    (--from-tokens) or None, and a line describing it."""
    classes, gen = gpt_ck["classes"], seeded(args.seed)
    if args.from_tokens:  # render real tokens: what the decoder alone can do, no GPT involved
        tokens, labels, _ = real_tokens(args.from_tokens, args.num_samples, gpt_ck, device)
        return labels, tokens, f"rendering {len(tokens)} real token grids of {args.from_tokens}"
    if gpt.n_classes == 0:
        return None, None, f"{args.num_samples} unconditional samples"
    if args.classes is None:
        rows = torch.randint(gpt.n_classes, (1,), generator=gen).tolist()
        note = f"no --class given: a random class ({classes[rows[0]]})"
    else:
        rows = parse_classes(args.classes, classes)
        note = "classes " + ", ".join(f"{c} ({classes[c]})" for c in rows)
    return torch.tensor(rows, device=device).repeat_interleave(args.num_samples), None, f"{args.num_samples} per class, {note}"


def load_renderer(args, gpt_ck, device):
    """render(tokens, gen) -> images in [-1, 1] for the GPT's kind of tokens, the fingerprints of the checkpoints it uses,
    and its name: VQ tokens -> the VQ decoder; DiGIT tokens -> the direct decoder, or MaskGIT + the VQ decoder."""
    out = args.out
    if gpt_ck.get("tokenizer", "digit") == "vq":  # VQ ids straight from the GPT: no MaskGIT stage
        vq, vq_ck = load_vq(os.path.join(out, "vq.pt"), device)
        check_fit_vq(gpt_ck, vq_ck, out)
        return (lambda t, gen: vq_decode(vq, t, tuple(vq_ck["grid"]))), [vq_ck.get("fingerprint")], "the VQ decoder"
    only_direct = os.path.exists(os.path.join(out, "direct.pt")) and not os.path.exists(os.path.join(out, "decoder.pt"))
    choice = args.decoder if args.decoder != "auto" else "direct" if only_direct else "maskgit"
    if choice == "direct":
        direct, d_ck = load_direct(os.path.join(out, "direct.pt"), device)
        for key, a, b in (("vocab_size", gpt_ck["vocab_size"], d_ck["digit_vocab"]), ("grid", tuple(gpt_ck["grid"]), tuple(d_ck["grid"]))):
            if a != b:
                fail(f"{out}/gpt.pt ({key} {a}) does not fit {out}/direct.pt ({key} {b}): they were trained on different tokens")
        check_same("codebooks", f"{out}/gpt.pt", gpt_ck.get("tokens"), f"{out}/direct.pt", d_ck.get("tokens"))
        return (lambda t, gen: direct_render(direct, t)), [d_ck.get("fingerprint")], "the direct decoder (direct.pt)"
    dec, dec_ck = load_decoder(os.path.join(out, "decoder.pt"), device)
    # the VQ the MaskGIT learned: OUT/vq.pt, or the pretrained one decoder.pt names (train_decoder.py --vq)
    vq_path = dec_ck.get("vq_path") or os.path.join(out, "vq.pt")
    vq, vq_ck = load_vq(vq_path, device, grid=tuple(dec_ck["grid"]), pixel_size=dec_ck.get("pixel_size"))
    check_fit(gpt_ck, dec_ck, vq_ck, out)

    def render(tokens, gen):
        return vq_decode(vq, decode(dec, tokens, args.decode_steps, args.decode_temperature, gen=gen), tuple(vq_ck["grid"]))
    return render, [dec_ck.get("fingerprint"), vq_ck.get("fingerprint")], f"MaskGIT ({args.decode_steps} steps, decoder.pt) + the VQ decoder ({vq_path})"


def sample_batch(args, models, labels, tokens, n, gen):
    """One batch: tokens from the GPT (unless given), then pixels [b, 3, H, W] in [-1, 1] (None with --tokens-only)."""
    gpt, render = models
    if tokens is None:
        # an unconditional model sees its BOS row (= the null class); guidance needs a class to guide towards
        rows = torch.full((n,), gpt.null_class, device=gpt.tok_emb.weight.device) if labels is None else labels
        cfg = args.cfg_scale if labels is not None else 1.0
        tokens = generate(gpt, rows, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=cfg, gen=gen,
                          use_cache=not args.no_cache, progress=True)
    if args.tokens_only:
        return tokens, None
    return tokens, render(tokens, gen).float().cpu()


def png_name(folder, i, labels, n):
    tag = "uncond" if labels is None else f"class{int(labels[i])}"
    return os.path.join(folder, f"{i:0{max(5, len(str(n - 1)))}d}_{tag}.png")


def read_pngs(paths):
    """uint8 [N, H, W, 3] of saved samples (what FID tools read: the .npz layout of OpenAI's evaluator),
    filled into one preallocated array (50k ImageNet samples at 256 px are ~10 GB)."""
    first = np.asarray(Image.open(paths[0]).convert("RGB"))
    out = np.empty((len(paths), *first.shape), dtype=np.uint8)
    for i, p in enumerate(tqdm(paths, desc="read PNGs", leave=False)):
        out[i] = np.asarray(Image.open(p).convert("RGB"))
    return out


def finish(args, folder, parts, labels, n, gpt_ck):
    """Rank 0, after every batch is done: tokens.pt, grid.png, tokens.png and samples.npz from the saved parts and PNGs."""
    tokens = torch.cat([load_artifact(p, "a part of this sampling run")["tokens"] for p in parts])
    save_atomic(dict(tokens=tokens, labels=None if labels is None else labels.cpu(), grid=gpt_ck["grid"],
                     vocab_size=gpt_ck["vocab_size"], classes=gpt_ck["classes"], config=vars(args)), os.path.join(folder, "tokens.pt"))
    print(f"tokens [{n}, {tokens.shape[1]}] -> {folder}/tokens.pt")
    if args.tokens_only:
        return tokens, None
    nrow = args.num_samples if not args.from_tokens else math.ceil(math.sqrt(min(n, 256)))
    shown = min(n, 16 * nrow)  # the picture shows at most 16 rows (classes); every sample is a PNG
    pixels = read_pngs([png_name(folder, i, labels, n) for i in range(n if not args.no_npz else shown)])  # read once
    images = torch.from_numpy(pixels[:shown]).permute(0, 3, 1, 2).float() / 255
    save_image(make_grid(images, nrow=nrow, padding=2), os.path.join(folder, "grid.png"))
    print(f"{n} images -> {folder}/NNNNN_*.png, first {shown} in {folder}/grid.png")
    if args.show_tokens:
        pic = token_picture(tokens[:shown], tuple(gpt_ck["grid"]), images.shape[-1], gpt_ck["vocab_size"]) / 2 + 0.5
        save_image(make_grid(torch.cat([pic, images]), nrow=nrow), os.path.join(folder, "tokens.png"))
        print(f"token picture (top: token ids as colours, bottom: images) -> {folder}/tokens.png")
    if not args.no_npz:
        tmp = os.path.join(folder, "samples.tmp.npz")
        np.savez(tmp, arr_0=pixels)
        os.replace(tmp, os.path.join(folder, "samples.npz"))
        print(f"all {n} samples as uint8 [N, H, W, 3] (key arr_0) -> {folder}/samples.npz")
    return tokens, images


def main(argv=None):
    args = get_args(argv)
    owner = not dist.is_initialized()  # eval.py --sweep calls us inside its own process group
    rank, world, device = init_distributed(args.device, args.dist_timeout)
    gpt, gpt_ck = load_gpt(gpt_path(args.out, args.tokenizer), device)
    if args.from_tokens and args.tokens_only:
        fail("--from-tokens renders given tokens; --tokens-only would do nothing")
    if args.classes is not None and gpt.n_classes == 0:
        fail("--class given, but gpt.pt is an unconditional model (trained with --unconditional or without labels)")
    if args.cfg_scale != 1.0 and gpt_ck["config"].get("class_dropout", 0) == 0 and rank == 0:
        print("warning: --cfg-scale on a model trained without --class-dropout: its null class was never trained", file=sys.stderr)
    labels, given, note = sampling_plan(args, gpt, gpt_ck, device)  # checks --class and --from-tokens first
    render, fingerprints, renderer = (None, [], "none (--tokens-only)") if args.tokens_only else load_renderer(args, gpt_ck, device)
    n = len(given) if given is not None else len(labels) if labels is not None else args.num_samples
    if rank == 0:
        print(f"sampling {note}; temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}, cfg {args.cfg_scale}, "
              f"{'no ' if args.no_cache else ''}KV cache; rendered by {renderer}; {world} process(es)")
    folder = args.samples_dir or os.path.join(args.out, "samples" if args.tokenizer == "digit" else f"samples_{args.tokenizer}")
    os.makedirs(os.path.join(prepare_out(folder), "parts"), exist_ok=True)
    # Work comes in batches of global sample indices; batch s has its own random stream (seeded by s), so
    # the images do not depend on the number of ranks, and a batch whose part file exists is already done.
    settings = {k: v for k, v in vars(args).items() if k not in ("device", "show_tokens", "no_npz", "samples_dir")}
    settings.update(out=os.path.abspath(args.out), from_tokens=args.from_tokens and os.path.abspath(args.from_tokens),
                    models=[gpt_ck.get("fingerprint")] + fingerprints)  # retrained = other samples
    starts = list(range(0, n, args.batch_size))
    parts = [os.path.join(folder, "parts", f"{s:08d}.pt") for s in starts]
    models = (gpt, render)
    done = 0
    for s, part in tqdm(list(zip(starts, parts))[rank::world], desc="batches", unit="batch", disable=rank != 0):
        if os.path.exists(part):
            if load_artifact(part, "a part of an earlier sampling run")["settings"] != settings:
                fail(f"{folder} holds samples made with other settings or other checkpoints: delete it or choose another --samples-dir")
            continue
        e = min(s + args.batch_size, n)
        gen = seeded(args.seed, s)
        tokens, images = sample_batch(args, models, None if labels is None else labels[s:e], None if given is None else given[s:e], e - s, gen)
        for i, img in enumerate(images if images is not None else []):
            save_image(img, png_name(folder, s + i, labels, n), normalize=True, value_range=(-1, 1))
        save_atomic(dict(tokens=tokens.cpu(), settings=settings), part)  # written last: the batch is complete
        done += 1
    if rank == 0 and done < len(starts[rank::world]):
        print(f"resumed: {len(starts[rank::world]) - done} of this process's batches were already in {folder}")
    result = None
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        result = finish(args, folder, parts, labels, n, gpt_ck)
    if dist.is_initialized():
        dist.barrier()
        if owner:
            dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
