"""The trainer: config and variants, model layout, schedule, CLI errors, one real run."""
import json
import os
import platform
import resource
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import speedrun as S


def expected_params(cfg: S.Config) -> int:
    """Parameter count from the layout in REFERENCE.md, written out by hand."""
    w, h, p = cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.patch_size
    tokens = 1024 // (p * p)
    proj = {n: (w * cfg.latent_dim + cfg.latent_dim * w + w) if n in cfg.mla else (w * w + w)
            for n in "qkv"}
    block = 4 * w + sum(proj.values()) + (w * w + w) + (w * h + h + h * w + w) + int(cfg.lsa)
    # an appended class-attention block: dense q, k, v, the output and the patch projections
    appended = 4 * w + 5 * (w * w + w) + (w * h + h + h * w + w)
    if cfg.patch_embed == "spt":
        embed = 2 * 15 * p * p + 15 * p * p * w + w
    else:  # the conv's filters read the patch and --patch-context pixels around it
        k = p + 2 * cfg.patch_context
        embed = 3 * k * k * w + w
    pos = (cfg.num_cls + tokens) * w if cfg.pos_emb == "learned" else 0
    head_in = w * cfg.num_cls if cfg.pool == "cls" else w
    return embed + cfg.num_cls * w + pos + cfg.depth * block + cfg.depth_token_only * appended + \
        2 * w + head_in * 10 + 10


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_baseline_matches_reference_count():
    assert n_params(S.build_model(S.resolve_config("baseline"))) == 2_697_610


@pytest.mark.parametrize("name", list(S.VARIANTS))
def test_every_preset_builds_trains_and_counts(name):
    cfg = S.resolve_config(name)
    model = S.build_model(cfg)
    assert n_params(model) == expected_params(cfg)
    logits = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 10)
    opt = S.make_optimizer(model, cfg, torch.device("cpu"))
    S.soft_cross_entropy(logits, torch.eye(10)[:3], 0.1).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", [n for n, v in S.VARIANTS.items() if v.paper_acc is not None])
def test_paper_variants_default_to_the_paper_codes_choices(name):
    cfg = S.resolve_config(name)
    assert (cfg.decay_params, cfg.mix_partner, cfg.drop_last, cfg.whiten_from) == \
        ("all", "randperm", True, "augmented")
    assert cfg.repeat_aug == (3 if cfg.batch_size == 1024 else 1)  # its 4-GPU rows only
    assert S.data_gpu.steps_for(cfg.epochs, 256) == 58_500 and cfg.epochs == 100


def test_mcls_head_reads_two_cls_tokens():
    cfg = S.resolve_config("mcls")
    model = S.build_model(cfg)
    assert (cfg.width, cfg.heads, cfg.num_cls) == (96, 12, 2)
    assert model.cls_token.shape == (1, 2, 96) and model.head.in_features == 192


def test_presets_compose_and_flags_override():
    cfg = S.resolve_config("mcls,mla-q", lr=1e-3)
    assert (cfg.width, cfg.num_cls, cfg.mla, cfg.lr) == (96, 2, "q", 1e-3)
    assert S.resolve_config("mla-q,mla-kv").mla == "kv"  # later preset wins
    with pytest.raises(S.UsageError, match="did you mean mla-q"):
        S.resolve_config("mla-qq")


@pytest.mark.parametrize("mla", ["q", "k", "qk", "kv", "qkv"])
def test_mla_layout(mla):
    attn = S.build_model(S.resolve_config("mla-" + mla)).blocks[0].attn
    assert sorted(attn.low_rank) == sorted(mla)
    for m in attn.low_rank.values():
        assert m.down.weight.shape == (64, 192) and m.down.bias is None
        assert m.up.weight.shape == (192, 64) and m.up.bias.shape == (192,)
    dense = 3 - len(mla)
    assert (attn.qkv is None) if dense == 0 else attn.qkv.weight.shape == (192 * dense, 192)


def test_schedule_warmup_and_end_values():
    cfg = S.resolve_config("baseline")
    assert S.lr_at(0.0, cfg) == 0.0
    assert S.lr_at(0.05, cfg) == pytest.approx(cfg.lr / 2)
    assert S.lr_at(0.1, cfg) == pytest.approx(cfg.lr)
    assert S.lr_at(1.0, cfg) == pytest.approx(cfg.min_lr)
    assert S.lr_at(0.55, cfg) == pytest.approx((cfg.lr + cfg.min_lr) / 2)


def test_linear_decay_falls_in_a_straight_line_after_the_same_warmup():
    cosine = S.resolve_config("baseline")
    linear = S.resolve_config("baseline", lr_decay="linear")
    for p in (0.0, 0.05, 0.1, 0.55, 1.0):  # warm-up, peak, middle and end agree
        assert S.lr_at(p, linear) == pytest.approx(S.lr_at(p, cosine))
    quarter = linear.min_lr + 0.75 * (linear.lr - linear.min_lr)  # a quarter into the decay
    assert S.lr_at(0.325, linear) == pytest.approx(quarter)
    assert S.lr_at(0.325, cosine) > quarter * 1.1  # the cosine is still near its peak there


def test_soft_cross_entropy_equals_mixed_label_smoothing_ce():
    logits, ya, yb, lam = torch.randn(5, 10), torch.arange(5), torch.arange(5, 10), 0.3
    targets = lam * torch.eye(10)[ya] + (1 - lam) * torch.eye(10)[yb]
    ce = torch.nn.functional.cross_entropy
    want = lam * ce(logits, ya, label_smoothing=0.1) + (1 - lam) * ce(logits, yb, label_smoothing=0.1)
    assert S.soft_cross_entropy(logits, targets, 0.1).item() == pytest.approx(want.item(), rel=1e-6)


