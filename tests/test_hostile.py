"""Hostile input: corrupt and mismatched files, bad flags, overwrites, full disks, stale temp files. Every
case ends in a one-line error (no traceback) and leaves what was there intact."""
import errno
import json
import os
import subprocess
import sys

import pytest
import torch

import artifacts
import common
import eval as evaluate
import probe
import sample
import tokenize_kmeans
import train_decoder
import train_gpt
import train_vq
from conftest import ROOT, make_token_files, run_script

TINY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--batch-size", "8", "--precision", "fp32",
        "--eval-batches", "1"]


def one_line_error(main, argv, text):
    """main(argv) stops with fail(): a SystemExit whose message is one line holding text (run in-process:
    fast)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    msg = str(e.value)
    assert text in msg and "\n" not in msg, msg


@pytest.mark.parametrize("get_args, argv", [
    (tokenize_kmeans.get_args, ["--image-size", "-14"]), (tokenize_kmeans.get_args, ["--batch-size", "0"]),
    (tokenize_kmeans.get_args, ["--workers", "-1"]), (tokenize_kmeans.get_args, ["--fit-points", "-100"]),
    (tokenize_kmeans.get_args, ["--iters", "0"]), (tokenize_kmeans.get_args, ["--image-size", "0"]),
    (train_gpt.get_args, ["--batch-size", "0"]), (train_gpt.get_args, ["--eval-interval", "0"]),
    (train_gpt.get_args, ["--ckpt-interval", "0"]), (train_gpt.get_args, ["--grad-accum", "0"]),
    (train_gpt.get_args, ["--n-head", "0"]), (train_gpt.get_args, ["--dropout", "2"]),
    (train_gpt.get_args, ["--device", "foo"]), (train_gpt.get_args, ["--class-dropout", "1.5"]),
    (train_gpt.get_args, ["--max-steps", "-1"]), (train_gpt.get_args, ["--lr", "nan"]),
    (sample.get_args, ["--top-k", "-5"]), (sample.get_args, ["--top-p", "0"]),
    (sample.get_args, ["--top-p", "1.5"]), (sample.get_args, ["--temperature", "0"]),
    (sample.get_args, ["--temperature", "-1"]), (sample.get_args, ["--cfg-scale", "-1"]),
    (sample.get_args, ["--num-samples", "0"]), (sample.get_args, ["--batch-size", "0"]),
    (sample.get_args, ["--decode-steps", "0"]), (sample.get_args, ["--decode-temperature", "0"]),
    (train_vq.get_args, ["--batch-size", "0"]), (train_vq.get_args, ["--vq-codes", "0"]),
    (train_vq.get_args, ["--eval-interval", "0"]),
    (train_decoder.get_args, ["--stage", "maskgit", "--decode-steps", "0"]),
    (train_decoder.get_args, ["--stage", "ar", "--top-p", "1.5"]),
    (sample.get_args, ["--temperature", "1e-45"]), (sample.get_args, ["--cfg-scale", "1e39"]),
    (sample.get_args, ["--cfg-scale", "nan"]),
    (probe.get_args, ["--epochs", "0"]), (probe.get_args, ["--batch-size", "0"]),
    (evaluate.get_args, ["--batch-size", "0"]), (evaluate.get_args, ["--nearest-k", "0"]),
])
def test_bad_flags_are_refused_when_parsed(get_args, argv, capsys):
    with pytest.raises(SystemExit) as e:
        get_args(argv)
    assert e.value.code == 2  # argparse's usage error, with the flag named
    assert f"argument {argv[-2]}" in capsys.readouterr().err


def test_a_cuda_device_without_a_gpu_is_refused(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        sample.get_args(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", os.urandom(2048)])
def test_corrupt_artifacts_are_named_in_one_line(tmp_path, content):
    path = tmp_path / "gpt.pt"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        artifacts.load_artifact(str(path), "run train_gpt.py first")
    msg = str(e.value)
    assert str(path) in msg and "cannot be read" in msg
    assert "weights_only=False" not in msg and "\n" not in msg


def test_a_truncated_checkpoint_is_a_one_line_error_in_every_consumer(tmp_path):
    out = make_token_files(str(tmp_path))
    train_gpt.main(["--out", out, "--max-steps", "2", *TINY])
    data = open(os.path.join(out, "gpt.pt"), "rb").read()
    open(os.path.join(out, "gpt.pt"), "wb").write(data[: len(data) // 2])
    one_line_error(probe.main, ["--out", out], "gpt.pt cannot be read")
    one_line_error(train_gpt.main, ["--out", out, "--resume", *TINY], "gpt.pt cannot be read")
    one_line_error(sample.main, ["--out", out, "--tokens-only"], "gpt.pt cannot be read")
    # and as a user sees it: one line, no traceback
    p = run_script("sample.py", "--out", out, "--tokens-only", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: ")


def test_training_never_silently_overwrites_a_checkpoint(tmp_path):
    out = make_token_files(str(tmp_path))
    train_gpt.main(["--out", out, "--max-steps", "4", *TINY])
    before = open(os.path.join(out, "gpt.pt"), "rb").read()
    one_line_error(train_gpt.main, ["--out", out, "--max-steps", "2", *TINY],
                   "--resume to continue it, --force")
    assert open(os.path.join(out, "gpt.pt"), "rb").read() == before
    train_gpt.main(["--out", out, "--max-steps", "2", "--force", *TINY])
    assert torch.load(os.path.join(out, "gpt.pt"), weights_only=True)["step"] == 2


def test_tokens_of_another_codebook_are_refused_where_they_meet(tmp_path):
    out = make_token_files(str(tmp_path))
    for split in ("train", "val"):  # both made by codebook "aaa"
        tok = torch.load(os.path.join(out, f"tokens_{split}.pt"), weights_only=True)
        torch.save(dict(tok, codebook="aaa"), os.path.join(out, f"tokens_{split}.pt"))
    train_gpt.main(["--out", out, "--max-steps", "2", *TINY])
    assert torch.load(os.path.join(out, "gpt.pt"), weights_only=True)["lineage"]["codebook"] == "aaa"
    val = torch.load(os.path.join(out, "tokens_val.pt"), weights_only=True)
    # a val file of another fit, same K
    torch.save(dict(val, codebook="bbb"), os.path.join(out, "tokens_val.pt"))
    one_line_error(train_gpt.main, ["--out", out, "--resume", "--max-steps", "3", *TINY],
                   "different codebooks")
    one_line_error(probe.main, ["--out", out], "different codebooks")
    one_line_error(sample.main, ["--out", out, "--from-tokens", os.path.join(out, "tokens_val.pt")],
                   "different codebooks")
    train = torch.load(os.path.join(out, "tokens_train.pt"), weights_only=True)
    # now both are "bbb", gpt.pt is "aaa"
    torch.save(dict(train, codebook="bbb"), os.path.join(out, "tokens_train.pt"))
    one_line_error(train_gpt.main, ["--out", out, "--resume", "--max-steps", "3", *TINY],
                   "different codebooks")


def test_samples_of_another_checkpoint_are_not_resumed(tmp_path):
    out = make_token_files(str(tmp_path / "out"))
    train_gpt.main(["--out", out, "--max-steps", "2", *TINY])
    folder = str(tmp_path / "s")
    sample.main(["--out", out, "--tokens-only", "--num-samples", "2", "--class", "0", "--samples-dir",
                 folder])
    train_gpt.main(["--out", out, "--max-steps", "3", "--resume", *TINY])  # the checkpoint changes
    one_line_error(sample.main, ["--out", out, "--tokens-only", "--num-samples", "2", "--class", "0",
                                 "--samples-dir", folder],
                   "other checkpoints")


def test_sweep_values_are_numbers_and_nothing_outside_is_removed(tmp_path):
    out = make_token_files(str(tmp_path / "out"))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    one_line_error(evaluate.main, ["--out", out, "--sweep", "cfg", "--values", "1/../../../victim"],
                   "expected comma-separated numbers")
    assert (victim / "keep.txt").read_text() == "precious"


def test_eval_json_keeps_the_sections_of_earlier_runs(tmp_path, monkeypatch):
    out = make_token_files(str(tmp_path))
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump({"stability": {"VQ": [], "DiGIT": []}, "rendered": {"n_samples": 4},
                   "rendered_vq": {"n_samples": 3}}, f)
    scores = dict(n_samples=2, n_real=4, fd_dinov2=1.0, classifier_score=1.0, class_agreement=1.0,
                  precision=1.0, recall=1.0)
    monkeypatch.setattr(evaluate, "score_folders", lambda *a, **k: dict(generative=scores))
    (tmp_path / "s").mkdir()
    res = evaluate.main(["--out", out, "--samples", str(tmp_path / "s")])
    # kept; the old "stability" section is dropped: stability.py writes stability.json now
    assert set(res) == {"rendered", "rendered_vq", "generative"} and res["rendered"] == {"n_samples": 4}
    assert res["generative"] == scores


def test_nan_guards():
    with pytest.raises(SystemExit, match="loss is nan at step 3"):
        common.stop_if_not_finite(3, "gpt.pt", loss=float("nan"), grad_norm=1.0)
    with pytest.raises(SystemExit, match="grad_norm is inf"):
        common.stop_if_not_finite(3, "gpt.pt", loss=1.0, grad_norm=float("inf"))
    common.stop_if_not_finite(3, "gpt.pt", loss=1.0, grad_norm=2.0)


def test_a_checkpoint_never_saves_nan_weights(tmp_path):
    from types import SimpleNamespace
    model = torch.nn.Linear(2, 2)
    ckpt = artifacts.Checkpoint(str(tmp_path / "x.pt"), SimpleNamespace(resume=False, force=False), {}, {},
                                "fp32")
    ckpt.start(torch.device("cpu"), model=model)
    ckpt.save(step=1)
    model.bias.data[0] = float("nan")
    with pytest.raises(SystemExit, match="not saving them"):
        ckpt.save(step=2)
    assert torch.load(tmp_path / "x.pt", weights_only=True)["step"] == 1


def test_full_disk_removes_the_temp_file_and_keeps_the_old_artifact(tmp_path, monkeypatch):
    path = str(tmp_path / "gpt.pt")
    torch.save({"step": 1}, path)

    def full(obj, f):
        open(f, "wb").write(b"x" * 1000)  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit, match="no space left on the device"):
        artifacts.save_atomic({"step": 2}, path)
    assert os.listdir(tmp_path) == ["gpt.pt"]
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_output_folder_is_checked_and_only_our_stale_temp_files_removed(tmp_path):
    stale = tmp_path / f"gpt.pt{artifacts.TMP_TAG}999999999"
    ours = tmp_path / f"vq.pt{artifacts.TMP_TAG}{os.getpid()}"
    foreign = tmp_path / "thesis.tmp4000000"  # a user's file that merely looks like a temp file
    for f in (stale, ours, foreign):
        f.write_bytes(b"x")
    artifacts.prepare_out(str(tmp_path))
    assert not stale.exists() and ours.exists()  # a live process's temp file may still be being written
    assert foreign.read_bytes() == b"x"
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        artifacts.prepare_out(str(tmp_path / "afile"))


def test_a_train_set_of_only_unreadable_images_is_a_one_line_error(tmp_path):
    for split in ("train", "val"):
        d = tmp_path / "data" / split / "a"
        d.mkdir(parents=True)
        for i in range(3):
            (d / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    one_line_error(tokenize_kmeans.main, ["--data", tmp_path / "data", "--out", tmp_path / "out",
                                          "--encoder", "dinov2_vits14_offline",
                                          "--image-size", "28", "--k", "2", "--workers", "0", "--batch-size",
                                          "1", "--precision", "fp32"],
                   "no readable images")


def test_image_folder_val_classes_by_name_no_link_loops_16_bit(tmp_path):
    import numpy as np
    from PIL import Image
    from data import make_dataset
    from torchvision import transforms
    for split, classes in (("train", ("x", "y", "z")), ("val", ("x", "z"))):  # val lacks "y"
        for c in classes:
            d = tmp_path / split / c
            d.mkdir(parents=True)
            Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(d / "a.png")
    os.symlink(tmp_path / "train", tmp_path / "train" / "x" / "loop")  # a link back up
    # mid-grey, 16 bits
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "train" / "z" / "b16.png")
    train = make_dataset(str(tmp_path), "train", 8, None, transform=transforms.PILToTensor())
    val = make_dataset(str(tmp_path), "val", 8, None, transform=transforms.PILToTensor())
    assert len(train) == 4 and [y for _, y in train.samples] == [0, 1, 2, 2]
    assert [y for _, y in val.samples] == [0, 2] and val.classes == ["x", "y", "z"]  # "z" keeps train's id
    img = train[[os.path.basename(p) for p, _ in train.samples].index("b16.png")][0]
    assert abs(int(img.float().mean()) - 128) <= 1  # not clipped to white
    (tmp_path / "val" / "w").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "val" / "w" / "a.png")
    with pytest.raises(SystemExit, match="class folders that train/ does not have: w"):
        make_dataset(str(tmp_path), "val", 8, None)


FREEZE = """
import os, signal, subprocess, sys, torch
sys.path.insert(0, {root!r})
from common import all_reduce, init_distributed
rank, world, _ = init_distributed("cpu", timeout=3)
all_reduce(torch.ones(1))                      # both ranks are up
# rank 1 freezes, as a swapped-out or stopped process would; it is killed after 5 s (a stopped
# process ignores torchrun's SIGTERM)
if rank == 1:
    subprocess.Popen(["sh", "-c", f"sleep 5; kill -KILL {{os.getpid()}}"], start_new_session=True)
    os.kill(os.getpid(), signal.SIGSTOP)
