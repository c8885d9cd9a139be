"""
Benchmark: our torch K-means (float32, and with bf16 distances) against faiss.Kmeans and scikit-learn
KMeans(algorithm="lloyd").
 Same data, same initial centroids, same number of Lloyd iterations, all in one run, so the ratios are fair on
whatever machine runs it; every library runs one untimed iteration first. The bf16 variant (what
tokenize_kmeans.py uses where the CPU has bf16 instructions) is run from --seeds different k-means++ inits
beside float32 from the same inits: its final inertia, computed in float32, must stay within 0.1% to be worth
using. Two problems:
  - real DINOv2 ViT-S/14 patch features (block 9) of demo MNIST images, K = 512
  - 200k x 384 synthetic clustered points, K = 1024 (the scale of PERF_NOTES)
Reports seconds per iteration, final inertia (computed by us in float64 for everyone), and the
distance step's throughput against this machine's measured matmul peak.

    python bench/kmeans.py            # writes bench/kmeans.md (linked from docs/RESULTS.md)
"""
import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import autocast, autocast_dtype, matmul_flops, seeded  # noqa: E402
from data import MNIST5k, image_transform  # noqa: E402
from dinov2 import load_encoder  # noqa: E402
import tokenize_kmeans  # noqa: E402
from tokenize_kmeans import init_centroids, kmeans, nearest_centroid  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--iters", type=int, default=20, help="Lloyd iterations per library (default: %(default)s)")
p.add_argument("--seeds", type=int, default=3,
               help="k-means++ inits on which bf16 and float32 are compared (default: %(default)s)")
p.add_argument("--images", type=int, default=1500,
               help="demo images encoded for the real-feature problem (default: %(default)s)")
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
    with torch.inference_mode(), autocast(torch.device("cpu"), autocast_dtype("auto", torch.device("cpu"))):
        for s in range(0, n_images, 100):
            x = torch.stack([ds[i][0] for i in range(s, min(n_images, s + 100))])
            feats.append(vit.get_intermediate_layers(x, [9])[0].float().flatten(0, 1))
    x = torch.cat(feats)
    return x - x.mean(0)


