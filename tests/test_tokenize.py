"""tokenize_kmeans.py end to end on a tiny ImageFolder: the file contract, corrupt images, torchrun, bad
input."""
import os

import pytest
import torch

from conftest import run_script
import tokenize_kmeans as tk
from data import MNIST5k, dataset_for_tokens, make_dataset
from dinov2 import load_encoder
from tokenize_kmeans import token_dtype

TINY = ["--encoder", "dinov2_vits14_offline", "--image-size", "56", "--k", "16", "--iters", "5", "--workers",
        "0", "--batch-size", "5", "--precision", "fp32"]


@pytest.fixture(scope="module")
def tokenized(image_folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tok1"))
    p = run_script("tokenize_kmeans.py", "--data", image_folder, "--out", out, *TINY)
    return out, p.stdout + p.stderr


def load(out, name):
    return torch.load(os.path.join(out, name), weights_only=True)


def test_token_files_follow_design(tokenized):
    out, _ = tokenized
    cb = load(out, "codebook.pt")
    assert cb["centroids"].dtype == torch.float32 and cb["centroids"].shape == (16, 384)
    assert cb["encoder"] == "dinov2_vits14_offline" and cb["layer"] == 9
    assert cb["image_size"] == 56 and cb["patch_size"] == 14
    assert {"iters", "init", "seed", "n_points", "inertia"} <= set(cb)
    for split, n in (("train", 24), ("val", 8)):
        t = load(out, f"tokens_{split}.pt")
        assert t["tokens"].shape == (n, 16) and t["tokens"].dtype == torch.uint8
        assert t["grid"] == (4, 4) and t["vocab_size"] == 16
        assert int(t["tokens"].max()) < 16
        assert t["labels"].dtype == torch.int64 and t["labels"].tolist() == [0] * (n // 2) + [1] * (n // 2)
        assert t["classes"] == ["bars", "disc"]
        assert t["data"]["name"] == "imagefolder" and t["data"]["split"] == split
        assert (t["encoder"], t["layer"], t["image_size"]) == (cb["encoder"], cb["layer"], cb["image_size"])


def test_train_features_kept_from_the_fit_give_the_tokens_of_a_second_pass(image_folder):
    args = tk.get_args(["--data", image_folder, *TINY])
    args.dtype, cpu = None, torch.device("cpu")
    train = make_dataset(image_folder, "train", 56, args.cache)
    model = load_encoder(args.encoder, args.cache)
    centroids, _, kept = tk.fit_codebook(args, model, train, 9, cpu, 0, 1)
    assert kept is not None  # 24 readable images: the fit encodes all of them
    again = tk.encode(model, train, list(range(len(train))), 9, args, cpu, 0, "again", cls=True)
    a, b = tk.tokenize_split(kept, centroids, cpu), tk.tokenize_split(again, centroids, cpu)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert a[4] == b[4] == [train.name(24)] and a[5] == b[5]
    torch.testing.assert_close(a[3], b[3])  # the images' descriptors (the feature cache) too


def test_the_feature_cache_tokenize_writes_is_what_probe_and_eval_would_compute(tokenized, tmp_path):
    """tokenize_kmeans.py writes the DINOv2 descriptors (block-9 patches mean-pooled | final CLS) of every
    image it encoded anyway; dinov2_features computing them afresh gives the same (cached = uncached)."""
    from dinov2 import dinov2_features, feature_cache
    out, _ = tokenized
    for split in ("train", "val"):
        tok = load(out, f"tokens_{split}.pt")
        cached = torch.load(feature_cache(tok, tok["encoder"], tok["image_size"], tok["layer"], None, out),
                            weights_only=True)
        fresh = dinov2_features(tok, tok["encoder"], tok["image_size"], tok["layer"], 8, torch.device("cpu"),
                                str(tmp_path))
        assert cached["features"].shape == (len(tok["tokens"]), 2 * 384)
        torch.testing.assert_close(cached["features"], torch.cat([fresh["pooled"], fresh["cls"]], 1),
                                   rtol=1e-4, atol=1e-4)


def test_corrupt_image_is_skipped_and_named(tokenized):
    out, log = tokenized
    t = load(out, "tokens_train.pt")
    assert len(t["skipped"]) == 1 and t["skipped"][0].endswith("999_corrupt.png")
    assert "skipped 1 unreadable image(s) in train" in log and "999_corrupt.png" in log
    # the corrupt file sorts last in class "disc" (index 24), so every other image is kept in order
    assert t["data"]["index"].tolist() == list(range(24))


def test_tokens_can_be_traced_back_to_their_images(tokenized):
    out, _ = tokenized
    t = load(out, "tokens_val.pt")
    ds = dataset_for_tokens(t)
    assert len(ds) == len(t["tokens"])
    img, label = ds[5]
    assert img.shape == (3, 56, 56) and label == int(t["labels"][5])


def test_codebook_is_reused_unless_settings_change(tokenized, image_folder, tmp_path):
    out, _ = tokenized
    before = load(out, "codebook.pt")["centroids"]
    p = run_script("tokenize_kmeans.py", "--data", image_folder, "--out", out, *TINY)
    assert "reusing" in p.stdout
    assert torch.equal(before, load(out, "codebook.pt")["centroids"])
    # a copy of the run, then: a changed setting is refused (everything trained on the tokens would be
    # orphaned)
    # and nothing is touched; --refit fits again
    for name in ("codebook.pt", "tokens_train.pt", "tokens_val.pt"):
        os.link(os.path.join(out, name), tmp_path / name)
    stamps = {f: os.path.getmtime(tmp_path / f) for f in os.listdir(tmp_path)}
    for change in (["--iters", "2"], ["--seed", "1"]):
        p = run_script("tokenize_kmeans.py", "--data", image_folder, "--out", tmp_path, *TINY, *change,
                       check=False)
        assert p.returncode != 0 and "fitted with other settings" in p.stderr and "--refit" in p.stderr
    assert {f: os.path.getmtime(tmp_path / f) for f in os.listdir(tmp_path)} == stamps
    p = run_script("tokenize_kmeans.py", "--data", image_folder, "--out", tmp_path, *TINY, "--iters", "2",
                   "--refit")
    assert "reusing" not in p.stdout and "codebook: inertia" in p.stdout
    assert load(tmp_path, "codebook.pt")["fit_config"]["iters"] == 2


def test_two_processes_match_one(tokenized, image_folder, tmp_path):
    out1, _ = tokenized
    out2 = str(tmp_path)
    run_script("tokenize_kmeans.py", "--data", image_folder, "--out", out2, *TINY, nproc=2)
    c1, c2 = load(out1, "codebook.pt"), load(out2, "codebook.pt")
    torch.testing.assert_close(c2["centroids"], c1["centroids"], atol=1e-4, rtol=1e-5)
    assert abs(c1["inertia"] - c2["inertia"]) < 1e-5 * c1["inertia"]
    for split in ("train", "val"):
        t1, t2 = load(out1, f"tokens_{split}.pt"), load(out2, f"tokens_{split}.pt")
        assert torch.equal(t1["tokens"], t2["tokens"]) and torch.equal(t1["labels"], t2["labels"])
        assert torch.equal(t1["data"]["index"], t2["data"]["index"]) and t1["skipped"] == t2["skipped"]


def test_mnist_split_is_fixed_and_stratified():
    cache = os.environ.get("DIGIT_CACHE", os.path.expanduser("~/.cache/digit"))
    tr, va = MNIST5k("train", lambda x: x, cache), MNIST5k("val", lambda x: x, cache)
    assert len(tr) == 4500 and len(va) == 500
    assert torch.bincount(torch.from_numpy(va.labels)).tolist() == [50] * 10
    img, label = va[0]
    assert img.mode == "RGB" and img.size == (28, 28) and 0 <= label < 10
    # no image is in both splits
    flat = lambda d: {bytes(x) for x in d.images.reshape(len(d), -1)}
    assert len(flat(tr) & flat(va)) <= 5  # MNIST has a handful of exact duplicate digits, not a split leak


def test_token_dtype():
    assert token_dtype(256) == torch.uint8 and token_dtype(257) == torch.int16
    assert token_dtype(8192) == torch.int16
    assert token_dtype(40000) == torch.int32


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/imagenet"], "does not exist"),
    (["--image-size", "50"], "not a multiple of the patch size 14"),
    (["--layer", "12"], "out of range"),
    (["--layer", "-13"], "out of range"),
    (["--k", "100000"], "larger than the number"),
    (["--encoder", "dinov3_vit"], "unknown encoder 'dinov3_vit'"),  # the last of several --encoder wins
])
def test_bad_input_is_a_one_line_error(args, message, image_folder, tmp_path, capsys):
    """In-process (fail() is SystemExit with a one-line message; argparse prints its own line and exits with
    2)."""
    out = tmp_path / "out"
    base = ["--data", image_folder, "--encoder", "dinov2_vits14_offline", "--image-size", "56", "--workers",
            "0"]
    with pytest.raises(SystemExit) as e:
        tk.main([*base, *args, "--out", str(out)])
    said = str(e.value) if e.value.code != 2 else capsys.readouterr().err.strip().splitlines()[-1]
    assert message in said and "\n" not in said
    assert not out.exists() or not os.listdir(out)  # nothing half-written


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    p = run_script("tokenize_kmeans.py", "--data", str(tmp_path), "--out", str(tmp_path / "out"), check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "no images" in p.stderr


def test_gallery_draws_patches_of_codes(tokenized):
    from PIL import Image
    out, _ = tokenized
    p = run_script("tokenize_kmeans.py", "--gallery", "--out", out)
    assert "token gallery" in p.stdout
    img = Image.open(os.path.join(out, "gallery.png"))
    assert img.size[0] == 2 + 10 * (42 + 2)  # 10 patches of 42 px (the patch + one patch of context) per row


def test_views_are_shifts_and_mirrors_and_view_0_is_the_plain_image(image_folder):
    """The official augmentation at fixed points: view 0 the centre crop, then crops shifted along the longer
    side and their mirrors, never a zoom; the official tokenizer input (--crop-size 256): a 256 px crop
    resized to 224."""
    import torch.nn.functional as F
    from data import image_transform, max_views, view_transform
    from PIL import Image
    import numpy as np
    ramp = np.tile(np.linspace(0, 255, 80, dtype=np.uint8)[None, :, None], (56, 1, 3))
    ramp[:, :10, 1:] = 0  # red at the left edge: the crops that contain it
    img = Image.fromarray(ramp)
    plain = image_transform(56)(img)
    assert torch.equal(view_transform(56, 0, True)(img), plain)
    # with flips: view 1 is the mirror image
    assert torch.equal(view_transform(56, 1, True)(img), plain.flip(-1))
    views = [view_transform(56, v, True)(img) for v in range(max_views(True))]
    assert all(v.shape == plain.shape for v in views) and len(views) == 10
    left = views[2]  # offset 0: the crop at the left edge holds the whole bar
    assert left[1, :, :10].mean() < plain[1, :, :10].mean() and torch.equal(views[3], left.flip(-1))
    assert all(not torch.equal(views[a], views[b]) for a in range(0, 10, 2) for b in range(a + 2, 10, 2))
    t = image_transform(14, crop=16)(img)  # resize the shorter side to 16, crop 16, then 14 px bicubic
    big = image_transform(16)(img)
    small = F.interpolate(big[None], size=(14, 14), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(t, small)


def test_token_views_end_to_end(tokenized, image_folder, tmp_path):
    """--views 3 reuses the codebook (the fit is unchanged), stores train tokens [N, 3, h*w] whose view 0 is
    the plain tokens, leaves val alone; train_gpt.py trains on the views, probe and sample read view 0."""
    out, _ = tokenized
    for name in ("codebook.pt",):
        os.link(os.path.join(out, name), tmp_path / name)
    p = run_script("tokenize_kmeans.py", "--data", image_folder, "--out", tmp_path, *TINY, "--views", "3")
    assert "reusing" in p.stdout
    plain, views = load(out, "tokens_train.pt"), load(tmp_path, "tokens_train.pt")
    assert views["tokens"].shape == (len(plain["tokens"]), 3,
                                     plain["tokens"].shape[1]) and views["views"] == 3
    assert views["view_flips"] is True  # an ImageFolder: mirrored views
    assert torch.equal(views["tokens"][:, 0], plain["tokens"])
    assert not torch.equal(views["tokens"][:, 1], plain["tokens"])  # the mirrored images have other tokens
    assert not torch.equal(views["tokens"][:, 2], plain["tokens"])  # and the shifted crops
    assert torch.equal(load(tmp_path, "tokens_val.pt")["tokens"], load(out, "tokens_val.pt")["tokens"])
    from data import load_tokens
    # what probe/eval/decoders read
    assert torch.equal(load_tokens(str(tmp_path), "train")["tokens"], plain["tokens"])
    import train_gpt
    train_gpt.main(["--out", str(tmp_path), "--max-steps", "2", "--batch-size", "4", "--n-layer", "1",
                    "--precision", "fp32", "--eval-interval", "2", "--eval-batches", "1"])
    assert torch.load(tmp_path / "gpt.pt", weights_only=True)["views"] == 3
    import probe
    probe.main(["--out", str(tmp_path), "--epochs", "1", "--device", "cpu"])
    # stage 2 reads the views too: item i * V + v is image i cut and mirrored as view v, with view v's tokens
    from data import ImagesWithTokens, dataset_for_tokens, pixel_transform, unchanged, view_geometry
    ds = ImagesWithTokens(views, 16)
    assert len(ds) == 3 * len(plain["tokens"])
    x, t, _ = ds[1 * 3 + 2]
    where, flip = view_geometry(2, True)
    assert torch.equal(t, views["tokens"][1, 2].long())
    image = dataset_for_tokens(views, transform=unchanged)[1][0]
    assert torch.equal(x, pixel_transform(16, where=where, flip=flip)(image))
    p = run_script("tokenize_kmeans.py", "--data", image_folder, "--out", tmp_path, *TINY, "--views", "6",
                   "--no-view-flips", check=False)
    assert p.returncode != 0 and "--views 6: at most 5 without flips" in p.stderr
