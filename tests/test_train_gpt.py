"""train_gpt.py: the model's contracts, learning, class dropout, checkpoints, resume, DDP, bad input."""
import os

import pytest
import torch

from conftest import make_token_files, run_script
from common import batch_indices, learning_rate
from train_gpt import GPT, drop_classes, loss_fn, main, make_optimizer

TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--batch-size", "16", "--precision", "fp32",
        "--eval-interval", "5", "--eval-batches", "1", "--warmup-steps", "2", "--lr", "3e-3"]


def tiny_gpt(**kw):
    torch.manual_seed(0)
    return GPT(**dict(dict(vocab_size=32, block_size=16, n_classes=3, n_layer=2, n_embd=32, n_head=2), **kw))


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_causality(norm):
    model = tiny_gpt(norm=norm).eval()
    x = torch.randint(32, (2, 15))
    labels = torch.tensor([0, 2])
    y = x.clone()
    # change token 9: position 9 is the first to see it (position 0 is the class)
    y[:, 9] = (y[:, 9] + 1) % 32
    a, b = model(x, labels), model(y, labels)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    c = model(x, torch.tensor([1, 2]))  # the class reaches every position
    assert not torch.allclose(a[0, 0], c[0, 0])


def test_hidden_states_and_shapes():
    model = tiny_gpt().eval()
    # 3 = null class
    logits, hidden = model(torch.randint(32, (3, 15)), torch.tensor([0, 1, 3]), return_hidden=True)
    # embedding + 2 blocks
    assert logits.shape == (3, 16, 32) and len(hidden) == 3 and hidden[0].shape == (3, 16, 32)
    assert model(torch.randint(32, (3, 4)), None).shape == (3, 5, 32)  # shorter prefixes work (sampling)


def test_tied_embeddings_share_weights():
    model = tiny_gpt(tie_embeddings=True)
    assert model.head.weight is model.tok_emb.weight
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in tiny_gpt().parameters())


def test_overfits_one_batch():
    model = tiny_gpt(n_embd=64)
    # one sequence per class: with two sequences of one class their first tokens could not both be memorised
    x, y = torch.randint(32, (3, 16)), torch.arange(3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = loss_fn(model, x, y).item()
    for _ in range(200):
        loss = loss_fn(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.0 and loss.item() < 0.05  # from ~ln(32) = 3.47 to memorised


def test_class_dropout_rate_and_determinism():
    labels = torch.zeros(20000, dtype=torch.long)
    out = drop_classes(labels, 0.1, 10, step=3, seed=0)
    rate = (out == 10).float().mean().item()
    assert 0.09 < rate < 0.11 and set(out.unique().tolist()) == {0, 10}
    assert torch.equal(out, drop_classes(labels, 0.1, 10, step=3, seed=0))
    assert not torch.equal(out, drop_classes(labels, 0.1, 10, step=4, seed=0))
    assert torch.equal(drop_classes(labels, 0.0, 10, 3, 0), labels)


def test_batches_cover_each_epoch_once():
    seen = torch.cat([batch_indices(s, 8, 40, seed=0) for s in range(5)])
    assert sorted(seen.tolist()) == list(range(40))
    # a new permutation next epoch
    assert not torch.equal(batch_indices(5, 8, 40, 0), batch_indices(0, 8, 40, 0))


def test_train_checkpoint_and_resume_exactly(tmp_path):
    """With dropout on, so the resumed run must also restore the random state to match."""
    straight, parts = str(tmp_path / "a"), str(tmp_path / "b")
    make_token_files(straight), make_token_files(parts)
    losses = main(["--out", straight, "--max-steps", "20", "--dropout", "0.1", *TINY])
    assert losses[-1] < losses[0] - 0.5  # it learns the class patterns
    ck = torch.load(os.path.join(straight, "gpt.pt"), weights_only=True)
    assert ck["step"] == 20 and ck["losses"] == losses and ck["evals"][-1]["step"] == 20
    model = GPT(**ck["model_args"])
    model.load_state_dict(ck["model"])
    assert ck["vocab_size"] == 32 and ck["grid"] == (4, 4) and ck["classes"] == ["c0", "c1", "c2"]

    main(["--out", parts, "--max-steps", "20", "--stop-after", "10", "--dropout", "0.1", *TINY])
    assert torch.load(os.path.join(parts, "gpt.pt"), weights_only=True)["step"] == 10
    # whatever the process did in between: the checkpoint's random state must take over
    torch.manual_seed(123)
    resumed = main(["--out", parts, "--max-steps", "20", "--resume", "--dropout", "0.1", *TINY])
    assert len(resumed) == 20
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(losses), rtol=0, atol=1e-6)


def test_two_processes_match_one(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    make_token_files(one), make_token_files(two)
    args = ["--max-steps", "6", "--class-dropout", "0.2", "--grad-accum", "2", *TINY]
    run_script("train_gpt.py", "--out", one, *args)
    run_script("train_gpt.py", "--out", two, *args, nproc=2)
    a = torch.load(os.path.join(one, "gpt.pt"), weights_only=True)
    b = torch.load(os.path.join(two, "gpt.pt"), weights_only=True)
    torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), rtol=0, atol=1e-5)
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """--grad-accum 2 sees the same global batch as --grad-accum 1, in two halves: the same losses and
    weights."""
    runs = {}
    for accum in ("1", "2"):
        out = make_token_files(str(tmp_path / accum))
        runs[accum] = main(["--out", out, "--max-steps", "6", "--class-dropout", "0.2", "--grad-accum",
                            accum, *TINY])
        runs[accum + "w"] = torch.load(os.path.join(out, "gpt.pt"), weights_only=True)["model"]
    torch.testing.assert_close(torch.tensor(runs["2"]), torch.tensor(runs["1"]), rtol=0, atol=1e-5)
    for k in runs["1w"]:
        torch.testing.assert_close(runs["2w"][k], runs["1w"][k], rtol=1e-4, atol=1e-5)


