"""
Benchmark: our torch K-means against faiss.Kmeans and scikit-learn KMeans(algorithm="lloyd").

Same data, same initial centroids, same number of Lloyd iterations, all in one run, so the
ratios are fair on whatever machine runs it. Two problems:
  - real DINOv2 ViT-S/14 patch features (block 9) of demo MNIST images, K = 512
  - 200k x 384 synthetic clustered points, K = 1024 (the scale of PERF_NOTES)
Reports seconds per iteration, final inertia (computed by us in float64 for everyone), and the
distance step's throughput against this machine's measured matmul peak.

    python bench/kmeans.py            # writes bench/kmeans.md (shown in the README)
"""
import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tokenize_kmeans import (MNIST5k, image_transform, init_centroids, kmeans, load_encoder,  # noqa: E402
                             matmul_flops, nearest_centroid)

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--iters", type=int, default=10, help="Lloyd iterations per library (default: %(default)s)")
p.add_argument("--images", type=int, default=1500, help="demo images encoded for the real-feature problem (default: %(default)s)")
p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "kmeans.md"))
p.add_argument("--cache", default=os.environ.get("DIGIT_CACHE", os.path.expanduser("~/.cache/digit")))
args = p.parse_args()
threads = os.cpu_count()
torch.set_num_threads(threads)


def real_features(n_images):
    """Patch features of block 9 (3rd from last) of DINOv2 ViT-S/14 at 112 px: 64 per image."""
    ds = MNIST5k("train", image_transform(112), args.cache)
    vit = load_encoder("dinov2_vits14_offline", args.cache)
    feats = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for s in range(0, n_images, 100):
            x = torch.stack([ds[i][0] for i in range(s, min(n_images, s + 100))])
            feats.append(vit.get_intermediate_layers(x, [9])[0].float().flatten(0, 1))
    x = torch.cat(feats)
    return x - x.mean(0)


def synthetic(n=200_000, d=384, k=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g)
    return centres[torch.randint(k, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)


def inertia(x, C):
    return float(nearest_centroid(x, C)[1].double().sum())


def run_ours(x, C0):
    t = time.perf_counter()
    C, _ = kmeans(x, C0, iters=args.iters, tol=0, verbose=False)
    return C, (time.perf_counter() - t) / args.iters


def run_faiss(x, C0):
    import faiss
    faiss.omp_set_num_threads(threads)
    km = faiss.Kmeans(x.shape[1], len(C0), niter=args.iters, max_points_per_centroid=10 ** 9, seed=0)
    t = time.perf_counter()
    km.train(x.numpy(), init_centroids=C0.numpy())
    return torch.from_numpy(km.centroids), (time.perf_counter() - t) / args.iters


def run_sklearn(x, C0):
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits
    with threadpool_limits(threads):
        km = KMeans(len(C0), init=C0.numpy(), n_init=1, max_iter=args.iters, tol=0, algorithm="lloyd")
        t = time.perf_counter()
        km.fit(x.numpy())
        dt = time.perf_counter() - t
    return torch.from_numpy(km.cluster_centers_).float(), dt / km.n_iter_


def bf16_distance(x, C, chunk=4096):
    """The distance step with a bf16 matmul (no float32 re-check): its time and how many labels it gets wrong."""
    c_sq, xb, Cb = (C * C).sum(1).bfloat16(), x.bfloat16(), C.bfloat16()
    exact, _ = nearest_centroid(x, C)
    t = time.perf_counter()
    idx = torch.cat([torch.addmm(c_sq, xb[s: s + chunk], Cb.t(), beta=1, alpha=-2).min(1)[1] for s in range(0, len(x), chunk)])
    return time.perf_counter() - t, float((idx != exact).float().mean())


def distance_gflops(x, C, reps=3):
    nearest_centroid(x[:4096], C)
    t = time.perf_counter()
    for _ in range(reps):
        nearest_centroid(x, C)
    return 2 * len(x) * len(C) * x.shape[1] * reps / (time.perf_counter() - t) / 1e9


cpu = torch.device("cpu")
peak32, peak16 = matmul_flops(cpu, torch.float32) / 1e9, matmul_flops(cpu, torch.bfloat16) / 1e9
rows = []
problems = [("DINOv2-S/14 features of MNIST", lambda: real_features(args.images), 512),
            ("synthetic clusters", synthetic, 1024)]
for name, make, k in problems:
    x = make()
    C0 = init_centroids(x[: 16 * k], k, "k-means++", seed=0)
    print(f"{name}: N={len(x)}, D={x.shape[1]}, K={k}, {args.iters} iterations from the same k-means++ init")
    results = {}
    for lib, fn in (("ours (torch fp32)", run_ours), ("faiss-cpu", run_faiss), ("scikit-learn lloyd", run_sklearn)):
        C, spi = fn(x, C0)
        results[lib] = (spi, inertia(x, C))
        print(f"  {lib:20s} {spi:7.3f} s/iter  inertia {results[lib][1]:.6g}")
    ref_spi, ref_in = results["ours (torch fp32)"]
    gf = distance_gflops(x, C0)
    for lib, (spi, ine) in results.items():
        rows.append(f"| {name} | {len(x):,} x {x.shape[1]}, K={k} | {lib} | {spi:.3f} | {spi / ref_spi:.2f}x "
                    f"| {ine:.6g} | {100 * (ine / ref_in - 1):+.2f}% |")
    rows.append(f"| {name} | | ours: distance step (fp32) | {gf:.0f} GFLOP/s = {100 * gf / peak32:.0f}% of fp32 matmul peak | | | |")
    t16, wrong = bf16_distance(x, C0)
    t32 = 2 * len(x) * k * x.shape[1] / gf / 1e9
    rows.append(f"| {name} | | experiment: bf16 distance step, not used | {t16:.3f} s vs fp32 {t32:.3f} s | {t32 / t16:.2f}x faster "
                f"| {100 * wrong:.2f}% of labels wrong | |")

table = [f"K-means benchmark ({platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}). "
         f"Measured matmul peak (2048^2): fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s.", "",
         "| problem | size | library | s/iter | time vs ours | final inertia | inertia vs ours |",
         "|---|---|---|---|---|---|---|", *rows]
open(args.out, "w").write("\n".join(table) + "\n")
print("\n".join(table))
print(f"-> {args.out}")