def test_sin_embedding_is_fixed():
    cfg = S.resolve_config("sin")
    model = S.build_model(cfg)
    assert "pos_embed" not in dict(model.named_parameters())
    before = model.pos_embed.clone()
    assert before[0, 0].abs().sum() == 0 and before[0, 1:].abs().sum() > 0  # CLS row is zero
    opt = S.make_optimizer(model, cfg, torch.device("cpu"))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert torch.equal(model.pos_embed, before)


def correlated_images(n=600):
    """Smooth random fields plus some noise, normalised: raw patches are far from white."""
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8), size=32, mode="bilinear")
    images = ((0.7 * smooth + 0.3 * torch.rand(n, 3, 32, 32)) * 255).round().to(torch.uint8)
    return S.data_gpu.normalize(images)


def test_whitened_filters_decorrelate_patches():
    images = correlated_images()
    model = S.build_model(S.resolve_config("whiten", whiten_from="raw"))
    S.whiten_patch_embed(model, images)
    with torch.no_grad():
        feats = model.patch_embed(images)[:, :48]  # (B, 48, 8, 8)
    feats = feats.permute(0, 2, 3, 1).reshape(-1, 48).double()
    cov = torch.cov(feats.T)
    assert torch.allclose(cov, torch.eye(48, dtype=torch.double), atol=0.05)


def test_overlapping_patch_filters_are_whitened_in_their_centre():
    """--patch-context 2: 8x8 filters at stride 4; whitening writes the same 4x4 filters into
    their centre, the context around them starting at zero, so the whitened outputs are those of
    plain patches."""
    images = correlated_images(200)
    plain = S.build_model(S.resolve_config("whiten", whiten_from="raw"))
    wide = S.build_model(S.resolve_config("whiten", whiten_from="raw", patch_context=2))
    assert wide.patch_embed.weight.shape[-2:] == (8, 8) and wide.patch_embed.stride == (4, 4)
    for model in (plain, wide):
        S.whiten_patch_embed(model, images)
    w = wide.patch_embed.weight[:48].detach()
    assert torch.equal(w[:, :, 2:6, 2:6], plain.patch_embed.weight[:48].detach())
    assert w.abs().sum() == w[:, :, 2:6, 2:6].abs().sum()  # nothing outside the centre
    with torch.no_grad():
        out = [m.patch_embed(images)[:, :48] - m.patch_embed.bias[:48, None, None]
               for m in (plain, wide)]
    assert out[1].shape == out[0].shape == (200, 48, 8, 8)
    assert torch.allclose(out[1], out[0], atol=1e-4)


def test_paper_whitening_takes_every_patch_uncentred_largest_eigenvalue_first():
    images = correlated_images(300)
    model = S.build_model(S.resolve_config("whiten"))
    S.whiten_patch_embed(model, images, every_patch=True)
    filters = model.patch_embed.weight[:48].detach().double()
    with torch.no_grad():  # every stride-1 patch (29 x 29 per image), no bias, no centring
        feats = F.conv2d(images.double(), filters).permute(0, 2, 3, 1).reshape(-1, 48)
    moment = feats.T @ feats / feats.shape[0]
    eigval = torch.linalg.eigvalsh(S.patch_covariance(images, 4, every_patch=True)).flip(0)
    assert torch.allclose(moment.diagonal(), eigval / (eigval + 5e-4), atol=1e-6)
    assert torch.allclose(moment, moment.diagonal().diag(), atol=1e-6)  # decorrelated
    gains = filters.flatten(1).norm(dim=1)
    assert (gains[1:] >= gains[:-1]).all()  # largest eigenvalue (smallest gain) first
    x = images[:3].double()  # the uncentred second moment of all stride-1 patches
    patches = x.unfold(2, 4, 1).unfold(3, 4, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 48)
    assert torch.allclose(S.patch_covariance(x, 4, every_patch=True),
                          patches.T @ patches / patches.shape[0])


def test_paper_whitening_reads_5120_augmented_training_images(tiny_cifar, one_thread):
    data = S.data_gpu.load_cifar10(tiny_cifar, log=lambda *a: None)
    small = dict(width=48, depth=1, heads=2, device="cpu", autoaugment=False,  # AA: slow on CPU
                 drop_last=False)  # 80 images: an epoch holds no whole batch
    trainer = S.Trainer(S.resolve_config("whiten", batch_size=1024, **small), data,
                        torch.device("cpu"))
    images = trainer.whitening_images()
    assert images.shape == (5120, 3, 32, 32)  # 5 batches: the first count over 5,000
    first = trainer.sampler.indices(0)
    plain = S.data_gpu.normalize(data["train_x"][first])
    assert not torch.allclose(images[:1024], plain)  # augmented, not raw
    raw = S.Trainer(S.resolve_config("whiten", whiten_from="raw", **small), data,
                    torch.device("cpu"))
    assert raw.whitening_images().equal(S.data_gpu.normalize(data["train_x"][:5000]))


def test_lsa_gives_no_attention_to_self():
    cfg = S.resolve_config("lsa")
    attn = S.build_model(cfg).blocks[0].attn
    assert isinstance(attn.scale, torch.nn.Parameter)
    assert attn.scale.item() == pytest.approx(16 ** -0.5)
    q, k = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16)
    v = torch.eye(7).expand(2, 3, 7, 7)  # output row i = attention weights of token i
    weights = S.kernels.attention(q, k, v, attn.scale, diag_mask=True)
    assert torch.all(weights.diagonal(dim1=-2, dim2=-1) == 0)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3, 7))


