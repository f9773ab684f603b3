"""Same seed, same curve: the losses that three short runs log, held against a record taken
before the trainer was restructured (issue 13), so a refactor that changes what is computed
fails here. Record anew only for a deliberate change of behaviour:

    python tests/test_golden.py --record

On the recording machine the runs matched the record bit for bit; the tolerance below only
allows for another CPU's fp32 kernels summing in another order.
"""
import json
import os
import signal
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import speedrun as S  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_losses.json")
SHARED_ARCHIVE = os.path.join(os.path.dirname(GOLDEN), "..", "..", "shared", "data",
                              "cifar-10-python.tar.gz")
TINY = dict(width=32, depth=2, heads=2, patch_size=8, batch_size=32, log_every=4,
            precision="fp32", device="cpu", compile="off", kernels="auto")


def curve(out) -> list:
    """What a run logged, without its timings: (kind, step, loss or accuracy) per record."""
    rows = []
    for line in open(os.path.join(out, "metrics.jsonl")):
        r = json.loads(line)
        if r["kind"] == "train":
            rows.append(["train", r["step"], r["loss"]])
        elif r["kind"] == "eval":
            rows.append(["eval", r["step"], r["test_acc"], r["test_loss"]])
        else:
            rows.append(["summary", r["steps"], r["test_acc"]])
    return rows


def fake_clock(patch):
    """A clock that only training steps (50 ms) and evaluations (0.5 s a call) move."""
    now = [0.0]
    step, evaluate = S.Trainer.step, S.Trainer.evaluate

    def timed_step(self, *a, **k):
        now[0] += 0.05
        return step(self, *a, **k)

    def timed_evaluate(self, *a, **k):
        now[0] += 0.5
        return evaluate(self, *a, **k)

    patch(S.Trainer, "step", timed_step)
    patch(S.Trainer, "evaluate", timed_evaluate)
    return lambda: now[0]


def run_baseline(archive, root, patch):
    out = os.path.join(root, "baseline")
    cfg = S.resolve_config("baseline", max_steps=24, eval_every=0.002, data=archive, out=out, **TINY)
    S.train(cfg)
    return curve(out)


def run_mcls_budget(archive, root, patch):
    out = os.path.join(root, "mcls")
    cfg = S.resolve_config("mcls", **{**TINY, "width": 32}, token_keep=0.25, full_token_tail=0.3,
                           time_budget=20.0, data=archive, out=out)
    S.train(cfg, clock=fake_clock(patch))
    return curve(out)


def run_resumed(archive, root, patch):
    """Baseline, stopped by SIGINT after step 10, then resumed to step 20."""
    out = os.path.join(root, "resumed")
    argv = ["--data", archive, "--out", out, "--max-steps", "20", "--eval-every", "0.002"] + \
        [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    step = S.Trainer.step

    def interrupting_step(self, s, *a, **k):
        loss = step(self, s, *a, **k)
        if s == 9:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    patch(S.Trainer, "step", interrupting_step)
    assert S.main(argv) == 0
    patch(S.Trainer, "step", step)
    assert S.main(["--resume", out]) == 0
    return curve(out)


RUNS = {"baseline": run_baseline, "mcls-token-drop-budget": run_mcls_budget,
        "baseline-resumed": run_resumed}


def assert_same_curve(got, want):
    assert [r[:2] for r in got] == [r[:2] for r in want]  # same records at the same steps
    for g, w in zip(got, want):
        assert g[2:] == pytest.approx(w[2:], rel=1e-3, abs=0.05 if g[0] != "train" else 1e-6), g


@pytest.mark.parametrize("name", RUNS)
def test_same_seed_gives_the_recorded_curve(name, real_archive, tmp_path, monkeypatch, one_thread):
    want = json.load(open(GOLDEN))[name]
    assert_same_curve(RUNS[name](real_archive, str(tmp_path), monkeypatch.setattr), want)


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    torch.set_num_threads(1)
    record = {}
    with tempfile.TemporaryDirectory() as root:
        for name, run in RUNS.items():
            saved = []
            record[name] = run(SHARED_ARCHIVE, root,
                               lambda obj, attr, value: (saved.append((obj, attr, getattr(obj, attr))),
                                                         setattr(obj, attr, value)))
            for obj, attr, value in reversed(saved):
                setattr(obj, attr, value)
    with open(GOLDEN, "w") as f:
        json.dump(record, f, indent=1)
    print({k: len(v) for k, v in record.items()})