def synthetic(n=200_000, d=384, k=1024, seed=0):
    g = seeded(seed)
    centres = torch.randn(k, d, generator=g)
    return centres[torch.randint(k, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)


def inertia(x, C):
    return float(nearest_centroid(x, C)[1].double().sum())


def run_ours(x, C0, iters, dtype=None):
    t = time.perf_counter()
    C, _ = kmeans(x, C0, iters=iters, tol=0, verbose=False, dtype=dtype)
    return C, (time.perf_counter() - t) / iters


def emulated_bf16_nearest(x, C, chunk=None, x_sq=None):
    """The bf16 assignment step computed in float32 with bf16's rounding: inputs and the x.c products rounded
    to bf16 as a bf16 GEMM rounds them (fp32 accumulation, bf16 output), the norms added in float32. Same
    labels as real bf16 up to ties, at fp32 speed: for CPUs without bf16 instructions, where a real bf16
    matmul runs at ~1 GFLOP/s. Same signature as nearest_centroid, which kmeans() calls."""
    if x.dtype != torch.bfloat16:
        return nearest_centroid(x, C, chunk, x_sq)  # the final, exact float32 assignment
    xf, Cb = x.float(), C.float().bfloat16().float()
    c_sq = (C.float() * C.float()).sum(1)
    x_sq = xf.pow(2).sum(1) if x_sq is None else x_sq
    idx, dists = [], []
    for s in range(0, len(x), 8192):
        # as nearest_centroid's bf16 branch
        d = (xf[s: s + 8192] @ Cb.t()).bfloat16().float().mul_(-2).add_(c_sq)
        dmin, i = d.min(1)
        idx.append(i)
        dists.append((dmin + x_sq[s: s + 8192]).clamp_min_(0))
    return torch.cat(idx), torch.cat(dists)


def run_ours_bf16(x, C0, iters):
    if not BF16_FAST:
        tokenize_kmeans.nearest_centroid = emulated_bf16_nearest
    try:
        return run_ours(x, C0, iters, torch.bfloat16)
    finally:
        tokenize_kmeans.nearest_centroid = nearest_centroid


def run_faiss(x, C0, iters):
    import faiss
    faiss.omp_set_num_threads(threads)
    km = faiss.Kmeans(x.shape[1], len(C0), niter=iters, max_points_per_centroid=10 ** 9, seed=0)
    t = time.perf_counter()
    km.train(x.numpy(), init_centroids=C0.numpy())
    return torch.from_numpy(km.centroids), (time.perf_counter() - t) / iters


def run_sklearn(x, C0, iters):
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits
    with threadpool_limits(threads):
        km = KMeans(len(C0), init=C0.numpy(), n_init=1, max_iter=iters, tol=0, algorithm="lloyd")
        t = time.perf_counter()
        km.fit(x.numpy())
        dt = time.perf_counter() - t
    return torch.from_numpy(km.cluster_centers_).float(), dt / km.n_iter_


def bf16_vs_fp32(x, k):
    """Final float32 inertia of Lloyd with bf16 distances relative to float32, from --seeds other k-means++
    inits."""
    diffs = []
    for seed in range(1, args.seeds + 1):
        C0 = init_centroids(x[torch.randperm(len(x), generator=seeded(seed))[: 16 * k]], k, seed=seed)
        i32, i16 = inertia(x, run_ours(x, C0, args.iters)[0]), inertia(x, run_ours_bf16(x, C0, args.iters)[0])
        diffs.append(100 * (i16 / i32 - 1))
    return diffs


def distance_gflops(x, C, reps=3):
    nearest_centroid(x[:4096], C)
    t = time.perf_counter()
    for _ in range(reps):
        nearest_centroid(x, C)
    return 2 * len(x) * len(C) * x.shape[1] * reps / (time.perf_counter() - t) / 1e9


cpu = torch.device("cpu")
peak32 = matmul_flops(cpu, torch.float32) / 1e9
peak16 = matmul_flops(cpu, torch.bfloat16, n=512, reps=3) / 1e9
# tokenize_kmeans.py's rule; without it bf16 is only emulated here
BF16_FAST = autocast_dtype("auto", cpu) is not None
BF16_NAME = "ours (bf16 distances)" if BF16_FAST else "ours (bf16 emulated in fp32)"
rows = []
problems = [("DINOv2-S/14 features of MNIST", lambda: real_features(args.images), 512),
            ("synthetic clusters", synthetic, 1024)]
for name, make, k in problems:
    x = make()
    C0 = init_centroids(x[: 16 * k], k, "k-means++", seed=0)
    print(f"{name}: N={len(x)}, D={x.shape[1]}, K={k}, {args.iters} iterations from the same k-means++ init")
    results = {}
    for lib, fn in (("ours (torch fp32)", run_ours), (BF16_NAME, run_ours_bf16), ("faiss-cpu", run_faiss),
                    ("scikit-learn lloyd", run_sklearn)):
        fn(x, C0, 1)  # untimed: first-call costs (oneDNN's bf16 kernels are built per shape)
        C, spi = fn(x, C0, args.iters)
        results[lib] = (spi, inertia(x, C))
        print(f"  {lib:22s} {spi:7.3f} s/iter  inertia {results[lib][1]:.6g}")
    ref_spi, ref_in = results["ours (torch fp32)"]
    faiss_spi = results["faiss-cpu"][0]
    gf = distance_gflops(x, C0)
    for lib, (spi, ine) in results.items():
        rows.append(f"| {name} | {len(x):,} x {x.shape[1]}, K={k} | {lib} | {spi:.3f} | "
                    f"{faiss_spi / spi:.2f}x | {ine:.6g} | {100 * (ine / ref_in - 1):+.3f}% |")
    rows.append(f"| {name} | | ours: distance step (fp32) | {gf:.0f} GFLOP/s = {100 * gf / peak32:.0f}% of "
                "fp32 matmul peak | | | |")
    diffs = bf16_vs_fp32(x, k)
    diffs = ", ".join(f"{d:+.3f}%" for d in diffs)
    print(f"  bf16 vs fp32 final inertia from {args.seeds} other inits: {diffs}")
    rows.append(f"| {name} | | bf16 vs fp32, {args.seeds} other inits | | | | {diffs} |")

table = [f"K-means benchmark ({platform.processor() or platform.machine()}, {threads} threads, torch "
         f"{torch.__version__}). Measured matmul peak: fp32 {peak32:.0f} GFLOP/s (2048^2), bf16 {peak16:.1f} "
         "GFLOP/s (512^2)"
         + ("." if BF16_FAST else ": no bf16 speed-up on this CPU, so tokenize_kmeans.py runs K-means in "
                                  "fp32 here; the bf16 rows emulate bf16's rounding in fp32 to measure its "
                                  "effect on the inertia (their time is not a bf16 time)."), "",
         "| problem | size | library | s/iter | speed vs faiss-cpu | final inertia (fp32) | inertia vs ours "
         "fp32 |",
         "|---|---|---|---|---|---|---|", *rows]
open(args.out, "w").write("\n".join(table) + "\n")
print("\n".join(table))
print(f"-> {args.out}")