def test_spt_shapes_and_shifts():
    spt = S.ShiftedPatchTokenization(192, 4)
    img = torch.arange(2 * 3 * 32 * 32, dtype=torch.float).view(2, 3, 32, 32)
    assert spt(img).shape == (2, 64, 192)
    captured = {}
    spt.norm.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    spt(img)
    # token of patch (1, 1): channels 0-2 the image, then the 4 diagonal shifts by 2 pixels
    tok = captured["x"][0, 1 * 8 + 1].view(15, 4, 4)
    y, x = 4, 4
    assert torch.equal(tok[0:3], img[0, :, y:y + 4, x:x + 4])
    assert torch.equal(tok[3:6], img[0, :, y - 2:y + 2, x - 2:x + 2])    # shifted down-right
    assert torch.equal(tok[6:9], img[0, :, y - 2:y + 2, x + 2:x + 6])    # down-left
    assert torch.equal(tok[9:12], img[0, :, y + 2:y + 6, x - 2:x + 2])   # up-right
    assert torch.equal(tok[12:15], img[0, :, y + 2:y + 6, x + 2:x + 6])  # up-left
    corner = captured["x"][0, 0].view(15, 4, 4)
    assert torch.all(corner[3:6, :2, :] == 0)  # zero fill where the shift leaves the image


def test_cls_only_blocks_leave_patch_tokens_untouched():
    model = S.build_model(S.resolve_config("cls-only-last2")).eval()
    assert len(model.blocks) == 9 and model.blocks[6].num_query == 0
    x = torch.randn(2, 65, 192)
    for block in model.blocks[-2:]:
        y = block(x)
        assert torch.equal(y[:, 1:], x[:, 1:]) and not torch.allclose(y[:, :1], x[:, :1])


def test_depth_token_only_appends_the_paper_codes_class_attention_blocks():
    """The paper code's form, from its description: 9 self-attention blocks, then 2 appended
    blocks in which the CLS token attends to every token (query from the CLS token alone), each
    patch token passes through a projection of its own, then all tokens through the MLP."""
    torch.manual_seed(0)
    cfg = S.resolve_config("depth-token-only", drop_path=0.0)
    model = S.build_model(cfg).eval()
    assert len(model.blocks) == 11 and all(b.num_query == 0 for b in model.blocks[:9])
    block = model.blocks[9]
    x = torch.randn(2, 65, 192)
    h = F.layer_norm(x, (192,), block.norm1.weight, block.norm1.bias, 1e-6)
    q, k, v = F.linear(h, block.attn.qkv.weight, block.attn.qkv.bias).chunk(3, -1)
    heads = lambda t: t.view(2, -1, 12, 16).transpose(1, 2)
    attn = torch.softmax(heads(q[:, :1]) @ heads(k).transpose(-1, -2) / 4.0, -1) @ heads(v)
    cls = x[:, :1] + block.attn.proj(attn.transpose(1, 2).reshape(2, 1, 192))
    patches = x[:, 1:] + block.patch_proj(h[:, 1:])
    mid = torch.cat([cls, patches], 1)
    want = mid + block.mlp(F.layer_norm(mid, (192,), block.norm2.weight, block.norm2.bias, 1e-6))
    with torch.no_grad():
        got = block(x)
        assert torch.allclose(got, want, atol=1e-5)
        x2 = x.clone()
        x2[:, 5] += 1.0  # a patch token's update depends on that token alone; CLS's on all
        moved = (block(x2) - got).abs().amax(-1)[0]
    assert moved[5] > 0 and moved[0] > 0 and moved[1:5].max() == 0 and moved[6:].max() == 0
    # the drop-path rates of the code: appended block i takes block i's
    rates = [b.drop_path.p for b in S.build_model(S.resolve_config("depth-token-only")).blocks]
    assert rates[9:] == rates[:2]


def test_repeat_aug_copies_are_augmented_apart(tiny_cifar, one_thread):
    data = S.data_gpu.load_cifar10(tiny_cifar, log=lambda *a: None)
    cfg = S.resolve_config("baseline", repeat_aug=3, batch_size=12, mix_prob=0.0, width=32,
                           depth=1, heads=2, device="cpu")
    trainer = S.Trainer(cfg, data, torch.device("cpu"))
    idx = trainer.sampler.indices(0).view(4, 3)
    assert (idx == idx[:, :1]).all() and idx[:, 0].unique().numel() == 4  # 4 images, 3 copies
    x, _ = trainer.batch(0)
    copies = x.view(4, 3, -1)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert (copies[:, a] != copies[:, b]).any(-1).all()  # every copy augmented on its own


