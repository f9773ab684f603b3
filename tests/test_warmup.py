"""Compiled runs: every graph is built once by Trainer.prepare, before the budget's clock starts,
with static shapes; the compile costs the run no steps and no budget."""
import json

import pytest
import torch

import data_gpu
import speedrun as S

pytestmark = pytest.mark.usefixtures("one_thread")


class GraphCounter:
    """A torch.compile backend that runs Dynamo's graphs eagerly (no C++ build) and keeps, per
    graph, whether any input size is symbolic (a dynamic graph, which guards loosely and whose
    next guard failure recompiles)."""

    def __init__(self):
        self.dynamic = []

    def __call__(self, gm, example_inputs):
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        sizes = [d for v in values if isinstance(v, torch.Tensor) for d in v.shape] + values
        self.dynamic.append(any(isinstance(d, (torch.SymInt, torch.SymFloat)) for d in sizes))
        return gm.forward

    @property
    def frame_count(self):
        return len(self.dynamic)


def tiny(tiny_cifar, out, **overrides):
    # 80 training images, 10 steps of 8 an epoch, 20 of them in all; 20 test images
    values = dict(width=32, depth=1, heads=2, patch_size=8, batch_size=8, passes_per_epoch=1,
                  epochs=2.0, warmup_epochs=0.5, log_every=5, autoaugment=False, mix_prob=0.0,
                  precision="fp32", device="cpu", data=tiny_cifar, out=str(out))
    return S.resolve_config("cpu-speedrun", **{**values, **overrides})


def test_compiled_run_builds_three_graphs_before_timing_and_never_recompiles(tiny_cifar, tmp_path,
                                                                            monkeypatch):
    """train (a quarter of the tokens) -> eval -> full-token tail -> eval, with flip TTA and a
    padded last eval batch: training at each token share and evaluation are the only graphs,
    all built by the warm-up."""
    counter = GraphCounter()
    monkeypatch.setitem(S.COMPILE, "backend", counter)
    after_warm_up = []
    prepare = S.Trainer.prepare
    monkeypatch.setattr(S.Trainer, "prepare", lambda self, *a, **k: (
        prepare(self, *a, **k), after_warm_up.append(counter.frame_count))[0])
    evaluations = []
    evaluate = S.Trainer.evaluate
    monkeypatch.setattr(S.Trainer, "evaluate", lambda self, *a, **k: (
        evaluations.append(counter.frame_count), evaluate(self, *a, **k))[1])
    torch._dynamo.reset()
    try:
        cfg = tiny(tiny_cifar, tmp_path / "run", compile="on", token_keep=0.25, full_token_tail=0.3,
                   full_token_ramp=0, eval_every=0.5)
        summary = S.train(cfg)
    finally:
        torch._dynamo.reset()
    records = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [5, 10, 15, 20]
    assert summary["steps"] == 20 and summary["compiled"]
    assert after_warm_up == [3] and counter.dynamic == [False] * 3
    # the warm-up's evaluation follows its training steps; every later one (the budget's timed
    # batch included) finds all three graphs built
    assert evaluations[0] == 2 and len(evaluations) > 5 and set(evaluations[1:]) == {3}


