"""demo.sh's stage logic, with a stand-in python that records its command lines: a finished stage is skipped,
an unfinished training stage resumes, --force redoes everything and lets training overwrite its
checkpoints."""
import os
import subprocess

from conftest import ROOT

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$DIGIT_LOG"
"""


def run_demo(tmp_path, *args):
    log = tmp_path / "log.txt"
    log.write_text("")
    env = dict(os.environ, DIGIT_VENV=str(tmp_path / "venv"), DIGIT_OUT=str(tmp_path / "out"),
               DIGIT_LOG=str(log), DIGIT_PRECISION="fp32")
    p = subprocess.run(["bash", os.path.join(ROOT, "demo.sh"), *args], capture_output=True, text=True,
                       env=env)
    assert p.returncode == 0, p.stderr
    return [line.split() for line in log.read_text().splitlines() if not line.startswith("-m pip")]


def test_demo_skips_resumes_and_forces(tmp_path):
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    first = run_demo(tmp_path)
    scripts = [c[0] for c in first]
    assert scripts == ["tokenize_kmeans.py", "tokenize_kmeans.py", "train_gpt.py", "train_vq.py",
                       "train_gpt.py",
                       "train_decoder.py", "sample.py", "sample.py", "probe.py", "probe.py", "sample.py",
                       "sample.py", "stability.py", "eval.py"]
    # the same GPT for both tokenizers
    assert first[2][first[2].index("--max-steps"):] == first[4][first[4].index("--max-steps"):]
    assert "--tokenizer" in first[4] and "--tokenizer" in first[7] and "--tokenizer" in first[9]
    assert not any("--resume" in c or "--force" in c or "--refit" in c for c in first)
    # one precision, decided once, for every stage
    assert all(c[-2:] == ["--precision", "fp32"] for c in first)
    assert run_demo(tmp_path) == []  # every stage done: nothing runs
    os.remove(tmp_path / "out" / ".done-gpt")  # the GPT stage was interrupted after writing a checkpoint
    (tmp_path / "out" / "gpt.pt").write_bytes(b"")
    again = run_demo(tmp_path)
    assert len(again) == 1 and again[0][0] == "train_gpt.py"
    assert "--resume" in again[0] and "--force" not in again[0]
    forced = run_demo(tmp_path, "--force")
    assert [c[0] for c in forced] == scripts
    assert "--refit" in forced[0] and all("--force" in c and "--resume" not in c for c in forced[2:6])


def test_an_interrupted_forced_run_leaves_no_old_marker(tmp_path):
    """demo.sh --force, interrupted after its GPT stage wrote a checkpoint: the next plain run redoes
    (resumes) that stage and everything after it, never 'done before' from the old run's markers."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    run_demo(tmp_path)  # a finished demo: every marker exists
    (tmp_path / "out" / "samples").mkdir()
    (bin_dir / "python").write_text(FAKE_PYTHON + 'case "$*" in *train_gpt.py*) touch "$DIGIT_OUT/gpt.pt"; '
                                                  'exit 130;; esac\n')
    log = tmp_path / "log.txt"
    env = dict(os.environ, DIGIT_VENV=str(tmp_path / "venv"), DIGIT_OUT=str(tmp_path / "out"),
               DIGIT_LOG=str(log), DIGIT_PRECISION="fp32")
    p = subprocess.run(["bash", os.path.join(ROOT, "demo.sh"), "--force"], capture_output=True, text=True,
                       env=env)
    assert p.returncode != 0 and not (tmp_path / "out" / "samples").exists()  # Ctrl-C in stage 2
    (bin_dir / "python").write_text(FAKE_PYTHON)
    again = run_demo(tmp_path)
    assert [c[0] for c in again][:2] == ["train_gpt.py", "train_vq.py"] and "--resume" in again[0]
    assert len(again) == 12