def test_a_run_trains_with_tf32_matmuls_and_puts_the_callers_setting_back(tiny_cifar, tmp_path,
                                                                         monkeypatch, one_thread):
    """TF32 is the trainer's choice for its own run; a caller in the same process (a benchmark's
    next part, the kernel sweep) must not inherit it."""
    seen, step = [], S.Trainer.step
    monkeypatch.setattr(S.Trainer, "step", lambda self, *a, **k: seen.append(
        torch.backends.cuda.matmul.allow_tf32) or step(self, *a, **k))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = S.resolve_config("baseline", max_steps=2, batch_size=8, width=32, depth=1, heads=2,
                           patch_size=8, device="cpu", data=tiny_cifar, out=str(tmp_path / "run"))
    S.train(cfg)
    assert seen == [True, True]
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_gap_head_reads_patch_mean():
    model = S.build_model(S.resolve_config("gap"))
    assert model.cls_token.shape[1] == 0 and model.head.in_features == 192


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        S.main(["--help"])
    text = capsys.readouterr().out
    for name, f in S.CONFIG_FIELDS.items():
        if f.metadata.get("cli", True):  # variant has --variant above; fitted_because is no flag
            assert "--" + name.replace("_", "-") in text
    assert "--variant" in text and "--fitted-because" not in text


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be in [1, inf) (got 0)"),
    (["--lr", "-1"], "--lr must be in [0, inf) (got -1.0)"),
    (["--crop-pad", "20"], "--crop-pad must be in [0, 16]"),
    (["--token-keep", "0"], "--token-keep must be in (0, 1]"),
    (["--full-token-tail", "1.5"], "--full-token-tail must be in [0, 1]"),
    (["--patch-context", "5"], "--patch-context must be in [0, --patch-size] (got 5; --patch-size is 4)"),
    (["--patch-context", "1", "--patch-embed", "spt"], "--patch-context widens conv patch filters"),
    (["--variant", "mcsl"], "did you mean mcls"),
    (["--repeat-aug", "0"], "--repeat-aug must be in [1, inf)"),
    (["--eval-every", "-1"], "--eval-every must be in [0, inf)"),
    (["--depth-token-only", "2", "--pool", "gap", "--num-cls", "0"], "need a CLS token"),
    (["--data", "/nonexistent/cifar.tar.gz"], "/nonexistent/cifar.tar.gz"),
    (["--eval-only"], "--eval-only needs --resume"),
    (["--resume", "/nonexistent/run"], "no checkpoint"),
])
def test_bad_input_is_one_line_exit_2(argv, message, capsys, tmp_path):
    assert S.main(argv + ["--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_build, why", [(None, "CPU-only build"), ("12.8", "driver is too old")])
def test_unusable_gpu_is_named_not_silently_skipped(cuda_build, why, monkeypatch, capsys, tmp_path):
    """/dev/nvidia0 exists but torch sees no CUDA device: auto says why before training on the
    CPU; --device cuda refuses in one line."""
    monkeypatch.setattr(S, "nvidia_device_files", lambda: ["/dev/nvidia0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert S.pick_device("auto") == torch.device("cpu")
    err = capsys.readouterr().err.strip()
    assert why in err and "install" in err and len(err.splitlines()) == 1
    assert S.main(["--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device cuda: ") and why in err and len(err.splitlines()) == 1
    monkeypatch.setattr(S, "nvidia_device_files", lambda: [])  # no GPU at all: nothing to say
    assert S.pick_device("auto") == torch.device("cpu") and capsys.readouterr().err == ""


def test_list_variants_shows_every_preset(capsys):
    assert S.main(["--list-variants"]) == 0
    out = capsys.readouterr().out
    for name in S.VARIANTS:
        assert f"| {name} |" in out
    assert "2,697,610" in out and "93.65" in out


def test_end_to_end_on_real_cifar(real_archive, tmp_path):
    """A few dozen steps on the real data: loss falls, accuracy clearly beats chance (10 %)."""
    out = tmp_path / "run"
    argv = ["--data", real_archive, "--out", str(out), "--max-steps", "60", "--batch-size", "64",
            "--width", "64", "--depth", "2", "--heads", "4", "--no-autoaugment", "--mix-prob", "0",
            "--erase-prob", "0", "--drop-path", "0", "--log-every", "10", "--warmup-epochs", "1",
            "--device", "cpu"]
    assert S.main(argv) == 0
    lines = [json.loads(l) for l in open(out / "metrics.jsonl")]
    train = [l["loss"] for l in lines if l["kind"] == "train"]
    summary = json.load(open(out / "summary.json"))
    assert train[-1] < train[0] - 0.1
    assert summary["steps"] == 60 and summary["test_acc"] > 20.0
    assert os.path.exists(out / "ckpt.pt") and json.load(open(out / "config.json"))["width"] == 64
    # a second start into the same folder is refused; --eval-only reports the checkpoint
    assert S.main(argv) == 2
    assert S.main(["--eval-only", "--resume", str(out), "--data", real_archive]) == 0


def test_time_budget_schedule_ends_at_the_budget(real_archive, tmp_path):
    """A fake clock that advances 50 ms per reading: the cosine reaches its end value exactly
    when the budget (less the final evaluation's reserve) runs out, long before the epochs do."""
    ticks = iter(range(10 ** 9))
    clock = lambda: next(ticks) * 0.05
    cfg = S.resolve_config("baseline", width=32, depth=1, heads=2, patch_size=8, batch_size=64,
                           time_budget=30.0, log_every=1, autoaugment=False, mix_prob=0.0, data=real_archive, out=str(tmp_path / "run"),
                           precision="fp32", device="cpu")
    summary = S.train(cfg, clock=clock)
    lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    lrs = [l["lr"] for l in lines if l["kind"] == "train"]
    assert 20 < summary["steps"] < 1000  # stopped by the budget, not by the 100 epochs
    assert lrs[-1] == pytest.approx(cfg.min_lr) and max(lrs) == pytest.approx(cfg.lr, rel=0.05)
    # the fake evaluation takes no time, so the run ends early by the time reserved for it
    assert 15.0 < summary["total_s"] <= 30.0


def fake_clock(monkeypatch, step_s, eval_s_per_image):
    """A clock that only training steps (step_s(token_keep) seconds each) and evaluations
    (eval_s_per_image per image) move; returns it as a one-item list [now]."""
    now = [0.0]
    step, evaluate = S.Trainer.step, S.Trainer.evaluate

    def timed_step(self, *args, token_keep=None, **kwargs):
        now[0] += step_s(token_keep)
        return step(self, *args, token_keep=token_keep, **kwargs)

    def timed_evaluate(self, batch_size=1000, limit=None):
        now[0] += eval_s_per_image * min(limit or 10 ** 9, self.data["test_x"].shape[0])
        return evaluate(self, batch_size, limit)

    monkeypatch.setattr(S.Trainer, "step", timed_step)
    monkeypatch.setattr(S.Trainer, "evaluate", timed_evaluate)
    return now


def test_the_evaluation_is_predicted_from_the_faster_of_two_timings_of_its_first_batch():
    # one timing of the eval batch is 2-3x slow now and then; the slow one must not set the
    # reserve (it kept up to 36 s for a 12 s evaluation), and a slow second one must not either
    now, limits = [0.0], []
    for seconds in ([3.0, 1.0], [1.0, 2.5]):
        pending = list(seconds)

        def evaluate(limit):
            limits.append(limit)
            now[0] += pending.pop(0)

        trainer = SimpleNamespace(dist=SimpleNamespace(world_size=1), eval_batch=1000,
                                  data={"test_x": torch.zeros(10_000, 1)}, evaluate=evaluate)
        assert S.Trainer.time_eval(trainer, clock=lambda: now[0]) == pytest.approx(10.0)
        assert not pending
    assert limits == [1000] * 4


def test_time_budget_keeps_what_the_final_evaluation_takes(real_archive, tmp_path, monkeypatch):
    """The final evaluation's reserve comes from timing one eval batch. On a fake clock a training
    step takes 50 ms and the evaluation 2 ms per image, 20 s for the test set (far more than a
    training step predicts): the run ends inside the budget, and close to it."""
    now = fake_clock(monkeypatch, step_s=lambda keep: 0.05, eval_s_per_image=0.002)
    cfg = S.resolve_config("baseline", width=32, depth=1, heads=2, patch_size=8, batch_size=64,
                           time_budget=60.0, log_every=5, autoaugment=False, mix_prob=0.0,
                           data=real_archive, out=str(tmp_path / "run"), precision="fp32", device="cpu")
    summary = S.train(cfg, clock=lambda: now[0])
    assert 60.0 - 3.0 < summary["total_s"] <= 60.0


@pytest.mark.parametrize("flags, device, want", [
    ({"amx_bf16", "amx_tile"}, "cpu", torch.bfloat16),
    ({"avx512_bf16"}, "cpu", torch.bfloat16),
    ({"avx2", "avx512f"}, "cpu", None),   # no bf16 units: bf16 would be emulated, slower
    (set(), "cuda", torch.bfloat16),
])
def test_precision_follows_the_hardware(flags, device, want):
    assert S.pick_precision("auto", torch.device(device), cpu_flags=flags) is want
    assert S.pick_precision("fp32", torch.device(device), cpu_flags=flags) is None


FAULT_COUNT = """
import ctypes, resource, sys
sys.path.insert(0, sys.argv[1])
import speedrun

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 2 << 20

def faults():  # minor page faults over 20 rounds of what a step asks of malloc: 8 blocks of 2 MiB
    def round_():  # written, as activations are, then freed
        blocks = [libc.malloc(SIZE) for _ in range(8)]
        for b in blocks:
            ctypes.memset(b, 1, SIZE)
        for b in blocks:
            libc.free(b)
    round_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        round_()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = faults()
print(plain, speedrun.keep_freed_memory(), faults())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_kept_so_a_step_does_not_fault_its_pages_in_again():
    """In a fresh process (mallopt is process-wide): glibc alone gives the 20 rounds' 80 MiB back
    to the kernel and faults nearly every page in again; after keep_freed_memory, none. The blocks
    come from malloc itself, as torch's CPU allocator takes them: tensors would also put their
    small objects on the heap, above the blocks or not as it happens, and how much glibc can
    trim would depend on that (torch.ones rounds faulted 81,216 pages one day, 8,559 another)."""
    done = subprocess.run([sys.executable, "-c", FAULT_COUNT, os.path.dirname(S.__file__)], capture_output=True, text=True,
                          check=True)
    plain, kept, after = done.stdout.split()
    pages = 20 * 8 * (2 << 20) // resource.getpagesize()
    assert kept == "True" and int(plain) > pages // 2 and int(after) < pages // 100


@pytest.mark.parametrize("optimizer", ["adamw", "lion", "muon"])
def test_optimizers_decay_what_decay_params_says_and_adamw_is_fused_on_cpu(optimizer):
    cfg = S.resolve_config("baseline", width=32, depth=1, heads=2, optimizer=optimizer)
    model = S.build_model(cfg)
    # the paper's code: AdamW(model.parameters(), weight_decay=0.05), every parameter decays
    group, free = S.make_optimizer(model, S.dataclasses.replace(cfg, decay_params="all"),
                                   torch.device("cpu")).param_groups
    assert group["weight_decay"] == 0.05 and len(group["params"]) == len(list(model.parameters()))
    assert free["params"] == []  # kept, empty: checkpoints hold two groups
    opt = S.make_optimizer(model, S.dataclasses.replace(cfg, decay_params="matrices"),
                           torch.device("cpu"))
    decay, free = opt.param_groups
    assert decay["weight_decay"] == 0.05 and free["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and model.cls_token in free["params"]
    assert S.resolve_config("cpu-speedrun").decay_params == "matrices"
    if optimizer == "muon":  # the blocks' matrices only: not the patch embedding, not the head
        ortho = {id(p) for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
        assert opt.orthogonalised == ortho and id(model.head.weight) not in ortho
    if optimizer == "adamw":
        assert opt.defaults["fused"]  # one update kernel: ~5x faster than foreach on CPU
    if optimizer != "lion":
        before = [p.detach().clone() for p in model.parameters()]
        model(torch.randn(2, 3, 32, 32)).square().sum().backward()
        opt.step()
        assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_flip_tta_scores_a_mirrored_test_set_alike():
    """With --tta-flip an image and its mirror get the same averaged logits, so mirroring the
    whole test set changes nothing; without it the (asymmetric, random) model's scores move."""
    g = torch.Generator().manual_seed(0)
    data = {"train_x": torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g),
            "train_y": torch.randint(0, 10, (64,), generator=g),
            "test_x": torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g),
            "test_y": torch.randint(0, 10, (40,), generator=g)}
    mirrored = dict(data, test_x=data["test_x"].flip(-1))
    results = {}
    for tta in (False, True):
        cfg = S.resolve_config("baseline", width=32, depth=1, heads=2, batch_size=16,
                               precision="fp32", tta_flip=tta)
        trainer = S.Trainer(cfg, data, torch.device("cpu"))
        plain = trainer.evaluate(batch_size=16)
        trainer.data = mirrored
        results[tta] = (plain, trainer.evaluate(batch_size=16))
    assert results[True][0] == results[True][1]
    assert results[False][0]["test_loss"] != results[False][1]["test_loss"]


@pytest.mark.parametrize("crop_pad", [0, 4])
def test_crop_pad_reaches_the_batches(crop_pad):
    """--crop-pad 0: every training image is the original or its mirror; 4: some are shifted."""
    g = torch.Generator().manual_seed(0)
    data = {"train_x": torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g),
            "train_y": torch.randint(0, 10, (64,), generator=g),
            "test_x": torch.zeros(8, 3, 32, 32, dtype=torch.uint8),
            "test_y": torch.zeros(8, dtype=torch.int64)}
    cfg = S.resolve_config("cpu-speedrun", width=32, depth=1, heads=2, batch_size=32,
                           crop_pad=crop_pad, whiten=False)
    trainer = S.Trainer(cfg, data, torch.device("cpu"))
    x, _ = trainer.batch(0)
    originals = S.data_gpu.normalize(data["train_x"][trainer.sampler.indices(0)])
    unshifted = [torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(x, originals)]
    assert all(unshifted) if crop_pad == 0 else not all(unshifted)


@pytest.mark.parametrize("patch_embed, context", [("conv", 0), ("conv", 2), ("spt", 0)])
def test_token_keep_drops_patch_tokens_in_training_only(patch_embed, context):
    """--token-keep 0.5: the blocks see the CLS tokens and 32 of the 64 patch tokens while
    training, different ones per image; evaluation sees every token, as with --token-keep 1.
    (The conv embeds only the kept patches, from their windows when they overlap; SPT embeds all
    and then draws: same tokens.)"""
    torch.manual_seed(0)
    small = dict(num_cls=2, width=32, heads=2, depth=1, patch_embed=patch_embed,
                 patch_context=context,
                 whiten=patch_embed == "conv")  # whitening sets conv filters: SPT has none
    full = S.build_model(S.resolve_config("cpu-speedrun", **small))
    half = S.build_model(S.resolve_config("cpu-speedrun", **small))
    half.load_state_dict(full.state_dict())
    x = torch.randn(4, 3, 32, 32)
    seen = []
    half.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    half.train()(x, token_keep=0.5)
    tokens = seen[0]
    assert tokens.shape == (4, 2 + 32, 32)
    embedded = full.eval().patch_tokens(x)
    dist = torch.cdist(tokens[:, 2:], embedded, compute_mode="donot_use_mm_for_euclid_dist")
    # each kept token is one of this image's own embedded patches
    assert torch.allclose(dist.min(-1).values, torch.zeros(4, 32), atol=1e-5)
    kept = [set(d.argmin(-1).tolist()) for d in dist]
    assert all(len(k) == 32 for k in kept) and len({frozenset(k) for k in kept}) > 1
    full.eval(), half.eval()
    assert torch.equal(half(x, token_keep=0.5), full(x))


def test_bf16_and_fp32_give_the_same_first_loss(one_thread):
    """The CPU fast path (bf16 autocast) computes the same step-0 loss as fp32, within bf16's
    precision, from the same weights and batch."""
    g = torch.Generator().manual_seed(0)
    data = {"train_x": torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g),
            "train_y": torch.randint(0, 10, (64,), generator=g),
            "test_x": torch.zeros(8, 3, 32, 32, dtype=torch.uint8),
            "test_y": torch.zeros(8, dtype=torch.int64)}
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = S.resolve_config("cpu-speedrun", width=64, depth=2, batch_size=32,
                               precision=precision)
        trainer = S.Trainer(cfg, data, torch.device("cpu"))
        assert (trainer.amp_dtype is None) == (precision == "fp32")
        trainer.step(0)
        losses[precision] = trainer.loss_sum.item()
    assert losses["fp32"] == pytest.approx(2.3026, abs=0.3)  # about ln 10 from a fresh init
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)
    assert losses["bf16"] != losses["fp32"]  # bf16 did run: its rounding shows


