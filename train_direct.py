"""
A direct decoder for stage 2: DiGIT tokens -> pixels in one pass, no VQ and no MaskGIT (the paper's future
work; RAE-style). Each id becomes its frozen K-means centroid (+ a learned residual, zero at start); Gaussian
noise on those embeddings while training, so that it copes with a GPT's imperfect tokens; a bidirectional
transformer over the grid; a head that paints each token's patch. Trained in train_decoder.py's loop.

Run (after tokenize_kmeans.py; needs no VQ):
    python train_direct.py                                   # -> out/direct.pt, out/direct_val.png
    python train_direct.py --direct-input features           # the upper bound -> out/direct_features.pt

--feature-noise S: a noise std ~ U(0, S) x the centroids' std per image (RAE's augmentation);
--token-corruption: that fraction of the ids replaced by random ones; --direct-input features: the same
decoder fed the continuous DINOv2 features the ids were quantised from (what K-means costs in pixels; demo
scale: every image's features are held in memory); --disc-weight: train_vq.py's PatchGAN.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from artifacts import lineage, load_model
from common import autocast, autocast_dtype, fail, fraction, nonneg_float, nonneg_int, positive_int
from data import dataset_for_tokens, load_codebook, to_unit
from dinov2 import DinoPerceptual, load_encoder
from train_decoder import Stage, decoder_parser, finish_args, save_rows, train
from train_gpt import Block, model_size
from train_vq import adversarial_term, default_pixel_size, eval_subset, patch_discriminator, psnr, vq_levels


def get_args(argv=None):
    p, model = decoder_parser(__doc__)
    a = model.add_argument
    a("--feature-noise", type=nonneg_float, default=0.8,
      help="noise scale on the embeddings (default: %(default)s)")
    a("--token-corruption", type=fraction, default=0.0, help="share of ids replaced (default: %(default)s)")
    a("--pixel-loss", default="l1", choices=["l1", "mse"], help="(default: %(default)s)")
    a("--direct-input", default="tokens", choices=["tokens", "features"], help="(default: %(default)s)")
    a("--perceptual", type=nonneg_float, default=0.1, help="DINOv2 loss weight (default: %(default)s)")
    a("--perceptual-layer", type=positive_int, default=3, help="its DINOv2 block (default: %(default)s)")
    a("--disc-weight", type=nonneg_float, default=0.0, help="PatchGAN weight, 0 = off (default: %(default)s)")
    a("--disc-start", type=nonneg_int, default=0, help="step the GAN starts at (default: %(default)s)")
    a("--disc-layers", type=positive_int, default=3,
      help="strided convs of the PatchGAN (default: %(default)s)")
    return finish_args(p.parse_args(argv))


class DirectDecoder(nn.Module):
    """DiGIT token ids [B, h*w] -> pixels [B, 3, h*p, w*p] in one forward pass.

    The ids become their K-means centroids (a frozen buffer copied from codebook.pt: the tokens keep the
    meaning the tokenizer gave them) plus a learned residual embedding (zero at start); a linear map to the
    width, learned positions, bidirectional Blocks (train_gpt.Block, causal=False: every token sees the
    whole grid), and a linear head that paints each token's p x p x 3 patch (as RAE's ViT decoder)."""

    def __init__(self, vocab, dim, grid, patch, n_layer, n_embd, n_head):
        super().__init__()
        self.grid, self.patch = tuple(grid), patch
        self.register_buffer("centroids", torch.zeros(vocab, dim))
        self.residual = nn.Embedding(vocab, dim)
        nn.init.zeros_(self.residual.weight)
        self.proj = nn.Linear(dim, n_embd)
        self.pos = nn.Parameter(torch.randn(1, grid[0] * grid[1], n_embd) * 0.02)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, 0.0, "pre", causal=False) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, patch * patch * 3)

    def embed(self, ids):
        return self.centroids[ids] + self.residual(ids)

    def forward(self, ids=None, emb=None):
        """Pixels in [-1, 1] (unclamped while training) from ids, or from given embeddings emb [B, h*w, D]
        (the ids' embeddings plus training noise, or continuous DINOv2 features for the upper bound)."""
        x = self.proj(self.embed(ids) if emb is None else emb) + self.pos
        for block in self.blocks:
            x = block(x)
        (h, w), p = self.grid, self.patch
        x = self.head(self.ln_f(x)).view(len(x), h, w, 3, p, p)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(len(x), 3, h * p, w * p)


def direct_render(model, ids):
    """What sample.py calls: DiGIT ids [B, h*w] -> images in [-1, 1] (or continuous features [B, h*w, D])."""
    return (model(emb=ids) if ids.is_floating_point() else model(ids)).clamp(-1, 1)


@torch.no_grad()
def patch_features(tok, device, dtype, batch_size=64):
    """[N, h*w, D] DINOv2 patch features of the images behind a token file: what tokenize_kmeans.py quantised
    (same encoder, block, image size, final norm), for the direct decoder's continuous upper bound."""
    model = load_encoder(tok["encoder"]).to(device)
    feats = []
    loader = DataLoader(dataset_for_tokens(tok), batch_size=batch_size)
    for x, _ in tqdm(loader, desc="DINOv2 patch features", leave=False):
        with autocast(device, dtype):
            feats.append(model.get_intermediate_layers(x.to(device), [tok["layer"]])[0].float().cpu())
    return torch.cat(feats)


def build_direct(args, train_tok, device):
    """The codebook's centroids as frozen input embeddings, a fresh transformer, the optional perceptual loss
    and PatchGAN."""
    cb = load_codebook(args.out, train_tok, "train")
    grid = tuple(train_tok["grid"])
    pixel_size = args.pixel_size or default_pixel_size(grid)
    vq_levels(pixel_size, grid)  # the same rule as the VQ: a power-of-two multiple of the grid
    model_args = dict(vocab=len(cb["centroids"]), dim=cb["centroids"].shape[1], grid=grid,
                      patch=pixel_size // grid[0], **model_size(args))
    model = DirectDecoder(**model_args)
    model.centroids.copy_(cb["centroids"])
    if args.direct_input == "features":  # the ids' embeddings are never used: no parameter without a gradient
        model.residual.requires_grad_(False)

    def features_instead_of_ids(train, val):  # the upper bound: items carry the features, not the ids
        dtype = autocast_dtype(args.precision, device)
        for ds in (train, val):
            if ds.tok["tokens"].ndim == 3:
                fail("--direct-input features takes the plain images: tokenize without --views for it")
            ds.tok = dict(ds.tok, tokens=patch_features(ds.tok, device, dtype))

    perceptual = None
    if args.perceptual:
        perceptual = DinoPerceptual(train_tok["encoder"], args.perceptual_layer).to(device)
    disc = patch_discriminator(args.disc_layers).to(device) if args.disc_weight > 0 else None
    features = args.direct_input == "features"
    return model.to(device), model_args, dict(
        perceptual=perceptual, disc=disc, scale=float(cb["centroids"].std()),
                                              record=dict(pixel_size=pixel_size),
        lineage=lineage(train_tok), file="direct_features.pt" if features else "direct.pt",
        prepare=features_instead_of_ids if features else None)


def direct_loss(model, raw, batch, parts, args, step):
    """Pixel loss (+ perceptual, + adversarial) of the picture painted from the DiGIT tokens, with the
    training augmentations drawn for the whole global batch on the device (this rank uses its rows): Gaussian
    noise of std ~ U(0, --feature-noise) x the centroids' std on the embeddings, and --token-corruption of the
    ids replaced by random ids. Returns the loss and the picture (for the discriminator's step)."""
    x, digit, gen, mine = batch.x, batch.digit, batch.gen, batch.mine
    B, L, (K, D) = batch.size, digit.shape[1], raw.centroids.shape
    sigma = torch.rand(B, 1, 1, generator=gen, device=gen.device) * args.feature_noise * parts["scale"]
    noise = (torch.randn(B, L, D, generator=gen, device=gen.device) * sigma)[mine]
    if digit.is_floating_point():  # continuous features (--direct-input features): noise, no id corruption
        emb = digit
    else:
        corrupt = (torch.rand(B, L, generator=gen, device=gen.device) < args.token_corruption)[mine]
        random_ids = torch.randint(K, (B, L), generator=gen, device=gen.device)[mine]
        emb = raw.embed(torch.where(corrupt, random_ids, digit))
    rec = model(emb=emb + noise).float()
    loss = F.l1_loss(rec, x) if args.pixel_loss == "l1" else F.mse_loss(rec, x)
    if parts["perceptual"] is not None:
        loss = loss + args.perceptual * parts["perceptual"](rec, x)
    return loss + adversarial_term(loss, rec, raw.head.weight, args, parts["disc"], step), rec


@torch.no_grad()
def evaluate_direct(model, val, parts, args, device, dtype, png):
    """PSNR of the pictures painted from the real DiGIT tokens of val images (noise off: eval mode)."""
    model.eval()
    psnrs, rows, seen = [], [], 0
    subset = eval_subset(val, args.eval_images)
    show = set(torch.linspace(0, len(subset) - 1, 8).long().tolist())
    with autocast(device, dtype):
        for x, digit, _ in DataLoader(subset, batch_size=64, generator=torch.Generator()):
            x = to_unit(x.to(device))
            rendered = direct_render(model, digit.to(device)).float()
            psnrs.append(psnr(rendered, x))
            pick = [i for i in range(len(x)) if seen + i in show]
            rows.append(torch.stack([x[pick], rendered[pick]]))  # original | painted from its DiGIT tokens
            seen += len(x)
    model.train()
    save_rows(rows, png)
    m = dict(psnr=float(torch.cat(psnrs).mean()))
    return m, f"val PSNR painted from DiGIT tokens {m['psnr']:.2f} dB -> {png}"


def load_direct(path, device):
    return load_model(path, DirectDecoder, "run train_direct.py first", device)


STAGE = Stage(build_direct, direct_loss, evaluate_direct, "direct.pt")


def main(argv=None):
    return train(get_args(argv), STAGE, "direct")


if __name__ == "__main__":
    main()
