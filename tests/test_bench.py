"""bench/: throughput sweep, step profiler, plain reference model, activation counter. CPU, tiny
configs, synthetic data; one thread so a loaded machine does not stall PyTorch's thread pool."""
import json
import re

import pytest
import torch

import speedrun as S
import activation_memory as A
import common
import reference_model
import roofline as R
import precision as Pr
import trace_step as P
import throughput as T
import record
from kernels import aot

TINY = ["--set", "width=32", "depth=1", "heads=2", "--device", "cpu", "--compile", "off", "--threads", "1"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000


def test_throughput_sweep_with_reference(tmp_path, capsys):
    argv = TINY + ["--batch-sizes", "4", "8", "--warmup", "1", "--repeats", "2", "--steps", "1",
                   "--compare-reference", "--out", str(tmp_path)]
    assert T.main(argv) == 0
    report = json.load(open(tmp_path / "results.json"))
    assert [r["batch_size"] for r in report["results"]] == [4, 8]
    for row in report["results"]:
        for who in ("ours", "reference"):
            fig = row[who]
            assert fig["status"] == "ok"
            for key in ("forward_img_s", "train_img_s"):
                assert 0 < fig[key]["min"] <= fig[key]["median"] <= fig[key]["max"]
                assert len(fig[key]["runs"]) == 2
            assert fig["activation_bytes"] > 0
        assert row["speedup"]["forward"] > 0 and row["speedup"]["train"] > 0
    # activations grow with the batch
    assert report["results"][1]["ours"]["activation_bytes"] > report["results"][0]["ours"]["activation_bytes"]
    table = (tmp_path / "table.md").read_text()
    assert "| 4 |" in table and "| 8 |" in table and "speed-up" in table
    assert_png(tmp_path / "throughput.png")
    out = capsys.readouterr().out
    assert out.count("batch     4 |") == 1 and "| 8 |" in out


def test_throughput_paper_columns_and_oom_keeps_sweeping(tmp_path, monkeypatch):
    """A batch that does not fit is reported as OOM; the others are still measured. Batch 32 is
    a paper batch size, so its row carries the RTX 3090 figures."""
    real_step = S.Trainer.step

    def step(self, s, *args, **kw):
        if self.cfg.batch_size == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, s, *args, **kw)

    monkeypatch.setattr(S.Trainer, "step", step)
    argv = TINY + ["--batch-sizes", "2", "32", "--warmup", "0", "--repeats", "1", "--steps", "1",
                   "--out", str(tmp_path)]
    assert T.main(argv) == 0
    rows = {r["batch_size"]: r for r in json.load(open(tmp_path / "results.json"))["results"]}
    assert rows[2]["ours"]["status"] == "OOM"
    assert rows[32]["ours"]["status"] == "ok" and rows[32]["ours"]["train_img_s"]["median"] > 0
    assert rows[32]["paper_forward_img_s"] == 3162.09
    table = (tmp_path / "table.md").read_text()
    assert "| 2 | OOM |" in table and "3,162" in table


def test_profile_trace_and_breakdown(tmp_path, capsys):
    argv = TINY + ["--batch-size", "8", "--wait", "1", "--warmup", "1", "--active", "2",
                   "--out", str(tmp_path)]
    assert P.main(argv) == 0
    trace = json.load(open(tmp_path / "trace.json"))  # valid JSON, Chrome trace layout
    names = {e.get("name") for e in trace["traceEvents"] if e.get("ph") == "X"}
    assert set(P.PARTS) <= names
    assert sum(n.startswith("ProfilerStep#") for n in names) == 2  # only the active steps
    report = json.load(open(tmp_path / "breakdown.json"))
    assert report["timing"] == "cpu-ranges" and report["active_steps"] == 2
    parts = sum(report["median_ms"][p] for p in P.PARTS)
    assert 0 < parts <= report["step_ms"] + 1e-9
    assert all(report["median_ms"][p] > 0 for p in P.PARTS)
    for step in report["per_step_ms"]:  # each step's ranges fit inside it
        assert sum(step[p] for p in P.PARTS) <= step["step"] + 1e-6
    assert report["paper"]["median_ms"]["backward"] == 79.3
    assert_png(tmp_path / "breakdown.png")
    out = capsys.readouterr().out
    assert "ui.perfetto.dev" in out and "| backward |" in out and "MB)" in out


