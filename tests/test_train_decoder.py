"""train_decoder.py: the mask schedule, MaskGIT decoding, the VQ's straight-through gradient, learning, checkpoints."""
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import make_image_folder, run_script
from train_decoder import MaskGIT, VQModel, decode, mask_count, psnr, random_mask, vq_decode, vq_encode


def test_mask_schedule_counts():
    L = 64
    u = torch.tensor([0.0, 0.5, 0.999])
    assert mask_count(u, L).tolist() == [64, 46, 1]  # ceil(cos(u pi/2) L): all, ceil(45.25), at least one
    m = random_mask(1000, L, gen=torch.Generator().manual_seed(0))
    n = m.sum(1).float()
    assert n.min() >= 1 and n.max() <= L
    assert abs(n.mean().item() - L * 2 / torch.pi) < 2  # E[cos(u pi/2)] = 2/pi


def tiny_maskgit():
    torch.manual_seed(0)
    return MaskGIT(digit_vocab=16, vq_codes=12, length=9, n_layer=2, n_embd=32, n_head=2).eval()


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_decode_fills_everything_and_keeps_known_tokens(steps):
    model = tiny_maskgit()
    digit = torch.randint(16, (5, 9))
    out = decode(model, digit, steps=steps, gen=torch.Generator().manual_seed(0))
    assert out.shape == (5, 9) and (out != model.mask_id).all() and out.max() < 12
    known = torch.full((5, 9), model.mask_id)
    known[:, ::3] = 7  # a partly known image: those tokens must survive decoding
    out = decode(model, digit, steps=steps, vq=known, gen=torch.Generator().manual_seed(1))
    assert (out[:, ::3] == 7).all() and (out != model.mask_id).all()


def test_decode_unmasks_along_the_cosine_schedule():
    model = tiny_maskgit()
    seen = []
    forward = model.forward
    model.forward = lambda d, v: (seen.append(int((v == model.mask_id).sum())), forward(d, v))[1]
    decode(model, torch.randint(16, (1, 9)), steps=4)
    assert seen == [9, 8, 6, 3]  # floor(cos(pi/2 t/4) * 9) for t = 0..3, then nothing is left


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    vq = VQModel(levels=2, channels=16, codes=32, code_dim=8)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, ids, cb, commit, _ = vq(x)
    assert rec.shape == x.shape and ids.shape == (2, 16)
    F.mse_loss(rec, x).backward()  # the reconstruction loss alone: only the straight-through path links it to the encoder
    assert vq.encoder[0].weight.grad is not None and vq.encoder[0].weight.grad.abs().sum() > 0
    assert vq.codebook.weight.grad is None or vq.codebook.weight.grad.abs().sum() == 0


def test_encode_decode_functions_agree_with_forward():
    torch.manual_seed(0)
    vq = VQModel(levels=2, channels=16, codes=32, code_dim=8).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        rec, ids, *_ = vq(x)
        assert torch.equal(vq_encode(vq, x), ids)
        torch.testing.assert_close(vq_decode(vq, ids, (4, 4)), rec.clamp(-1, 1))


def test_tiny_vq_overfits_a_few_images():
    torch.manual_seed(0)
    vq = VQModel(levels=2, channels=16, codes=64, code_dim=8)
    g = torch.Generator().manual_seed(0)
    # four smooth pictures (blurred noise), the kind of content an 8x8 latent grid can hold
    x = F.interpolate(torch.rand(4, 3, 4, 4, generator=g) * 2 - 1, size=(16, 16), mode="bilinear", align_corners=False)
    opt = torch.optim.Adam(vq.parameters(), lr=3e-3)
    for _ in range(300):
        rec, _, cb, commit, _ = vq(x)
        loss = F.mse_loss(rec, x) + cb + 0.25 * commit
        opt.zero_grad()
        loss.backward()
        opt.step()
    # 25 dB = RMS error 5.6% of the range; the images' own spread is ~17 dB, so this is learning, not the mean
    assert psnr(x.mean(0, keepdim=True).expand_as(x), x).mean() < 20
    assert psnr(vq(x)[0].detach(), x).mean() > 25


