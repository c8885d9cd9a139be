"""train_vq.py and train_decoder.py: the mask schedule, MaskGIT and AR decoding, the VQ's straight-through
gradient, learning, checkpoints, the whole chain on a tiny run."""
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from conftest import make_image_folder, run_script
import train_decoder
import train_direct
import train_vq
from train_decoder import MaskGIT, decode, mask_count, random_mask
from train_vq import psnr
from vqgan import VQModel, vq_decode, vq_encode


def test_mask_schedule_counts():
    L = 64
    u = torch.tensor([0.0, 0.5, 0.999])
    assert mask_count(u, L).tolist() == [64, 46, 1]  # ceil(cos(u pi/2) L): all, ceil(45.25), at least one
    m = random_mask(1000, L, gen=torch.Generator().manual_seed(0))
    n = m.sum(1).float()
    assert n.min() >= 1 and n.max() <= L
    assert abs(n.mean().item() - L * 2 / torch.pi) < 2  # E[cos(u pi/2)] = 2/pi


def tiny_maskgit(layout="ours"):
    torch.manual_seed(0)
    return MaskGIT(digit_vocab=16, vq_codes=12, length=9, n_layer=2, n_embd=32, n_head=2,
                   layout=layout).eval()


@pytest.mark.parametrize("layout", ["ours", "fairseq", "aligned"])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_decode_fills_everything_and_keeps_known_tokens(steps, layout):
    model = tiny_maskgit(layout)
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


def test_decode_keeps_the_most_confident_tokens_first():
    """Stub logits: positions 2 and 5 are certain (one id has all the mass), the rest uniform. With no Gumbel
    noise the first step must keep exactly the certain ones when the schedule keeps two."""
    model = tiny_maskgit()
    seen = []

    def stub(digit, vq):
        seen.append(vq.clone())
        logits = torch.zeros(len(digit), 9, 12)
        logits[:, 2, 4] = logits[:, 5, 7] = 50.0
        return logits
    model.forward = stub
    decode(model, torch.randint(16, (3, 9)), steps=4, noise=0.0, gen=torch.Generator().manual_seed(0))
    after_first = seen[1] != model.mask_id  # 9 - floor(cos(pi/8) * 9) = 1 ... the schedule keeps 1 at step 1
    assert after_first.sum(1).tolist() == [1, 1, 1]
    assert all(row.nonzero().flatten().tolist()[0] in (2, 5) for row in after_first)
    # 9 - floor(cos(pi/4) * 9) = 3 known: both certain ones among them
    after_second = seen[2] != model.mask_id
    assert after_second[:, 2].all() and after_second[:, 5].all()


@pytest.mark.parametrize("layout", ["ours", "fairseq", "aligned"])
def test_maskgit_attends_both_ways(layout):
    """A bidirectional decoder: changing a later VQ token changes the logits of an earlier position (and a
    DiGIT token changes every position), in every layout."""
    model = tiny_maskgit(layout)
    digit, vq = torch.randint(16, (1, 9)), torch.randint(12, (1, 9))
    base = model(digit, vq)
    later = vq.clone()
    later[0, 8] = (later[0, 8] + 1) % 12
    assert (model(digit, later)[0, 0] - base[0, 0]).abs().max() > 1e-4
    other = digit.clone()
    other[0, 8] = (other[0, 8] + 1) % 16
    assert ((model(other, vq) - base).abs().amax(-1) > 1e-4).all()


@pytest.mark.parametrize("layout", ["ours", "aligned"])
def test_maskgit_learns_a_token_to_code_map(layout):
    """Both layouts can learn what stage 2 must: the VQ code of each patch from the DiGIT tokens (here a fixed
    map code = f(token, position)), decoded from all [MASK]; aligned does it with half the positions."""
    torch.manual_seed(0)
    model = MaskGIT(digit_vocab=8, vq_codes=10, length=4, n_layer=2, n_embd=32, n_head=2, layout=layout)
    assert model.pos_emb.num_embeddings == (4 if layout == "aligned" else 8)
    digit = torch.randint(8, (16, 4))
    target = (digit * 3 + torch.arange(4)) % 10
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        masks = random_mask(16, 4)
        logits = model(digit, torch.where(masks, torch.full_like(target, model.mask_id), target))
        loss = F.cross_entropy(logits[masks], target[masks])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = decode(model.eval(), digit, steps=4, gen=torch.Generator().manual_seed(0))
    assert (out == target).float().mean() > 0.95


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    vq = VQModel(levels=2, channels=16, codes=32, code_dim=8)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, ids, cb, commit, _ = vq(x)
    assert rec.shape == x.shape and ids.shape == (2, 16)
    # the reconstruction loss alone: only the straight-through path links it to the encoder
    F.mse_loss(rec, x).backward()
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
    x = F.interpolate(torch.rand(4, 3, 4, 4, generator=g) * 2 - 1, size=(16, 16), mode="bilinear",
                      align_corners=False)
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
    run_script("tokenize_kmeans.py", "--data", root, "--out", out, "--encoder", "dinov2_vits14_offline",
               "--image-size", "56", "--k", "8", "--iters", "3", "--workers", "0", "--precision", "fp32")
    common = ["--out", out, "--batch-size", "4", "--workers", "0", "--precision", "fp32", "--eval-images",
              "8"]
    run_script("train_vq.py", "--max-steps", "3", "--vq-channels", "16", "--vq-codes", "32", "--perceptual",
               "0.1", *common)
    run_script("train_decoder.py", "--stage", "maskgit", "--max-steps", "3", "--n-layer", "1", *common)
    run_script("train_decoder.py", "--stage", "ar", "--max-steps", "3", "--n-layer", "1", "--dropout", "0.1",
               *common)
    train_decoder.main(["--stage", "direct", "--max-steps", "3", "--n-layer", "1", "--perceptual", "0",
                        *common])
    return out