def test_breakdown_attributes_gpu_kernels_by_correlation(tmp_path):
    """On CUDA a range's time is the GPU time of the kernels it launched (matched by correlation
    id), not its CPU enqueue time. A hand-made trace: forward enqueues in 1 us, its kernels run 5 us."""
    def x(name, cat, ts, dur, **args):
        return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "args": args}

    events = [x("ProfilerStep#2", "user_annotation", 0, 100),
              x("forward", "user_annotation", 10, 1),
              x("cudaLaunchKernel", "cuda_runtime", 10.2, 0.3, correlation=7),
              x("cudaLaunchKernel", "cuda_runtime", 10.6, 0.3, correlation=8),
              x("gemm", "kernel", 30, 3, correlation=7),
              x("gelu", "kernel", 32, 2, correlation=8),  # overlaps gemm: counted once
              x("backward", "user_annotation", 12, 2),
              x("cudaLaunchKernel", "cuda_runtime", 12.5, 0.3, correlation=9),
              x("gemm_bwd", "kernel", 40, 10, correlation=9)]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    b = P.read_breakdown(P.trace_events(str(path)))
    assert b["timing"] == "gpu-kernels"
    assert b["median_ms"]["forward"] == pytest.approx(0.004)
    assert b["median_ms"]["backward"] == pytest.approx(0.010)
    assert b["median_ms"]["data"] == 0
    assert b["step_ms"] == pytest.approx(0.1)


def test_a_trace_without_steps_is_named_in_the_error(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": [{"ph": "X", "name": "forward", "ts": 0, "dur": 1,
                                                 "cat": "user_annotation", "args": {}}]}))
    with pytest.raises(RuntimeError, match=re.escape(f"{path} holds no ProfilerStep ranges")):
        P.read_breakdown(P.trace_events(str(path)), str(path))


def test_kernel_list_counts_a_steps_gpu_kernels_busy_time_and_gaps(tmp_path):
    """What a replayed CUDA graph's profile is read for: per step, how many kernels, how long the
    GPU was busy, and how much of the span went between kernels. Hand-made trace: two steps."""
    def x(name, cat, ts, dur):
        return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "args": {}}

    events = [x("ProfilerStep#1", "user_annotation", 0, 100),
              x("gemm", "kernel", 10, 20), x("gelu", "kernel", 25, 10),  # overlap: busy 25 us
              x("gemm", "kernel", 40, 20),  # 5 us gap after gelu ends at 35
              x("ProfilerStep#2", "user_annotation", 100, 50),
              x("gemm", "kernel", 110, 20), x("Memcpy HtoD", "gpu_memcpy", 131, 1)]  # 1 us gap
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    k = P.read_kernels(P.trace_events(str(path)), top=2)
    assert k["steps"] == 2 and k["kernels"] == 2.5
    assert k["busy_ms"] == pytest.approx((45 + 21) / 2 / 1000)
    assert k["span_ms"] == pytest.approx((50 + 22) / 2 / 1000)
    assert k["gaps_ms"] == pytest.approx((5 + 1) / 2 / 1000)
    assert k["step_ms"] == pytest.approx(0.075)
    assert [t["name"] for t in k["top"]] == ["gemm", "gelu"]
    assert k["top"][0]["calls"] == 1.5 and k["top"][0]["ms"] == pytest.approx(0.03)
    assert "| `gemm` | 2 | 0.030 |" in P.kernel_text(k)
    assert [(t["kind"], t["calls"], t["mean_us"]) for t in k["kinds"]] == [
        ("matmul (cuBLAS/CUTLASS)", 1.5, 20.0), ("other", 0.5, 10.0), ("copies and fills", 0.5, 1.0)]
    assert "| matmul (cuBLAS/CUTLASS) | 2 | 0.030 | 20.0 |" in P.kernel_text(k)
    cpu_only = tmp_path / "cpu.json"
    cpu_only.write_text(json.dumps({"traceEvents": events[:1]}))
    assert P.read_kernels(P.trace_events(str(cpu_only))) is None


