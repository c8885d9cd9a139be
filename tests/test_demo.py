"""demo.sh's stage logic, with a stand-in python that records when each command starts and ends: every
stage runs once and only after the stages it reads from have ended (in two lanes at once, each with half
of the cores), a finished stage is skipped, an unfinished training stage resumes, --force
redoes everything and lets training overwrite its checkpoints, and a failing stage stops the demo."""
import os
import subprocess

from conftest import ROOT

# a stage lasts long enough that two stages run side by side overlap in the log
FAKE_PYTHON = """#!/usr/bin/env bash
echo "start ${OMP_NUM_THREADS:-all} $*" >> "$DIGIT_LOG"
sleep 0.2
echo "end ${OMP_NUM_THREADS:-all} $*" >> "$DIGIT_LOG"
"""

# what each stage reads from another stage's output
NEEDS = dict(tokenize=[], gallery=["tokenize"], gpt=["tokenize"], vq=["tokenize"], gpt_vq=["vq"],
             maskgit=["tokenize", "vq"], sample=["gpt", "maskgit"], sample_vq=["gpt_vq", "vq"], probe=["gpt"],
             probe_vq=["gpt_vq", "tokenize"], render=["gpt", "maskgit"], render_vq=["gpt_vq", "vq"],
             stability=["tokenize", "vq"], eval=["sample", "sample_vq", "render", "render_vq"])
IN_LANES = set(NEEDS) - {"tokenize", "eval"}  # the stages between the tokenizer and eval


def stage_of(argv):
    """The demo's stage key of a recorded command line."""
    script, vq = argv[0], "--tokenizer" in argv
    if script == "tokenize_kmeans.py":
        return "gallery" if "--gallery" in argv else "tokenize"
    if script == "sample.py":
        return ("render" if "--from-tokens" in argv else "sample") + ("_vq" if vq else "")
    name = dict(train_gpt="gpt", train_vq="vq", train_decoder="maskgit", probe="probe", stability="stability",
                eval="eval")[script[:-3]]
    return name + ("_vq" if vq and name in ("gpt", "probe") else "")


def make_fake_python(tmp_path, extra=""):
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "python").write_text(FAKE_PYTHON.replace("sleep", extra + "sleep"))
    (bin_dir / "python").chmod(0o755)


def run_logged(tmp_path, script, ok=True, **env):
    """Run a bash script with the stand-in python; return (the logged lines, split; process)."""
    log = tmp_path / "log.txt"
    log.write_text("")
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
           "DIGIT_VENV": str(tmp_path / "venv"), "DIGIT_LOG": str(log), **env}
    p = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, env=env)
    assert (p.returncode == 0) == ok, p.stderr
    return [line.split() for line in log.read_text().splitlines()], p


def run_demo(tmp_path, *args, ok=True):
    """Run demo.sh with the stand-in python; return (events, process): events are (start|end, threads,
    stage, argv) in the order they happened."""
    lines, p = run_logged(tmp_path, " ".join(["bash demo.sh", *args]), ok, DIGIT_OUT=str(tmp_path / "out"),
                          DIGIT_PRECISION="fp32")
    events = [(what, threads, stage_of(argv), argv) for what, threads, *argv in lines
              if argv[0] != "-m"]  # not the installer (python -m pip / python -m uv)
    return events, p


def commands(events):
    """{stage: argv} of the stages that started."""
    return {stage: argv for what, _, stage, argv in events if what == "start"}


def check_order(events):
    """Every stage ran once, and started only after every stage it reads from had ended."""
    ended = set()
    for what, _, stage, _ in events:
        if what == "start":
            assert set(NEEDS[stage]) <= ended, (stage, "started before", set(NEEDS[stage]) - ended)
        else:
            assert stage not in ended
            ended.add(stage)
    return ended


