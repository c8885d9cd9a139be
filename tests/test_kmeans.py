"""The torch K-means: exact nearest centroids, known clusters, scikit-learn's inertia, empty clusters."""
import pytest
import torch

from tokenize_kmeans import init_centroids, kmeans, nearest_centroid


def blobs(n_per=200, k=8, d=16, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 3
    labels = torch.arange(k).repeat_interleave(n_per)
    return centres[labels] + spread * torch.randn(len(labels), d, generator=g), labels, centres


def test_nearest_centroid_is_exact_in_chunks():
    g = torch.Generator().manual_seed(1)
    x, C = torch.randn(1000, 32, generator=g), torch.randn(50, 32, generator=g)
    ref = torch.cdist(x.double(), C.double()) ** 2
    idx, d = nearest_centroid(x, C, chunk=97)  # a chunk that does not divide N
    assert torch.equal(idx, ref.argmin(1))
    torch.testing.assert_close(d.double(), ref.min(1).values, atol=1e-3, rtol=1e-4)


def test_recovers_well_separated_clusters():
    x, labels, centres = blobs()
    C, stats = kmeans(x, init_centroids(x, 8, "k-means++", seed=0), iters=20, verbose=False)
    idx, _ = nearest_centroid(x, C)
    # every true cluster lands on exactly one centroid and every centroid on one cluster
    pairs = {(int(a), int(b)) for a, b in zip(labels, idx)}
    assert len(pairs) == 8 and len({b for _, b in pairs}) == 8
    assert torch.cdist(C, centres).min(1).values.max() < 0.05
    assert stats["counts"].tolist() == [200.0] * 8


@pytest.mark.parametrize("d, k", [(16, 10), (64, 40)])
def test_matches_scikit_learn_on_the_same_init(d, k):
    from sklearn.cluster import KMeans
    x, _, _ = blobs(n_per=150, k=k // 2, d=d, spread=1.0, seed=2)  # overlapping: K-means has real work to do
    C0 = init_centroids(x, k, "random", seed=3)
    C, stats = kmeans(x, C0, iters=15, tol=0, verbose=False)
    km = KMeans(k, init=C0.numpy(), n_init=1, max_iter=15, tol=0, algorithm="lloyd").fit(x.numpy())
    sk_inertia = float(((x.numpy() - km.cluster_centers_[km.predict(x.numpy())]) ** 2).sum())
    assert abs(stats["inertia"] - sk_inertia) < 0.005 * sk_inertia
    assert stats["inertia"] < 0.9 * float(nearest_centroid(x, C0)[1].sum())  # it did improve on the init


def test_empty_clusters_are_reseeded():
    x, _, _ = blobs(n_per=100, k=4, d=8)
    C0 = x[:1].repeat(4, 1)  # four identical centroids: three of them start empty
    C0[3] = 100.0  # and one far from every point
    C, stats = kmeans(x, C0, iters=10, verbose=False)
    assert (stats["counts"] > 0).all()
    assert stats["counts"].sum() == len(x)
    assert torch.unique(C, dim=0).shape[0] == 4


def test_kmeans_plusplus_spreads_the_seeds():
    x, labels, _ = blobs(n_per=100, k=6, d=8, spread=0.01)
    C = init_centroids(x, 6, "k-means++", seed=0)
    idx, _ = nearest_centroid(C, x)  # the sample each seed is
    assert len(set(labels[idx].tolist())) == 6  # one seed per blob, which random init rarely gives


def test_too_many_clusters_is_an_error():
    with pytest.raises(SystemExit, match="larger than the number of points"):
        kmeans(torch.randn(5, 3), torch.randn(8, 3), verbose=False)