def test_kernel_kinds_follow_the_names_a_replayed_step_shows():
    """Ours before PyTorch's, attention before matmul (SDPA's CUTLASS kernels are attention)."""
    kinds = {"_attn_bwd_kernel": "attention (ours, Triton)",
             "_lowrank_fwd_kernel": "low-rank (ours, Triton)",
             "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "attention (PyTorch's)",
             "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<32>>": "attention (PyTorch's)",
             "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x64x64": "matmul (cuBLAS/CUTLASS)",
             "nvjet_tst_128x64_64x8_1x1_v_bz_TNT": "matmul (cuBLAS/CUTLASS)",
             "void at::native::multi_tensor_apply_kernel<...>": "optimizer",
             "triton_poi_fused__to_copy_add_native_layer_norm_0": "Inductor's fused (triton_)",
             "Memcpy DtoD (Device -> Device)": "copies and fills",
             "void at::native::vectorized_elementwise_kernel<4, ...>": "other"}
    assert {name: P.kernel_kind(name) for name in kinds} == kinds


def test_profile_of_the_prepared_step_on_cpu(tmp_path, capsys):
    """--captured prepares the step as a run does; eager on CPU, so there is nothing to record."""
    argv = TINY + ["--batch-size", "8", "--wait", "0", "--warmup", "1", "--active", "1",
                   "--captured", "--out", str(tmp_path)]
    assert P.main(argv) == 0
    report = json.load(open(tmp_path / "breakdown.json"))
    assert report["captured"] and not report["graph"] and report["gpu_kernels"] is None
    assert "eager: nothing to prepare" in capsys.readouterr().out


def test_reference_model_matches_parameter_count_and_layout():
    for cfg in (S.resolve_config("baseline"), S.resolve_config("mcls")):
        ours, plain = S.build_model(cfg), reference_model.from_config(cfg)
        assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in ours.parameters())
        assert plain(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    attn = reference_model.from_config(S.resolve_config("baseline")).blocks[0].attn
    assert all(isinstance(getattr(attn, n), torch.nn.Linear) for n in "qkv")
    assert reference_model.layout_mismatches(S.resolve_config("mla-q")) == ["mla='q'"]


def test_saved_activation_bytes_counts_each_storage_once_without_parameters():
    x = torch.randn(100, requires_grad=True)

    def views():
        e = x.exp()  # saves its result: 400 bytes
        return e.view(10, 10).sin()  # saves its input, a view of the same storage

    assert common.saved_activation_bytes(views) == 400
    linear = torch.nn.Linear(100, 50)
    inp = torch.randn(8, 100, requires_grad=True)
    assert common.saved_activation_bytes(lambda: linear(inp), exclude=linear.parameters()) == 8 * 100 * 4


def test_help_explains_every_flag(capsys):
    for main, flags in ((T.main, ["--batch-sizes", "--repeats", "--steps", "--warmup",
                                  "--compare-reference"]),
                        (P.main, ["--batch-size", "--wait", "--warmup", "--active"]),
                        (Pr.main, ["--max-steps", "--batch-size", "--seeds"])):
        with pytest.raises(SystemExit) as stop:
            main(["--help"])
        assert stop.value.code == 0
        text = capsys.readouterr().out
        for flag in flags + ["--variant", "--set", "--device", "--precision", "--compile",
                             "--kernels", "--data", "--threads", "--out"]:
            assert flag in text


@pytest.mark.parametrize("main, argv, message", [
    (T.main, ["--batch-sizes", "0"], "--batch-sizes must be in [1, inf) (got 0)"),
    (T.main, ["--batch-sizes", "x"], "invalid int value"),
    (T.main, ["--set", "widht=32"], "did you mean width"),
    (T.main, ["--set", "width"], "KEY=VALUE"),
    (T.main, ["--set", "batch_size=8"], "use --batch-sizes"),
    (T.main, ["--set", "pos_emb=spiral"], "choose one of"),
    (T.main, ["--variant", "mcsl"], "did you mean mcls"),
    (T.main, ["--variant", "spt", "--compare-reference"], "patch_embed='spt'"),
    (T.main, ["--data", "/nonexistent/cifar.tar.gz"], "/nonexistent/cifar.tar.gz"),
    (T.main, ["--no-such-flag"], "unrecognized arguments"),
    (P.main, ["--active", "0"], "--active must be in [1, inf) (got 0)"),
    (P.main, ["--set", "depth=two"], "not a valid int"),
    (P.main, ["--device", "tpu"], "unknown --device"),
    (Pr.main, ["--seeds", "3", "3"], "at least two different --seeds"),
    (Pr.main, ["--precision", "bf16"], "runs both fp32 and bf16"),
    (Pr.main, ["--set", "seed=1"], "use --seeds"),
    (Pr.main, ["--seeds", "0", "-1"], "--seeds must be in [0, 4294967295] (got -1)"),
    (Pr.main, ["--max-steps", "0"], "--max-steps must be in [1, inf) (got 0)"),
    (T.main, ["--warmup", "-1"], "--warmup must be in [0, inf) (got -1)"),
    (T.main, ["--threads", "-2"], "--threads must be in [0, inf) (got -2)"),
    (P.main, ["--batch-size", "0"], "--batch-size must be in [1, inf) (got 0)"),
    (P.main, ["--set", "heads=0"], "--heads must be in [1, inf) (got 0)"),
    (A.main, ["--variants", "baseline", "nope"], "unknown variant 'nope'"),
    (A.main, ["--variants", "mla-qq"], "did you mean mla-q"),
    (R.main, ["--batch", "0"], "--batch must be in [1, inf) (got 0)"),
    (R.main, ["--batch", "-3"], "--batch must be in [1, inf) (got -3)"),
    (aot.main, ["--arch", "75"], "invalid choice: 75 (choose from 80, 86, 89, 90)"),
    (aot.main, ["--arch", "0"], "invalid choice: 0"),
    (aot.main, ["--arch", "sm_90"], "invalid int value: 'sm_90'"),
    (aot.main, ["--jobs", "0"], "--jobs must be in [1, inf) (got 0)"),
    (aot.main, ["--sweep", "fwd", "65", "12", "bf16", "0"], "--sweep D must be one of 8, 16, 32, 64"),
    (aot.main, ["--sweep", "up", "65", "16", "bf16", "0"], "--sweep KERNEL must be one of fwd, bwd"),
    (aot.main, ["--sweep", "fwd", "x", "16", "bf16", "0"], "--sweep N must be in [1, 128]"),
    (aot.main, ["--sweep", "fwd", "65", "16", "int8", "0"], "--sweep DTYPE must be one of"),
])
def test_bad_input_is_one_line_exit_2(main, argv, message, capsys, tmp_path):
    writes = main in (T.main, P.main, Pr.main)  # the others have no --out
    pinned = ["--device", "cpu"] if writes else []
    assert main(pinned + argv + (["--out", str(tmp_path / "out")] if writes else [])) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_precision_runs_both_over_seeds_and_reports_the_difference(tiny_cifar, tmp_path, capsys,
                                                                   monkeypatch):
    resets = []
    reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1) or reset())
    out = tmp_path / "precision"
    argv = TINY + ["--variant", "cpu-speedrun", "--max-steps", "2", "--batch-size", "8",
                   "--seeds", "0", "1", "--data", tiny_cifar, "--out", str(out)]
    assert Pr.main(argv) == 0
    report = json.load(open(out / "results.json"))
    assert [(r["precision"], r["seed"], r["steps"]) for r in report["runs"]] == [
        ("fp32", 0, 2), ("bf16", 0, 2), ("fp32", 1, 2), ("bf16", 1, 2)]
    assert len(resets) == 4 and not any(r["compiled"] for r in report["runs"])
    for run in report["runs"]:
        saved = json.load(open(out / f"{run['precision']}-seed{run['seed']}" / "config.json"))
        assert (saved["precision"], saved["seed"], saved["width"], saved["time_budget"]) == (
            run["precision"], run["seed"], 32, 0.0)
    assert set(report["stats"]) == {"loss", "test_acc"}
    assert "bf16 − fp32" in capsys.readouterr().out and "| fp32 | 0 | 2 | no |" in (out / "table.md").read_text()


