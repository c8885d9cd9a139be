"""
Benchmark: GPT training-step throughput (forward + backward + AdamW) and MFU on this machine.

MFU = achieved model FLOP/s / peak, with the peak *measured* in the same run by a 2048^2 matmul in
the same dtype (float32 and bf16), so the figure says how close the step gets to what this machine's
matmul can do. Also prints where the time goes (torch.profiler, top ops) for one preset.

    python bench/train_gpt.py            # writes bench/train_gpt.md (linked from docs/RESULTS.md)
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import autocast, matmul_flops  # noqa: E402
from train_gpt import GPT, MODELS, flops_per_token, loss_fn  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (default: %(default)s)")
p.add_argument("--profile", default="small", help="preset to profile (default: %(default)s)")
p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_gpt.md"))
args = p.parse_args()
cpu = torch.device("cpu")
# (preset, vocab, tokens per image, batch): the demo's shapes for tiny/small, the paper's for base
CASES = [("tiny", 512, 64, 64), ("small", 512, 64, 32), ("base", 8192, 256, 4)]


def step_fn(model, opt, dtype, x, y):
    def step():
        with autocast(torch.device("cpu"), dtype):
            loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timed(fn, steps):
    fn()  # warm-up: allocator, oneDNN kernel selection
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


peaks = {name: matmul_flops(cpu, dt) for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
rows = []
for preset, vocab, T, B in CASES:
    torch.manual_seed(0)
    model = GPT(vocab, T, 10, **MODELS[preset])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randint(vocab, (B, T)), torch.randint(10, (B,))
    fpt = flops_per_token(dict(MODELS[preset], block_size=T), model.num_params())
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        s = timed(step_fn(model, opt, dtype, x, y), args.steps)
        tps = B * T / s
        mfu = tps * fpt / peaks[name]
        rows.append(f"| {preset} | {model.num_params() / 1e6:.1f}M | {vocab} | {B}x{T} | {name} | {s:.3f} | "
                    f"{tps:,.0f} | {100 * mfu:.0f}% |")
        print(rows[-1], flush=True)

# where the time goes: one profiled step of the profiled preset in the faster dtype
preset, vocab, T, B = next(c for c in CASES if c[0] == args.profile)
dtype = torch.bfloat16 if peaks["bf16"] > peaks["fp32"] else None
model = GPT(vocab, T, 10, **MODELS[preset])
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
fn = step_fn(model, opt, dtype, torch.randint(vocab, (B, T)), torch.randint(10, (B,)))
fn()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    fn()
ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
total = sum(e.self_cpu_time_total for e in ops)
top = [f"| {e.key} | {100 * e.self_cpu_time_total / total:.0f}% |" for e in ops[:8]]

lines = [f"GPT training step on CPU ({os.cpu_count()} threads, torch {torch.__version__}); measured matmul "
         f"peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s. MFU counts "
         "6N + 12·L·C·T FLOPs per token.", "",
         "| preset | params (non-emb.) | vocab | batch x tokens | dtype | s/step | tokens/s | MFU vs "
         "same-dtype peak |",
         "|---|---|---|---|---|---|---|---|", *rows, "",
         f"Where one `{preset}` step ({'bf16' if dtype else 'fp32'}) spends its time (self CPU time, top "
         "ops):", "",
         "| op | share |", "|---|---|", *top]
open(args.out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines[-len(top) - 4:]))
print(f"-> {args.out}")
