"""convert_official.py: the official DiGIT models (fairseq) as this project's own, equal to the official
forward on fixtures its code computed (tests/make_official_fixtures.py): the same DiGIT tokens and VQ codes of
the same pictures, the same logits (stage 1 unconditional and class-conditional, stage 2 autoregressive and
MaskGIT-style), the same linear-probe features; a real fairseq checkpoint read without fairseq; a pickle that
would run code refused; sample.py --class 207 end to end on the converted models."""
import os

import pytest
import torch

import convert_official
from data import IMAGENET_MEAN, IMAGENET_STD, ResizeTensor
from dinov2 import load_encoder
from make_vq_fixtures import FIXTURES, fixed_weights
from tokenize_kmeans import nearest_centroid

FX = torch.load(os.path.join(FIXTURES, "official_digit.pt"), weights_only=True)
IMAGES = FX["images"].float() / 255  # the two 256 px pictures every official model was run on
MEAN, STD = (torch.tensor(v)[:, None, None] for v in (IMAGENET_MEAN, IMAGENET_STD))


def official_state_dict(fx):
    """The official model's weights: drawn from the fixture's seed (as the fixture drew them), its centroids
    and VQ codebook as the fixture set them."""
    sd = fixed_weights(fx["shapes"], fx["seed"])
    if fx.get("half"):
        sd = {k: v.half().float() for k, v in sd.items()}
    sd["centroids"], sd["centroid_norm"] = fx["centroids"], (fx["centroids"] ** 2).sum(0, keepdim=True)
    if "vq_codebook" in fx:
        sd["vqgan.quantize.embedding.weight"] = fx["vq_codebook"]
    return sd


def convert(tmp_path, stage1=None, stage2=None, kind="auto"):
    """Write the fixtures' models as plain checkpoints {"model": ...} and convert them; the out folder. Given
    both stages, stage 2 gets stage 1's encoder and centroids (the fixtures drew their own): one model."""
    argv, out, shared = [], tmp_path / "out", {}
    for flag, name in (("--stage1", stage1), ("--stage2", stage2)):
        if name:
            sd = dict(official_state_dict(FX[name]), **shared)
            shared = {k: v for k, v in sd.items() if k.startswith(("pretrained_encoder.", "centroid"))}
            torch.save({"model": sd}, tmp_path / f"{name}.pt")
            argv += [flag, str(tmp_path / f"{name}.pt")]
    convert_official.main([*argv, "--out", str(out), "--cache", str(tmp_path / "cache"), "--stage2-kind",
                           kind])
    return out


def digit_tokens(out, cache, images):
    """Our tokenizer on the converted encoder and codebook: a 256 px crop resized to 224 (bicubic, no
    antialiasing), DINOv2 block depth-3, nearest centroid."""
    cb = torch.load(out / "codebook.pt", weights_only=True)
    enc = load_encoder(cb["encoder"], str(cache))
    x = torch.stack([ResizeTensor(cb["image_size"])((im - MEAN) / STD) for im in images])
    f = enc.get_intermediate_layers(x, [cb["layer"]])[0]
    return nearest_centroid(f.flatten(0, 1), cb["centroids"])[0].view(len(images), -1)


@pytest.mark.parametrize("name", ["stage1_uncond", "stage1_cls"])
def test_stage1_gpt_equals_the_official_forward(tmp_path, name):
    from train_gpt import load_gpt
    fx = FX[name]
    out = convert(tmp_path, stage1=name)
    tokens = digit_tokens(out, tmp_path / "cache", IMAGES)
    assert torch.equal(tokens, fx["tokens"])  # the same DiGIT ids of the same pictures
    gpt, ck = load_gpt(str(out / "gpt.pt"), "cpu")
    labels = fx["labels"] if ck["model_args"]["n_classes"] else None
    logits, hidden = gpt(tokens, labels, return_hidden=True)  # [condition, t_0 .. t_255]: all 257 positions
    k = ck["vocab_size"]
    torch.testing.assert_close(logits, fx["logits"][..., 5: 5 + k], rtol=1e-4, atol=1e-4)
    # the official probe: embedding + blocks 1..L-1
    probe = torch.stack([h.mean(1) for h in hidden[:-1]], dim=1)
    torch.testing.assert_close(probe, fx["probe"], rtol=1e-4, atol=1e-4)
    assert ck["model_args"]["norm"] == "post" and ck["model_args"]["emb_scale"]