def test_precision_verdict_compares_the_difference_with_the_seed_spread():
    runs = [{"precision": p, "seed": s, "loss": loss, "test_acc": acc}
            for p, s, loss, acc in [("fp32", 0, 2.0, 30.0), ("fp32", 1, 2.2, 32.0),
                                    ("bf16", 0, 2.1, 40.0), ("bf16", 1, 2.1, 40.0)]]
    stats = Pr.compare(runs)
    loss, acc = stats["loss"], stats["test_acc"]
    assert loss["mean"]["fp32"] == pytest.approx(2.1) and loss["diff"] == pytest.approx(0.0)
    assert loss["se"] == pytest.approx((0.2 ** 2 / 2 / 2) ** 0.5) and loss["within_noise"]
    assert acc["diff"] == pytest.approx(9.0) and not acc["within_noise"]  # 9 > 2 x 1.0


def test_record_statistics_and_the_95_percent_bound():
    s = record.statistics_of([70.0, 72.0, 74.0], target=68.0)
    assert (s["n"], s["mean"], s["std"], s["min"], s["max"]) == (3, 72.0, 2.0, 70.0, 74.0)
    assert s["lower95"] == pytest.approx(72.0 - 2.920 * 2.0 / 3 ** 0.5)  # t(0.95, 2) = 2.920
    assert s["target_met"] and not record.statistics_of([70.0, 72.0, 74.0], target=69.0)["target_met"]
    assert not record.statistics_of([75.0], target=50.0)["target_met"]  # one run proves nothing
    assert record.t95(4) == 2.132 and record.t95(11) == 1.812 and record.t95(100) == 1.645


