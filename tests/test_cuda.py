"""What a GPU machine must check, skipped without one: no host syncs inside training steps, the
Triton kernels against their references on the device, compiled against eager losses, and no
recompiles after the warm-up. bench/gpu_check.py runs this module first."""
import pytest
import torch
from torch._dynamo.utils import counters

import common
import speedrun as S
from kernels import parity

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a usable CUDA device (torch.cuda.is_available() is "
                                        "False here)")]

DEVICE = "cuda"
SMALL = dict(batch_size=64, device=DEVICE, time_budget=0.0, log_every=10)
# what the training steps of the variants differ in: the paper's model, two CLS tokens at width
# 96, low-rank queries (fused into the attention kernel), LSA's mask and temperature, dropped tokens
STEP_VARIANTS = {"baseline": {}, "mcls": {}, "mla-q": {}, "lsa": {},
                 "token-drop": {"token_keep": 0.25, "full_token_tail": 0.1}}


def trainer(name, **overrides):
    variant = "mcls" if name == "token-drop" else name
    cfg = S.resolve_config(variant, **{**SMALL, **STEP_VARIANTS[name], **overrides})
    return S.Trainer(cfg, common.load_data(n_train=512), torch.device(cfg.device))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("name", list(STEP_VARIANTS))
def test_training_steps_never_wait_for_the_device(name):
    """Whole steps under sync debug mode 'error': any device->host copy or sync raises."""
    t = trainer(name, compile="off")
    keep = t.cfg.token_keep
    t.step(0, token_keep=keep)  # one-off initialisation (cuBLAS handles, Triton builds)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    for s in range(1, 4):
        t.step(s, token_keep=keep if s < 3 else 1.0)
    torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_kernels_match_their_references_on_the_device():
    rows = parity.sweep("cuda")
    bad = [r for r in rows if not r["ok"]]
    assert len(rows) > 100 and not bad, bad


def test_compiled_and_eager_losses_agree():
    """The same seed, 5 steps: Inductor's fused bf16 code rounds differently, not more. (Not with
    dropped tokens or drop-path: compiled code draws its random numbers another way.)"""
    losses = {}
    for mode in ("off", "on"):
        torch._dynamo.reset()
        t = trainer("mcls", compile=mode, drop_path=0.0)
        sums = []
        for s in range(5):
            t.step(s)
            sums.append(t.loss_sum.item())  # the losses summed so far
        losses[mode] = sums
    assert losses["on"] == pytest.approx(losses["off"], rel=2e-2)


def test_a_compiled_step_can_come_first_in_a_process():
    """The trainer builds the augmentation's constants for torch.device("cuda"); the compiled step
    reads them for the batch's device, cuda:0. Both must be one entry, or the graph builds them
    under tracing (torch 2.11's Dynamo refused to, on an H200, when no eager step came first)."""
    import data_gpu
    data_gpu._CONSTS.clear()
    t = trainer("mcls", compile="on")
    t.step(0)
    assert all(key[0].index is not None for key in data_gpu._CONSTS)


def test_no_recompiles_after_warm_up():
    """prepare() builds training at both token shares and evaluation (and records the steps as
    CUDA graphs); the run then builds nothing."""
    t = trainer("token-drop", compile="on")
    t.prepare({0.25, 1.0})
    graphs = counters["stats"]["unique_graphs"]
    for s in range(3):
        t.step(s, token_keep=0.25)
    t.evaluate()
    for s in range(3, 6):
        t.step(s, token_keep=1.0)
    t.evaluate()
    assert counters["stats"]["unique_graphs"] == graphs and graphs >= 3