@pytest.mark.parametrize("name", ["stage2_ar", "stage2_nar"])
def test_stage2_decoders_equal_the_official_forward(tmp_path, name):
    from train_decoder import load_decoder
    from vqgan import load_vq, vq_encode
    fx = FX[name]
    out = convert(tmp_path, stage2=name, kind="nar" if fx["nar"] else "ar")
    assert torch.equal(digit_tokens(out, tmp_path / "cache", IMAGES), fx["tokens"])
    vq, _ = load_vq(str(out / "vqgan.pt"), "cpu", grid=(16, 16))
    # MAGE's VQGAN as the checkpoint holds it
    assert torch.equal(vq_encode(vq, IMAGES * 2 - 1), fx["codes"])
    kind = "maskgit" if fx["nar"] else "ar"
    dec, ck = load_decoder(str(out / ("decoder.pt" if fx["nar"] else "decoder_ar.pt")), "cpu", kind)
    codes = ck["model_args"]["vq_codes"]
    if fx["nar"]:  # the official input: [DiGIT | </s>, codes with <unk> where masked]; ours: [MASK] there
        vq_in = torch.where(fx["masked"], torch.full_like(fx["codes"], dec.mask_id), fx["codes"])
        logits, want = dec(fx["tokens"], vq_in), fx["logits"][:, 1:, 5: 5 + codes]
    # teacher forcing: [DiGIT | BOS, v_0 .. v_254] -> v_0 .. v_255 (the official also predicts </s> last)
    else:
        logits, want = dec(fx["tokens"], fx["codes"][:, :-1]), fx["logits"][:, :-1, 5: 5 + codes]
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)


def test_a_real_fairseq_checkpoint_is_read_without_fairseq(tmp_path):
    """The class-conditional model as fairseq saves it (an omegaconf config, optimizer history, numpy
    scalars): read with stand-ins that run nothing; the heads come from its config; the converted GPT is the
    official one."""
    path = os.path.join(FIXTURES, "official_stage1_cls_fairseq.pt")
    names = convert_official.pickle_globals(path)
    assert any(n.startswith("omegaconf.") for n in names) and any(n.startswith("numpy.") for n in names)
    out = tmp_path / "out"
    convert_official.main(["--stage1", path, "--out", str(out), "--cache", str(tmp_path / "cache")])
    from train_gpt import load_gpt
    gpt, ck = load_gpt(str(out / "gpt.pt"), "cpu")
    assert ck["model_args"]["n_head"] == 2 and ck["model_args"]["n_classes"] == 1000
    fx = FX["stage1_cls"]
    torch.testing.assert_close(gpt(fx["tokens"], fx["labels"]), fx["logits"][..., 5: 5 + ck["vocab_size"]],
                               rtol=1e-3, atol=1e-3)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo this must never run > pwned.txt",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {}, "cfg": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(SystemExit,
                       match=r"needs (posix|os)\.system, which no fairseq checkpoint needs: refused"):
        convert_official.main(["--stage1", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "pwned.txt").exists()


def test_sample_class_207_and_tokenize_on_the_converted_model(tmp_path, image_folder):
    """The design card's example on the converted (fixture-sized) official models: sample.py --class 207 draws
    through the class-conditional GPT, the AR stage 2 and MAGE's VQGAN; tokenize_kmeans.py reuses the official
    codebook and tokens of an ImageFolder are the official tokenizer's."""
    import sample
    import tokenize_kmeans
    out = convert(tmp_path, stage1="stage1_cls", stage2="stage2_ar", kind="ar")
    cache = str(tmp_path / "cache")
    tokens, images = sample.main(["--out", str(out), "--class", "207", "--num-samples", "1", "--top-k", "5",
                                  "--precision", "fp32", "--device", "cpu"])
    assert tokens.shape == (1, 256) and images.shape == (1, 3, 256, 256)
    cb = torch.load(out / "codebook.pt", weights_only=True)
    tokenize_kmeans.main(["--data", image_folder, "--out", str(out), "--encoder", cb["encoder"], "--cache",
                          cache, "--image-size", "224", "--crop-size", "256", "--k", "16", "--workers", "0",
                          "--precision", "fp32"])
    tok = torch.load(out / "tokens_val.pt", weights_only=True)
    assert tok["lineage"]["codebook"] == cb["fingerprint"] and tok["tokens"].shape[1] == 256