def test_checkpoints_round_trip(decoder_out):
    from train_decoder import load_decoder
    from vqgan import load_vq
    vq, vq_ck = load_vq(os.path.join(decoder_out, "vq.pt"), torch.device("cpu"))
    dec, dec_ck = load_decoder(os.path.join(decoder_out, "decoder.pt"), torch.device("cpu"))
    assert vq_ck["step"] == 3 and dec_ck["step"] == 3
    assert vq_ck["pixel_size"] == 16 and tuple(vq_ck["grid"]) == (4, 4)  # 4 x grid side for small grids
    assert dec_ck["model_args"]["vq_codes"] == 32 and dec_ck["model_args"]["digit_vocab"] == 8
    assert {"psnr", "codes_used", "perplexity"} <= set(vq_ck["metrics"])
    assert {"vq_token_acc", "psnr"} <= set(dec_ck["metrics"])
    assert os.path.getsize(os.path.join(decoder_out, "decoder_val.png")) > 0


def test_aligned_maskgit_trains_saves_and_renders(decoder_out, tmp_path):
    """--layout aligned (the demo's): the checkpoint records it, load_decoder rebuilds it with one position
    per patch, and sample.py renders real tokens through it."""
    from train_decoder import load_decoder
    out = tmp_path / "out"
    out.mkdir()
    for f in ("tokens_train.pt", "tokens_val.pt", "vq.pt", "vq_tokens_train.pt", "vq_tokens_val.pt"):
        os.link(os.path.join(decoder_out, f), out / f)
    train_decoder.main(["--stage", "maskgit", "--layout", "aligned", "--max-steps", "2", "--n-layer", "1",
                        "--out", str(out), "--batch-size", "4", "--workers", "0", "--precision", "fp32",
                        "--eval-images", "4"])
    dec, ck = load_decoder(str(out / "decoder.pt"), torch.device("cpu"))
    assert ck["model_args"]["layout"] == "aligned" and dec.aligned and dec.pos_emb.num_embeddings == 16
    run_script("train_gpt.py", "--out", out, "--max-steps", "1", "--batch-size", "4", "--n-layer", "1",
               "--precision", "fp32")  # sample.py checks real tokens against the GPT's kind
    run_script("sample.py", "--out", out, "--from-tokens", out / "tokens_val.pt", "--num-samples", "3",
               "--samples-dir", tmp_path / "r", "--precision", "fp32")
    assert len(list((tmp_path / "r").glob("0000*_class*.png"))) == 3


def test_bad_inputs(decoder_out, tmp_path):
    p = run_script("train_decoder.py", "--stage", "maskgit", "--out", str(tmp_path), check=False)
    assert p.returncode != 0 and "tokens_train.pt not found" in p.stderr and "Traceback" not in p.stderr
    for f in ("tokens_train.pt", "tokens_val.pt"):
        os.link(os.path.join(decoder_out, f), tmp_path / f)
    p = run_script("train_decoder.py", "--stage", "maskgit", "--out", str(tmp_path), check=False)
    assert p.returncode != 0 and "vq.pt not found: run train_vq.py first" in p.stderr
    p = run_script("train_vq.py", "--out", str(tmp_path), "--pixel-size", "24", check=False)
    assert p.returncode != 0 and "not a power-of-two multiple of the DiGIT grid 4x4" in p.stderr
    vq = torch.load(os.path.join(decoder_out, "vq.pt"), weights_only=True)
    vq["grid"] = (8, 8)
    torch.save(vq, tmp_path / "vq.pt")
    p = run_script("train_decoder.py", "--stage", "maskgit", "--out", str(tmp_path), check=False)
    assert p.returncode != 0 and "latent grid but the DiGIT tokens" in p.stderr


def test_whole_chain_gpt_sample_eval_sweep(decoder_out):
    """tokens -> GPT -> sample.py -> eval.py --sweep --report on the tiny run: every stage fits the next."""
    import json
    run_script("train_gpt.py", "--out", decoder_out, "--max-steps", "2", "--batch-size", "4", "--n-layer",
               "1", "--precision", "fp32")
    run_script("eval.py", "--out", decoder_out, "--sweep", "top-k", "--values", "1,0", "--sweep-samples", "2",
                   "--fd-size", "28", "--report")
    res = json.load(open(os.path.join(decoder_out, "eval.json")))["sweep"]
    assert res["setting"] == "top-k" and [r["value"] for r in res["rows"]] == [1.0, 0.0]
    assert all(r["n_samples"] == 4 for r in res["rows"])
    # each value was really used: greedy (top-k 1) samples differ from full-distribution ones with the same
    # seed
    sweep = os.path.join(decoder_out, "sweep")
    greedy, full = (torch.load(os.path.join(sweep, f"top-k_{v}", "tokens.pt"),
                               weights_only=True)["tokens"] for v in ("1", "0"))
    assert not torch.equal(greedy, full) and res["rows"][0]["fd_dinov2"] != res["rows"][1]["fd_dinov2"]
    assert "## Sampling sweep: top-k" in open(os.path.join(decoder_out, "report.md")).read()


