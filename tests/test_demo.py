"""demo.sh's stage logic, with a stand-in python that records its command lines: a finished stage is skipped,
an unfinished training stage resumes, --force redoes everything and lets training overwrite its checkpoints."""
import os
import subprocess

from conftest import ROOT

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$DIGIT_LOG"
"""


def run_demo(tmp_path, *args):
    log = tmp_path / "log.txt"
    log.write_text("")
    env = dict(os.environ, DIGIT_VENV=str(tmp_path / "venv"), DIGIT_OUT=str(tmp_path / "out"), DIGIT_LOG=str(log))
    p = subprocess.run(["bash", os.path.join(ROOT, "demo.sh"), *args], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    return [line.split() for line in log.read_text().splitlines() if not line.startswith("-m pip")]


def test_demo_skips_resumes_and_forces(tmp_path):
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    first = run_demo(tmp_path)
    scripts = [c[0] for c in first]
    assert scripts == ["tokenize_kmeans.py", "tokenize_kmeans.py", "train_gpt.py", "train_vq.py", "train_gpt.py",
                       "train_decoder.py", "sample.py", "sample.py", "probe.py", "probe.py", "sample.py", "sample.py", "stability.py", "eval.py"]
    assert first[2][first[2].index("--max-steps"):] == first[4][first[4].index("--max-steps"):]  # the same GPT for both tokenizers
    assert "--tokenizer" in first[4] and "--tokenizer" in first[7] and "--tokenizer" in first[9]
    assert not any("--resume" in c or "--force" in c or "--refit" in c for c in first)
    assert run_demo(tmp_path) == []  # every stage done: nothing runs
    os.remove(tmp_path / "out" / ".done-gpt")  # the GPT stage was interrupted after writing a checkpoint
    (tmp_path / "out" / "gpt.pt").write_bytes(b"")
    again = run_demo(tmp_path)
    assert len(again) == 1 and again[0][0] == "train_gpt.py" and "--resume" in again[0] and "--force" not in again[0]
    forced = run_demo(tmp_path, "--force")
    assert [c[0] for c in forced] == scripts
    assert "--refit" in forced[0] and all("--force" in c and "--resume" not in c for c in forced[2:6])
