"""eval.py and probe.py: Frechet distance vs closed form, precision/recall, noise at a given SNR, probes,
inputs."""

import pytest
import torch
from PIL import Image

from conftest import make_token_files, run_script
from eval import (frechet_distance, gaussian_stats, inception_score, list_samples, load_images,
                  precision_recall)
from probe import bag_of_tokens, gpt_features, probe_accuracy
from train_gpt import GPT


def draws(g, *shape, uniform=False):
    """Two float64 draws of `shape` from generator g (normal, or uniform in [0.5, 1.5))."""
    if uniform:
        return [torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5 for _ in range(2)]
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(2)]


def test_frechet_distance_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = draws(g, 5)
    d1, d2 = draws(g, 5, uniform=True)
    # diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(d1) - sqrt(d2))^2
    expected = float((mu1 - mu2).pow(2).sum() + (d1.sqrt() - d2.sqrt()).pow(2).sum())
    assert abs(frechet_distance(mu1, torch.diag(d1), mu2, torch.diag(d2)) - expected) < 1e-9
    # a rotation of both covariances changes nothing; equal Gaussians are at distance 0
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    s1, s2 = Q @ torch.diag(d1) @ Q.T, Q @ torch.diag(d2) @ Q.T
    assert abs(frechet_distance(mu1, s1, mu2, s2) - expected) < 1e-9
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_inception_score_bounds():
    assert abs(inception_score(torch.full((50, 10), 0.1)) - 1) < 1e-9  # a uniform classifier: IS = 1
    # confident and balanced: IS = #classes
    assert abs(inception_score(torch.eye(10).repeat(5, 1), splits=5) - 10) < 1e-6


