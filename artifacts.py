"""
What the stages write and read, in one place (none of it DiGIT's idea; docs/FILES.md lists every file):

  - atomic saves and safe loads: a crash never leaves half a file, and every .pt loads with
    weights_only=True; a bad file is one line naming it and what is wrong;
  - the lineage record: which tokenizer, codebook and VQ an artifact was made from, and one check
    wherever two artifacts meet;
  - Checkpoint: a training stage's file, started fresh, resumed (--resume) or replaced (--force)
    with every check, and saved with its random state, a NaN guard and a fingerprint;
  - SampleFolder: sample.py's output, sharded over ranks and resumable, that says what it holds.

Imports no stage.
"""
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import uuid

import torch

from common import fail

TMP_TAG = ".digit-tmp-"  # save_atomic writes PATH.digit-tmp-PID, then renames it: a name only we use


# ----------------------------------------------------------------------------- files

def prepare_out(out, flag="--out"):
    """A writable folder before any work (not after an hour of training); removes the temp files a killed
    save of ours left behind (PATH.digit-tmp-PID whose process is gone), and nothing else."""
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"{flag} {out} is a file, not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the folder {out} ({flag}): {e.strerror}")
    if not os.access(out, os.W_OK | os.X_OK):
        fail(f"the folder {out} ({flag}) is not writable")
    for tmp in glob.glob(os.path.join(glob.escape(out), f"*{TMP_TAG}[0-9]*")):
        pid = re.search(re.escape(TMP_TAG) + r"(\d+)$", tmp)
        if pid and not pid_alive(int(pid.group(1))):
            os.remove(tmp)
    return out


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_atomic(obj, path):
    """torch.save to a temp file, then rename: a crash never leaves a half-written artifact. A full disk
    or a read-only folder is a one-line error, and the temp file is removed (it would keep the disk full)."""
    tmp = f"{path}{TMP_TAG}{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError of its zip writer
        if os.path.exists(tmp):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        if getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in str(e) or free < 1 << 20:
            fail(f"no space left on the device of {path} while saving it; {path} was not changed")
        fail(f"could not write {path}: {getattr(e, 'strerror', None) or e}")


def write_json(obj, path):
    """A JSON report, written atomically like the checkpoints."""
    tmp = f"{path}{TMP_TAG}{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def check_regular_file(path, hint):
    """One line for what is not a readable regular file: missing, a folder, a pipe (which would block)."""
    if not os.path.exists(path):
        fail(f"{path} not found: {hint}")
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        fail(f"{path} is a folder, not a file")
    if not stat.S_ISREG(mode):
        fail(f"{path} is not a regular file (a pipe or a device?): give the file itself")


def load_artifact(path, hint, mmap=False):
    """torch.load(path, weights_only=True) of any artifact of this project, with one-line errors naming the
    file and what is wrong (missing, a folder, a pipe, truncated, not a torch file, holding more than data).
    mmap: read tensors lazily (a checkpoint's optimizer state is never read); files in torch's old
    non-zip format cannot be mapped and are read whole."""
    check_regular_file(path, hint)
    if os.path.getsize(path) == 0:
        fail(f"{path} cannot be read as a checkpoint/token file (the file is empty): write it again ({hint})")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not mmap or "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # the legacy format
    except Exception as e:  # zip reader, unpickler, mmap: each has its own exception type
        reason = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
        fail(f"{path} cannot be read as a checkpoint/token file ({reason}); it may be truncated or not ours: "
             f"write it again ({hint})")


def expect(ok, path, what):
    """One-line error for a file that loads but does not hold what it should."""
    if not ok:
        fail(f"{path} is malformed: {what}")


