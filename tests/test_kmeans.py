"""The torch K-means: exact nearest centroids, known clusters, scikit-learn's inertia, empty clusters."""
import pytest
import torch

from tokenize_kmeans import init_centroids, kmeans, kmeans_plusplus, nearest_centroid, split_empty


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
    # the same algorithm from the same start: the same partition, inertia equal to float32 rounding
    # (seen: ~2e-7)
    assert torch.equal(nearest_centroid(x, C)[0], torch.from_numpy(km.predict(x.numpy())).long())
    assert abs(stats["inertia"] - sk_inertia) < 1e-5 * sk_inertia
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


def test_bf16_distances_reach_the_float32_inertia():
    """Lloyd with bf16 assignment steps ends as close to float32's inertia (same init) as another init would;
    the inertia and sizes it reports are computed in float32 for the centroids it returns."""
    x, _, _ = blobs(n_per=150, k=10, d=16, spread=1.0, seed=4)
    # a large common mean: without centring, bf16 distances lose the differences (seen: +3-4% inertia)
    x = x + 20
    inits = [init_centroids(x, 20, "k-means++", seed=s) for s in (1, 2, 3)]
    i32 = [kmeans(x, C0, iters=10, tol=0, verbose=False)[1]["inertia"] for C0 in inits]
    runs = [kmeans(x, C0, iters=10, tol=0, verbose=False, dtype=torch.bfloat16) for C0 in inits]
    spread = max(i32) - min(i32)  # what the choice of init does (~1% here)
    assert all(abs(s16["inertia"] - a) < spread for (_, s16), a in zip(runs, i32))
    C16, s16 = runs[0]
    idx, d = nearest_centroid(x, C16)
    assert s16["inertia"] == pytest.approx(float(d.double().sum()), rel=1e-6)
    assert s16["counts"].tolist() == torch.bincount(idx, minlength=20).double().tolist()


def test_empty_cluster_is_split_from_the_largest():
    C = torch.tensor([[0.0, 0.0], [10.0, 10.0], [5.0, 5.0], [7.0, 7.0]])
    counts = torch.tensor([3.0, 50.0, 0.0, 7.0])
    out = split_empty(C.clone(), counts, torch.Generator().manual_seed(0))
    # the empty centroid and the largest cluster's become two points close to (10, 10); the others do not move
    target = torch.tensor([10.0, 10.0])
    assert (out[2] - target).norm() < 0.1 and (out[1] - target).norm() < 0.1
    assert not torch.equal(out[1], out[2])
    assert torch.equal(out[0], C[0]) and torch.equal(out[3], C[3])
    assert counts.tolist() == [3.0, 25.0, 25.0, 7.0]


def test_kmeans_plusplus_draws_with_probability_d_squared():
    """Points: 2000 at the origin, one at distance 1, one at distance 3. The first seed is (almost surely) the
    origin; the second is the near point with probability 1/(1+9) = 0.1 under D^2 (0.25 under D)."""
    x = torch.zeros(2002, 2)
    x[2000, 0], x[2001, 0] = 1.0, 3.0
    near = 0
    for seed in range(400):
        C = kmeans_plusplus(x, 2, torch.Generator().manual_seed(seed))
        near += int(C[1, 0] == 1.0)
    assert 0.05 < near / 400 < 0.16  # binomial sd at 0.1: 0.015