def test_keep_schedule_ends_on_every_token():
    cfg = S.resolve_config("cpu-speedrun", token_keep=0.25, full_token_tail=0.2, full_token_ramp=0)
    assert [S.keep_at(p, cfg) for p in (0.0, 0.5, 0.79, 0.8, 1.0)] == [0.25, 0.25, 0.25, 1.0, 1.0]
    assert S.keep_at(0.99, S.resolve_config("cpu-speedrun", token_keep=0.25, full_token_tail=0,
                                          full_token_ramp=0)) == 0.25


def test_keep_ramp_rises_an_eighth_at_a_time_before_the_tail():
    cfg = S.resolve_config("cpu-speedrun", token_keep=0.25, full_token_tail=0.1, full_token_ramp=0.3)
    shares = [S.keep_at(i / 100, cfg) for i in range(101)]
    assert shares[:61] == [0.25] * 61 and shares[90:] == [1.0] * 11
    assert shares == sorted(shares)  # never falls
    assert S.keep_levels(cfg) == [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
    assert S.keep_at(0.75, cfg) == 0.625  # halfway up the ramp: 0.25 + 0.75 / 2 = 0.625
    assert S.keep_levels(S.resolve_config("cpu-speedrun", full_token_ramp=0)) == [0.25, 1.0]
    assert S.keep_levels(S.resolve_config("baseline")) == [1.0]


def test_full_token_tail_runs_last_and_the_run_still_ends_at_its_budget(real_archive, tmp_path,
                                                                        monkeypatch):
    """On a fake clock a step costs 10 ms per quarter of the tokens kept (40 ms with all of
    them) and the evaluation 1 ms per image: the last quarter of the time trains on every token,
    the eval reserve is re-timed when the steps get dearer, and the run ends close to its budget."""
    keeps = []
    now = fake_clock(monkeypatch, step_s=lambda keep: keeps.append(keep) or 0.04 * keep,
                     eval_s_per_image=0.001)
    cfg = S.resolve_config("cpu-speedrun", width=32, depth=1, heads=2, patch_size=8, batch_size=32,
                           time_budget=40.0, log_every=5, token_keep=0.25, full_token_tail=0.25,
                           full_token_ramp=0,
                           tta_flip=False, whiten=False, data=real_archive,
                           out=str(tmp_path / "run"), precision="fp32", device="cpu")
    summary = S.train(cfg, clock=lambda: now[0])
    assert 40.0 - 3.0 < summary["total_s"] <= 40.0
    switch = keeps.index(1.0)
    assert set(keeps[:switch]) == {0.25} and set(keeps[switch:]) == {1.0}
    # a quarter of the training time at 4x the cost per step: about 1/13 of the steps
    assert 0.04 < (len(keeps) - switch) / len(keeps) < 0.12


def test_a_rising_share_times_the_evaluation_at_its_start_and_last_share_only(real_archive,
                                                                              tmp_path, monkeypatch):
    """The preset's ramp of token shares: the final evaluation's reserve is timed 5 steps in and
    5 steps into the last share, not at every share; the run ends close to its budget, and its
    token share never falls back when the reserve is re-timed."""
    keeps, passes = [], []
    now = fake_clock(monkeypatch, step_s=lambda keep: keeps.append(keep) or 0.04 * keep,
                     eval_s_per_image=0.001)
    time_eval = S.Trainer.time_eval
    monkeypatch.setattr(S.Trainer, "time_eval",
                        lambda self, clock: passes.append(clock()) or time_eval(self, clock))
    cfg = S.resolve_config("cpu-speedrun", width=32, depth=1, heads=2, patch_size=8, batch_size=32,
                           time_budget=60.0, log_every=5, tta_flip=False, whiten=False,
                           data=real_archive, out=str(tmp_path / "run"), precision="fp32",
                           device="cpu")
    summary = S.train(cfg, clock=lambda: now[0])
    assert len(passes) == 2 and len(set(keeps)) == len(S.keep_levels(cfg)) > 2
    assert all(a <= b for a, b in zip(keeps, keeps[1:]))
    assert 60.0 - 3.0 < summary["total_s"] <= 60.0
    # 10,000 test images at 1 ms each, and what was kept back for them: 2 s more
    assert summary["eval_s"] == pytest.approx(10.0) and summary["eval_reserve_s"] == pytest.approx(12.0)


def test_a_log_step_on_the_eval_timing_step_reports_the_last_pace_not_zero():
    # the eval batch is timed after step 5: a log at that same step once measured an empty
    # window (the timing restarted it) and printed 0 img/s; the timing's seconds are no training
    now = [0.0]
    cfg = S.resolve_config("cpu-speedrun", batch_size=128, time_budget=60.0)
    budget = S.Budget(cfg, total=100, step=0, start_time=0.0, clock=lambda: now[0],
                      time_eval=lambda clock: 0.5, world_size=1)
    paces = []
    for step in range(1, 9):
        budget.before_step(step, cfg.token_keep)
        now[0] += 0.1
        budget.after_step(step)
        paces.append(budget.window(step, 0.0))
    assert paces == pytest.approx([1280.0] * 8)


def test_the_reserve_follows_the_pace_of_a_whole_window_not_the_steps_after_the_timing():
    # the eval batch (1 s) is timed after step 5; the 5 steps from there to the log step at 10
    # run twice as fast as the rest (as steps just after an evaluation can): the machine has not
    # sped up, so the reserve stays 2 s + 1 s rather than doubling the evaluation
    now = [0.0]
    cfg = S.resolve_config("cpu-speedrun", batch_size=128, time_budget=60.0)
    budget = S.Budget(cfg, total=1000, step=0, start_time=0.0, clock=lambda: now[0],
                      time_eval=lambda clock: 1.0, world_size=1)
    for step in range(1, 31):
        budget.before_step(step - 1, cfg.token_keep)
        now[0] += 0.05 if 5 < step <= 10 else 0.1
        budget.after_step(step)
        if step % 10 == 0:
            budget.window(step, 0.0)
    assert budget.reserve == pytest.approx(3.0)


@pytest.mark.parametrize("resume_at", [0, 400])
def test_the_eta_counts_the_dearer_steps_of_a_rising_token_share(resume_at):
    # a run of fixed steps whose steps cost as many tokens as they keep (a quarter of 64 patch
    # tokens, rising to all over the last 40 %): the ETA at each log step is the time the rest of
    # the run then takes, within a few %; a share of steps alone would say 2-3x too little late on
    cfg = S.resolve_config("cpu-speedrun", time_budget=0.0, max_steps=1000)
    total, now = 1000, [0.0]
    budget = S.Budget(cfg, total=total, step=resume_at, start_time=0.0, clock=lambda: now[0],
                      time_eval=lambda clock: 0.0, world_size=1)
    etas, ends = {}, {}
    for step in range(resume_at, total):
        keep = S.keep_at(budget.progress(step), cfg)
        budget.before_step(step, keep)
        now[0] += (keep * 64 + cfg.num_cls) * 1e-3
        budget.after_step(step + 1)
        ends[step + 1] = now[0]
        if (step + 1) % 50 == 0:
            etas[step + 1] = budget.eta(step + 1)
    for step, eta in etas.items():
        assert eta == pytest.approx(now[0] - ends[step], rel=0.03, abs=0.05), step
    assert etas[total] == pytest.approx(0.0)


@pytest.mark.parametrize("bf16, fp32, typed, want", [
    (2000.0, 1000.0, {}, ("bf16", 128, 7, 0.25)),                 # matrix units: bf16 and the preset
    (1100.0, 1000.0, {}, ("bf16", 128, 7, 0.25)),                 # bf16 a little faster: still bf16
    (900.0, 1000.0, {}, ("fp32", 96, 4, 0.125)),                  # bf16 slower: fp32, cheaper images
    (900.0, 1000.0, {"depth": 5}, ("fp32", 96, 5, 0.125)),        # typed flags win over the tuning
    (None, None, {"precision": "bf16"}, ("bf16", 128, 7, 0.25)),  # typed precision: no probe
])
def test_cpu_speedrun_fits_the_cpu_it_measures(bf16, fp32, typed, want, monkeypatch):
    monkeypatch.setattr(S, "probe_img_per_s", lambda cfg: {"bf16": bf16, "fp32": fp32})
    cfg = S.resolve_config("cpu-speedrun", **typed)
    said = []
    fitted = S.fit_cpu_speedrun(cfg, set(typed), log=said.append)
    assert (fitted.precision, fitted.width, fitted.depth, fitted.token_keep) == want
    assert len(said) == 1 and said[0].startswith(f"cpu-speedrun: {want[0]}, width {want[1]}, depth {want[2]}")
    assert fitted.fitted_because == said[0].split(": ", 2)[2]  # config.json keeps the reason


def test_cpu_speedrun_says_its_choice_once_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    said = {}
    for rank in "01":
        monkeypatch.setenv("RANK", rank)
        said[rank] = []
        fitted = S.fit_cpu_speedrun(S.resolve_config("cpu-speedrun"), set(), log=said[rank].append)
        assert "under torchrun" in fitted.fitted_because
    assert len(said["0"]) == 1 and said["1"] == []


def test_cpu_probe_measures_a_training_step(one_thread):
    cfg = S.resolve_config("cpu-speedrun", width=32, depth=1, heads=2, batch_size=16)
    speed = S.probe_img_per_s(cfg, steps=2)
    assert set(speed) == {"bf16", "fp32"} and all(v > 0 for v in speed.values())


def test_cpu_probe_is_not_fooled_by_a_slow_phase_of_the_machine(one_thread, monkeypatch):
    # a bf16 step costs 0.1 s and an fp32 step 0.15 s, but the machine runs 3x slower for its
    # first 3 s: probed one precision after the other, bf16 would fall wholly in the slow
    # phase and look slower than fp32 (this once chose fp32 on a CPU where bf16 is 1.4x faster)
    now = [0.0]
    monkeypatch.setattr(S.Trainer, "step", lambda self, s: now.__setitem__(
        0, now[0] + {"bf16": 0.1, "fp32": 0.15}[self.cfg.precision] * (3 if now[0] < 3.0 else 1)))
    cfg = S.resolve_config("cpu-speedrun", width=32, depth=1, heads=2, batch_size=16)
    speed = S.probe_img_per_s(cfg, clock=lambda: now[0])
    assert speed["bf16"] == pytest.approx(16 / 0.1) and speed["fp32"] == pytest.approx(16 / 0.15)


def test_a_paper_recipe_on_a_cpu_says_how_long_and_what_to_run_instead():
    note = S.cpu_recipe_note(S.resolve_config("mcls"), 58593)
    assert "on a CPU this recipe takes about" in note and "--variant cpu-speedrun" in note
    assert S.cpu_recipe_note(S.resolve_config("mcls", max_steps=50), 50) is None