all_reduce(torch.ones(1))                      # rank 0 waits here for rank 1
print("not reached")
"""


def test_a_frozen_torchrun_rank_is_named_after_the_timeout(tmp_path):
    """Item 14: a collective gives up after --dist-timeout (not gloo's 30 minutes) and names the silent
    rank."""
    script = tmp_path / "freeze.py"
    script.write_text(FREEZE.format(root=ROOT))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        "2", str(script)],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode != 0 and "not reached" not in p.stdout
    line = [s for s in p.stderr.splitlines() if s.startswith("error: rank 0")]
    assert line and "waited 3 s (--dist-timeout)" in line[0], p.stderr[-2000:]
    assert "stopped answering: rank 1" in line[0], p.stderr[-2000:]


BEATING = """
import sys, time
sys.path.insert(0, {root!r})
import torch.distributed as dist
from common import start_heartbeat
dist.init_process_group("gloo")
start_heartbeat(600, every=0)  # beat without pause: the exit is all but sure to find the thread in store.set
time.sleep(0.3)
print("done")
"""


def test_a_beating_heartbeat_does_not_abort_a_finished_script(tmp_path):
    """The heartbeat thread is stopped before the interpreter finalizes: a daemon thread torn down inside a
    store call aborts the finished process (SIGABRT: a failed torchrun; once seen in CI)."""
    script = tmp_path / "beating.py"
    script.write_text(BEATING.format(root=ROOT))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        "1", str(script)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0 and "done" in p.stdout, p.stderr[-2000:]


def test_dist_timeout_is_a_checked_flag_of_every_script():
    import train_gpt
    assert train_gpt.get_args(["--dist-timeout", "30"]).dist_timeout == 30
    with pytest.raises(SystemExit):
        train_gpt.get_args(["--dist-timeout", "0"])


# ------------------------------------------------------------------------ second pass: the newer surfaces

def test_an_incomplete_or_foreign_sample_folder_is_named(tmp_path):
    """A folder a killed sample.py left (manifest: not complete) is refused unless --allow-incomplete, which
    says how many of the planned samples it scores; a 0-byte PNG (a killed writer) is one line naming the
    file."""
    from PIL import Image
    from artifacts import write_json
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i:05d}_class0.png")
    write_json(dict(settings={}, n=5, complete=False), str(tmp_path / "manifest.json"))
    with pytest.raises(SystemExit, match="is incomplete .3 of the 5 samples sample.py planned"):
        evaluate.list_samples(str(tmp_path))
    assert evaluate.list_samples(str(tmp_path),
                                 allow_incomplete=True)[3] == "3 of the 5 samples sample.py planned"
    (tmp_path / "00003_class0.png").write_bytes(b"")
    with pytest.raises(SystemExit, match="00003_class0.png is not a readable image"):
        evaluate.list_samples(str(tmp_path), allow_incomplete=True)


def test_a_sample_folder_has_one_writer(tmp_path):
    """Two sample.py runs into one folder at once: the second is refused while the first's process lives; a
    lock a killed run left is taken over."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        folder = artifacts.SampleFolder(str(tmp_path / "s"), dict(a=1), 4)
        (tmp_path / "s" / ".writer").write_text(str(sleeper.pid))
        with pytest.raises(SystemExit, match=f"being written by another sample.py .process {sleeper.pid}"):
            folder.claim(0)
    finally:
        sleeper.kill()
        sleeper.wait()
    folder.claim(0)  # the writer is gone: its lock is stale
    assert (tmp_path / "s" / ".writer").read_text() == str(os.getpid())
    other = artifacts.SampleFolder(str(tmp_path / "s"), dict(a=2), 4)
    os.remove(tmp_path / "s" / ".writer")
    with pytest.raises(SystemExit, match="holds samples made with other settings"):
        other.claim(0)


@pytest.mark.parametrize("change, message", [
    # more rows than labels
    (lambda t: dict(t, tokens=torch.cat([t["tokens"], t["tokens"][:3]])), "labels for"),
    # fewer rows than labels
    (lambda t: dict(t, labels=torch.cat([t["labels"], t["labels"][:3]])), "labels for"),
    (lambda t: dict(t, tokens=t["tokens"][:, None][:, :0]), "views >= 1"),  # zero views
    (lambda t: dict(t, tokens=t["tokens"] - 1), "outside 0..31"),  # negative ids
    (lambda t: dict(t, tokens=t["tokens"].float()), "not integers"),  # float ids
])
def test_inconsistent_token_files_are_one_line_errors(tmp_path, change, message):
    out = make_token_files(str(tmp_path))
    path = os.path.join(out, "tokens_train.pt")
    torch.save(change(torch.load(path, weights_only=True)), path)
    one_line_error(train_gpt.main, ["--out", out, "--max-steps", "2", *TINY], message)


def test_malformed_vq_checkpoints_are_one_line_errors(tmp_path):
    """Our layout with a wrong shape, unexpected model_args, a missing weight, a model that is not a dict, NaN
    codes; MAGE's layout missing a weight, an int where a tensor belongs, zero channels: each one line naming
    the file."""
    from test_vqgan import official_state_dict, write_checkpoint
    from vqgan import VQModel, load_vq
    args = dict(levels=2, channels=16, codes=32, code_dim=8)
    good = dict(model=VQModel(**args).state_dict(), model_args=args, grid=(4, 4), pixel_size=16,
                fingerprint="f")
    cases = [(dict(good, model={**good["model"], "codebook.weight": torch.zeros(32, 9)}),
              "do not fit its model_args"),
             (dict(good, model_args=dict(args, extra=1)), "do not build a VQModel"),
             (dict(good, model={k: v for k, v in good["model"].items() if k != "codebook.weight"}),
              "do not fit"),
             (dict(good, model=[1, 2]), "no 'model' state dict"),
             (dict(good, model={**good["model"], "codebook.weight": torch.full((32, 8), float("nan"))}),
              "NaN")]
    path, fx = write_checkpoint(tmp_path, "mage", lambda sd: {"state_dict": sd})
    sd = official_state_dict(fx)
    cases += [({"state_dict": {k: v for k, v in sd.items() if k != "encoder.conv_out.weight"}},
               "incomplete or malformed"),
              ({"state_dict": dict(sd, **{"encoder.conv_out.bias": 3})}, "is a int, not a tensor"),
              ({"state_dict": dict(sd, **{"encoder.conv_in.weight": torch.zeros(0, 3, 3, 3)})},
               "mage layout")]
    for i, (ck, message) in enumerate(cases):
        torch.save(ck, tmp_path / f"bad{i}.pt")
        with pytest.raises(SystemExit) as e:
            load_vq(str(tmp_path / f"bad{i}.pt"), "cpu")
        msg = str(e.value)
        assert message in msg and f"bad{i}.pt" in msg and "\n" not in msg, (i, msg)


def test_pipes_and_legacy_files(tmp_path):
    """A named pipe given as a checkpoint is refused at once (opening it would block); a checkpoint in torch's
    old non-zip format loads (it cannot be memory-mapped)."""
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(SystemExit, match="not a regular file"):
        artifacts.load_artifact(str(tmp_path / "pipe"), "x", mmap=True)
    torch.save({"step": 3, "w": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert artifacts.load_artifact(str(tmp_path / "old.pt"), "x", mmap=True)["step"] == 3


def test_user_numbers_are_finite_and_in_range():
    import stability
    for bad in ("nan", "20,inf", "-inf"):
        with pytest.raises(SystemExit, match="finite"):
            stability.get_args([f"--snrs={bad}"])
    for spec in ("--1", "²", "1,²"):
        with pytest.raises(SystemExit, match="unknown class"):
            sample.parse_classes(spec, ["a", "b"])


SHARDS = """
import os, sys, torch
sys.path.insert(0, {root!r})
from common import fit_linear, gather_rows, init_distributed, owned, sharded_accuracy
rank, world, device = init_distributed("cpu")
n = 10
x = torch.arange(n * 3, dtype=torch.int32).view(n, 3)
mine = owned(n)
got = gather_rows(x[mine], mine, dst=0, chunk=2, host_dtype=torch.int16)[0]  # 2 rows per rank per message
if rank == 0:
    assert torch.equal(got, x.to(torch.int16)), got
else:
    assert got is None  # only rank 0 ever holds every row
g = torch.Generator().manual_seed(0)
y = torch.arange(40) % 2
feats = torch.randn(1, 40, 4, generator=g) + y[None, :, None] * 2.0
rows = owned(40)
touched = set()
def features(local):
    touched.update(rows[local].tolist())
    return feats[:, rows[local]]
classify = fit_linear(features, 40, y[rows], 2, epochs=3, lr=0.1, batch_size=8, seed=0)
acc = sharded_accuracy(classify, features, y[rows], 1, device)
assert touched <= set(rows.tolist()), "a rank read rows it does not hold"
# one file per rank: two processes printing to one pipe can interleave their lines
with open(os.path.join({out!r}, f"result_{{rank}}_of_{{world}}.txt"), "w") as f:
    f.write(f"{{float(classify(feats[:, :5]).sum())}} {{float(acc[0])}}")
"""


def test_sharded_sets_stay_sharded_and_train_what_one_process_trains(tmp_path):
    """The memory design of issue-scale runs, at small N: gathered rows reach rank 0 only (in chunks, in a
    compact dtype); the linear classifiers read only the rows their rank holds and still train exactly what
    one process trains on all rows (the full-batch gradient, summed over ranks)."""
    script = tmp_path / "shards.py"
    script.write_text(SHARDS.format(root=ROOT, out=str(tmp_path)))
    results = {}
    for nproc in (1, 2):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node", str(nproc), str(script)], capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert p.returncode == 0, p.stderr[-2000:]
        results[nproc] = [(tmp_path / f"result_{r}_of_{nproc}.txt").read_text().split() for r in range(nproc)]
    (logits1, acc1), = results[1]
    for logits2, acc2 in results[2]:
        assert abs(float(logits2) - float(logits1)) < 1e-4 and acc2 == acc1