def test_learning_rate_schedules():
    from types import SimpleNamespace
    a = SimpleNamespace(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert [learning_rate(s, a) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warm-up
    # cos: half-way
    assert learning_rate(10, a) == pytest.approx(1.0) and learning_rate(60, a) == pytest.approx(0.55)
    # ends at min_lr
    assert learning_rate(110, a) == pytest.approx(0.1) and learning_rate(500, a) == pytest.approx(0.1)
    a.schedule = "inverse-sqrt"
    assert learning_rate(39, a) == pytest.approx(0.5)  # sqrt(10 / 40)
    a.schedule = "constant"
    assert learning_rate(1000, a) == 1.0


def test_weight_decay_only_on_matrices():
    from types import SimpleNamespace
    model = tiny_gpt()
    opt = make_optimizer(model, SimpleNamespace(lr=1e-3, weight_decay=0.05, beta2=0.95), torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert any(names[id(p)].endswith("ln1.weight") for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_nan_stops_before_the_update_and_keeps_the_last_good_checkpoint(tmp_path):
    out = make_token_files(str(tmp_path))
    main(["--out", out, "--max-steps", "4", *TINY])
    good = torch.load(os.path.join(out, "gpt.pt"), weights_only=True)
    # an absurd learning rate: the weights blow up within a few steps; no checkpoint may hold them
    p = run_script("train_gpt.py", "--out", out, "--resume", "--max-steps", "40", "--ckpt-interval", "1",
                   "--grad-clip", "0", *TINY[:-2], "--lr", "1e30", "--warmup-steps", "0", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "last good checkpoint" in p.stderr or "not saving them" in p.stderr
    last = torch.load(os.path.join(out, "gpt.pt"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert last["step"] >= good["step"]


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory):
    out = make_token_files(str(tmp_path_factory.mktemp("base")))
    main(["--out", out, "--max-steps", "6", *TINY, "--warmup-steps", "0"])
    return torch.load(os.path.join(out, "gpt.pt"), weights_only=True)["model"]


@pytest.mark.parametrize("flag", [["--label-smoothing", "0.1"], ["--grad-clip", "0.01"],
                                  ["--weight-decay", "0.5"], ["--beta2", "0.5"], ["--class-dropout", "0.5"],
                                  ["--dropout", "0.2"], ["--norm", "post"], ["--tie-embeddings"],
                                  ["--unconditional"], ["--schedule", "inverse-sqrt"], ["--min-lr", "1e-2"],
                                  ["--seed", "1"]])
def test_every_training_option_changes_the_run(base_weights, tmp_path, flag):
    """Each option, set alone, changes the weights after a few steps (an option the loop ignored would
    not)."""
    out = make_token_files(str(tmp_path))
    main(["--out", out, "--max-steps", "6", *TINY, "--warmup-steps", "0", *flag])
    b = torch.load(os.path.join(out, "gpt.pt"), weights_only=True)["model"]
    assert any(base_weights[k].shape != b[k].shape or not torch.allclose(base_weights[k], b[k])
               for k in base_weights), flag


def test_mismatched_token_files_are_one_line_errors(tmp_path):
    out = make_token_files(str(tmp_path))
    val = torch.load(os.path.join(out, "tokens_val.pt"), weights_only=True)
    val["vocab_size"] = 64
    torch.save(val, os.path.join(out, "tokens_val.pt"))
    p = run_script("train_gpt.py", "--out", out, *TINY, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "different codebook sizes (digit_vocab 32 vs 64)" in p.stderr.strip().splitlines()[-1]
    make_token_files(out)
    main(["--out", out, "--max-steps", "2", *TINY])
    p = run_script("train_gpt.py", "--out", out, "--resume", *TINY[:-2], "--n-embd", "64", check=False)
    assert p.returncode != 0 and "other model settings" in p.stderr
    p = run_script("train_gpt.py", "--out", str(tmp_path / "empty"), check=False)
    assert p.returncode != 0 and "not found: run tokenize_kmeans.py" in p.stderr


def test_views_are_drawn_by_the_step():
    """pick_views: one view per row, a pure function of (seed, step) (resume and any world size see the same),
    every view used, and plain [N, h*w] tokens pass through."""
    from train_gpt import pick_views
    tokens = torch.arange(10 * 4 * 3).view(10, 4, 3)  # 10 images, 4 views, 3 tokens; the value names the view
    rows = torch.arange(10)
    a, b = pick_views(tokens, rows, 7, 0), pick_views(tokens, rows, 7, 0)
    assert torch.equal(a, b) and a.shape == (10, 3)
    v = (a[:, 0] // 3) % 4  # which view each row got
    assert not torch.equal(pick_views(tokens, rows, 8, 0), a)
    seen = torch.cat([(pick_views(tokens, rows, s, 0)[:, 0] // 3) % 4 for s in range(20)])
    assert set(seen.tolist()) == {0, 1, 2, 3} and set(v.tolist()) <= {0, 1, 2, 3}
    assert torch.equal(pick_views(tokens[:, 0], rows, 7, 0), tokens[:, 0])


def test_compiled_model_gives_the_eager_logits():
    """--compile: torch.compile of a tiny GPT (here on the CPU; on by default on GPUs) computes what the eager
    model computes, within float tolerance."""
    model = tiny_gpt().eval()
    x, y = torch.randint(32, (2, 15)), torch.tensor([0, 3])
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x, y), model(x, y), rtol=1e-4, atol=1e-4)