@pytest.fixture(scope="module")
def decoder_out(tmp_path_factory):
    """tokenize -> vq -> maskgit on a tiny ImageFolder, a few steps each (the whole CLI path)."""
    root = make_image_folder(str(tmp_path_factory.mktemp("imgs")), n_train=8, n_val=4, corrupt=False)
    out = str(tmp_path_factory.mktemp("out"))
    run_script("tokenize_kmeans.py", "--data", root, "--out", out, "--encoder", "dinov2_vits14_offline", "--image-size", "56",
               "--k", "8", "--iters", "3", "--workers", "0", "--precision", "fp32")
    common = ["--out", out, "--batch-size", "4", "--workers", "0", "--precision", "fp32", "--eval-images", "8"]
    run_script("train_decoder.py", "--stage", "vq", "--max-steps", "3", "--vq-channels", "16", "--vq-codes", "32",
               "--perceptual", "0.1", *common)
    run_script("train_decoder.py", "--stage", "maskgit", "--max-steps", "3", "--n-layer", "1", *common)
    return out


def test_checkpoints_round_trip(decoder_out):
    from train_decoder import load_decoder, load_vq
    vq, vq_ck = load_vq(os.path.join(decoder_out, "vq.pt"), torch.device("cpu"))
    dec, dec_ck = load_decoder(os.path.join(decoder_out, "decoder.pt"), torch.device("cpu"))
    assert vq_ck["step"] == 3 and dec_ck["step"] == 3
    assert vq_ck["pixel_size"] == 16 and tuple(vq_ck["grid"]) == (4, 4)  # 4 x grid side for small grids
    assert dec_ck["model_args"]["vq_codes"] == 32 and dec_ck["model_args"]["digit_vocab"] == 8
    assert {"psnr", "codes_used", "perplexity"} <= set(vq_ck["metrics"]) and {"vq_token_acc", "psnr"} <= set(dec_ck["metrics"])
    assert os.path.getsize(os.path.join(decoder_out, "decoder_val.png")) > 0


def test_bad_inputs(decoder_out, tmp_path):
    p = run_script("train_decoder.py", "--stage", "maskgit", "--out", str(tmp_path), check=False)
    assert p.returncode != 0 and "tokens_train.pt not found" in p.stderr and "Traceback" not in p.stderr
    for f in ("tokens_train.pt", "tokens_val.pt"):
        os.link(os.path.join(decoder_out, f), tmp_path / f)
    p = run_script("train_decoder.py", "--stage", "maskgit", "--out", str(tmp_path), check=False)
    assert p.returncode != 0 and "vq.pt not found: run train_decoder.py --stage vq first" in p.stderr
    p = run_script("train_decoder.py", "--stage", "vq", "--out", str(tmp_path), "--pixel-size", "24", check=False)
    assert p.returncode != 0 and "not a power-of-two multiple of the DiGIT grid 4x4" in p.stderr
    vq = torch.load(os.path.join(decoder_out, "vq.pt"), weights_only=True)
    vq["grid"] = (8, 8)
    torch.save(vq, tmp_path / "vq.pt")
    p = run_script("train_decoder.py", "--stage", "maskgit", "--out", str(tmp_path), check=False)
    assert p.returncode != 0 and "latent grid but the DiGIT tokens" in p.stderr


def test_whole_chain_gpt_sample_eval_sweep(decoder_out):
    """tokens -> GPT -> sample.py -> eval.py --sweep --report on the tiny run: every stage fits the next."""
    import json
    run_script("train_gpt.py", "--out", decoder_out, "--max-steps", "2", "--batch-size", "4", "--n-layer", "1", "--precision", "fp32")
    run_script("eval.py", "--out", decoder_out, "--sweep", "top-k", "--values", "1,0", "--sweep-samples", "2",
                   "--fd-size", "28", "--report")
    res = json.load(open(os.path.join(decoder_out, "eval.json")))["sweep"]
    assert res["setting"] == "top-k" and [r["value"] for r in res["rows"]] == [1.0, 0.0]
    assert all(r["n_samples"] == 4 and r["fd_dinov2"] >= 0 and 0 <= r["class_agreement"] <= 1 for r in res["rows"])
    assert "## Sampling sweep: top-k" in open(os.path.join(decoder_out, "report.md")).read()


