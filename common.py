"""
Plumbing every stage shares, none of it DiGIT's idea: one-line errors, the flags every script has,
processes (torchrun), the precision of a run, seeds, learning-rate schedules, step-indexed batches, and
the linear classifier that probe.py and eval.py train. What stages write and read: artifacts.py.
Imports no stage.
"""
import argparse
import atexit
import contextlib
import functools
import math
import os
import platform
import re
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F


def fail(msg):
    """Stop with a one-line error and a non-zero exit code."""
    raise SystemExit(f"error: {msg}")


# ----------------------------------------------------------------------------- command line

def positive_int(text):
    """argparse type: an integer >= 1 (batch sizes, steps, intervals, counts)."""
    return _checked(int, text, lambda v: v >= 1, "an integer >= 1")


def nonneg_int(text):
    """argparse type: an integer >= 0 (0 meaning 'off' where the help says so)."""
    return _checked(int, text, lambda v: v >= 0, "an integer >= 0")


def positive_float(text):
    """argparse type: a number > 0 (learning rates, temperatures, scales)."""
    return _checked(float, text, lambda v: v > 0 and math.isfinite(v), "a number > 0")


def nonneg_float(text):
    """argparse type: a number >= 0 (weights of loss terms, clipping; 0 meaning 'off')."""
    return _checked(float, text, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")


def bounded(lo, hi):
    """argparse type: a number in [lo, hi] (e.g. temperatures and guidance scales a sampler can use)."""
    return lambda text: _checked(float, text, lambda v: lo <= v <= hi, f"a number in [{lo:g}, {hi:g}]")


def fraction(text):
    """argparse type: a probability in [0, 1) (dropout rates)."""
    return _checked(float, text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def mass(text):
    """argparse type: a probability mass in (0, 1] (top-p)."""
    return _checked(float, text, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _checked(kind, text, ok, what):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def parser(doc):
    """An ArgumentParser whose --help shows the script's docstring (how to run it) above the flags."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_system_args(p, out_help, precision=True):
    """The flags every script has, declared once: --out, --device, --seed, --dist-timeout (and --precision).

    --dist-timeout: under torchrun, the seconds a collective waits for the other ranks before the run stops
    and names the rank that stopped answering; raise it if rank 0 alone works longer than that.
    --precision auto: bf16 autocast on a GPU, and on a CPU with bf16 instructions (AMX or AVX512-BF16,
    read from the CPU's flags, so every process of a machine decides the same); fp32 elsewhere."""
    g = p.add_argument_group("system")
    g.add_argument("--out", default="out", help=f"{out_help} (default: %(default)s)")
    g.add_argument("--device", default="auto", type=device_name,
                   help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    g.add_argument("--dist-timeout", type=positive_float, default=600,
                   help="torchrun: seconds a collective waits (default: %(default)s)")
    if precision:
        g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                       help="autocast dtype; auto: see the docstring (default: %(default)s)")
    return g


def device_name(text):
    """argparse type for --device: checked at parse time, so a typo or a missing GPU is a one-line error."""
    if text == "auto" or text == "cpu":
        return text
    if not re.fullmatch(r"cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available here (use 'cpu' or 'auto')")
    return text


# ----------------------------------------------------------------------------- training guards

def stop_if_not_finite(step, ckpt_path, **values):
    """Stop with a one-line error when a loss or gradient norm is NaN/inf, before the update that would
    carry it into the weights (and so into the next checkpoint)."""
    bad = [f"{name} is {value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        fail(f"{', '.join(bad)} at step {step}; stopped before updating the weights. The last good "
             f"checkpoint {ckpt_path} is untouched (try a lower --lr)")


# ----------------------------------------------------------------------------- processes (torchrun)

_STARTED = []  # one entry per init_distributed call not yet finished: did that call start the group?


def init_distributed(device_arg="auto", timeout=600.0):
    """(rank, world, device). Under torchrun: one process per GPU (NCCL, the GPU of LOCAL_RANK) or per CPU
    slot (gloo); without it, --device as given (cuda:3 is GPU 3).

    A collective waits at most `timeout` seconds for the other ranks (gloo's default is 30 minutes of
    silence); every rank also writes a heartbeat to torchrun's store, so when one stops answering
    (frozen, swapped out, SIGSTOPped) the others say which one it was instead of a bare 'Timed out'."""
    cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg.startswith("cuda")
    torchrun = "RANK" in os.environ
    started = torchrun and not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
        start_heartbeat(timeout)
    _STARTED.append(started)
    rank, world = rank_world()
    if cuda:
        index = int(os.environ.get("LOCAL_RANK",
                                   0)) if torchrun or ":" not in device_arg else int(device_arg[5:])
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        # TF32 for the fp32 matmuls autocast leaves (A100 and newer)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    return rank, world, device


def start_heartbeat(timeout, every=None):
    """A daemon thread that stores 'heartbeat/<rank>' = time every few seconds, and an exception hook that
    turns a collective's timeout into one line naming the ranks whose heartbeat went quiet."""
    rank, world = dist.get_rank(), dist.get_world_size()
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          # a second client of the rendezvous store torchrun runs
                          timeout=timedelta(seconds=30))
    every = max(0.5, min(5.0, timeout / 4)) if every is None else every
    stop = threading.Event()

    def beat():
        while not stop.is_set():
            try:
                store.set(f"heartbeat/{rank}", repr(time.time()))
            except Exception:  # the store went away: the run is ending
                return
            stop.wait(every)
    thread = threading.Thread(target=beat, daemon=True, name="heartbeat")
    thread.start()

    def stop_beating():
        # A daemon thread caught inside store.set (C++) when the interpreter finalizes is torn down
        # mid-call and the process aborts (SIGABRT) after the script succeeded; atexit runs before that.
        stop.set()
        thread.join(timeout=40)  # one store.set, which gives up after the store's 30 s
    atexit.register(stop_beating)
    previous = sys.excepthook

    def explain(kind, exc, tb):
        if "timed out" not in str(exc).lower() and "timeout" not in str(exc).lower():
            return previous(kind, exc, tb)
        silent = []
        for r in range(world):
            key = f"heartbeat/{r}"
            age = time.time() - float(store.get(key)) if store.check([key]) else float("inf")
            if r != rank and age > 3 * every:
                silent.append(f"rank {r} (last heard {age:.0f} s ago)" if age < float("inf")
                              else f"rank {r} (never heard)")
        who = ("stopped answering: " + ", ".join(silent)) if silent else \
            "every other rank is alive but one was busy longer than that (raise --dist-timeout)"
        print(f"error: rank {rank}: a collective waited {timeout:g} s (--dist-timeout) and gave up; {who}",
              file=sys.stderr, flush=True)
        os._exit(1)  # not a normal exit: tearing down the process group would wait for the silent rank again
    sys.excepthook = explain


def rank_world():
    """(this process's rank, number of processes); (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce(t, op=None):
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def gather_rows(x, keys, dst=None, chunk=1 << 16, host_dtype=None):
    """Every rank's rows of x, sorted by their integer keys (e.g. dataset index): on every rank, or with
    dst=0 on rank 0 only, on its CPU (the others get (None, None)), so no other rank, and no GPU, ever
    holds all N rows: they travel `chunk` rows per rank at a time, and with host_dtype arrive in it (int32 ids
    on the wire, int16 on rank 0: NCCL has no int16).

    Rank r encodes images r, r+W, r+2W, ...; sorting by image index restores the order one process
    would have produced, so the result does not depend on the number of ranks."""
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
        sizes = [int(n) for n in sizes]
        m = max(sizes)
        pad_x = torch.zeros((m, *x.shape[1:]), dtype=x.dtype, device=x.device)
        pad_k = torch.zeros(m, dtype=keys.dtype, device=x.device)
        pad_x[: len(x)], pad_k[: len(keys)] = x, keys.to(x.device)
        here = dst is None or rank == dst
        xs, ks = [[] for _ in range(world)], [[] for _ in range(world)]
        for s in range(0, max(m, 1), chunk):
            for t, out in ((pad_x[s: s + chunk], xs), (pad_k[s: s + chunk], ks)):
                got = [torch.empty_like(t) for _ in range(world)] if here else None
                if dst is None:
                    dist.all_gather(got, t)
                else:
                    dist.gather(t, got, dst=dst)
                for r in range(world if here else 0):
                    piece = got[r] if dst is None else got[r].cpu()
                    out[r].append(piece.to(host_dtype) if host_dtype is not None and out is xs else piece)
        if not here:
            return None, None
        x = torch.cat([torch.cat(p)[:n] for p, n in zip(xs, sizes)])
        keys = torch.cat([torch.cat(p)[:n] for p, n in zip(ks, sizes)])
    order = torch.argsort(keys.to(x.device), stable=True)
    x = x.to(host_dtype) if host_dtype is not None else x
    return x[order], keys.to(x.device)[order]


def gather_objects(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def finish_distributed():
    """Pairs with the last unfinished init_distributed call: end the process group if that call started it.
    A group a caller started (eval.py --sweep running sample.py, bench/gpu_smoke.py running every stage)
    stays for the caller."""
    if _STARTED and _STARTED.pop() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- precision

def matmul_flops(device, dtype, n=2048, reps=5):
    """Measured matmul throughput (FLOP/s) of an n x n product on this device: the machine's practical
    peak (for MFU and the benchmarks; never for choosing the precision: timings vary between processes)."""
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(device, dtype)  # not the global RNG
    a @ a  # warm-up (thread pools, oneDNN's JIT of this shape)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
             "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "DEFAULT", "ALL")


def cpuinfo():
    """The fields of the first processor in /proc/cpuinfo ('model name', 'flags', ...); {} where there is
    no such file (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        return {}
    fields = (line.split(":", 1) for line in first.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in fields}


def cpu_has_bf16():
    """True where bf16 matmuls beat fp32 on this CPU: x86 with AMX or AVX512-BF16 (2.4-8x faster, warm);
    without them a bf16 matmul is emulated at ~1 GFLOP/s. Read from the CPU's flags, not timed: the
    answer is the same in every process of a machine. ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 (oneDNN
    then emulates bf16) counts as no bf16."""
    flags = cpuinfo().get("flags", "").split()
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() not in BF16_ISAS
    has_bf16 = bool({"amx_bf16", "avx512_bf16"} & set(flags))
    return platform.machine() in ("x86_64", "AMD64") and has_bf16 and not capped


def autocast_dtype(precision, device):
    """None (fp32) or torch.bfloat16 for --precision auto|fp32|bf16 on this device (see add_system_args)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


def precision_name(dtype):
    """What a checkpoint records: 'bf16' or 'fp32'."""
    return "bf16" if dtype is not None else "fp32"


def autocast(device, dtype):
    """The autocast context for autocast_dtype()'s choice (dtype None = plain fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------- seeds, schedules, batches

def seeded(*keys, device="cpu"):
    """A torch.Generator seeded by a tuple of integers (e.g. seed, step): each (seed, step) its own stream,
    so a random draw depends on what it is for, never on the rank or on what ran before. device: where
    the tensors it draws live (a CUDA sampler needs a CUDA generator)."""
    s = 0
    for k in keys:
        s = (s * 1_000_003 + int(k)) % 2 ** 63  # manual_seed takes < 2^64
    return torch.Generator(device=device).manual_seed(s)


def learning_rate(step, args):
    """Linear warm-up (from args.warmup_init_lr, fairseq's warmup_init_lr), then cosine decay to args.min_lr,
    the paper's inverse square root, or constant."""
    if step < args.warmup_steps:
        start = getattr(args, "warmup_init_lr", 0.0)
        return start + (args.lr - start) * (step + 1) / args.warmup_steps
    if args.schedule == "constant":
        return args.lr
    if args.schedule == "inverse-sqrt":
        return args.lr * math.sqrt(args.warmup_steps / (step + 1))
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step, batch_size, n, seed):
    """Row indices of the global batch of a step: a fresh permutation each epoch, a pure function of
    the step, so resuming needs only the step and any number of ranks sees the same global batch."""
    epoch, i = divmod(step, n // batch_size)
    return epoch_permutation(n, seed, epoch)[i * batch_size: (i + 1) * batch_size]


@functools.lru_cache(maxsize=2)
def epoch_permutation(n, seed, epoch):
    """The order of an epoch, drawn once per epoch (not per step: 1.28M ids take ~30 ms to shuffle)."""
    return torch.randperm(n, generator=seeded(seed, epoch))


# ------------------------------------------------------------------ step-indexed loading, linear classifiers

class StepSampler(torch.utils.data.Sampler):
    """This rank's share of the global batch of every step from `start` on (see batch_indices):
    resumable from the step alone, and the same global batches for any number of ranks. With views > 1
    (a dataset of n images x views items, item i * views + v) one view per image is drawn from (seed, step),
    as train_gpt.pick_views."""

    def __init__(self, n, batch_size, seed, start, rank, world, views=1):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world, self.views = rank, world, views

    def __iter__(self):
        step, share = self.start, self.batch_size // self.world
        while True:
            rows = batch_indices(step, self.batch_size, self.n, self.seed)
            if self.views > 1:
                view = torch.randint(self.views, (len(rows),), generator=seeded(self.seed, step, 2))
                rows = rows * self.views + view
            yield from rows[self.rank * share: (self.rank + 1) * share].tolist()
            step += 1

    def __len__(self):
        return 2 ** 62


def owned(n, rank=None, world=None):
    """The rows of a set of n that this rank holds when sets are sharded over ranks: rank, rank + W, ..."""
    rank, world = rank_world() if rank is None else (rank, world)
    return torch.arange(rank, n, world)


def fit_linear(features, n_total, labels, n_classes, epochs, lr=0.1, batch_size=256, seed=0, device="cpu",
               weight_decay=1e-4, standardize=True, init_std=0.0):
    """Linear softmax classifiers on G feature sets at once, trained on the device; the features may stay
    sharded over the ranks (never all rows on one rank). features(local) -> [G, len(local), D] on the device
    for this rank's rows `local` (its rows of the set are owned(n_total)); labels: those rows' labels.
    Returns classify: [G, M, D] -> logits [G, M, n_classes].

    The global batch of every step is drawn from all n_total rows; each rank computes the loss of the rows it
    holds and the gradients are summed over the ranks, so any number of ranks trains the same classifiers
    (the full-batch gradient). standardize: features centred and scaled by their train statistics (the demo's
    probe and eval.py); SGD + momentum with cosine decay (the paper's probe)."""
    rank, world = rank_world()
    labels = labels.to(device)
    n_local = len(labels)
    G, _, D = features(torch.arange(min(1, n_local))).shape if n_local else (1, 0, 0)
    shape = torch.tensor([G, D], device=device)
    all_reduce(shape, op=dist.ReduceOp.MAX)  # ranks without rows learn the shape from the others
    G, D = int(shape[0]), int(shape[1])
    mean, std = torch.zeros(G, 1, D, device=device), torch.ones(G, 1, D, device=device)
    if standardize:
        acc = torch.zeros(3, G, 1, D, dtype=torch.float64, device=device)  # count, sum, sum of squares
        for chunk in torch.arange(n_local).split(4096):
            x = features(chunk).double()
            acc[0] += len(chunk)
            acc[1] += x.sum(1, keepdim=True)
            acc[2] += x.pow(2).sum(1, keepdim=True)
        n, s1, s2 = all_reduce(acc)
        mean = (s1 / n).float()
        std = ((s2 - s1 * s1 / n) / (n - 1)).clamp_min(0).sqrt().float() + 1e-6  # unbiased, as torch.std
    g = torch.Generator().manual_seed(seed)
    W = torch.zeros(G, D, n_classes, device=device)
    if init_std:
        W.normal_(0, init_std, generator=torch.Generator(device=device).manual_seed(seed))
    W.requires_grad_(True)
    b = torch.zeros(G, 1, n_classes, device=device, requires_grad=True)
    opt = torch.optim.SGD([W, b], lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps = epochs * math.ceil(n_total / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(epochs):
        for batch in torch.randperm(n_total, generator=g).split(batch_size):
            local = batch[batch % world == rank] // world  # the batch's rows this rank holds
            x = (features(local) - mean) / std
            y = labels[local.to(device)]
            loss = F.cross_entropy(torch.baddbmm(b, x, W).flatten(0, 1), y.repeat(G), reduction="sum")
            opt.zero_grad()
            (loss / (G * len(batch))).backward()  # the mean over the whole global batch, once summed
            for p in (W, b):
                all_reduce(p.grad)
            opt.step()
            sched.step()
    W, b = W.detach(), b.detach()
    return lambda x: torch.baddbmm(b, (x.to(device) - mean) / std, W)


def sharded_accuracy(classify, features, labels, n_sets, device):
    """Top-1 accuracy [G] of classify over every rank's rows (features, labels: this rank's)."""
    counts = torch.zeros(n_sets + 1, dtype=torch.float64, device=device)  # rows, then correct per set
    counts[0] = len(labels)
    for chunk in torch.arange(len(labels)).split(4096):
        pred = classify(features(chunk)).argmax(-1)
        counts[1:] += (pred == labels[chunk].to(device)).sum(1)
    all_reduce(counts)
    return (counts[1:] / counts[0]).float().cpu()
