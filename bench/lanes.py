"""
Why demo.sh runs its stages in two lanes: on a small CPU, two one-thread processes do more work than one
process on all the cores.

The models of the demo multiply small matrices (a GPT 192 wide, 64 tokens per image), which two threads share
badly. This benchmark takes two of the demo's own training stages, a GPT and the MaskGIT decoder, shortened,
on a finished demo's outputs, and runs them both ways, one after the other, several times in alternation (a
cloud CPU's speed drifts within minutes, so only figures of the same run are compared):
  serial: the first, then the second, each with every core (OMP_NUM_THREADS = cores);
  lanes:  both at once, each with half of the cores (as demo.sh's two lanes).
It prints the wall times and the ratio serial / lanes (above 1: the lanes win). The lanes' wall time is the
longer lane's, so the default step counts give the two stages about the same time on one core.

    python bench/lanes.py --out out            # a finished demo (reads tokens, vq.pt; writes in a copy)
    # -> bench/lanes.md (or --table FILE)
"""
import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import cpuinfo  # noqa: E402
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", default="out", help="a finished demo's output folder (default: %(default)s)")
p.add_argument("--repeats", type=int, default=2, help="serial/lanes pairs, alternated (default: %(default)s)")
# about the same time for each at one thread (a GPT step is ~2/3 of a MaskGIT step): the lanes' wall time
# is the longer lane's
p.add_argument("--gpt-steps", type=int, default=240, help="(default: %(default)s)")
p.add_argument("--maskgit-steps", type=int, default=150, help="(default: %(default)s)")
p.add_argument("--table", default=os.path.join(ROOT, "bench", "lanes.md"))
args = p.parse_args()

CORES = os.cpu_count()
HALF = max(1, CORES // 2)


def cpu():
    """'model name, AVX-512 or AVX2 only' from /proc/cpuinfo (Linux), else the machine's architecture."""
    info = cpuinfo()
    if not info:
        return platform.machine()
    flags = info.get("flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2 only" if "avx2" in flags else "no AVX2"
    return f"{info.get('model name', platform.machine())}, {isa}"


def stage_commands(work):
    """The two stages, as demo.sh runs them, shortened (no evaluation, no checkpoint on the way)."""
    gpt = ["train_gpt.py", "--out", work, "--batch-size", "32", "--max-steps", str(args.gpt_steps),
           "--eval-interval", "100000", "--ckpt-interval", "100000", "--force", "--precision", "fp32"]
    maskgit = ["train_decoder.py", "--stage", "maskgit", "--out", work, "--layout", "aligned",
               "--max-steps", str(args.maskgit_steps), "--lr", "1e-3", "--eval-interval", "100000",
               "--ckpt-interval", "100000", "--force", "--precision", "fp32"]
    return [[sys.executable, os.path.join(ROOT, c[0]), *c[1:]] for c in (gpt, maskgit)]


def start(cmd, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def finish(proc):
    _, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"a stage failed:\n{err[-2000:]}")


def serial(cmds):
    t0 = time.perf_counter()
    for cmd in cmds:
        finish(start(cmd, CORES))
    return time.perf_counter() - t0


def lanes(cmds):
    t0 = time.perf_counter()
    procs = [start(cmd, HALF) for cmd in cmds]
    for proc in procs:
        finish(proc)
    return time.perf_counter() - t0


def main():
    work = tempfile.mkdtemp(prefix="lanes-")
    for name in os.listdir(args.out):  # the inputs the two stages read; what they write stays in the copy
        if name.endswith(".pt") and not name.startswith(("gpt", "decoder")):
            shutil.copy(os.path.join(args.out, name), work)
    cmds = stage_commands(work)
    rows = []
    for r in range(args.repeats):
        s, ln = serial(cmds), lanes(cmds)
        rows.append((s, ln))
        print(f"pair {r + 1}: serial {s:.1f} s, lanes {ln:.1f} s, serial / lanes {s / ln:.2f}")
    shutil.rmtree(work)
    ratios = [s / ln for s, ln in rows]
    table = [f"# Two lanes vs one stage at a time ({cpu()}, {CORES} cores)",
             "",
             f"`python bench/lanes.py --out out --repeats {args.repeats} --gpt-steps {args.gpt_steps} "
             f"--maskgit-steps {args.maskgit_steps}`: the GPT on DiGIT tokens "
             f"({args.gpt_steps} steps) and the MaskGIT decoder ({args.maskgit_steps} steps) of demo.sh, "
             f"fp32; serial = one after the other with {CORES} threads each, lanes = both at once with "
             f"{HALF} each. Wall seconds, alternated:",
             "", "| pair | serial | lanes | serial / lanes |", "|---|---|---|---|"]
    table += [f"| {i + 1} | {s:.1f} | {ln:.1f} | {s / ln:.2f} |" for i, (s, ln) in enumerate(rows)]
    mean = sum(ratios) / len(ratios)
    table += ["", f"Mean ratio {mean:.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})."]
    with open(args.table, "w") as f:
        f.write("\n".join(table) + "\n")
    print(f"mean serial / lanes {mean:.2f} -> {args.table}")


if __name__ == "__main__":
    main()
