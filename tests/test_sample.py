"""sample.py: the KV cache changes nothing but speed, CFG and top-k behave, the CLI checks its inputs."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script
from sample import generate
from train_decoder import MaskGIT
from vqgan import VQModel
from train_gpt import GPT, filter_logits

GRID, VOCAB, CLASSES = (3, 3), 20, ["zero", "one", "two"]


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(vocab_size=VOCAB, block_size=9, n_classes=3, n_layer=2, n_embd=32, n_head=4).eval()


def test_cached_equals_uncached_greedy_and_sampled():
    model = tiny_gpt()
    labels = torch.tensor([0, 1, 2, 3])  # 3 = null class
    for kw in (dict(top_k=1), dict(temperature=1.0), dict(top_p=0.9, cfg_scale=2.0)):
        a = generate(model, labels, gen=torch.Generator().manual_seed(5), use_cache=True, **kw)
        b = generate(model, labels, gen=torch.Generator().manual_seed(5), use_cache=False, **kw)
        assert a.shape == (4, 9) and torch.equal(a, b), kw


def test_cache_logits_match_full_forward():
    from train_gpt import KVCache
    model = tiny_gpt()
    x, y = torch.randint(VOCAB, (2, 8)), torch.tensor([0, 2])
    full = model(x, y)
    cache = KVCache(model, 2)
    steps = [model(x[:, :0], y, cache=cache)[:, -1]]
    steps += [model(x[:, t: t + 1], y, cache=cache)[:, -1] for t in range(8)]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)


def tiny_ar(seed=0):
    from train_decoder import ARDecoder
    torch.manual_seed(seed)
    return ARDecoder(digit_vocab=VOCAB, vq_codes=12, length=9, n_layer=2, n_embd=32, n_head=4).eval()


def test_ar_stage2_cache_logits_match_full_forward():
    """The AR stage 2: [DiGIT | BOS] in one call, then one code per call, equals teacher forcing."""
    from train_gpt import KVCache
    model = tiny_ar()
    digit, codes = torch.randint(VOCAB, (2, 9)), torch.randint(12, (2, 9))
    full = model(digit, codes[:, :-1])  # logits of v_0 .. v_8
    cache = KVCache(model, 2, length=18)
    steps = [model(digit, codes[:, :0], cache=cache)[:, -1]]
    steps += [model(None, codes[:, t: t + 1], cache=cache)[:, -1] for t in range(8)]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_ar_decode_equals_an_uncached_loop():
    """ar_decode (KV cache) draws what re-running the whole sequence for each code draws, with the same
    generator: greedy and top-p 0.8."""
    from train_decoder import ar_decode
    from train_gpt import sample_token
    model = tiny_ar()
    digit = torch.randint(VOCAB, (3, 9))
    for kw in (dict(top_k=1, top_p=1.0), dict(top_p=0.8)):
        cached = ar_decode(model, digit, gen=torch.Generator().manual_seed(3), **kw)
        gen, codes = torch.Generator().manual_seed(3), digit.new_zeros(3, 0)
        with torch.no_grad():
            for _ in range(9):
                logits = model(digit, codes)[:, -1]
                codes = torch.cat([codes, sample_token(logits, 1.0, kw.get("top_k", 0), kw["top_p"], gen)], 1)
        assert cached.shape == (3, 9) and torch.equal(cached, codes), kw


def test_top_k_one_is_greedy():
    model = tiny_gpt()
    labels = torch.tensor([0, 1, 2])
    a = generate(model, labels, top_k=1, gen=torch.Generator().manual_seed(1))
    # greedy by hand: argmax of the full forward at every step
    x = torch.zeros(3, 0, dtype=torch.long)
    for _ in range(9):
        x = torch.cat([x, model(x, labels)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(a, x)


def test_cfg_scale_one_is_plain_conditional():
    model = tiny_gpt()
    model.cls_emb.weight.data *= 100  # a random model barely looks at its class; make the class matter
    labels = torch.tensor([1, 2])
    a = generate(model, labels, cfg_scale=1.0, gen=torch.Generator().manual_seed(3))
    b = generate(model, labels, gen=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    c = generate(model, labels, cfg_scale=5.0, gen=torch.Generator().manual_seed(3))
    assert not torch.equal(a, c)  # guidance does change the samples


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, True, True]]


def test_top_p_keeps_the_nucleus_of_unsorted_rows():
    """Two rows holding the same probabilities in different orders: the kept ids follow each row's own
    order."""
    p = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = torch.log(torch.stack([p, p[[2, 0, 3, 1]]]))  # row 1: 0.15, 0.05, 0.3, 0.5
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[False, True, False, True], [False, False, True, True]]
    kept = ~torch.isinf(filter_logits(logits, top_p=0.9))  # 0.5 + 0.3 < 0.9: the 0.15 joins
    assert kept.tolist() == [[False, True, True, True], [True, False, True, True]]


def test_cfg_mixes_logits_as_uncond_plus_scale_times_difference():
    """Greedy guided sampling, step by step, against argmax(u + s (c - u)) of two plain forward passes."""
    model = tiny_gpt()
    model.cls_emb.weight.data *= 100  # make the class matter
    labels, s = torch.tensor([0, 1, 2]), 5.0
    got = generate(model, labels, top_k=1, cfg_scale=s, gen=torch.Generator().manual_seed(0))
    x = torch.zeros(3, 0, dtype=torch.long)
    null = torch.full_like(labels, model.null_class)
    for _ in range(9):
        c, u = model(x, labels)[:, -1], model(x, null)[:, -1]
        x = torch.cat([x, (u + s * (c - u)).argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, x)
    plain = torch.zeros(3, 0, dtype=torch.long)  # and guidance matters here: plain greedy decoding differs
    for _ in range(9):
        plain = torch.cat([plain, model(plain, labels)[:, -1].argmax(-1, keepdim=True)], 1)
    assert not torch.equal(got, plain)


def test_temperature_and_top_k_shape_the_samples():
    """Temperature changes the samples of a seed; top-k keeps every sampled token among the k most likely."""
    model = tiny_gpt()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    hot = generate(model, labels, temperature=1.0, gen=torch.Generator().manual_seed(2))
    cold = generate(model, labels, temperature=0.3, gen=torch.Generator().manual_seed(2))
    assert not torch.equal(hot, cold)
    got = generate(model, labels, top_k=3, gen=torch.Generator().manual_seed(2))
    logits = model(got[:, :-1], labels)  # the logits every token was drawn from
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == got[..., None]).any(-1).all()
    # and it did sample, not just take the argmax
    assert not (logits.topk(1, dim=-1).indices[..., 0] == got).all()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """gpt.pt, decoder.pt, vq.pt of tiny random models, in the format the training scripts write."""
    out = tmp_path_factory.mktemp("ckpt")
    common = dict(grid=GRID, encoder="dinov2_vits14_offline", step=0, optimizer={},
                  config={"class_dropout": 0.1})
    gpt_args = dict(vocab_size=VOCAB, block_size=9, n_classes=3, n_layer=2, n_embd=32, n_head=4)
    torch.save(dict(model=GPT(**gpt_args).state_dict(), model_args=gpt_args, vocab_size=VOCAB,
                    classes=CLASSES, **common), out / "gpt.pt")
    vq_args = dict(levels=2, channels=16, codes=16, code_dim=8)
    torch.save(dict(model=VQModel(**vq_args).state_dict(), model_args=vq_args, pixel_size=12, **common),
               out / "vq.pt")
    dec_args = dict(digit_vocab=VOCAB, vq_codes=16, length=9, n_layer=1, n_embd=32, n_head=2)
    torch.save(dict(model=MaskGIT(**dec_args).state_dict(), model_args=dec_args, digit_vocab=VOCAB,
                    **common), out / "decoder.pt")
    return out


def test_cli_writes_grid_singles_and_tokens(checkpoints, tmp_path):
    run_script("sample.py", "--out", checkpoints, "--samples-dir", tmp_path, "--class", "one,2",
               "--num-samples", "3", "--top-k", "5", "--cfg-scale", "2", "--show-tokens")
    grid = Image.open(tmp_path / "grid.png")
    # make_grid: 3 columns x 2 rows of 12 px, padding 2
    assert grid.size == (2 + 3 * (12 + 2), 2 + 2 * (12 + 2))
    assert len([f for f in os.listdir(tmp_path) if f.endswith("_class1.png")]) == 3
    tok = torch.load(tmp_path / "tokens.pt", weights_only=True)
    assert tok["tokens"].shape == (6, 9) and tok["labels"].tolist() == [1, 1, 1, 2, 2, 2]
    assert (tmp_path / "tokens.png").exists()


def test_sharded_sampling_matches_one_process_and_resumes(checkpoints, tmp_path):
    """torchrun with 2 processes writes the same images as 1 (seeds per batch, not per rank); a rerun
    redoes only the batch whose part file is missing; other settings into the same folder are refused."""
    args = ["--out", checkpoints, "--class", "0,1,2", "--num-samples", "3", "--batch-size", "2", "--top-k",
            "5", "--cfg-scale", "2"]
    run_script("sample.py", *args, "--samples-dir", tmp_path / "one")
    run_script("sample.py", *args, "--samples-dir", tmp_path / "two", nproc=2)
    one, two = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("one", "two"))
    assert one.shape == (9, 12, 12, 3) and one.dtype == np.uint8 and np.array_equal(one, two)
    tok = [torch.load(tmp_path / d / "tokens.pt", weights_only=True) for d in ("one", "two")]
    assert torch.equal(tok[0]["tokens"], tok[1]["tokens"])
    assert tok[0]["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    class2 = sorted(f for f in os.listdir(tmp_path / "two") if f.endswith("_class2.png"))
    assert class2 == [f"0000{i}_class2.png" for i in (6, 7, 8)]

    first = os.path.getmtime(tmp_path / "two" / "00000_class0.png")
    # as if killed while the last batch (sample 8) was running
    os.remove(tmp_path / "two" / "parts" / "00000008.pt")
    os.remove(tmp_path / "two" / "00008_class2.png")
    p = run_script("sample.py", *args, "--samples-dir", tmp_path / "two")
    assert "resumed" in p.stdout and os.path.getmtime(tmp_path / "two" / "00000_class0.png") == first
    assert np.array_equal(np.load(tmp_path / "two" / "samples.npz")["arr_0"], one)
    p = run_script("sample.py", *args, "--top-k", "3", "--samples-dir", tmp_path / "two", check=False)
    assert p.returncode != 0 and "made with other settings" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("args, message", [
    (["--class", "3"], "class 3 is out of range"),
    (["--class", "seven"], "unknown class 'seven'"),
])
def test_cli_bad_classes(checkpoints, tmp_path, args, message):
    p = run_script("sample.py", "--out", checkpoints, "--samples-dir", tmp_path, *args, check=False)
    assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr


def test_cli_mismatched_and_missing_files(checkpoints, tmp_path):
    for f in ("gpt.pt", "vq.pt"):
        os.link(checkpoints / f, tmp_path / f)
    p = run_script("sample.py", "--out", tmp_path, check=False)
    assert p.returncode != 0 and "decoder.pt not found" in p.stderr
    dec = torch.load(checkpoints / "decoder.pt", weights_only=True)
    dec["digit_vocab"] = 99
    torch.save(dec, tmp_path / "decoder.pt")
    p = run_script("sample.py", "--out", tmp_path, check=False)
    line = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and "gpt.pt and" in line
    assert "decoder.pt were made from different codebook sizes (digit_vocab 20 vs 99)" in line


def test_cli_class_on_unconditional_model(checkpoints, tmp_path):
    gpt = torch.load(checkpoints / "gpt.pt", weights_only=True)
    args = dict(gpt["model_args"], n_classes=0)
    gpt.update(model=GPT(**args).state_dict(), model_args=args, classes=[])
    torch.save(gpt, tmp_path / "gpt.pt")
    p = run_script("sample.py", "--out", tmp_path, "--class", "1", "--tokens-only", check=False)
    assert p.returncode != 0 and "unconditional model" in p.stderr
    p = run_script("sample.py", "--out", tmp_path, "--tokens-only", "--num-samples", "2")
    assert "unconditional" in p.stdout


def test_cli_renders_real_tokens(checkpoints, tmp_path):
    tok = dict(tokens=torch.randint(VOCAB, (10, 9)), grid=GRID, vocab_size=VOCAB,
               labels=torch.arange(10) % 3, classes=CLASSES)
    torch.save(tok, tmp_path / "tokens_val.pt")
    run_script("sample.py", "--out", checkpoints, "--samples-dir", tmp_path / "r", "--from-tokens",
               tmp_path / "tokens_val.pt", "--num-samples", "4")
    saved = torch.load(tmp_path / "r" / "tokens.pt", weights_only=True)
    rows = [0, 3, 6, 9]  # spread over the file
    assert torch.equal(saved["tokens"], tok["tokens"][rows]) and saved["labels"].tolist() == [0, 0, 0, 0]
    assert len([f for f in os.listdir(tmp_path / "r") if f.endswith("_class0.png")]) == 4