def test_probe_and_eval_encode_the_real_images_once(decoder_out, tmp_path):
    """probe.py's DINOv2 baseline and eval.py's reference share one cached pass when the extractor is the
    tokenizer's; under torchrun both shard their features over the ranks and get what one process gets."""
    import glob
    import json
    import torch_fidelity
    from torchvision import transforms
    if not os.path.exists(os.path.join(decoder_out, "gpt.pt")):
        run_script("train_gpt.py", "--out", decoder_out, "--max-steps", "2", "--batch-size", "4",
                   "--n-layer", "1", "--precision", "fp32")
    rendered = tmp_path / "rendered"
    run_script("sample.py", "--out", decoder_out, "--from-tokens", os.path.join(decoder_out, "tokens_val.pt"),
               "--num-samples", "4", "--samples-dir", rendered)
    for f in glob.glob(os.path.join(decoder_out, "features_*.pt")):
        os.remove(f)
    run_script("probe.py", "--out", decoder_out, "--epochs", "2", "--precision", "fp32", nproc=2)
    cached = sorted(glob.glob(os.path.join(decoder_out, "features_*.pt")))
    assert len(cached) == 2 and "baseline: DINOv2" in open(os.path.join(decoder_out, "probe.md")).read()
    two_procs = [torch.load(f, weights_only=True)["features"] for f in cached]
    two_probe = json.load(open(os.path.join(decoder_out, "probe.json")))
    for f in cached:
        os.remove(f)
    run_script("probe.py", "--out", decoder_out, "--epochs", "2", "--precision", "fp32")
    for f, two in zip(cached, two_procs):
        one = torch.load(f, weights_only=True)["features"]
        assert one.shape == (8 if "val" in f else 16, 2 * 384)
        # fp32: only the batch shapes differ per rank
        torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-4)
    # the GPT's layer features and the probes on them too: the same accuracies with 1 and 2 processes
    assert json.load(open(os.path.join(decoder_out, "probe.json")))["top1"] == two_probe["top1"]

    stamps = [os.path.getmtime(f) for f in cached]
    # torch-fidelity's download fails at once
    offline = dict(https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    p = run_script("eval.py", "--out", decoder_out, "--rendered", rendered, "--fd-size", "56", "--precision",
                   "fp32", env=offline)
    assert "FID/IS skipped" in p.stderr  # --inception auto: no weights, a note, the DINOv2 scores still come
    assert [os.path.getmtime(f) for f in cached] == stamps  # reused, not recomputed
    one = json.load(open(os.path.join(decoder_out, "eval.json")))["rendered"]
    assert one["n_samples"] == 4 and "fid" not in one
    p = run_script("eval.py", "--out", decoder_out, "--rendered", rendered, "--inception", "on", env=offline,
                   check=False)
    assert p.returncode != 0 and "Inception weights did not load" in p.stderr and "Traceback" not in p.stderr

    # With a weights file (random weights of the same network: the wiring, not the numbers) FID and IS come
    # from torch-fidelity, on exactly the images eval.py documents: the sample PNGs, and the val images
    # resized (shorter side, bilinear as the official prepare_imgnet_val.py) and centre-cropped to the
    # samples' size. The reference reads both sets itself.
    torch.save(random_inception_weights(), tmp_path / "inception.pth")
    run_script("eval.py", "--out", decoder_out, "--rendered", rendered, "--fd-size", "56", "--precision",
               "fp32", "--inception", "on", "--inception-weights", tmp_path / "inception.pth", nproc=2)
    two = json.load(open(os.path.join(decoder_out, "eval.json")))["rendered"]
    # 2 processes, fp32: the same features
    assert two["fd_dinov2"] == pytest.approx(one["fd_dinov2"], rel=1e-4)
    samples = sorted(glob.glob(os.path.join(rendered, "0*.png")))
    size = Image.open(samples[0]).size[0]
    crop = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
                               transforms.CenterCrop(size), transforms.PILToTensor()])
    val_root = torch.load(os.path.join(decoder_out, "tokens_val.pt"), weights_only=True)["data"]["root"]
    val_files = sorted(glob.glob(os.path.join(val_root, "val", "*", "*.png")))
    ref = torch_fidelity.calculate_metrics(
        input1=Images([transforms.PILToTensor()(Image.open(f).convert("RGB")) for f in samples]),
        input2=Images([crop(Image.open(f).convert("RGB")) for f in val_files]), fid=True, isc=True,
                                           isc_splits=1, verbose=False,
        feature_extractor_weights_path=str(tmp_path / "inception.pth"), save_cpu_ram=True, cuda=False)
    assert len(val_files) == two["n_real"] and ref["frechet_inception_distance"] > 1e-3
    assert two["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-4)
    assert two["inception_score"] == pytest.approx(ref["inception_score_mean"], rel=1e-4)


class Images(torch.utils.data.Dataset):
    """A list of uint8 [3, H, W] tensors as the Dataset torch-fidelity reads."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def random_inception_weights(seed=0):
    """Weights for torch-fidelity's Inception-v3 (torchvision's layout, 1008 classes), He-initialised so that
    features stay O(1) through BatchNorm's default running statistics."""
    torch.manual_seed(seed)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                          init_weights=False)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    return net.state_dict()