def test_probe_and_eval_encode_the_real_images_once(decoder_out, tmp_path):
    """probe.py's DINOv2 baseline and eval.py's reference share one cached pass when the extractor is the tokenizer's;
    under torchrun both shard their features over the ranks and get what one process gets."""
    import glob
    import json
    from eval import fid_inception
    if not os.path.exists(os.path.join(decoder_out, "gpt.pt")):
        run_script("train_gpt.py", "--out", decoder_out, "--max-steps", "2", "--batch-size", "4", "--n-layer", "1", "--precision", "fp32")
    rendered = tmp_path / "rendered"
    run_script("sample.py", "--out", decoder_out, "--from-tokens", os.path.join(decoder_out, "tokens_val.pt"), "--num-samples", "4",
               "--samples-dir", rendered)
    for f in glob.glob(os.path.join(decoder_out, "features_*.pt")):
        os.remove(f)
    run_script("probe.py", "--out", decoder_out, "--epochs", "2", nproc=2)
    cached = sorted(glob.glob(os.path.join(decoder_out, "features_*.pt")))
    assert len(cached) == 2 and "baseline: DINOv2" in open(os.path.join(decoder_out, "probe.md")).read()
    two_procs = [torch.load(f, weights_only=True)["features"] for f in cached]
    two_probe = json.load(open(os.path.join(decoder_out, "probe.json")))
    for f in cached:
        os.remove(f)
    run_script("probe.py", "--out", decoder_out, "--epochs", "2")
    for f, two in zip(cached, two_procs):
        one = torch.load(f, weights_only=True)["features"]
        assert one.shape == (8 if "val" in f else 16, 2 * 384)
        torch.testing.assert_close(one, two, rtol=2e-2, atol=2e-2)  # bf16 on fast CPUs: batch shapes differ per rank
    assert json.load(open(os.path.join(decoder_out, "probe.json")))["top1"].keys() == two_probe["top1"].keys()

    stamps = [os.path.getmtime(f) for f in cached]
    p = run_script("eval.py", "--out", decoder_out, "--rendered", rendered, "--fd-size", "56", "--inception-weights", tmp_path / "none.pth")
    assert "Inception FID/IS skipped" in p.stderr  # --inception auto: no weights, a note, the DINOv2 scores still come
    assert [os.path.getmtime(f) for f in cached] == stamps  # reused, not recomputed
    one = json.load(open(os.path.join(decoder_out, "eval.json")))["rendered"]
    assert one["n_samples"] == 4 and "fid" not in one
    # with an Inception weights file (random weights here: the contract, not the numbers), FID and IS appear
    torch.save(fid_inception().state_dict(), tmp_path / "inception.pth")
    run_script("eval.py", "--out", decoder_out, "--rendered", rendered, "--fd-size", "56", "--inception", "on",
               "--inception-weights", tmp_path / "inception.pth", nproc=2)
    two = json.load(open(os.path.join(decoder_out, "eval.json")))["rendered"]
    assert two["fid"] >= 0 and two["inception_score"] >= 1
    assert two["fd_dinov2"] == pytest.approx(one["fd_dinov2"], rel=0.05, abs=0.5)


def test_decoder_two_processes_match_one(decoder_out, tmp_path):
    """Both stages under torchrun with 2 gloo processes end where 1 process ends: same global batches,
    masks drawn for the global batch, dead VQ codes restarted from the whole batch."""
    runs = {}
    for nproc in (None, 2):
        out = tmp_path / f"p{nproc}"
        out.mkdir()
        for f in ("tokens_train.pt", "tokens_val.pt"):
            os.link(os.path.join(decoder_out, f), out / f)
        common = ["--out", out, "--batch-size", "4", "--workers", "0", "--precision", "fp32", "--eval-images", "4", "--max-steps", "4"]
        run_script("train_decoder.py", "--stage", "vq", "--vq-channels", "16", "--vq-codes", "64", "--perceptual", "0",
                   "--restart-interval", "2", *common, nproc=nproc)
        run_script("train_decoder.py", "--stage", "maskgit", "--n-layer", "1", *common, nproc=nproc)
        runs[nproc] = [torch.load(out / f, weights_only=True) for f in ("vq.pt", "decoder.pt")]
    for one, two in zip(runs[None], runs[2]):
        assert two["history"] == pytest.approx(one["history"], rel=1e-4)
        # the all-reduce sums in another order (~1e-7), and Adam's early steps (~lr = 1e-3 per weight, whatever the
        # gradient's size) can enlarge that to ~1e-5; another batch or mask would move weights by ~1e-3
        for k in one["model"]:
            torch.testing.assert_close(two["model"][k], one["model"][k], rtol=1e-3, atol=1e-4)