def load_model(path, model_class, hint, device):
    """(frozen model, checkpoint dict) from a checkpoint of any stage; hint says how to make it.
    A malformed checkpoint (keys, settings or shapes that do not fit the model) is one line."""
    ck = load_artifact(path, hint, mmap=True)  # mmap: the optimizer state (2x the weights) is never read
    ok = isinstance(ck, dict) and isinstance(ck.get("model"), dict)
    expect(ok and isinstance(ck.get("model_args"), dict), path, "no 'model' state dict and 'model_args'")
    try:
        model = model_class(**ck["model_args"])
    except (TypeError, ValueError, ZeroDivisionError) as e:
        fail(f"{path} is malformed: model_args {ck['model_args']} do not build a "
             f"{model_class.__name__} ({e})")
    try:
        model.load_state_dict(ck["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        lines = [s.strip() for s in str(e).splitlines() if s.strip()]
        fail(f"{path} is malformed: its weights do not fit its model_args ({(lines[1:] or lines)[0][:160]})")
    bad = [k for k, v in ck["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    expect(not bad, path, f"weight {bad[0] if bad else ''} holds NaN/inf")
    return model.to(device).eval().requires_grad_(False), ck


def new_fingerprint():
    """An id written into a checkpoint at every save: later stages record the ids of their inputs."""
    return uuid.uuid4().hex[:12]


def tensor_fingerprint(t):
    """A content id of a tensor (the codebook's centroids): the same codebook always has the same id."""
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:12]


# ----------------------------------------------------------------------------- lineage

# What an artifact was made from: the DiGIT tokenizer (encoder, block, image size, grid, K, codebook id),
# the pixel VQ (its id and code count) and which of the two token kinds a model reads (tokenizer).
LINEAGE = {"tokenizer": "token kinds", "encoder": "encoders", "layer": "encoder blocks",
           "image_size": "image sizes",
           "grid": "token grids", "digit_vocab": "codebook sizes", "codebook": "codebooks", "vq": "VQs",
           "vq_codes": "VQ code counts"}


def lineage(d):
    """The lineage record of an artifact (a dict of LINEAGE keys). Files written before the record existed
    are read from their old top-level keys, so old out/ folders keep working."""
    if not isinstance(d, dict):
        return {}
    if isinstance(d.get("lineage"), dict):
        return d["lineage"]
    old = {}
    for key in ("encoder", "layer", "image_size"):
        if d.get(key) is not None and d.get("tokenizer") != "vq":
            old[key] = d[key]
    if d.get("grid") is not None:
        old["grid"] = tuple(d["grid"])
    ref = d.get("codebook") if not isinstance(d.get("codebook"), torch.Tensor) else None
    ref = ref or (d["tokens"] if isinstance(d.get("tokens"), str) else None)  # checkpoints: their tokens' id
    args = d.get("model_args") or {}
    if "centroids" in d:  # codebook.pt
        old.update(codebook=d.get("fingerprint"), digit_vocab=len(d["centroids"]))
    elif "codes" in args:  # vq.pt
        old.update(vq=d.get("fingerprint"), vq_codes=args["codes"], codebook=ref)
    elif d.get("tokenizer") == "vq":  # the VQ's token files and the GPT trained on them
        old.update(tokenizer="vq", vq=ref, vq_codes=d.get("vocab_size"), codebook=d.get("digit_tokens"))
    else:
        old.update(codebook=ref, digit_vocab=d.get("digit_vocab") or d.get("vocab_size"), vq=d.get("vq"),
                   vq_codes=args.get("vq_codes"))
        if "tokens" in d or "vocab_size" in d:
            old["tokenizer"] = "digit"
    return {k: v for k, v in old.items() if v is not None}


def check_lineage(a_name, a, b_name, b, keys=None):
    """Two artifacts that meet must come from the same tokenizer, codebook and VQ: every lineage key both
    record must agree. a, b: artifacts or lineage records. One line naming both files on a mismatch."""
    la, lb = lineage(a), lineage(b)
    for key in keys or LINEAGE:
        va, vb = la.get(key), lb.get(key)
        if va is not None and vb is not None and _plain(va) != _plain(vb):
            fail(f"{a_name} and {b_name} were made from different {LINEAGE[key]} ({key} {_plain(va)} vs "
                 f"{_plain(vb)}): make them again from the same one")


def _plain(v):
    return tuple(v) if isinstance(v, list) else v


def check_precision(files):
    """files: {name: artifact}. The models of one comparison must run in one precision (an fp32 model
    beside a bf16 one would make the table measure the precision too)."""
    seen = {name: d.get("precision") for name, d in files.items()
            if isinstance(d, dict) and d.get("precision")}
    if len(set(seen.values())) > 1:
        fail("these were made in different precisions, so their comparison is not fair: "
             + ", ".join(f"{n} {p}" for n,
                         p in seen.items()) + "; train them again with the same --precision")


# ----------------------------------------------------------------------------- training checkpoints

class Checkpoint:
    """A training stage's checkpoint file (gpt.pt, vq.pt, decoder.pt, ...):

        ckpt = Checkpoint(path, args, model_args, lineage, precision)  # refuses to overwrite a trained file
        state = ckpt.start(device, model=model, optimizer=opt)         # --resume: weights, optimizer, RNG
        ...
        ckpt.save(step=step, history=history)                          # NaN guard, RNG, fingerprint, atomic

    What a later stage checks (model_args, lineage, precision, fingerprint) is written with every save."""

    def __init__(self, path, args, model_args, lineage_record, precision, identity=None, **extra):
        """identity: the lineage key under which later artifacts record this one (vq.pt: "vq")."""
        if os.path.exists(path) and not args.resume and not args.force:
            fail(f"{path} exists: --resume to continue it, --force to train afresh and overwrite it")
        self.path, self.args, self.model_args = path, args, model_args
        self.lineage, self.precision = dict(lineage_record), precision
        self.identity, self.extra = identity, extra
        self.parts, self.device = {}, None

    def start(self, device, **parts):
        """Remember the parts to save (modules and optimizers, by the key they are saved under); with
        --resume, load them and the random state, after checking the file fits this run. Returns the
        checkpoint dict ({} for a fresh start)."""
        self.parts, self.device = parts, device
        if not self.args.resume:
            return {}
        ck = load_artifact(self.path, "--resume needs the checkpoint of an earlier run")
        expect(isinstance(ck, dict) and "model_args" in ck and "step" in ck, self.path,
               "not a training checkpoint")
        # a setting an older checkpoint lacks was off then (False, 0, None)
        diff = {k: (ck["model_args"].get(k), v) for k, v in self.model_args.items()
                if ck["model_args"].get(k) != v and (k in ck["model_args"] or v)}
        if diff:
            fail(f"--resume: {self.path} was trained with other model settings (checkpoint vs now): {diff}")
        check_lineage(self.path, ck, "the files it would now train on", self.lineage,
                      keys=[k for k in LINEAGE if k != self.identity])
        if ck.get("precision") not in (None, self.precision):
            fail(f"--resume: {self.path} was trained in {ck['precision']}: add --precision {ck['precision']} "
                 "(one precision per run)")
        for name, part in parts.items():
            if part is not None:
                if name not in ck:
                    fail(f"--resume: {self.path} has no {name} (it was trained with other settings): give "
                         "the same ones")
                part.load_state_dict(ck[name])
        # older files: the CPU state alone
        rng = ck["rng"] if isinstance(ck["rng"], dict) else dict(cpu=ck["rng"])
        torch.set_rng_state(rng["cpu"].cpu())
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
        return ck

    def save(self, **state):
        """Write the parts and `state` atomically; weights holding NaN/inf are never saved (the file on disk
        stays the last good checkpoint)."""
        for name, part in self.parts.items():
            if isinstance(part, torch.nn.Module):
                bad = [n for n, p in part.named_parameters() if not torch.isfinite(p).all()]
                if bad:
                    fail(f"{len(bad)} weight tensor(s) of {name} hold NaN/inf (e.g. {bad[0]}); not saving "
                         f"them: {self.path} stays the last good checkpoint")
        d = self.device
        rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(d) if d.type == "cuda" else None)
        parts = {name: part.state_dict() for name, part in self.parts.items() if part is not None}
        fingerprint = new_fingerprint()
        own = {self.identity: fingerprint} if self.identity else {}
        save_atomic(dict(model_args=self.model_args, lineage=dict(self.lineage, **own),
                         precision=self.precision,
                         config=vars(self.args), rng=rng, fingerprint=fingerprint, **self.extra, **parts,
                         **state), self.path)


# ----------------------------------------------------------------------------- sample folders

class SampleFolder:
    """sample.py's output folder: PNGs, one part file per finished batch (parts/), and manifest.json saying
    what the folder holds (settings, the checkpoints' fingerprints, how many samples, whether complete).

    Batches are global sample indices spread over the ranks; a batch whose part file exists is done, so an
    interrupted run continues. Nothing in the manifest is a path, so a moved folder still resumes. A second
    run with other settings, or a second writer while one is running, is refused."""

    def __init__(self, folder, settings, n, flag="--samples-dir"):
        self.folder, self.settings, self.n = folder, settings, n
        self.manifest_path = os.path.join(folder, "manifest.json")
        prepare_out(folder, flag)
        os.makedirs(os.path.join(folder, "parts"), exist_ok=True)

    def claim(self, rank):
        """Rank 0: take the folder's writer lock (refused while another sample.py holds it), refuse a folder
        of other samples, then record this run."""
        if rank != 0:
            return
        lock = os.path.join(self.folder, ".writer")
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                break
            except FileExistsError:
                with open(lock) as f:
                    pid = int(f.read().strip() or 0)
                if pid_alive(pid):
                    fail(f"{self.folder} is being written by another sample.py (process {pid}): wait for it, "
                         "or use another --samples-dir")
                os.remove(lock)  # left by a run that was killed
        old = read_manifest(self.folder)
        if old is not None and old.get("settings") != self.settings:
            fail(f"{self.folder} holds samples made with other settings or other checkpoints: delete it or "
                 "choose another --samples-dir")
        if old is None and any(f.endswith(".png") for f in os.listdir(self.folder)):
            fail(f"{self.folder} already holds images that are not from this sample.py run: choose another "
                 "--samples-dir")
        write_json(dict(settings=self.settings, n=self.n, complete=False), self.manifest_path)

    def part(self, start):
        return os.path.join(self.folder, "parts", f"{start:08d}.pt")

    def done(self, start):
        return os.path.exists(self.part(start))

    def finish(self):
        """Rank 0, after every batch: the folder is complete."""
        write_json(dict(settings=self.settings, n=self.n, complete=True), self.manifest_path)
        os.remove(os.path.join(self.folder, ".writer"))


def read_manifest(folder):
    """The manifest.json of a sample folder, or None (a folder of images from elsewhere)."""
    path = os.path.join(folder, "manifest.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{path} cannot be read ({e}): delete the folder and sample again")
    expect(isinstance(m, dict) and "complete" in m and "n" in m, path, "not a sample.py manifest")
    return m