def test_decoder_two_processes_match_one(decoder_out, tmp_path):
    """Both stages under torchrun with 2 gloo processes end where 1 process ends: same global batches,
    masks drawn for the global batch, dead VQ codes restarted from the whole batch, the GAN's adaptive weight
    taken from the whole batch's gradients."""
    runs = {}
    for nproc in (None, 2):
        out = tmp_path / f"p{nproc}"
        out.mkdir()
        for f in ("tokens_train.pt", "tokens_val.pt"):
            os.link(os.path.join(decoder_out, f), out / f)
        # no warm-up: the weights move by ~lr per step, far more than the tolerance, so equal weights mean
        # something
        common = ["--out", out, "--batch-size", "4", "--workers", "0", "--precision", "fp32",
                  "--eval-images", "4", "--max-steps", "4", "--warmup-steps", "0"]
        run_script("train_vq.py", "--vq-channels", "16", "--vq-codes", "64", "--perceptual", "0",
                   "--restart-interval", "2", "--disc-weight", "0.5", "--disc-start", "2", "--disc-layers",
                   "1", *common, nproc=nproc)
        run_script("train_decoder.py", "--stage", "maskgit", "--n-layer", "1", *common, nproc=nproc)
        # the AR decoder encodes the images itself: both paths run under torchrun
        os.remove(out / "vq_tokens_train.pt")
        # (no --dropout: each rank draws dropout for its own rows from its own generator, as in any DDP run)
        run_script("train_decoder.py", "--stage", "ar", "--n-layer", "1", *common, nproc=nproc)
        runs[nproc] = [torch.load(out / f, weights_only=True)
                       for f in ("vq.pt", "decoder.pt", "decoder_ar.pt")]
    for one, two in zip(runs[None], runs[2]):
        assert two["history"] == pytest.approx(one["history"], rel=1e-4)
        # the all-reduce sums in another order (~1e-7), and Adam's early steps (~lr = 1e-3 per weight,
        # whatever the gradient's size) can enlarge that to ~1e-5; another batch or mask would move weights
        # by ~1e-3
        for k in one["model"]:
            torch.testing.assert_close(two["model"][k], one["model"][k], rtol=1e-3, atol=1e-4)
    assert runs[2][0]["disc_history"] == pytest.approx(runs[None][0]["disc_history"], rel=1e-4)
    for k in runs[None][0]["disc"]:
        torch.testing.assert_close(runs[2][0]["disc"][k], runs[None][0]["disc"][k], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("stage", ["vq", "vq+gan", "maskgit", "ar", "direct", "direct+gan"])
def test_decoder_resume_continues_exactly(decoder_out, tmp_path, stage):
    """6 steps straight == 3 steps, then --resume to 6: same losses and weights (the VQ restarts dead codes
    every 2 steps, so the code-use counts since the last restart must survive the checkpoint; with the GAN the
    discriminator, its optimizer and its losses too)."""
    gan = ["--disc-weight", "0.5", "--disc-start", "2", "--disc-layers", "1"] if "+gan" in stage else []
    stage = stage.split("+")[0]
    runs = {}
    for name in ("straight", "parts"):
        out = tmp_path / name
        out.mkdir()
        for f in ("tokens_train.pt", "tokens_val.pt", "vq.pt", "codebook.pt"):
            os.link(os.path.join(decoder_out, f), out / f)
        args = ["--out", str(out), "--batch-size", "4", "--workers", "0", "--precision", "fp32",
                "--eval-images", "4", "--schedule", "constant", "--warmup-steps", "0",
                "--eval-interval", "100", *gan]
        if stage == "vq":
            main = train_vq.main
            args += ["--vq-channels", "16", "--vq-codes", "32", "--restart-interval", "2",
                     "--perceptual", "0"]
        elif stage == "direct":
            main = train_direct.main
            args += ["--n-layer", "1", "--token-corruption", "0.25", "--perceptual", "0"]
        else:
            main = train_decoder.main
            args += ["--stage", stage, "--n-layer", "1", "--dropout", "0.1"]
        if name == "straight":
            main([*args, "--max-steps", "6", "--force"])
        else:
            main([*args, "--max-steps", "3", "--force"])
            torch.manual_seed(123)  # whatever ran in between: the checkpoint's random state takes over
            main([*args, "--max-steps", "6", "--resume"])
        runs[name] = torch.load(out / {"vq": "vq.pt", "maskgit": "decoder.pt", "ar": "decoder_ar.pt",
                                       "direct": "direct.pt"}[stage],
                                weights_only=True)
    a, b = runs["straight"], runs["parts"]
    assert b["step"] == a["step"] == 6
    assert b["history"] == pytest.approx(a["history"], rel=1e-6)
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6)
    if gan:
        assert len(a["disc_history"]) == 4 and b["disc_history"] == pytest.approx(a["disc_history"], rel=1e-6)
        for k in a["disc"]:
            torch.testing.assert_close(b["disc"][k], a["disc"][k], rtol=1e-5, atol=1e-6)