def test_record_runs_each_seed_as_a_user_would_and_writes_the_row(tiny_cifar, tmp_path, capsys):
    argv = ["--variant", "baseline", "--seeds", "2", "--time-budget", "20", "--target", "5",
            "--data", tiny_cifar, "--out", str(tmp_path / "rec"), "--set", "width=32", "depth=1",
            "heads=2", "patch_size=8", "batch_size=16", "device=cpu", "precision=fp32",
            "autoaugment=false", "max_steps=6"]
    assert record.main(argv) == 0
    report = json.load(open(tmp_path / "rec" / "record.json"))
    accs = [r["test_acc"] for r in report["runs"]]
    assert [r["seed"] for r in report["runs"]] == [0, 1] and all(r["steps"] == 6 for r in report["runs"])
    assert report["stats"]["mean"] == pytest.approx(sum(accs) / 2)
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    row = (tmp_path / "rec" / "record.md").read_text()
    assert f"{report['stats']['mean']:.2f} ±" in row and "bench/record.py --variant baseline" in row
    # what each run trained, from its config.json: fp32, width 32, depth 1, all tokens, both runs
    assert all(r["tuning"] == "fp32, width 32, depth 1, token share 1" for r in report["runs"])
    assert "| baseline (fp32, width 32, depth 1, token share 1 ×2) |" in row
    # what the budget kept back for each final evaluation (2 s more than one batch predicts)
    assert all(r["eval_reserve_s"] >= 2.0 and r["eval_s"] >= 0.0 for r in report["runs"])
    assert "seed 1:" in capsys.readouterr().out
    # each run's output is kept beside it; baseline fits nothing to the CPU, so no reason is kept
    for r in report["runs"]:
        assert "test" in open(r["log"]).read() and r["chosen_because"] is None


def test_record_reads_why_a_self_fitting_preset_chose_its_tuning_from_the_runs_config(
        tiny_cifar, tmp_path, capsys):
    """cpu-speedrun keeps the reason for its choice in config.json; record.py reads it there."""
    out = str(tmp_path / "run")
    assert S.main(["--variant", "cpu-speedrun", "--precision", "fp32", "--width", "32", "--depth", "1",
                   "--batch-size", "16", "--max-steps", "2", "--no-whiten", "--device", "cpu", "--data", tiny_cifar,
                   "--out", out]) == 0
    said = capsys.readouterr().out.splitlines()
    assert "cpu-speedrun: fp32, width 32, depth 1, token share 0.125, batch 16: as --precision asks" in said
    assert record.tuning_of(out) == ("fp32, width 32, depth 1, token share 0.125", "as --precision asks")