def test_compiled_ramp_builds_a_graph_per_token_share_before_timing(tiny_cifar, tmp_path,
                                                                    monkeypatch):
    """The rising token share (a quarter of 16 tokens, up an eighth at a time over half the run,
    then all): the warm-up builds the step at each of the 7 shares and evaluation, and training
    at every share then finds its graph (8 graphs in all, none built after the warm-up)."""
    counter = GraphCounter()
    monkeypatch.setitem(S.COMPILE, "backend", counter)
    after_warm_up, keeps = [], []
    prepare, step = S.Trainer.prepare, S.Trainer.step
    monkeypatch.setattr(S.Trainer, "prepare", lambda self, *a, **k: (
        prepare(self, *a, **k), after_warm_up.append(counter.frame_count))[0])
    monkeypatch.setattr(S.Trainer, "step", lambda self, s, share=0.0, token_keep=None, *a, **k: (
        keeps.append((token_keep, counter.frame_count)), step(self, s, share, token_keep, *a, **k))[1])
    torch._dynamo.reset()
    try:
        cfg = tiny(tiny_cifar, tmp_path / "run", compile="on", token_keep=0.25, full_token_ramp=0.5,
                   full_token_tail=0.25, epochs=4.0, eval_every=0)
        levels = S.keep_levels(cfg)
        summary = S.train(cfg)
    finally:
        torch._dynamo.reset()
    assert levels == [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
    assert summary["steps"] == 40 and summary["compiled"]
    assert after_warm_up == [len(levels) + 1] and counter.dynamic == [False] * (len(levels) + 1)
    trained = keeps[len(levels):]  # after the warm-up's one step per share
    assert sorted({k for k, _ in trained}) == levels  # every share trained ...
    assert {built for _, built in trained} == {len(levels) + 1}  # ... on a graph built before


def test_compiled_evaluation_pads_its_last_batch_to_one_shape(tiny_cifar, tmp_path, monkeypatch):
    """20 test images in batches of 8: the last batch of 4 is padded to 8 and its padding
    dropped, so one graph serves and the figures equal an uncompiled evaluation's."""
    counter = GraphCounter()
    monkeypatch.setitem(S.COMPILE, "backend", counter)
    data = data_gpu.load_cifar10(tiny_cifar, log=lambda *a, **k: None)
    results = {}
    torch._dynamo.reset()
    try:
        for mode in ("off", "on"):
            trainer = S.Trainer(tiny(tiny_cifar, tmp_path, compile=mode, tta_flip=True), data,
                                torch.device("cpu"))
            results[mode] = trainer.evaluate(batch_size=8)
    finally:
        torch._dynamo.reset()
    assert counter.dynamic == [False]
    assert results["on"]["test_acc"] == results["off"]["test_acc"]
    assert results["on"]["test_loss"] == pytest.approx(results["off"]["test_loss"], rel=1e-6)


def test_compiling_costs_no_steps_and_no_budget(tiny_cifar, tmp_path, monkeypatch):
    """A fake clock on which building a graph costs 30 s (the first training step at each token
    share, the first evaluation) and nothing else but steps and evaluations moves: the warm-up
    pays for the graphs before the budget's clock starts, so a compiled run takes the steps, the
    time share and the losses of an uncompiled one, and its summary says where the time went."""
    now, built = [0.0], set()
    step, evaluate = S.Trainer.step, S.Trainer.evaluate

    def build(self, graph):
        if self.compiled and graph not in built:
            built.add(graph)
            now[0] += 30.0

    def timed_step(self, s, share=0.0, token_keep=None, skip_nonfinite=False):
        build(self, ("train", token_keep))
        now[0] += 0.25 * token_keep  # binary fractions: sums exact from any start
        return step(self, s, share, token_keep, skip_nonfinite)

    def timed_evaluate(self, batch_size=None, limit=None):
        build(self, "eval")
        now[0] += 0.0625 * min(limit or 10 ** 9, self.data["test_x"].shape[0])
        return evaluate(self, batch_size, limit)

    monkeypatch.setattr(S.Trainer, "step", timed_step)
    monkeypatch.setattr(S.Trainer, "evaluate", timed_evaluate)
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # the clock holds its cost
    runs = {}
    for mode in ("off", "on"):
        now[0] = 0.0
        out = tmp_path / mode
        cfg = tiny(tiny_cifar, out, compile=mode, time_budget=40.0, epochs=1000.0, log_every=10,
                   token_keep=0.25, full_token_tail=0.25, full_token_ramp=0, tta_flip=False, whiten=False)
        summary = S.train(cfg, clock=lambda: now[0])
        losses = [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == "train"]
        runs[mode] = summary, losses
    (plain, plain_losses), (compiled, compiled_losses) = runs["off"], runs["on"]
    assert len(built) == 3 and compiled["compiled"] and not plain["compiled"]
    assert plain["warmup_s"] == 0.0 and compiled["warmup_s"] >= 90.0
    assert compiled["steps"] == plain["steps"] > 300  # the budget ends both, not the epochs
    assert compiled["timed_s"] == plain["timed_s"] == plain["total_s"]
    assert 40.0 - 3.0 < compiled["timed_s"] <= 40.0
    assert compiled_losses == plain_losses