def test_latent_stability_on_the_tiny_run(decoder_out, tmp_path):
    """stability.py on the tiny run: noise far below the signal changes nothing, the change rate grows as the
    SNR falls (both tokenizers), and the report files are written."""
    import stability
    out = tmp_path / "out"
    out.mkdir()
    for f in os.listdir(decoder_out):
        if f.endswith(".pt"):
            os.link(os.path.join(decoder_out, f), out / f)
    r = stability.main(["--out", str(out), "--images", "4", "--snrs", "300,20,0.01,-20", "--device", "cpu"])
    for name in ("VQ", "DiGIT"):
        changed = [x["changed"] for x in r["fair"][name]]
        assert changed[0] == 0.0 and r["fair"][name][0]["cosine"] > 0.9999, (name, changed)
        assert changed[0] <= changed[1] <= changed[2] <= changed[3] and changed[3] > 0.3, (name, changed)
    assert r["analysis"]["snrs"] == [20] and len(r["analysis"]["rows"]) == 8
    assert set(r["resize_agreement"]) == {"DiGIT", "VQ"}
    for f in ("stability.md", "stability.json", "stability.png", "toy.png"):
        assert os.path.getsize(out / f) > 0


def test_vq_tokens_are_a_token_file_and_the_same_gpt_trains_samples_and_probes_on_them(decoder_out, tmp_path):
    """The paper's baseline tokens: stage vq writes the VQ's codes of the same rows as the DiGIT token files
    (same labels, data, grid; ids = vq_encode of the images); train_gpt.py --tokenizer vq trains the same GPT
    on them; sample.py paints its ids with the VQ decoder directly (no MaskGIT); probe.py probes its layers; a
    VQ that is not the GPT's is refused."""
    import probe
    import sample
    import train_gpt
    from data import ImagesWithTokens, to_unit
    from vqgan import load_vq, vq_decode, vq_encode
    out = tmp_path / "out"
    out.mkdir()
    for f in ("tokens_train.pt", "tokens_val.pt", "vq_tokens_train.pt", "vq_tokens_val.pt", "vq.pt",
              "codebook.pt"):
        os.link(os.path.join(decoder_out, f), out / f)
    digit, vq_tok = torch.load(out / "tokens_val.pt",
                               weights_only=True), torch.load(out / "vq_tokens_val.pt", weights_only=True)
    vq, vq_ck = load_vq(str(out / "vq.pt"), torch.device("cpu"))
    assert vq_tok["tokenizer"] == "vq" and vq_tok["lineage"]["vq"] == vq_ck["fingerprint"]
    assert vq_tok["vocab_size"] == 32
    assert tuple(vq_tok["grid"]) == tuple(digit["grid"]) and torch.equal(vq_tok["labels"], digit["labels"])
    assert vq_tok["data"]["index"].tolist() == digit["data"]["index"].tolist()
    assert vq_tok["classes"] == digit["classes"]
    images = ImagesWithTokens(digit, vq_ck["pixel_size"])
    x = to_unit(torch.stack([images[i][0] for i in range(len(images))]))
    with torch.no_grad():
        assert torch.equal(vq_encode(vq, x), vq_tok["tokens"].long())

    train_gpt.main(["--out", str(out), "--tokenizer", "vq", "--max-steps", "3", "--batch-size", "4",
                    "--n-layer", "1",
                    "--eval-interval", "3", "--eval-batches", "1", "--precision", "fp32", "--device", "cpu"])
    ck = torch.load(out / "gpt_vq.pt", weights_only=True)
    assert ck["tokenizer"] == "vq" and ck["vocab_size"] == 32 and ck["lineage"]["vq"] == vq_ck["fingerprint"]
    assert not (out / "gpt.pt").exists()

    tokens, pngs = sample.main(["--out", str(out), "--tokenizer", "vq", "--class", "0,1", "--num-samples",
                                "2", "--device", "cpu", "--precision", "fp32"])
    assert tokens.shape == (4, 16) and int(tokens.max()) < 32 and pngs.shape == (4, 3, 16, 16)
    assert len([f for f in os.listdir(out / "samples_vq") if f.endswith("png")]) == 4 + 1  # + grid.png
    with torch.no_grad():  # the PNGs are the VQ decoder's pictures of the sampled ids, up to 8-bit rounding
        painted = vq_decode(vq, tokens.long(), tuple(vq_ck["grid"])) / 2 + 0.5
    assert (painted - pngs).abs().max() < 1.5 / 255

    r = probe.main(["--out", str(out), "--tokenizer", "vq", "--epochs", "2", "--device", "cpu",
                    "--precision", "fp32"])
    assert r["tokenizer"] == "vq" and len(r["per_layer"]) == 1
    assert (out / "probe_vq.json").exists() and (out / "probe_vq.md").exists()

    other = torch.load(out / "vq.pt", weights_only=True)
    other["lineage"]["vq"] = "another-vq"
    (out / "vq.pt").unlink()
    torch.save(other, out / "vq.pt")
    with pytest.raises(SystemExit, match="different VQs"):
        sample.main(["--out", str(out), "--tokenizer", "vq", "--class", "0", "--num-samples", "1",
                     "--samples-dir", str(tmp_path / "s")])