def test_record_a_failing_seed_is_one_line_naming_its_output(tmp_path, capsys):
    missing = str(tmp_path / "missing.tar.gz")
    argv = ["--variant", "baseline", "--seeds", "2", "--data", missing, "--out", str(tmp_path / "rec"),
            "--set", "device=cpu", "max_steps=1"]
    assert record.main(argv) == 2
    err = capsys.readouterr().err.strip()
    log = tmp_path / "rec" / "seed0.log"
    assert len(err.splitlines()) == 1 and err.startswith("error: seed 0 failed: error: ")
    assert "no such file or folder" in err and str(log) in err and "no such file" in log.read_text()
    assert not (tmp_path / "rec" / "seed1.log").exists()  # the record stops at the first failure


def test_record_names_what_holds_the_kernels_below_the_cpus_instruction_set(monkeypatch):
    """An AVX-512 CPU made to stand in for an AVX2-only one says so in its row and command."""
    for key in record.ISA_LIMITS:
        monkeypatch.delenv(key, raising=False)
    assert record.machine()["isa_limits"] == {}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    m = record.machine()
    assert m["isa_limits"] == {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert m["kernels_isa"] == torch.backends.cpu.get_cpu_capability()
    report = {"date": "2026-12-04", "variant": "cpu-speedrun", "budget_s": "600 s", "machine": m,
              "runs": [{"total_s": 599.0, "tuning": "fp32, width 96, depth 4, token share 0.125"}],
              "stats": record.statistics_of([70.0], target=None),
              "command": "python bench/record.py --seeds 1"}
    row = record.markdown(report).splitlines()[-1]
    assert "threads; limited by ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2)" in row
    assert "`ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/record.py --seeds 1`" in row


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--time-budget", "-1"], "--time-budget must be a positive"),
    (["--target", "120"], "--target must be a test accuracy"),
    (["--variant", "nope"], "unknown variant"),
])
def test_record_bad_input_is_one_line(argv, message, capsys):
    assert record.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_gpu_check_reduced_form_on_cpu(tiny_cifar, tmp_path, capsys):
    """The CPU form of the first GPU command: CUDA parts skipped and saying why, the others run
    (few tiny steps), one report and its JSON, a figure per part printed."""
    import gpu_check as G
    out = tmp_path / "check"
    argv = ["--device", "cpu", "--set", "width=32", "depth=1", "heads=2", "--steps", "2",
            "--batch-sizes", "16", "--epoch-steps", "2", "--data", tiny_cifar, "--out", str(out)]
    assert G.main(argv) == 0
    parts = json.load(open(out / "gpu_check.json"))["parts"]
    assert "needs CUDA" in parts["tests"]["skipped"] and "needs CUDA" in parts["kernels"]["skipped"]
    steps = parts["steps"]["rows"]
    assert [(r["label"], r["variant"], r["batch_size"], r["kernels"], r["steps"], r["compiled"])
            for r in steps] == [("mcls", "mcls", 64, "torch", 2, False),
                                ("baseline", "baseline", 64, "torch", 2, False)]
    probes = parts["probes"]["rows"]  # mcls with one thing changed each
    assert [(r["label"], r["batch_size"], r["kernels"]) for r in probes] == [
        ("mcls, kernels torch", 64, "torch"), ("mcls, 4x batch", 256, "torch"),
        ("mcls, no AutoAugment", 64, "torch"), ("mcls, combo kernels", 64, "torch")]
    for r in steps:
        assert set(r["phase_ms"]) == set(G.PHASES) and min(r["phase_ms"].values()) > 0
        assert r["cuda_graph"] is False
    assert [(r["batch_size"], r["status"]) for r in parts["table1"]["rows"]] == [(16, "ok")]
    profile = parts["profile"]
    assert profile["variant"] == "mcls" and not profile["cuda_graph"] and profile["gpu_kernels"] is None
    assert profile["step_ms"] > 0 and (tmp_path / "check" / "profile-mcls" / "trace.json").exists()
    epoch = parts["epoch"]
    recipe = S.resolve_config("mcls")  # 100 epochs of 585 steps, as the paper's loader
    assert epoch["steps"] == 2 and epoch["recipe_steps"] == 58500
    assert epoch["recipe_evaluations"] == -(-recipe.epochs // recipe.eval_every)
    assert epoch["recipe_s"] > epoch["train_s"] * 1000
    printed = capsys.readouterr().out
    figures = printed.split("\n\n")[-2].splitlines()
    assert [f.split(":")[0] for f in figures] == ["tests", "kernels", "steps", "profile", "probes",
                                                      "table1", "epoch"]
    report = (out / "gpu_check.md").read_text()
    assert "## Figures" in report and "profile: mcls step" in report
    assert "| mcls | 64 | torch | no | no |" in report and "| mcls, 4x batch | 256 | torch | no | no |" in report
    assert "### Probes: mcls with one thing changed" in report


def test_gpu_check_a_failing_probe_fails_its_row_only(tiny_cifar, tmp_path, monkeypatch, capsys):
    """A probe that breaks on a GPU (a kernel backend that will not compile there) costs its row:
    the other rows and parts still report, and the check exits 1. Each probe's Inductor options
    hold while it runs, and only then."""
    import gpu_check as G
    real = G.time_steps

    seen = []

    def breaks_on_big_batches(cfg, *a, **k):
        seen.append((cfg.kernels, cfg.batch_size, cfg.autoaugment, torch._inductor.config.combo_kernels))
        if cfg.batch_size > 64:
            raise RuntimeError("out of luck")
        return real(cfg, *a, **k)
    monkeypatch.setattr(G, "time_steps", breaks_on_big_batches)
    out = tmp_path / "check"
    argv = ["--device", "cpu", "--set", "width=32", "depth=1", "heads=2", "--steps", "1",
            "--parts", "steps", "probes", "--out", str(out)]
    assert G.main(argv) == 1
    parts = json.load(open(out / "gpu_check.json"))["parts"]
    assert ["error" in r for r in parts["steps"]["rows"]] == [False, False]
    rows = parts["probes"]["rows"]
    assert ["error" in r for r in rows] == [False, True, False, False]
    assert rows[1]["error"] == "RuntimeError: out of luck"
    assert seen[2:] == [("torch", 64, True, False), ("auto", 256, True, False),
                        ("auto", 64, False, False), ("auto", 64, True, True)]
    assert not torch._inductor.config.combo_kernels
    assert "mcls, 4x batch FAILED (RuntimeError: out of luck)" in (out / "gpu_check.md").read_text()
    assert "| mcls, 4x batch | 256 | FAILED: RuntimeError: out of luck |" in (out / "gpu_check.md").read_text()


def test_gpu_check_runs_the_parts_asked_in_their_order_and_keeps_each_report(tiny_cifar, tmp_path,
                                                                              monkeypatch, capsys):
    """--parts picks and orders the parts (a short GPU lease runs the step first); the report is
    rewritten after each part, so a run stopped at a time limit keeps what was measured."""
    import gpu_check as G
    out = tmp_path / "check"
    base = ["--device", "cpu", "--set", "width=32", "depth=1", "heads=2", "--steps", "1",
            "--epoch-steps", "1", "--data", tiny_cifar, "--out", str(out)]
    assert G.main(base + ["--parts", "epoch", "steps"]) == 0
    report = json.load(open(out / "gpu_check.json"))
    assert list(report["parts"]) == ["epoch", "steps"]
    printed = capsys.readouterr().out
    assert [f.split(":")[0] for f in printed.split("\n\n")[-2].splitlines()] == ["epoch", "steps"]

    def killed(*a, **k):  # what a time limit does: nothing after this point runs
        raise KeyboardInterrupt
    monkeypatch.setattr(G, "one_epoch", killed)
    (out / "gpu_check.json").unlink()
    with pytest.raises(KeyboardInterrupt):
        G.run(base + ["--parts", "steps", "epoch"])
    assert list(json.load(open(out / "gpu_check.json"))["parts"]) == ["steps"]
    assert "steps: mcls" in (out / "gpu_check.md").read_text()


def test_gpu_check_makes_random_images_of_the_official_layout_without_an_archive(tmp_path):
    """A GPU machine that cannot reach the archive still times the epoch on the real loader."""
    import gpu_check as G
    folder = G.synthetic_cifar(str(tmp_path))
    data = S.data_gpu.load_cifar10(folder, log=lambda *a, **k: None)
    assert data["train_x"].shape == (50_000, 3, 32, 32) and data["test_x"].shape == (10_000, 3, 32, 32)
    assert data["train_x"].dtype == torch.uint8 and int(data["train_y"].max()) == 9
