"""
Benchmark: GPT sampling speed with and without the KV cache (tokens/s), in one run.

Without the cache every new token re-runs the whole prefix (O(T^2) work per image); with it, each
step runs one token through the model and attends to the cached keys/values.

    python bench/sample.py            # writes bench/sample.md (linked from docs/RESULTS.md)
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import seeded  # noqa: E402
from sample import generate  # noqa: E402
from train_gpt import GPT, MODELS  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--batch-size", type=int, default=16, help="images sampled at once (default: %(default)s)")
p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample.md"))
args = p.parse_args()

rows = []
for preset in ("tiny", "small"):
    for T, vocab in ((64, 512), (256, 8192)):
        torch.manual_seed(0)
        model = GPT(vocab, T, 10, **MODELS[preset]).eval()
        labels = torch.arange(args.batch_size) % 10
        speed = {}
        for cache in (True, False):
            generate(model, labels[:2], use_cache=cache)  # warm-up
            t = time.perf_counter()
            generate(model, labels, gen=seeded(0), use_cache=cache)
            speed[cache] = args.batch_size * T / (time.perf_counter() - t)
        rows.append(f"| {preset} | {T} | {vocab} | {speed[False]:,.0f} | {speed[True]:,.0f} | "
                    f"{speed[True] / speed[False]:.1f}x |")
        print(rows[-1], flush=True)

# what one cached step costs besides the model: time the model call alone at mid-sequence
model = GPT(8192, 256, 10, **MODELS["small"]).eval()
from train_gpt import KVCache  # noqa: E402
labels = torch.arange(args.batch_size) % 10
cache = KVCache(model, args.batch_size)
with torch.no_grad():
    model(torch.zeros(args.batch_size, 0, dtype=torch.long), labels, cache=cache)
    x = torch.zeros(args.batch_size, 1, dtype=torch.long)
    t = time.perf_counter()
    for _ in range(100):
        model(x, labels, cache=cache)
    per_step = (time.perf_counter() - t) / 100
    t = time.perf_counter()
    for _ in range(100):
        torch.multinomial(torch.randn(args.batch_size, 8192).softmax(-1), 1)
    sampling = (time.perf_counter() - t) / 100
lines = [f"GPT sampling on CPU, batch {args.batch_size}, fp32, torch {torch.__version__}.", "",
         "| preset | tokens/image | vocab | tokens/s, no cache | tokens/s, KV cache | speed-up |",
         "|---|---|---|---|---|---|", *rows, "",
         f"Per cached step of `small` at 256 tokens: model call {1e3 * per_step:.1f} ms, softmax + "
         f"multinomial over 8192 ids {1e3 * sampling:.2f} ms."]
open(args.out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
