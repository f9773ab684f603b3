"""Reliability (issue 6): exact resume, faults, bad input, torchrun/DDP, determinism.

Every run is a tiny model on a tiny synthetic CIFAR-10 archive written in the official layout,
on CPU with one thread (the development machine has two shared cores), so the file stays fast.
"""
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import signal
import socket
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import data_gpu
import speedrun as S
from conftest import write_archive, write_folder

N_TRAIN, N_TEST = 64, 32
# 4 steps an epoch, 12 in all; checkpoints at 4, 8, 12; a log line and host sync every step
TINY = ["--width", "32", "--depth", "1", "--heads", "2", "--patch-size", "8", "--batch-size", "16",
        "--passes-per-epoch", "1", "--epochs", "3", "--warmup-epochs", "1", "--eval-every", "1",
        "--log-every", "1", "--no-autoaugment", "--device", "cpu"]
# what differs between two identical runs: wall-clock figures and the folder
TIMING_KEYS = {"img_per_s", "elapsed", "train_s", "warmup_s", "timed_s", "total_s", "eval_s",
               "out"}


# one intra-op thread: faster than two on a shared 2-core machine, and the same in every run
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# A synthetic CIFAR-10 in the official layout

def make_batches(seed=0):
    """name -> batch dict; the red plane is darker for higher labels, so a model can learn."""
    rng = np.random.default_rng(seed)
    sizes = [N_TRAIN // 5 + (i < N_TRAIN % 5) for i in range(5)] + [N_TEST]
    batches = {}
    for name, n in zip(data_gpu._BATCHES, sizes):
        labels = rng.integers(0, 10, n)
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, :1024] //= (labels[:, None] + 1).astype(np.uint8)
        batches[name] = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": data}
    return batches


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return write_archive(tmp_path_factory.mktemp("data") / "cifar-10-python.tar.gz", make_batches(),
                         meta=True)