def test_demo_runs_every_stage_after_what_it_reads(tmp_path):
    make_fake_python(tmp_path)
    events, _ = run_demo(tmp_path)
    assert check_order(events) == set(NEEDS)
    first = commands(events)
    # the same GPT for both tokenizers
    gpt, gpt_vq = first["gpt"], first["gpt_vq"]
    assert gpt[gpt.index("--max-steps"):] == gpt_vq[gpt_vq.index("--max-steps"):]
    assert all("--tokenizer" in first[s] for s in ("gpt_vq", "sample_vq", "probe_vq", "render_vq"))
    assert not any("--resume" in c or "--force" in c or "--refit" in c for c in first.values())
    # one precision, decided once, for every stage
    assert all(c[-2:] == ["--precision", "fp32"] for c in first.values())
    # two lanes, half of the cores each; the tokenizer and eval on all of them
    half = str(max(1, os.cpu_count() // 2))
    threads = {stage: t for what, t, stage, _ in events if what == "start"}
    assert threads == {s: half if s in IN_LANES else "all" for s in NEEDS}
    # and the lanes really overlap: their first stages run at the same time
    order = [(what, stage) for what, _, stage, _ in events]
    assert order.index(("start", "vq")) < order.index(("end", "gpt"))
    assert order.index(("start", "gpt")) < order.index(("end", "vq"))


def test_demo_skips_resumes_and_forces(tmp_path):
    make_fake_python(tmp_path)
    run_demo(tmp_path)
    assert run_demo(tmp_path)[0] == []  # every stage done: nothing runs
    os.remove(tmp_path / "out" / ".done-gpt")  # the GPT stage was interrupted after writing a checkpoint
    (tmp_path / "out" / "gpt.pt").write_bytes(b"")
    again = commands(run_demo(tmp_path)[0])
    assert list(again) == ["gpt"] and "--resume" in again["gpt"] and "--force" not in again["gpt"]
    forced, _ = run_demo(tmp_path, "--force")
    assert check_order(forced) == set(NEEDS)
    forced = commands(forced)
    assert "--refit" in forced["tokenize"]
    for s in ("gpt", "vq", "gpt_vq", "maskgit"):
        assert "--force" in forced[s] and "--resume" not in forced[s]


def test_an_interrupted_forced_run_leaves_no_old_marker(tmp_path):
    """demo.sh --force, interrupted in its GPT stage after a checkpoint was written: the next plain run
    resumes that stage and runs everything after it, never 'done before' from the old run's markers; what
    the other lane finished stays done."""
    make_fake_python(tmp_path)
    run_demo(tmp_path)  # a finished demo: every marker exists
    (tmp_path / "out" / "samples").mkdir()
    make_fake_python(tmp_path, 'case "$*" in *train_gpt.py*) touch "$DIGIT_OUT/gpt.pt"; exit 130;; esac\n')
    run_demo(tmp_path, "--force", ok=False)
    assert not (tmp_path / "out" / "samples").exists()  # Ctrl-C in stage 2
    make_fake_python(tmp_path)
    again, _ = run_demo(tmp_path)
    again = commands(again)
    assert "--resume" in again["gpt"] and "tokenize" not in again
    assert set(NEEDS) - {"tokenize", "vq", "gallery", "maskgit"} <= set(again)


def test_a_failing_stage_stops_both_lanes_and_shows_its_log(tmp_path):
    make_fake_python(tmp_path, 'case "$*" in *train_vq.py*) echo "the VQ broke here"; exit 1;; esac\n')
    events, p = run_demo(tmp_path, ok=False)
    ran = commands(events)
    assert "vq" in ran and "gpt" in ran  # the stage in the other lane still ends (its marker is written) ...
    assert (tmp_path / "out" / ".done-gpt").exists() and not (tmp_path / "out" / ".done-vq").exists()
    assert not {"gallery", "maskgit", "gpt_vq", "eval"} & set(ran)  # ... and nothing after them starts
    assert "the VQ broke here" in p.stderr and "logs/vq.txt" in p.stderr


def installs(tmp_path, extra="", **env):
    """Source setup_env.sh with the stand-in python; return the installer commands it ran."""
    make_fake_python(tmp_path, extra)
    lines, p = run_logged(tmp_path, "source ./setup_env.sh requirements.txt", **env)
    return [" ".join(argv[:3]) for what, _, *argv in lines if what == "start"], p


def test_setup_installs_with_uv_and_falls_back_to_pip(tmp_path):
    ran, _ = installs(tmp_path / "uv")
    assert ran == ["-m pip install", "-m uv pip"]  # pip fetches uv, uv installs the requirements
    ran, p = installs(tmp_path / "fallback", 'case "$*" in *"-m uv"*) exit 1;; esac\n')
    assert ran == ["-m pip install", "-m uv pip", "-m pip install"] and "pip instead" in p.stdout
    ran, _ = installs(tmp_path / "pip", DIGIT_INSTALLER="pip")
    assert ran == ["-m pip install"]
    assert installs(tmp_path / "pip", DIGIT_INSTALLER="pip")[0] == []  # the stamp: installed once
