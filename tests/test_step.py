"""The training step as one device-side function (issue 15): compiled whole, identical to the
eager step, free of graph breaks, rehearsed without a trace, and still training when recording
it as a CUDA graph fails. Compiles use the aot_eager backend (Dynamo and AOTAutograd, eager
kernels): it checks the whole capture in seconds, where Inductor's C++ build takes minutes on
two cores; Inductor's own parity is measured in bench/README.md."""
import re

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import speedrun as S

TINY = dict(width=32, depth=1, heads=2, patch_size=8, batch_size=16, device="cpu",
            precision="fp32", drop_path=0.0)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return {"train_x": torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g),
            "train_y": torch.randint(0, 10, (64,), generator=g),
            "test_x": torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g),
            "test_y": torch.randint(0, 10, (20,), generator=g)}


@pytest.fixture
def cheap_compile(monkeypatch):
    monkeypatch.setitem(S.COMPILE, "backend", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def run(data, steps, compile="off", prepare=False, **overrides):
    """Per-step losses and the final weights of a run keeping half the tokens for the first half
    of its steps (so both of the step's graphs are used)."""
    cfg = S.resolve_config("baseline", **{**TINY, **overrides}, compile=compile, token_keep=0.5)
    trainer = S.Trainer(cfg, data, torch.device("cpu"))
    if prepare:
        trainer.prepare({0.5, 1.0})
    losses = []
    for s in range(steps):
        before = trainer.loss_sum.item()
        trainer.step(s, token_keep=0.5 if s < steps // 2 else 1.0)
        losses.append(trainer.loss_sum.item() - before)
    assert trainer.step_t.item() == steps  # the device's counter kept pace with the host's
    return losses, [p.detach().clone() for p in trainer.model.parameters()]


def test_compiled_whole_step_matches_eager_over_50_steps(data, cheap_compile, one_thread):
    """AutoAugment, erasing and mixing on; the compiled step draws the very same randomness."""
    eager, _ = run(data, 50)
    compiled, _ = run(data, 50, compile="on")
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    assert compiled != pytest.approx(compiled[:1] * 50)  # it trained: the losses moved


def test_whole_step_compiles_without_graph_breaks(data, cheap_compile, one_thread):
    """Data, augmentation, mixing, forward and loss trace as one graph per token share."""
    run(data, 4, compile="on")
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2  # token share 0.5 and 1.0


def test_rehearsal_leaves_no_trace(data, cheap_compile, one_thread):
    """prepare() compiles by running steps; the run then is the run that never rehearsed."""
    direct, weights = run(data, 6, compile="on")
    rehearsed, rehearsed_weights = run(data, 6, compile="on", prepare=True)
    assert rehearsed == direct
    assert all(torch.equal(a, b) for a, b in zip(weights, rehearsed_weights))


def test_failed_graph_recording_warns_and_trains_on(data, cheap_compile, one_thread, monkeypatch,
                                                    capsys):
    """On CPU recording a CUDA graph must fail (no CUDA streams): one warning line, no graphs,
    and the compiled, unrecorded step trains as it would have."""
    monkeypatch.setattr(S.Trainer, "records_graphs", lambda self, skip_nonfinite: True)
    direct, _ = run(data, 4, compile="on")
    recorded, _ = run(data, 4, compile="on", prepare=True)
    # torch's own log lines ("W1202 12:00:00 ..."; its first compile in a process writes one)
    err = [l for l in capsys.readouterr().err.strip().splitlines() if not re.match(r"[IWE]\d{4} ", l)]
    assert len(err) == 1 and err[0].startswith("warning: recording the step as a CUDA graph failed")
    assert recorded == direct


def test_lion_is_the_papers_update():
    """Foreach Lion with a tensor lr against the update written out per parameter."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    ref = [p.detach().clone() for p in params]
    momenta = [torch.zeros_like(p) for p in ref]
    lr, wd, (b1, b2) = torch.tensor(0.01), 0.5, (0.9, 0.99)
    opt = S.Lion([{"params": params, "weight_decay": wd}], lr=lr)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ref]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, (p, m, g) in enumerate(zip(ref, momenta, grads)):
            update = (b1 * m + (1 - b1) * g).sign()
            ref[i] = p * (1 - lr * wd) - lr * update
            momenta[i] = b2 * m + (1 - b2) * g
    assert all(torch.allclose(p, r, atol=1e-6) for p, r in zip(params, ref))


def test_muon_orthogonalises_the_matrices_and_runs_adamw_on_the_rest():
    """Its AdamW part is torch's AdamW; its matrices move by lr * 0.2 * sqrt(max dim) * an update
    whose singular values Newton-Schulz has pushed near 1, after Nesterov momentum."""
    torch.manual_seed(0)
    matrix, tall, bias = (torch.nn.Parameter(torch.randn(*s)) for s in ((8, 24), (24, 8), (8,)))
    twin = torch.nn.Parameter(bias.detach().clone())
    lr, wd, mom = torch.tensor(0.01), 0.1, 0.95
    opt = S.Muon([{"params": [matrix, tall, bias], "weight_decay": wd}], lr=lr,
                 orthogonalised=[matrix, tall], momentum=mom)
    adamw = torch.optim.AdamW([twin], lr=0.01, weight_decay=wd)
    momenta = [torch.zeros_like(matrix), torch.zeros_like(tall)]
    for _ in range(3):
        before = [matrix.detach().clone(), tall.detach().clone()]
        grads = [torch.randn_like(p) for p in (matrix, tall, bias)]
        for p, g in zip((matrix, tall, bias), grads):
            p.grad = g.clone()
        twin.grad = grads[2].clone()
        opt.step()
        adamw.step()
        assert torch.allclose(bias, twin, atol=1e-6)
        # the wide matrix and the tall one (orthogonalised as its transpose, in one batch)
        for i, p in enumerate((matrix, tall)):
            momenta[i] = mom * momenta[i] + (1 - mom) * grads[i]
            nesterov = (1 - mom) * grads[i] + mom * momenta[i]
            step = (before[i] * (1 - lr * wd) - p.detach()) / (lr * 0.2 * 24 ** 0.5)
            sv = torch.linalg.svdvals(step)
            assert sv.min() > 0.6 and sv.max() < 1.25  # orthogonal, roughly
            # the direction of the polar factor of the Nesterov update
            u, _, vh = torch.linalg.svd(nesterov, full_matrices=False)
            assert torch.nn.functional.cosine_similarity(step.flatten(), (u @ vh).flatten(), 0) > 0.95


def test_muon_orthogonalises_q_k_and_v_each_on_its_own():
    """Attention's q, k and v share one Linear; Muon takes them as the three maps they are: each
    block of the first update points along its own gradient block's polar factor (cosine >= 0.98;
    the stack orthogonalised as one matrix gives 0.86-0.89)."""
    torch.manual_seed(0)
    start, grad = torch.randn(24, 8), torch.randn(24, 8)
    cosines = {}
    for stacked in (True, False):
        qkv = torch.nn.Parameter(start.clone())
        opt = S.Muon([{"params": [qkv], "weight_decay": 0.0}], lr=torch.tensor(0.01),
                     orthogonalised=[qkv], stacked=[(qkv, 3)] if stacked else [])
        qkv.grad = grad.clone()
        opt.step()
        cosines[stacked] = []
        for block, g in zip((start - qkv.detach()).chunk(3), grad.chunk(3)):
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            cosines[stacked].append(
                torch.nn.functional.cosine_similarity(block.flatten(), (u @ vh).flatten(), 0))
    assert min(cosines[True]) > 0.98 and max(cosines[False]) < 0.95
    cfg = S.resolve_config("cpu-speedrun", device="cpu")
    opt = S.make_optimizer(S.build_model(cfg), cfg, torch.device("cpu"))
    assert sorted(opt.stacked.values()) == [3] * cfg.depth


def test_newton_schulz_pushes_a_gradients_spread_of_singular_values_near_one():
    """A gradient's singular values span decades; after the five steps most of them sit near 1
    (the fixed quintic of Jordan et al. 2024 left the median at 0.74), none above 1.2, and
    the result is nearer the exact polar factor (cosine 0.89-0.90; the quintic 0.85-0.86)."""
    torch.manual_seed(0)
    stack = []
    for _ in range(3):
        u = torch.linalg.qr(torch.randn(64, 64))[0]
        v = torch.linalg.qr(torch.randn(192, 64))[0]
        stack.append((u * torch.logspace(0, -4, 64)) @ v.T)
    G = torch.stack(stack)
    u, _, vh = torch.linalg.svd(G, full_matrices=False)
    polar = u @ vh
    for dtype in (torch.float32, torch.bfloat16):
        X = S.newton_schulz(G.to(dtype)).float()
        sv = torch.linalg.svdvals(X)
        assert sv.median() > 0.85 and sv.max() < 1.2, (dtype, sv.median(), sv.max())
        assert torch.nn.functional.cosine_similarity(X.flatten(1), polar.flatten(1)).min() > 0.87


def test_learning_rate_is_computed_on_the_device_from_the_counter(data):
    """The lr the step used is lr_at(the step's progress), as the host logs it."""
    cfg = S.resolve_config("baseline", **TINY, max_steps=10, warmup_epochs=30)
    trainer = S.Trainer(cfg, data, torch.device("cpu"))
    for s in range(10):
        trainer.step(s)
        assert trainer.lr_t.item() == pytest.approx(S.lr_at((s + 1) / 10, cfg), rel=1e-6)
    trainer.step(3, share=0.95)  # a time budget running ahead of the steps
    assert trainer.lr_t.item() == pytest.approx(S.lr_at(0.95, cfg), rel=1e-6)