@pytest.fixture(scope="module")
def finished_run(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    torch.set_num_threads(1)
    assert S.main(["--data", archive, "--out", str(out)] + TINY) == 0
    return out


@pytest.fixture
def old_run(finished_run, tmp_path):
    """A private copy of a finished run, to point bad commands at."""
    return shutil.copytree(finished_run, tmp_path / "old_run")


# ----------------------------------------------------------------------------------------------
# Helpers

def snapshot(*folders):
    """Every file below the folders -> (digest, mtime): 'nothing written' is equality."""
    files = {}
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    files[path] = (hashlib.md5(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return files


def refused(capsys, argv, message, *watched, mid_run=False):
    """main(argv) exits 2 with one line 'error: ...message...' and changes no file in `watched`;
    mid_run: progress lines may come first, the error is the last line, no traceback."""
    before = snapshot(*watched)
    capsys.readouterr()
    assert S.main(argv) == 2
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert lines[-1].startswith("error: ") and (mid_run or len(lines) == 1), err
    assert "Traceback" not in err and sum(l.startswith("error") for l in lines) == 1, err
    assert message in lines[-1], err
    assert snapshot(*watched) == before
    return err


def records(run, kind):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in lines if r["kind"] == kind]


def load_ckpt(run):
    return torch.load(os.path.join(run, "ckpt.pt"), map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, path="state"):
    """Bit-identical nested state (tensors compared exactly, NaN-free by construction)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):  # NumPy's random state
        assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_tensors(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def assert_same_training(run_a, run_b):
    """Same weights, optimizer state, step and random streams, and the same logged curve."""
    a, b = load_ckpt(run_a), load_ckpt(run_b)
    assert a["step"] == b["step"]
    for key in ("model", "optimizer", "rng", "skipped"):
        assert_same_tensors(a[key], b[key], key)
    assert records(run_a, "train") == records(run_b, "train")
    assert records(run_a, "eval") == records(run_b, "eval")


def after_step(monkeypatch, action):
    """Run action(trainer, s) right after every optimisation step s (0-based)."""
    real_step = S.Trainer.step

    def step(self, s, *args, **kwargs):
        taken = real_step(self, s, *args, **kwargs)
        action(self, s)
        return taken
    monkeypatch.setattr(S.Trainer, "step", step)


def poison(monkeypatch, calls, grads_only=False, rank=None):
    """Make the training loss of the given steps (0-based) NaN; grads_only: keep the loss finite
    but make the gradients NaN (d sqrt(u)/du at u=0 is inf, times du/dlogits = 0)."""
    real, count = S.soft_cross_entropy, [0]

    def loss_fn(logits, targets, smoothing):
        loss, i = real(logits, targets, smoothing), count[0]
        count[0] += 1
        if i in calls and (rank is None or int(os.environ.get("RANK", 0)) == rank):
            return loss + torch.sqrt(logits.sum() * 0) if grads_only else loss * float("nan")
        return loss
    monkeypatch.setattr(S, "soft_cross_entropy", loss_fn)


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written or overwritten

def _bad(batch=None, **fields):
    """The synthetic batches with one batch's fields replaced."""
    def build(batches):
        batches[batch or "data_batch_3"].update(fields)
        return batches
    return build


BAD_DATA = {
    "missing": (lambda tmp, b: str(tmp / "nowhere" / "cifar-10-python.tar.gz"), "no such file or folder"),
    "truncated": (lambda tmp, b: _mangle(write_archive(tmp / "a.tar.gz", b), keep=0.5),
                  "a.tar.gz: cannot be read (EOFError"),
    # tarfile ends its listing quietly at a damaged header: which error comes depends on where
    "corrupt": (lambda tmp, b: _mangle(write_archive(tmp / "a.tar.gz", b), flip_at=0.5), "a.tar.gz: "),
    # the loader reads the archive to its end, so gzip's CRC catches a flipped pixel bit
    "one bit flipped in the pixels": (
        lambda tmp, b: _mangle(write_archive(tmp / "a.tar.gz", b), flip_bit_at=0.9), "a.tar.gz: "),
    "not an archive": (lambda tmp, b: _write(tmp / "a.tar.gz", os.urandom(5000)),
                       "a.tar.gz: cannot be read (ReadError"),
    "wrong folder in archive": (lambda tmp, b: write_archive(tmp / "a.tar.gz", b, folder="cifar10"),
                                "archive has no cifar-10-batches-py/data_batch_1"),
    "batch missing from archive": (lambda tmp, b: write_archive(
        tmp / "a.tar.gz", {k: v for k, v in b.items() if k != "test_batch"}),
        "archive has no cifar-10-batches-py/test_batch"),
    "folder without the batches": (lambda tmp, b: write_folder(tmp / "cifar-10-batches-py", {
        k: v for k, v in b.items() if k != "data_batch_4"}), "missing data_batch_4"),
    "folder of something else": (lambda tmp, b: _write(tmp / "stuff" / "notes.txt", b"hi", folder=True),
                                 "holds neither"),
    "images of the wrong shape": (lambda tmp, b: write_archive(tmp / "a.tar.gz", _bad(
        data=np.zeros((12, 1024), np.uint8))(b)), "data is uint8 (12, 1024), expected uint8 (n, 3072)"),
    "images not uint8": (lambda tmp, b: write_archive(tmp / "a.tar.gz", _bad(
        data=np.zeros((13, 3072), np.float32))(b)), "expected uint8 (n, 3072)"),
    "fewer labels than images": (lambda tmp, b: write_archive(tmp / "a.tar.gz", _bad(
        labels=[0] * 5)(b)), "expected 13 integers"),
    "label 10": (lambda tmp, b: write_archive(tmp / "a.tar.gz", _bad(
        "test_batch", labels=[10] + [0] * (N_TEST - 1))(b)), "labels run from 0 to 10, expected 0..9"),
    "label -1": (lambda tmp, b: write_archive(tmp / "a.tar.gz", _bad(
        labels=[-1] + [0] * 12)(b)), "labels run from -1 to 0, expected 0..9"),
    "batch not a dict": (lambda tmp, b: write_archive(tmp / "a.tar.gz", {**b, "data_batch_2": [1, 2]}),
                         "holds a list, expected a dict"),
    "empty test batch": (lambda tmp, b: write_archive(tmp / "a.tar.gz", _bad(
        "test_batch", data=np.zeros((0, 3072), np.uint8), labels=[])(b)), "test_batch: holds no images"),
    "empty training batch": (lambda tmp, b: write_archive(tmp / "a.tar.gz", _bad(
        data=np.zeros((0, 3072), np.uint8), labels=[])(b)), "data_batch_3: holds no images"),
    "hostile pickle": (lambda tmp, b: write_archive(tmp / "a.tar.gz", {
        **b, "data_batch_1": pickle.dumps(_Hostile(), protocol=2)}), "unexpected object"),
}


class _Hostile:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def _write(path, raw, folder=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(raw)
    return str(os.path.dirname(path) if folder else path)


def _mangle(path, keep=1.0, flip_at=None, flip_bit_at=None):
    with open(path, "rb") as f:
        raw = bytearray(f.read())
    raw = raw[:int(len(raw) * keep)]
    if flip_at is not None:  # 64 bytes of the deflate stream inverted
        at = int(len(raw) * flip_at)
        raw[at:at + 64] = bytes(b ^ 0xFF for b in raw[at:at + 64])
    if flip_bit_at is not None:  # random pixels sit in stored deflate blocks: only the CRC sees it
        raw[int(len(raw) * flip_bit_at)] ^= 1
    return _write(path, bytes(raw))


@pytest.mark.parametrize("build, message", list(BAD_DATA.values()), ids=list(BAD_DATA))
def test_bad_data_is_refused_before_anything_is_written(build, message, tmp_path, old_run, capsys):
    (tmp_path / "data").mkdir()
    data = build(tmp_path / "data", make_batches())
    new = tmp_path / "new"
    refused(capsys, ["--data", data, "--out", str(new)] + TINY, message, tmp_path / "data")
    assert not new.exists()
    # into a folder holding a run, with --overwrite: the old run must survive the refusal
    refused(capsys, ["--data", data, "--out", str(old_run), "--overwrite"] + TINY, message,
            tmp_path / "data", old_run)


def test_unreadable_data_is_refused(tmp_path, monkeypatch, capsys):
    folder = write_folder(tmp_path / "cifar-10-batches-py", make_batches())
    locked = os.path.join(folder, "data_batch_2")
    os.chmod(locked, 0)
    if os.geteuid() == 0:  # root reads any file: make the OS refuse it as it would anyone else
        def deny(path, *args, **kwargs):
            if os.fspath(path) == locked:
                raise PermissionError(13, "Permission denied", locked)
            return open(path, *args, **kwargs)
        monkeypatch.setattr(data_gpu, "open", deny, raising=False)
    refused(capsys, ["--data", folder, "--out", str(tmp_path / "new")] + TINY,
            f"PermissionError: [Errno 13] Permission denied: '{locked}'", folder)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("failure", ["wrong MD5", "connection lost"])
def test_failed_download_is_refused_and_removed(failure, tmp_path, monkeypatch, capsys):
    """No --data and no ./data: the official archive is fetched (here: a fake server)."""
    payload = b"this is not the CIFAR-10 archive\n" * 4000

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

        def read(self, n=-1):
            if failure == "connection lost" and self.tell() > 0:
                raise ConnectionResetError(104, "Connection reset by peer")
            return super().read(n)

    urls = []
    monkeypatch.setattr(data_gpu.urllib.request, "urlopen",
                        lambda url, timeout=None: urls.append(url) or Response(payload))
    monkeypatch.chdir(tmp_path)
    message = "is corrupt (MD5" if failure == "wrong MD5" else "could not download"
    refused(capsys, ["--out", "run"] + TINY, message, tmp_path)
    assert urls == [data_gpu.CIFAR_URL]
    assert os.listdir(tmp_path / "data") == []  # the partial download is gone
    assert not (tmp_path / "run").exists()


def _outside(interval, integer):
    """Values just outside a stated range (speedrun.RANGES), NaN and the infinities for floats."""
    low, high = (t.strip() for t in interval[1:-1].split(","))
    below = float(low) - (0 if interval[0] == "(" else 1)
    above = [] if high == "inf" else [1e9 if high.startswith("--") else float(high) + (interval[-1] == "]")]
    values = [below] + above + ([] if integer else [math.nan, math.inf, -math.inf])
    return [str(int(v)) if integer else repr(v) for v in values]


# every flag's bad values: one line, exit 2, and nothing written (each check runs only once those
# before it passed, so one bad value never crashes the check of another)
BAD_FLAGS = [
    (["--variant", "mcsl"], "unknown variant 'mcsl'; did you mean mcls"),
    (["--variant", "mla-qq"], "did you mean mla-q"),
    (["--heads", "0"], "--heads must be in [1, inf) (got 0)"),
    (["--patch-size", "0"], "--patch-size must be in [2, 32] (got 0)"),
    (["--patch-size", "-4"], "--patch-size must be in [2, 32] (got -4)"),
    (["--patch-size", "6"], "--patch-size must be even and divide 32 (got 6)"),
    (["--width", "30", "--heads", "4"], "--width 30 is not divisible by --heads 4"),
    (["--width", "nan"], "argument --width: invalid int value: 'nan'"),
    (["--mlp-ratio", "-1"], "--mlp-ratio must be in (0, inf) (got -1.0)"),
    (["--mlp-ratio", "nan"], "--mlp-ratio must be in (0, inf) (got nan)"),
    (["--mlp-ratio", "0.01"], "--mlp-ratio 0.01 leaves the MLP of width 32 without a unit"),
    (["--epochs", "inf"], "--epochs must be in (0, inf) (got inf)"),
    (["--epochs", "0"], "--epochs must be in (0, inf) (got 0.0)"),
    (["--lr", "nan"], "--lr must be in [0, inf) (got nan)"),
    (["--lr", "-0.001"], "--lr must be in [0, inf) (got -0.001)"),
    (["--min-lr", "0.01"], "--min-lr must be in [0, --lr] (got 0.01; --lr is 0.002)"),
    (["--warmup-epochs", "nan"], "--warmup-epochs must be in [0, inf) (got nan)"),
    (["--eval-every", "inf"], "--eval-every must be in [0, inf) (got inf)"),
    (["--time-budget", "-1"], "--time-budget must be in [0, inf) (got -1.0)"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295] (got -1)"),
    (["--batch-size", "0"], "--batch-size must be in [1, inf) (got 0)"),
    (["--batch-size", "-16"], "--batch-size must be in [1, inf) (got -16)"),
    (["--cls-only-blocks", "2"], "--cls-only-blocks must be in [0, --depth] (got 2; --depth is 1)"),
    (["--depth-token-only", "1", "--pool", "gap", "--num-cls", "0"],
     "class-attention blocks need a CLS token"),
    (["--batch-size", "128"], "--batch-size 128 exceeds an epoch of 64 samples; pass --no-drop-last"),
    (["--mla", "qx"], "--mla takes letters from 'qkv'"),
    (["--whiten", "--patch-embed", "spt"], "--whiten sets conv patch filters: it needs --patch-embed conv"),
    (["--pool", "cls", "--num-cls", "0"], "--num-cls must be >= 1 with CLS pooling"),
    (["--pos-emb", "sin", "--width", "34"], "sin position embedding needs width % 4 == 0"),
    (["--pos-emb", "spiral"], "argument --pos-emb: invalid choice: 'spiral'"),
    (["--device", "meta"], "unknown --device 'meta' (use auto, cpu, cuda or cuda:N)"),
    (["--device", "cpu:1"], "unknown --device 'cpu:1'"),
    (["--kernels", "triton", "--device", "cpu"], "--kernels triton runs on CUDA; on cpu only in "
                                                 "Triton's interpreter"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
] + [([f"--{name.replace('_', '-')}={value}"], f"--{name.replace('_', '-')} must be in {interval}")
     for name, interval in S.RANGES.items()
     for value in _outside(interval, type(S.CONFIG_FIELDS[name].default) is int)]


def test_every_numeric_flag_states_its_range():
    numeric = {name for name, f in S.CONFIG_FIELDS.items() if type(f.default) in (int, float)}
    assert set(S.RANGES) == numeric


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_are_refused(argv, message, archive, tmp_path, old_run, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    refused(capsys, ["--data", archive, "--out", str(tmp_path / "new")] + TINY + argv, message)
    assert not (tmp_path / "new").exists()
    refused(capsys, ["--data", archive, "--out", str(old_run), "--overwrite"] + TINY + argv, message,
            old_run)


def test_batch_not_divisible_by_processes_is_refused_before_rendezvous(archive, tmp_path, monkeypatch,
                                                                        capsys):
    # what torchrun --nproc_per_node=2 sets; no rendezvous address: joining one would fail loudly
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    refused(capsys, ["--data", archive, "--out", str(tmp_path / "new")] + TINY + ["--batch-size", "15"],
            "--batch-size 15 is not divisible by the 2 processes")
    assert not (tmp_path / "new").exists()


@pytest.mark.cuda
def test_more_processes_than_gpus_is_refused_before_rendezvous(archive, tmp_path, monkeypatch, capsys):
    """torchrun's second process on a one-GPU machine: LOCAL_RANK 1 names no device."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail(f"set_device({d}) reached"))
    argv = ["--data", archive, "--out", str(tmp_path / "new")] + TINY + ["--device", "cuda"]
    refused(capsys, argv, "LOCAL_RANK 1 but this machine shows 1 CUDA device(s)")


def test_folder_holding_another_run_is_refused(archive, old_run, capsys):
    refused(capsys, ["--data", archive, "--out", str(old_run), "--lr", "1e-3"] + TINY,
            "already holds a run", old_run)


def test_out_that_is_a_file_is_refused(archive, tmp_path, capsys):
    out = _write(tmp_path / "taken", b"precious")
    refused(capsys, ["--data", archive, "--out", out] + TINY, out, tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--variant", "mla-q"], "is from variant 'baseline', not 'mla-q'"),
    (["--variant=mcls"], "is from variant 'baseline', not 'mcls'"),
    (["--variant", "mlq-q"], "did you mean mla-q"),
    (["--width", "64"], "it cannot change --width"),
])
def test_resume_into_another_recipe_is_refused(argv, message, old_run, capsys):
    refused(capsys, ["--resume", str(old_run)] + argv, message, old_run)


def _renamed_weight(state):
    state["model"]["head.w"] = state["model"].pop("head.weight")


def _config_wider_than_weights(state):
    state["config"]["width"] = 64


# a checkpoint of another version of the trainer, or not of it at all
DAMAGED_CHECKPOINTS = {
    "truncated": (lambda path: _mangle(path, keep=0.5), "unreadable checkpoint"),
    "a bare state_dict": (lambda path: torch.save(S.build_model(S.resolve_config(
        "baseline", width=32, heads=2)).state_dict(), path), "not a checkpoint of this trainer"),
    "unknown config field": (lambda s: s["config"].update(retired_flag=1), "does not know"),
    "config field of another type": (lambda s: s["config"].update(width="32"),
                                     "config field width is str, expected int"),
    "invalid config": (lambda s: s["config"].update(heads=0), "its config is invalid"),
    "renamed weight": (_renamed_weight, "weights that do not match"),
    "missing weight": (lambda s: s["model"].pop("norm.bias"), "weights that do not match"),
    "config shapes differ from its weights": (_config_wider_than_weights, "weights that do not match"),
    "optimizer of another layout": (lambda s: s["optimizer"].pop("param_groups"),
                                    "optimizer state of another layout"),
    "random states of another layout": (lambda s: s["rng"][0].pop("numpy"),
                                        "random states of another layout"),
    "no step": (lambda s: s.pop("step"), "keys missing"),
}


@pytest.mark.parametrize("damage, message", list(DAMAGED_CHECKPOINTS.values()),
                         ids=list(DAMAGED_CHECKPOINTS))
def test_damaged_or_foreign_checkpoint_is_one_line(damage, message, old_run, capsys):
    path = old_run / "ckpt.pt"
    if damage.__code__.co_varnames[:1] == ("path",):
        damage(path)
    else:
        state = load_ckpt(old_run)
        damage(state)
        torch.save(state, path)
    for extra in ([], ["--eval-only"]):
        refused(capsys, ["--resume", str(old_run)] + extra, message, old_run)


class _Payload:
    """Unpickling it runs a shell command that leaves a file behind."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_that_would_run_code_is_refused_unrun(old_run, tmp_path, capsys):
    """A real checkpoint plus one object whose unpickling runs a command: refused unread."""
    marker = tmp_path / "pwned"
    state = load_ckpt(old_run)
    state["extra"] = _Payload(marker)
    torch.save(state, old_run / "ckpt.pt")
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload works: it does run when unpickled
    assert marker.exists()
    marker.unlink()
    for extra in (["--eval-only"], []):
        refused(capsys, ["--resume", str(old_run)] + extra,
                "refused, it holds posix.system, which is not a tensor, number or string", old_run)
        assert not marker.exists()


def test_checkpoint_holds_only_tensors_numbers_and_strings(finished_run):
    def leaves(value):
        if isinstance(value, dict):
            return [leaf for v in value.values() for leaf in leaves(v)]
        if isinstance(value, (list, tuple)):
            return [leaf for v in value for leaf in leaves(v)]
        return [value]
    kinds = {type(leaf) for leaf in leaves(load_ckpt(finished_run))}
    assert kinds <= {torch.Tensor, int, float, str, bool, type(None)}, kinds


def test_resume_on_another_device_reseeds_and_says_so(archive, finished_run, tmp_path, capsys):
    """A checkpoint written on CUDA (the CUDA generator's state is 16 bytes, a CPU one's 5,056),
    resumed on CPU: faked by giving a CPU checkpoint a CUDA generator's state."""
    cut = tmp_path / "cut"
    assert S.main(["--data", archive, "--out", str(cut)] + TINY + ["--max-steps", "6"]) == 0
    state = load_ckpt(cut)
    for rng in state["rng"]:
        rng.update(device="cuda", cuda=torch.zeros(16, dtype=torch.uint8))
    torch.save(state, cut / "ckpt.pt")
    os.remove(cut / "summary.json")
    capsys.readouterr()
    assert S.main(["--resume", str(cut), "--max-steps", "0"]) == 0
    out, err = capsys.readouterr()
    said = [line for line in out.splitlines() if "re-seeded" in line]
    assert said == ["the checkpoint was saved on cuda, this run is on cpu: its random streams "
                    "(drop path, token dropping) are re-seeded"], out
    assert "Traceback" not in err
    resumed = load_ckpt(cut)
    assert resumed["step"] == 12 and resumed["rng"][0]["device"] == "cpu"
    # weights and optimizer carried over; drop path's draws after step 6 are new ones
    assert not torch.equal(resumed["model"]["head.weight"], load_ckpt(finished_run)["model"]["head.weight"])


# ----------------------------------------------------------------------------------------------
# Exact resume

@pytest.mark.parametrize("interruption", ["SIGINT", "SIGTERM", "crash"])
def test_interrupted_run_resumes_to_identical_weights(interruption, archive, finished_run, tmp_path,
                                                      monkeypatch, capsys):
    """Stopped mid-epoch (signal: after step 6, checkpointed there; crash: after step 10, the
    epoch checkpoint of step 8 is all that is left) and resumed: the same weights, optimizer
    state, random streams and logged curve as the run left alone. Mixing, drop path and random
    erasing are all on, so every random stream is exercised."""
    cut = tmp_path / "cut"
    argv = ["--data", archive, "--out", str(cut)] + TINY
    if interruption == "crash":
        def action(trainer, s):
            if s == 9:
                raise RuntimeError("power cut")
        after_step(monkeypatch, action)
        with pytest.raises(RuntimeError, match="power cut"):
            S.main(argv)
        assert load_ckpt(cut)["step"] == 8
    else:
        signum = getattr(signal, interruption)
        after_step(monkeypatch, lambda trainer, s: s == 5 and os.kill(os.getpid(), signum))
        assert S.main(argv) == 0
        assert f"{interruption}: stopped at step 6" in capsys.readouterr().out
        assert load_ckpt(cut)["step"] == 6 and not (cut / "summary.json").exists()
    monkeypatch.undo()
    assert S.main(["--resume", str(cut)]) == 0
    assert_same_training(finished_run, cut)
    assert json.load(open(cut / "summary.json"))["steps"] == 12


def test_muon_run_resumes_to_identical_weights(archive, tmp_path, monkeypatch):
    """Muon's state (momenta, and AdamW's for the rest) goes through a weights-only checkpoint:
    a run cut after step 6 and resumed ends as the run left alone."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert S.main(["--data", archive, "--out", str(whole), "--optimizer", "muon"] + TINY) == 0
    after_step(monkeypatch, lambda trainer, s: s == 5 and os.kill(os.getpid(), signal.SIGINT))
    assert S.main(["--data", archive, "--out", str(cut), "--optimizer", "muon"] + TINY) == 0
    monkeypatch.undo()
    assert load_ckpt(cut)["step"] == 6
    assert S.main(["--resume", str(cut)]) == 0
    assert_same_training(whole, cut)
    assert "momentum_buffer" in str(load_ckpt(cut)["optimizer"]["state"])


def test_best_of_the_scheduled_evaluations_is_reported_and_survives_a_resume(
        archive, tmp_path, monkeypatch, capsys):
    """As the paper's code: the best of the evaluations every --eval-every epochs (here half an
    epoch, 2 steps), the first of equal ones, beside the final one, which counts only on a
    scheduled step (11 is not); a run resumed from step 5 keeps the best found before it."""
    out = tmp_path / "run"
    scores = iter([20.0, 55.0, 40.0, 55.0, 30.0, 70.0])  # steps 2, 4 | 6, 8, 10, final 11
    monkeypatch.setattr(S.Trainer, "evaluate", lambda self, **k: {"test_acc": next(scores),
                                                                  "test_loss": 1.0})
    after_step(monkeypatch, lambda trainer, s: s == 4 and os.kill(os.getpid(), signal.SIGINT))
    argv = ["--data", archive, "--out", str(out)] + TINY + ["--eval-every", "0.5", "--max-steps", "11"]
    assert S.main(argv) == 0
    assert (load_ckpt(out)["best_test_acc"], load_ckpt(out)["best_epoch"]) == (55.0, 1.0)
    after_step(monkeypatch, lambda trainer, s: None)
    assert S.main(["--resume", str(out)]) == 0
    assert [r["step"] for r in records(out, "eval")] == [2, 4, 6, 8, 10, 11]
    for summary in records(out, "summary") + [json.load(open(out / "summary.json"))]:
        assert (summary["test_acc"], summary["best_test_acc"], summary["best_epoch"]) == \
            (70.0, 55.0, 1.0)
    assert "test acc 70.00% | best 55.00% at epoch 1 |" in capsys.readouterr().out


def test_evaluations_fall_where_the_paper_codes_do():
    """Every 5 epochs from the end of the first, 585 steps an epoch: after epochs 1, 6, ..., 96
    (the code's epochs 0, 5, ..., 95), never at the end of the 100th."""
    cfg = S.resolve_config("baseline")
    evals = S.Evaluations(cfg, 585, None)
    assert [s for s in range(58_501) if evals.due(s)] == [585 * (1 + 5 * k) for k in range(20)]
    none = S.Evaluations(S.resolve_config("cpu-speedrun"), 1171.875, None)
    assert not any(none.due(s) for s in range(40_000))
    sub_epoch = S.Evaluations(S.resolve_config("baseline", eval_every=0.002), 4687, None)
    assert [s for s in range(30) if sub_epoch.due(s)] == [9, 18, 27]


def test_second_signal_aborts_at_once(archive, tmp_path, monkeypatch):
    """Ctrl-C twice: no waiting for the step's end, no checkpoint; the epoch's one stays."""
    out = tmp_path / "run"

    def twice(trainer, s):
        if s == 5:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
    after_step(monkeypatch, twice)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest was started in the background
    with pytest.raises(KeyboardInterrupt):
        S.main(["--data", archive, "--out", str(out)] + TINY)
    assert load_ckpt(out)["step"] == 4
    assert signal.getsignal(signal.SIGINT) is before  # handlers given back


# ----------------------------------------------------------------------------------------------
# Run folders: never lost, never mixed

@pytest.fixture
def cut_run(archive, tmp_path, monkeypatch):
    """A run stopped by SIGINT after step 6 (checkpoint at 6, no summary)."""
    cut = tmp_path / "cut"
    with monkeypatch.context() as patch:
        after_step(patch, lambda trainer, s: s == 5 and os.kill(os.getpid(), signal.SIGINT))
        assert S.main(["--data", archive, "--out", str(cut)] + TINY) == 0
    return cut


def test_resume_writes_only_into_its_own_run(cut_run, finished_run, old_run, tmp_path, capsys):
    """--resume A --out B: refused while B holds another run; into an empty B, or with
    --overwrite, B becomes the whole of A's run (its records up to the checkpoint come along)."""
    refused(capsys, ["--resume", str(cut_run), "--out", str(old_run)], "holds another run",
            cut_run, old_run)
    before = snapshot(cut_run)
    fresh = tmp_path / "b"
    for out, extra in ((fresh, []), (old_run, ["--overwrite"])):
        assert S.main(["--resume", str(cut_run), "--out", str(out)] + extra) == 0
        assert_same_training(finished_run, out)
        assert len(records(out, "summary")) == 1 and sorted(os.listdir(out)) == sorted(S.RUN_FILES)
    assert snapshot(cut_run) == before  # A itself is left as it was


def test_resuming_a_finished_run_says_so_and_writes_nothing(old_run, capsys):
    before = snapshot(old_run)
    capsys.readouterr()
    assert S.main(["--resume", str(old_run)]) == 0
    out = capsys.readouterr().out
    assert f"{old_run} holds a finished run (12 steps, test accuracy" in out
    assert "nothing to resume" in out and snapshot(old_run) == before


def _out_of_memory_at_step(n):
    real_step, calls = S.Trainer.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, *args, **kwargs)
    return step


def test_a_failure_before_the_first_checkpoint_leaves_no_trace(archive, tmp_path, old_run,
                                                               monkeypatch, capsys):
    """Out of memory at step 2, before the first checkpoint (step 4): a new folder is gone again,
    and a run that --overwrite was replacing is back as it was."""
    monkeypatch.setattr(S.Trainer, "step", _out_of_memory_at_step(2))
    new = tmp_path / "parent" / "new"
    refused(capsys, ["--data", archive, "--out", str(new)] + TINY, "out of memory", mid_run=True)
    assert not new.exists()
    monkeypatch.setattr(S.Trainer, "step", _out_of_memory_at_step(2))
    refused(capsys, ["--data", archive, "--out", str(old_run), "--overwrite"] + TINY,
            "out of memory", old_run, mid_run=True)
    assert sorted(os.listdir(old_run)) == sorted(S.RUN_FILES)  # no .replaced left behind


def test_overwrite_replaces_the_old_run_once_the_new_one_has_a_checkpoint(archive, old_run,
                                                                          monkeypatch, capsys):
    monkeypatch.setattr(S.Trainer, "step", _out_of_memory_at_step(6))  # after the step-4 one
    refused(capsys, ["--data", archive, "--out", str(old_run), "--overwrite"] + TINY,
            "out of memory", mid_run=True)
    assert load_ckpt(old_run)["step"] == 4 and not (old_run / "summary.json").exists()
    assert sorted(os.listdir(old_run)) == ["ckpt.pt", "config.json", "metrics.jsonl"]


def test_read_only_out_is_refused_before_the_data_is_loaded(archive, tmp_path, old_run,
                                                            monkeypatch, capsys):
    monkeypatch.setattr(data_gpu, "load_cifar10", lambda *a, **k: pytest.fail("loaded the data"))
    locked = tmp_path / "locked"
    locked.mkdir()
    os.remove(old_run / "summary.json")  # unfinished: a resume has something left to do
    os.chmod(locked, 0o555)
    os.chmod(old_run, 0o555)
    try:
        refused(capsys, ["--data", archive, "--out", str(locked / "run")] + TINY,
                f"--out {locked / 'run'}: {locked} is read-only", locked)
        refused(capsys, ["--data", archive, "--out", str(old_run), "--overwrite"] + TINY,
                f"--out {old_run}: {old_run} is read-only", old_run)
        refused(capsys, ["--resume", str(old_run / "ckpt.pt"), "--out", str(locked)],
                f"--out {locked}: {locked} is read-only", old_run, locked)
    finally:
        os.chmod(locked, 0o755)
        os.chmod(old_run, 0o755)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_signal_during_the_final_evaluation_stops_cleanly(signame, archive, finished_run, tmp_path,
                                                          monkeypatch, capsys):
    """The evaluations at steps 4 and 8 run; the final one (the third) is cut short by a signal:
    the usual line and exit 0, the step-12 checkpoint in place, no summary; --resume finishes."""
    out, real_evaluate, calls = tmp_path / "run", S.Trainer.evaluate, []

    def evaluate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), getattr(signal, signame))
        return real_evaluate(self, *args, **kwargs)
    monkeypatch.setattr(S.Trainer, "evaluate", evaluate)
    capsys.readouterr()
    assert S.main(["--data", archive, "--out", str(out)] + TINY) == 0
    printed = capsys.readouterr()
    assert f"{signame} during the final evaluation: stopped at step 12; checkpoint " \
           f"{out / 'ckpt.pt'}; continue with --resume {out}" in printed.out
    assert "Traceback" not in printed.err
    assert load_ckpt(out)["step"] == 12 and not (out / "summary.json").exists()
    monkeypatch.undo()
    assert S.main(["--resume", str(out)]) == 0
    assert_same_training(finished_run, out)
    assert len(records(out, "summary")) == 1


# ----------------------------------------------------------------------------------------------
# Faults: non-finite loss, out of memory

def test_nan_loss_stops_with_last_good_checkpoint_intact(archive, tmp_path, monkeypatch, capsys):
    """The NaN at step 10 is only seen at the step-12 sync (log every 100): no checkpoint after
    step 8 may be written, and the error says so."""
    out = tmp_path / "run"
    poison(monkeypatch, calls={9})
    refused(capsys, ["--data", archive, "--out", str(out)] + TINY + ["--log-every", "100"],
            f"non-finite loss nan near step 12; the last good checkpoint {out / 'ckpt.pt'} is intact",
            mid_run=True)
    state = load_ckpt(out)
    assert state["step"] == 8 and all(torch.isfinite(t).all() for t in state["model"].values())


def test_nan_gradients_never_reach_a_checkpoint(archive, tmp_path, monkeypatch, capsys):
    """Finite loss, NaN gradients at step 8 (a checkpoint step): the update poisons the weights
    although every logged loss is finite; the step-8 checkpoint must not be written."""
    out = tmp_path / "run"
    poison(monkeypatch, calls={7}, grads_only=True)
    refused(capsys, ["--data", archive, "--out", str(out)] + TINY, "non-finite weights after step 8",
            mid_run=True)
    state = load_ckpt(out)
    assert state["step"] == 4 and all(torch.isfinite(t).all() for t in state["model"].values())


def test_nan_policy_skip_skips_counts_and_resumes_the_count(archive, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    poison(monkeypatch, calls={2})  # step 3
    after_step(monkeypatch, lambda trainer, s: s == 5 and os.kill(os.getpid(), signal.SIGINT))
    assert S.main(["--data", archive, "--out", str(out), "--nan-policy", "skip"] + TINY) == 0
    assert load_ckpt(out)["skipped"] == 1
    monkeypatch.undo()
    poison(monkeypatch, calls={2})  # the resumed process's third step: step 9
    assert S.main(["--resume", str(out)]) == 0
    summary = json.load(open(out / "summary.json"))
    assert summary["skipped"] == 2 and summary["steps"] == 12
    assert records(out, "train")[-1]["skipped"] == 2
    state = load_ckpt(out)
    assert state["skipped"] == 2 and all(torch.isfinite(t).all() for t in state["model"].values())


def test_nan_policy_skip_also_skips_nan_gradients(archive, tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison(monkeypatch, calls={3, 7}, grads_only=True)
    assert S.main(["--data", archive, "--out", str(out), "--nan-policy", "skip"] + TINY) == 0
    assert json.load(open(out / "summary.json"))["skipped"] == 2
    assert all(torch.isfinite(t).all() for t in load_ckpt(out)["model"].values())


def test_a_checkpoint_that_cannot_be_written_ends_the_run_with_the_last_one_intact(
        archive, tmp_path, monkeypatch, capsys):
    """A full disk at the step-8 checkpoint: torch.save's writer raises RuntimeError midway."""
    out, real_save, saves = tmp_path / "run", torch.save, []

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj:
            saves.append(obj["step"])
            if obj["step"] == 8:
                f.write(b"half a checkpoint")
                raise RuntimeError("[enforce fail at inline_container.cc:664] . "
                                   "PytorchStreamWriter failed writing file data/3: file write failed")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    refused(capsys, ["--data", archive, "--out", str(out)] + TINY,
            f"could not write the checkpoint after step 8 (RuntimeError: [enforce fail at "
            f"inline_container.cc:664] . PytorchStreamWriter failed writing file data/3: file write "
            f"failed); the last good checkpoint {out / 'ckpt.pt'} is intact (free some disk space)",
            mid_run=True)
    monkeypatch.undo()
    assert saves == [4, 8] and load_ckpt(out)["step"] == 4
    assert sorted(os.listdir(out)) == ["ckpt.pt", "config.json", "metrics.jsonl"]  # no .tmp


def test_out_of_memory_names_a_batch_size_that_fits(archive, tmp_path, monkeypatch, capsys):
    """CUDA's OutOfMemoryError, faked on CPU: a forward of more than 4 images 'does not fit'."""
    real_forward = S.ViT.forward

    def forward(self, x, **kwargs):
        if self.training and x.shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(self, x, **kwargs)
    monkeypatch.setattr(S.ViT, "forward", forward)
    refused(capsys, ["--data", archive, "--out", str(tmp_path / "run")] + TINY,
            "out of memory at --batch-size 16; a batch of 4 fits: try --batch-size 4", mid_run=True)


# ----------------------------------------------------------------------------------------------
# Determinism

def test_same_seed_gives_identical_metrics(archive, tmp_path):
    """AutoAugment, mixing, erasing and drop path all on; --deterministic changes nothing on CPU."""
    argv = ["--data", archive] + TINY + ["--autoaugment", "--batch-size", "8", "--max-steps", "3",
                                         "--mix-prob", "1"]
    for name, extra in (("a", []), ("b", ["--deterministic"])):
        assert S.main(argv + ["--out", str(tmp_path / name)] + extra) == 0
    assert_same_training(tmp_path / "a", tmp_path / "b")
    assert records(tmp_path / "a", "summary") == records(tmp_path / "b", "summary")


def test_deterministic_flag_documents_its_cost(capsys):
    with pytest.raises(SystemExit):
        S.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--deterministic" in text and "CUBLAS_WORKSPACE_CONFIG" in text and "slower" in text


# ----------------------------------------------------------------------------------------------
# torchrun / DDP: 2 processes, Gloo on CPU

def _flat_augment(x, draws, **kwargs):
    """No per-rank randomness in the batch: what makes 2 processes comparable with 1."""
    return data_gpu.normalize(x)


# fp32: bf16 rounding would differ between one batch of 16 and two shards of 8
FLAT = ["--mix-prob", "0", "--drop-path", "0", "--precision", "fp32"]


def _ddp_worker(rank, world, port, root, archive):
    """One torchrun-like process: the env vars torchrun sets, then several runs in sequence."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if rank:  # everything rank 1 prints lands here: it must stay empty
        log = os.open(os.path.join(root, "rank1.log"), os.O_WRONLY | os.O_CREAT)
        os.dup2(log, 1)
        os.dup2(log, 2)
    patch = pytest.MonkeyPatch()
    trainers = []
    real_init = S.Trainer.__init__
    patch.setattr(S.Trainer, "__init__", lambda self, *a, **k: real_init(self, *a, **k) or
                  trainers.append(self))

    def run(name, argv, expect=0):
        assert S.main(argv) == expect, name
        torch.save(trainers[-1].model.state_dict(), os.path.join(root, f"{name}.rank{rank}.pt"))

    base = ["--data", archive] + TINY
    run("whole", base + ["--out", f"{root}/whole"])
    with pytest.MonkeyPatch.context() as p:  # SIGINT reaches rank 1 alone, after its 6th step
        after_step(p, lambda trainer, s: rank == 1 and s == 5 and os.kill(os.getpid(), signal.SIGINT))
        run("cut", base + ["--out", f"{root}/cut"])
    shutil.copy(f"{root}/cut/ckpt.pt", f"{root}/cut.ckpt.pt")
    run("resumed", ["--resume", f"{root}/cut"])
    with pytest.MonkeyPatch.context() as p:  # a NaN on rank 1 alone: both ranks skip that step
        poison(p, calls={2}, rank=1)
        run("skip", base + ["--out", f"{root}/skip", "--nan-policy", "skip"])
    with pytest.MonkeyPatch.context() as p:  # ... or both stop, with the same error
        poison(p, calls={9}, rank=1)
        run("stop", base + ["--out", f"{root}/stop", "--log-every", "100"], expect=2)
    with pytest.MonkeyPatch.context() as p:
        p.setattr(data_gpu, "augment", _flat_augment)
        run("flat", base + FLAT + ["--out", f"{root}/flat"])
    # a time budget: each rank's clock differs, yet all must use one lr and stop at one step
    run("budget", base + ["--out", f"{root}/budget", "--epochs", "1000", "--time-budget", "3",
                          "--log-every", "3"])
    patch.undo()
    S.exit_process(0)  # as speedrun's __main__ ends: Gloo's teardown can abort a finished process


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_runs(archive, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ddp"))
    ctx = mp.start_processes(_ddp_worker, args=(2, _free_port(), root, archive), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 150
    while not ctx.join(timeout=1):  # a child's exception is re-raised here with its traceback
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2 DDP processes hung (a collective one rank never reached?)")
    return root


def _weights(root, name, rank):
    return torch.load(os.path.join(root, f"{name}.rank{rank}.pt"))


def test_ddp_matches_one_process_with_the_same_global_batch(ddp_runs, archive, tmp_path, monkeypatch):
    """Per-rank augmentation, mixing and drop path are off here (by design they differ per rank),
    so 2 processes x 8 images and 1 process x 16 images see the same batches; only float sums
    in another order separate them."""
    monkeypatch.setattr(data_gpu, "augment", _flat_augment)
    one = tmp_path / "one"
    assert S.main(["--data", archive, "--out", str(one)] + TINY + FLAT) == 0
    two = os.path.join(ddp_runs, "flat")
    loss_one = [r["loss"] for r in records(one, "train")]
    loss_two = [r["loss"] for r in records(two, "train")]
    eval_one, eval_two = records(one, "eval"), records(two, "eval")
    w_one, w_two = load_ckpt(one)["model"], load_ckpt(two)["model"]
    gaps = {"loss": max(abs(a - b) for a, b in zip(loss_one, loss_two)),
            "test_loss": max(abs(a["test_loss"] - b["test_loss"]) for a, b in zip(eval_one, eval_two)),
            "weights": max((w_one[k] - w_two[k]).abs().max().item() for k in w_one)}
    print("1 vs 2 processes, largest gaps:", gaps)
    assert len(loss_one) == len(loss_two) == 12 and len(eval_one) == len(eval_two) == 3
    assert loss_one[-1] < loss_one[0] - 0.05  # it did train
    assert gaps["loss"] < 1e-5 and gaps["test_loss"] < 1e-5 and gaps["weights"] < 1e-4, gaps
    assert [e["test_acc"] for e in eval_one] == [e["test_acc"] for e in eval_two]


def test_ddp_ranks_stay_identical_and_only_rank_0_writes(ddp_runs):
    for name in ("whole", "resumed", "skip", "flat", "budget"):
        assert_same_tensors(_weights(ddp_runs, name, 0), _weights(ddp_runs, name, 1), name)
    # errors are each process's own to report (their cause may be local to it), progress is not
    rank1 = open(os.path.join(ddp_runs, "rank1.log")).read().splitlines()
    assert [line.split(";")[0] for line in rank1] == ["error: non-finite loss nan near step 12"]
    assert json.load(open(os.path.join(ddp_runs, "skip", "summary.json")))["skipped"] == 1
    assert load_ckpt(os.path.join(ddp_runs, "stop"))["step"] == 8
    assert 3 < json.load(open(os.path.join(ddp_runs, "budget", "summary.json")))["steps"] < 4000


def test_ddp_run_interrupted_on_one_rank_resumes_to_identical_weights(ddp_runs):
    """SIGINT reached rank 1 only; both ranks stopped at the same step, the checkpoint holds both
    ranks' random streams, and 2 processes resumed to the weights of the run left alone."""
    cut = torch.load(os.path.join(ddp_runs, "cut.ckpt.pt"), weights_only=True)
    assert cut["step"] == 6 and len(cut["rng"]) == 2 and not torch.equal(*(r["torch"] for r in cut["rng"]))
    assert_same_training(os.path.join(ddp_runs, "whole"), os.path.join(ddp_runs, "cut"))
    assert_same_tensors(_weights(ddp_runs, "whole", 1), _weights(ddp_runs, "resumed", 1))