def test_tiny_direct_decoder_overfits_a_few_images():
    """Four token grids -> four smooth pictures: the decoder learns to paint them (RAE-style head over a
    ViT)."""
    from train_direct import DirectDecoder, direct_render
    torch.manual_seed(0)
    model = DirectDecoder(vocab=16, dim=8, grid=(4, 4), patch=4, n_layer=2, n_embd=32, n_head=4)
    model.centroids.copy_(torch.randn(16, 8))
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(4, 3, 4, 4, generator=g) * 2 - 1, size=(16, 16), mode="bilinear",
                      align_corners=False)
    ids = torch.randint(16, (4, 16), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = F.l1_loss(model(ids), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert psnr(x.mean(0, keepdim=True).expand_as(x), x).mean() < 20
    assert psnr(direct_render(model.eval(), ids).detach(), x).mean() > 25
    # frozen: a buffer
    assert torch.equal(model.centroids, model.centroids.clone()) and not model.centroids.requires_grad


def test_direct_noise_and_corruption_only_in_training():
    """direct_loss draws noise (std ~ U(0, --feature-noise) x centroid std) and corrupts ids; with both at 0
    it is the plain pixel loss of model(ids), which is what evaluation and sample.py use (no noise there, and
    deterministic)."""
    from types import SimpleNamespace
    from train_decoder import Batch
    from train_direct import DirectDecoder, direct_loss
    torch.manual_seed(0)
    model = DirectDecoder(vocab=16, dim=8, grid=(2, 2), patch=4, n_layer=1, n_embd=16, n_head=2)
    model.centroids.copy_(torch.randn(16, 8))
    x, ids = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randint(16, (4, 4))
    parts = dict(perceptual=None, disc=None, scale=float(model.centroids.std()))

    def batch(seed):  # the whole global batch on this one rank
        return Batch(x, ids, torch.Generator().manual_seed(seed), slice(0, 4), 4)
    def args(noise, corrupt):
        return SimpleNamespace(batch_size=4, feature_noise=noise, token_corruption=corrupt, pixel_loss="l1")
    with torch.no_grad():
        plain, rec = direct_loss(model, model, batch(1), parts, args(0.0, 0.0), 0)
        torch.testing.assert_close(plain, F.l1_loss(model(ids), x))
        torch.testing.assert_close(rec, model(ids))
        for noise, corrupt in ((0.8, 0.0), (0.0, 0.5)):
            loss, _ = direct_loss(model, model, batch(1), parts, args(noise, corrupt), 0)
            assert abs(float(loss - plain)) > 1e-4
        assert torch.equal(model(ids), model(ids))


def test_sample_renders_through_the_direct_decoder(decoder_out, tmp_path, capsys):
    """--decoder direct paints the sampled tokens with direct.pt; auto picks MaskGIT when decoder.pt exists,
    else direct.pt, and says which; a missing direct.pt or one from another codebook is a one-line error."""
    import sample
    import train_gpt
    from train_direct import direct_render, load_direct
    out = tmp_path / "out"
    out.mkdir()
    for f in ("tokens_train.pt", "tokens_val.pt", "vq.pt", "decoder.pt", "codebook.pt", "direct.pt"):
        os.link(os.path.join(decoder_out, f), out / f)
    train_gpt.main(["--out", str(out), "--max-steps", "2", "--batch-size", "4", "--n-layer", "1",
                    "--eval-interval", "2", "--eval-batches", "1", "--precision", "fp32", "--device", "cpu"])
    sample.main(["--out", str(out), "--class", "0", "--num-samples", "1", "--samples-dir",
                 str(tmp_path / "m")])
    assert "rendered by MaskGIT" in capsys.readouterr().out  # auto with decoder.pt
    (out / "decoder.pt").unlink()
    tokens, pngs = sample.main(["--out", str(out), "--class", "0,1", "--num-samples", "2", "--samples-dir",
                                str(tmp_path / "d")])
    assert "rendered by the direct decoder" in capsys.readouterr().out  # auto without it
    direct, _ = load_direct(str(out / "direct.pt"), torch.device("cpu"))
    with torch.no_grad():
        painted = direct_render(direct, tokens.long()) / 2 + 0.5
    assert pngs.shape == painted.shape and (painted - pngs).abs().max() < 1.5 / 255
    (out / "direct.pt").rename(tmp_path / "direct.pt")
    with pytest.raises(SystemExit, match="direct.pt not found: run train_direct.py first"):
        sample.main(["--out", str(out), "--decoder", "direct", "--class", "0", "--num-samples", "1",
                     "--samples-dir", str(tmp_path / "a")])
    other = torch.load(tmp_path / "direct.pt", weights_only=True)
    other["lineage"]["codebook"] = "another-codebook"
    torch.save(other, out / "direct.pt")
    with pytest.raises(SystemExit, match="different codebooks"):
        sample.main(["--out", str(out), "--class", "0", "--num-samples", "1", "--samples-dir",
                     str(tmp_path / "e")])


def test_direct_stage_refuses_a_codebook_that_did_not_make_the_tokens(decoder_out, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for f in ("tokens_train.pt", "tokens_val.pt"):
        os.link(os.path.join(decoder_out, f), out / f)
    with pytest.raises(SystemExit, match="codebook.pt not found"):
        train_decoder.main(["--stage", "direct", "--out", str(out), "--max-steps", "1", "--workers", "0"])
    cb = torch.load(os.path.join(decoder_out, "codebook.pt"), weights_only=True)
    cb["lineage"]["codebook"] = "another-fit"
    torch.save(cb, out / "codebook.pt")
    with pytest.raises(SystemExit, match="different codebooks"):
        train_decoder.main(["--stage", "direct", "--out", str(out), "--max-steps", "1", "--workers", "0"])


def test_direct_upper_bound_trains_on_continuous_features(decoder_out, tmp_path):
    """--direct-input features: the same decoder fed the DINOv2 patch features the tokens were quantised
    from."""
    from train_direct import patch_features
    out = tmp_path / "out"
    out.mkdir()
    for f in ("tokens_train.pt", "tokens_val.pt", "codebook.pt"):
        os.link(os.path.join(decoder_out, f), out / f)
    tok = torch.load(out / "tokens_val.pt", weights_only=True)
    feats = patch_features(tok, torch.device("cpu"), None)
    cb = torch.load(out / "codebook.pt", weights_only=True)
    assert feats.shape == (len(tok["tokens"]), 16, cb["centroids"].shape[1])
    nearest = torch.cdist(feats.flatten(0, 1), cb["centroids"]).argmin(1).view(len(feats), -1)
    assert (nearest == tok["tokens"].long()).float().mean() > 0.95  # the features the ids were made from
    m = train_decoder.main(["--stage", "direct", "--direct-input", "features", "--out", str(out),
                            "--max-steps", "2", "--n-layer", "1",
                            "--batch-size", "4", "--workers", "0", "--perceptual", "0", "--precision",
                            "fp32", "--eval-interval", "2"])
    assert (out / "direct_features.pt").exists() and not (out / "direct.pt").exists() and m["psnr"] > 0


def test_gan_losses_move_the_right_way():
    """The adversarial pieces on a tiny VQ: discriminator steps lower its hinge loss on (real, reconstruction)
    pairs; generator steps on the adversarial term alone (D frozen) raise D's score of the reconstructions."""
    from train_vq import disc_loss, patch_discriminator
    torch.manual_seed(0)
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    vq, disc = VQModel(levels=2, channels=16, codes=16, code_dim=8), patch_discriminator(2, channels=16)
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.9))
    rec = vq(x)[0].detach()
    d0 = disc_loss(disc, x, rec).item()
    for _ in range(20):
        d_opt.zero_grad()
        disc_loss(disc, x, rec).backward()
        d_opt.step()
    assert disc_loss(disc, x, rec).item() < d0 - 0.1
    g_opt = torch.optim.Adam(vq.parameters(), lr=1e-3)
    d_opt.zero_grad(set_to_none=True)
    disc.requires_grad_(False)
    g0 = -disc(vq(x)[0]).mean().item()
    for _ in range(20):
        g_opt.zero_grad()
        (-disc(vq(x)[0]).mean()).backward()
        g_opt.step()
    assert -disc(vq(x)[0]).mean().item() < g0 - 0.1
    assert all(p.grad is None for p in disc.parameters())  # the generator's term never trained D


def test_adaptive_weight_balances_gradient_norms():
    """taming's weight = |grad nll| / |grad g| at the last layer: scaling the adversarial loss by c divides it
    by c."""
    from train_vq import adaptive_weight
    w = torch.randn(4, 4, requires_grad=True)
    nll, g = (w ** 2).sum(), (w * 3).sum()
    lam = adaptive_weight(nll, g, w)
    assert lam == pytest.approx(float((2 * w).detach().norm() / (torch.full((4, 4), 3.0).norm() + 1e-4)),
                                rel=1e-5)
    assert adaptive_weight(nll, 10 * g, w) == pytest.approx(float(lam) / 10, rel=1e-3)


def test_maskgit_on_a_pretrained_vq(decoder_out, tmp_path):
    """--stage maskgit --vq PATH learns a pretrained VQ's codes (MAGE's layout, the fixture's tiny weights)
    with no --stage vq; decoder.pt names the file, sample.py renders through it, stability.py compares it; bad
    --vq fail."""
    import sample
    import stability
    import train_gpt
    from test_vqgan import write_checkpoint
    from vqgan import load_vq
    ckpt, fx = write_checkpoint(tmp_path, "mage", lambda sd: {"state_dict": sd})
    out = tmp_path / "out"
    out.mkdir()
    for f in ("tokens_train.pt", "tokens_val.pt", "codebook.pt"):
        os.link(os.path.join(decoder_out, f), out / f)
    common = ["--out", str(out), "--batch-size", "4", "--workers", "0", "--precision", "fp32",
              "--eval-images", "4"]
    m = train_decoder.main(["--stage", "maskgit", "--vq", ckpt, "--max-steps", "2", "--n-layer", "1",
                            *common])
    assert 0 <= m["vq_token_acc"] <= 1
    dec = torch.load(out / "decoder.pt", weights_only=True)
    vq, info = load_vq(ckpt, "cpu", grid=(4, 4))
    assert dec["vq_path"] == os.path.abspath(ckpt) and dec["lineage"]["vq"] == info["fingerprint"]
    # 4x4 DiGIT grid x MAGE's 4x downsampling
    assert dec["pixel_size"] == 16 and dec["model_args"]["vq_codes"] == 64
    train_gpt.main(["--out", str(out), "--max-steps", "1", "--batch-size", "4", "--n-layer", "1",
                    "--precision", "fp32"])
    sample.main(["--out", str(out), "--num-samples", "2", "--class", "0", "--device", "cpu"])
    pngs = sorted(f for f in os.listdir(out / "samples") if f.endswith("_class0.png"))
    assert len(pngs) == 2 and Image.open(out / "samples" / pngs[0]).size == (16, 16)
    os.link(os.path.join(decoder_out, "vq_tokens_val.pt"), out / "vq_tokens_val.pt")  # made by another VQ
    r = stability.main(["--out", str(out), "--vq", ckpt, "--images", "4", "--snrs", "20", "--device", "cpu"])
    # not compared with them
    assert set(r["fair"]) == {"VQ", "DiGIT"} and set(r["resize_agreement"]) == {"DiGIT"}
    for bad, msg in ((str(tmp_path), "is a folder"),
                     (os.path.join(decoder_out, "tokens_val.pt"), "none of vq.pt")):
        with pytest.raises(SystemExit, match=msg):
            train_decoder.main(["--stage", "maskgit", "--vq", bad, "--max-steps", "1", "--n-layer", "1",
                                "--force", *common])
    with pytest.raises(SystemExit, match="use --pixel-size 16"):
        train_decoder.main(["--stage", "maskgit", "--vq", ckpt, "--pixel-size", "32", "--max-steps", "1",
                            "--force", *common])


def test_missing_vq_tokens_are_written_without_training(decoder_out, tmp_path):
    """The hint for missing vq_tokens_*.pt names train_vq.py --tokens-only, which writes them from the
    finished vq.pt and never trains it further (the old hint, --resume, trained on and replaced vq.pt)."""
    import train_gpt
    out = tmp_path / "out"
    out.mkdir()
    for f in ("tokens_train.pt", "tokens_val.pt", "vq.pt"):
        os.link(os.path.join(decoder_out, f), out / f)
    with pytest.raises(SystemExit, match="--tokens-only"):
        train_gpt.main(["--out", str(out), "--tokenizer", "vq", "--max-steps", "1"])
    before = (out / "vq.pt").read_bytes()
    train_vq.main(["--out", str(out), "--tokens-only", "--device", "cpu"])
    assert (out / "vq.pt").read_bytes() == before
    for split in ("train", "val"):
        assert torch.equal(torch.load(out / f"vq_tokens_{split}.pt", weights_only=True)["tokens"],
                           torch.load(os.path.join(decoder_out, f"vq_tokens_{split}.pt"),
                                      weights_only=True)["tokens"])


def test_a_moved_out_folder_and_a_moved_pretrained_vq(decoder_out, tmp_path):
    """decoder.pt records a pretrained VQ's place as given and relative to out/: a moved out/ (with the VQ
    inside) still renders, and the same sample folder resumes after the move; a VQ moved elsewhere is named in
    one line with --vq as the way out; --vq naming another VQ is refused, naming that file."""
    import shutil
    import sample
    import train_gpt
    from test_vqgan import write_checkpoint
    out = tmp_path / "out"
    out.mkdir()
    for f in ("tokens_train.pt", "tokens_val.pt", "codebook.pt"):
        os.link(os.path.join(decoder_out, f), out / f)
    ckpt, _ = write_checkpoint(out, "mage", lambda sd: {"state_dict": sd})  # the pretrained VQ inside out/
    common = ["--out", str(out), "--batch-size", "4", "--workers", "0", "--precision", "fp32",
              "--eval-images", "4"]
    train_decoder.main(["--stage", "maskgit", "--vq", ckpt, "--max-steps", "1", "--n-layer", "1", *common])
    train_gpt.main(["--out", str(out), "--max-steps", "1", "--batch-size", "4", "--n-layer", "1",
                    "--precision", "fp32"])
    args = ["--class", "0", "--num-samples", "2", "--batch-size", "1", "--precision", "fp32"]
    sample.main(["--out", str(out), *args])
    moved = tmp_path / "moved"
    shutil.move(str(out), str(moved))
    os.remove(moved / "samples" / "parts" / "00000001.pt")  # as if the last batch had not finished
    # the recorded VQ is gone; the one inside moved/ is used
    tokens, _ = sample.main(["--out", str(moved), *args])
    assert tokens.shape == (2, 16)
    shutil.move(str(moved / "mage.ckpt"), str(tmp_path / "mage.ckpt"))
    with pytest.raises(SystemExit, match="which is not there: give its new place with --vq"):
        sample.main(["--out", str(moved), *args, "--samples-dir", str(tmp_path / "s2")])
    sample.main(["--out", str(moved), *args, "--samples-dir", str(tmp_path / "s3"), "--vq",
                 str(tmp_path / "mage.ckpt")])
    with pytest.raises(SystemExit, match=r"other\.ckpt were made from different VQs"):
        other, _ = write_checkpoint(tmp_path, "llamagen", lambda sd: {"model": sd})
        os.rename(other, tmp_path / "other.ckpt")
        sample.main(["--out", str(moved), *args, "--samples-dir", str(tmp_path / "s4"), "--vq",
                     str(tmp_path / "other.ckpt")])
