"""stability.py: the noise has the requested SNR, the fair protocol gives both tokenizers the same noisy
image, the toy."""
import torch

import stability


def test_noise_has_the_requested_snr():
    x = torch.rand(3, 28, 28)
    for snr in (30, 10, 0.01):
        noisy = stability.add_noise(x, snr, torch.Generator().manual_seed(0))
        measured = 10 * torch.log10(x.pow(2).mean() / (noisy - x).pow(2).mean())
        assert abs(float(measured) - snr) < 0.15


class Recorder:
    """A stand-in tokenizer: records what prepare() is given, 'tokenizes' by thresholding its own resize."""

    def __init__(self, size):
        self.size, self.seen = size, []

    def prepare(self, x):
        self.seen.append(x.clone())
        return stability.resize(x, self.size)

    def __call__(self, x):
        f = x.mean(1).flatten(1)  # [N, size*size]
        return f.reshape(-1, 1).repeat(1, 2), (f > 0.5).long().flatten()


def test_fair_protocol_gives_both_tokenizers_the_same_noisy_native_image():
    images = [torch.rand(3, 28, 28) for _ in range(3)]
    toks = {"VQ": Recorder(32), "DiGIT": Recorder(112)}
    stability.measure(toks, images, [10], torch.Generator().manual_seed(0), "native")
    a, b = toks["VQ"].seen[3:], toks["DiGIT"].seen[3:]  # after the 3 clean images: the noisy ones, at 28 px
    assert all(x.shape == (3, 28, 28) for x in a) and all(torch.equal(x, y) for x, y in zip(a, b))
    noise = torch.stack(a) - torch.stack(images)
    assert abs(float(10 * torch.log10(torch.stack(images).pow(2).mean() / noise.pow(2).mean())) - 10) < 0.3
    # the other protocol: each tokenizer gets its own noise at its own input size (so the images differ)
    toks = {"VQ": Recorder(32), "DiGIT": Recorder(112)}
    stability.measure(toks, images, [10], torch.Generator().manual_seed(0), "input")
    # prepare() saw clean images only
    assert all(torch.equal(x, y) for x, y in zip(toks["VQ"].seen, toks["DiGIT"].seen))


def test_toy_lda_beats_pca_and_noise_costs_accuracy():
    toy = stability.toy_pca_lda(n=4000, noises=(0, 1, 3))
    pca, lda = toy["accuracy"]["PCA"], toy["accuracy"]["LDA"]
    assert lda[0] > 0.9 and pca[0] < 0.7  # PCA keeps the long axis, which barely separates the classes
    assert all(a > b for a, b in zip(lda, pca)) and lda[2] > pca[2]  # still ahead at the highest noise
    assert lda[0] > lda[1] > lda[2]  # noise costs the discriminative projection accuracy too
    d = toy["directions"]
    assert abs(float(d["PCA"] @ d["PCA"]) - 1) < 1e-5 and abs(float(d["LDA"] @ d["LDA"]) - 1) < 1e-5