def test_frechet_distance_matches_torch_fidelity_on_non_commuting_covariances():
    """Random SPD covariances that do not commute (tr sqrt(S1 S2) != tr(S1^1/2 S2^1/2)) against
    torch-fidelity's formula."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    g = torch.Generator().manual_seed(0)
    s1, s2 = (a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64) for a in draws(g, 6, 6))
    assert not torch.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = draws(g, 6)
    ref = fid_statistics_to_metric(dict(mu=mu1.numpy(), sigma=s1.numpy()),
                                   dict(mu=mu2.numpy(), sigma=s2.numpy()), False)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref["frechet_inception_distance"], rel=1e-9)


def test_frechet_distance_of_samples_converges():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(20000, 3, generator=g), torch.randn(20000, 3, generator=g) * 2 + 1
    # |mu|^2 = 3, (2-1)^2 x 3
    assert abs(frechet_distance(*gaussian_stats(a), *gaussian_stats(b)) - (3 * 1 + 3 * 1)) < 0.1


def test_precision_recall():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 4, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    p, r = precision_recall(real, real + 100)
    assert p == 0.0 and r == 0.0
    p, r = precision_recall(real, real[:30] * 0.1)  # collapsed fakes: precise, low recall
    assert p > 0.9 and r < 0.3


def test_precision_recall_radius_is_the_kth_neighbour_by_hand():
    """1-D by hand, k = 1: real points 0, 1, 3, 6 have radii 1, 1, 2, 3 (distance to the nearest *other*
    point). Fake 2.1 lies in the ball of 3 (|2.1 - 3| = 0.9 <= 2); fake 9.5 in none (|9.5 - 6| = 3.5 > 3; a
    radius to the 2nd neighbour, 5, would take it in). The two fakes' radii are 7.4 each, so every real point
    is covered."""
    real, fake = torch.tensor([[0.0], [1.0], [3.0], [6.0]]), torch.tensor([[2.1], [9.5]])
    p, r = precision_recall(real, fake, k=1)
    assert p == 0.5 and r == 1.0
    # 9.1 is within 3.1 > 3 of 6: still outside
    p, r = precision_recall(real, torch.tensor([[2.1], [9.1]]), k=1)
    assert p == 0.5
    p, _ = precision_recall(real, torch.tensor([[2.1], [8.9]]), k=1)  # 2.9 <= 3: inside
    assert p == 1.0


def test_linear_probe_learns_separable_features():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(600) % 3
    x = torch.randn(600, 16, generator=g)
    good = x.clone()
    good[:, 0] += 8 * y  # one informative direction, 8 standard deviations between classes
    acc = probe_accuracy(torch.stack([good[:500], x[:500]]), y[:500], torch.stack([good[500:], x[500:]]),
                         y[500:], 3, 30, 0.1, 64)
    assert acc[0] > 0.95 and acc[1] < 0.6  # the informative set is learned, pure noise is at chance


def test_probe_features_do_not_see_the_label():
    torch.manual_seed(0)
    model = GPT(vocab_size=16, block_size=9, n_classes=3, n_layer=2, n_embd=16, n_head=2).eval()
    tokens = torch.randint(16, (4, 9))
    f = gpt_features(model, tokens, 2, torch.device("cpu"))
    assert f.shape == (4, 2, 16) and f.dtype == torch.float16  # [N, layers, C], compact on the CPU
    model.cls_emb.weight.data[:3] = 5.0  # changing the class rows must not change the (null-class) features
    torch.testing.assert_close(gpt_features(model, tokens, 2, torch.device("cpu")), f)


def test_bag_of_tokens():
    h = bag_of_tokens(torch.tensor([[0, 0, 1, 3]]), 4)
    assert h.tolist() == [[0.5, 0.25, 0.0, 0.25]]


def test_samples_of_mixed_sizes_are_resized_and_labels_parsed(tmp_path, capsys):
    for i, size in enumerate([16, 16, 20]):
        Image.new("RGB", (size, size), (i * 50, 0, 0)).save(tmp_path / f"{i:05d}_class{i + 1}.png")
    Image.new("RGB", (50, 50)).save(tmp_path / "grid.png")  # sample.py's grid is not a sample
    files, labels, size, _ = list_samples(str(tmp_path))
    x = load_images(files, size)
    assert x.shape == (3, 3, 16, 16) and labels.tolist() == [1, 2, 3]
    assert "resizing all to (16, 16)" in capsys.readouterr().err


def test_cli_refuses_too_few_samples_and_missing_files(tmp_path):
    out = make_token_files(str(tmp_path / "out"))
    (tmp_path / "s").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "s" / "00000_class0.png")
    p = run_script("eval.py", "--out", out, "--samples", tmp_path / "s", check=False)
    assert p.returncode != 0 and "at least 2 are needed" in p.stderr and "Traceback" not in p.stderr
    p = run_script("stability.py", "--out", out, check=False)
    assert p.returncode != 0 and "codebook.pt not found" in p.stderr and "Traceback" not in p.stderr
    p = run_script("probe.py", "--out", out, check=False)
    assert p.returncode != 0 and "gpt.pt not found" in p.stderr


def test_probe_compare_gathers_runs_into_one_table_and_plot(tmp_path):
    import json
    import probe
    for k, accs in ((64, [0.5, 0.7]), (256, [0.6, 0.8, 0.75])):
        d = tmp_path / str(k)
        d.mkdir()
        best = max(range(len(accs)), key=lambda i: accs[i])
        json.dump(dict(k=k, tokenizer="digit", per_layer=accs, best_layer=best + 1, best_top1=accs[best]),
                  open(d / "probe.json", "w"))
    runs = probe.main(["--out", str(tmp_path), "--compare", str(tmp_path / "64"), str(tmp_path / "256")])
    assert [name for name, _ in runs] == ["K=64 (digit)", "K=256 (digit)"]
    table = (tmp_path / "probe_compare.md").read_text()
    assert "| K=256 (digit) | 60.0 | 80.0 | 75.0 | 80.0 (layer 2) |" in table
    assert "| K=64 (digit) | 50.0 | 70.0 | | 70.0 (layer 2) |" in table
    assert (tmp_path / "probe_compare.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="probe.json not found"):
        probe.main(["--out", str(tmp_path), "--compare", str(tmp_path / "missing")])


def test_report_puts_the_two_tokenizers_side_by_side(tmp_path):
    """eval.py --report: the same-GPT table takes each column from its own results and says the losses are not
    comparable."""
    import json
    import eval as evaluate
    g = lambda fd, agree: dict(n_samples=100, n_real=500, fd_dinov2=fd, classifier_score=9.0,
                               classifier_val_acc=0.95,
                               class_agreement=agree, precision=0.6, recall=0.7, feature="f")
    results = dict(generative=g(110.0, 0.98), generative_vq=g(96.3, 0.89), rendered=g(86.9, 0.90),
                   rendered_vq=g(72.5, 0.928))
    json.dump(dict(k=1024, tokenizer="vq", per_layer=[0.8, 0.9], best_layer=2, best_top1=0.9),
              open(tmp_path / "probe_vq.json", "w"))
    evaluate.write_report(evaluate.get_args(["--out", str(tmp_path)]), results)
    text = (tmp_path / "report.md").read_text()
    assert "| FD_DINOv2 of the samples (lower is better) | 110.0 | 96.3 |" in text
    assert "| class agreement of the samples | 98.0% | 89.0% |" in text
    # no probe.json for DiGIT here
    assert "| linear probe, best GPT layer, val top-1 | - | 90.0% (layer 2) |" in text
    assert "REAL tokens, FD_DINOv2 / recognised | 86.9 / 90.0% | 72.5 / 92.8% |" in text
    assert "NOT comparable" in text
