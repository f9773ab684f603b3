"""bench/launches.py: op counting, the launch/roofline prediction, and the script end to end on a
tiny configuration (CPU, one thread)."""
import json

import pytest
import torch

import launches as L

TINY = ["--set", "width=32", "depth=1", "heads=2", "--device", "cpu", "--threads", "1",
        "--batch-size", "4", "--steps", "1"]


def test_counter_separates_launching_ops_from_views_and_splits_by_range():
    x = torch.randn(4, 6, requires_grad=True)
    with L.OpCounter() as counter:
        with torch.profiler.record_function("forward"):
            y = (x.t().reshape(6, 4) * 2).sum()  # t, view: no kernel; mul, sum: two
        with torch.profiler.record_function("backward"):
            y.backward()
        torch.empty(3)  # allocation only, outside any range
    assert counter.launches["forward"] == 2
    assert counter.launches["backward"] >= 2  # sum's and mul's backward at least
    assert set(counter.launches) == {"forward", "backward"}
    summary = counter.summary(steps=1)
    assert summary["dispatched"] > summary["launches"] == sum(counter.launches.values())
    assert counter.dispatched["aten::t"] >= 1 and "aten::t" not in summary["top_launching_ops"]
    assert summary["top_launching_ops"]["aten::mul"] >= 1
    # mul reads 24 floats and writes 24, sum reads 24 and writes 1 (the forward's bytes)
    assert counter.bytes["forward"] == (24 + 24 + 24 + 1) * 4


def test_counter_counts_a_gather_by_what_it_picks():
    table = torch.zeros(1000, 8)
    with L.OpCounter() as counter:
        table[torch.tensor([1, 2])]
    index_bytes = 2 * 8  # the int64 index
    assert counter.bytes["other"] == 2 * (2 * 8 * 4) + index_bytes  # torch.tensor: no kernel


def test_compiled_gather_counts_the_rows_it_picks_not_the_whole_table():
    # a gather fused with a reduction: Inductor's own count (num_bytes_accessed) takes the whole
    # 6.4 MB table, as it did the whole data set and index stream for the training step
    table = torch.randn(100_000, 16)
    idx = torch.randint(0, 100_000, (64,))

    def gather_and_sum(table, idx):
        rows = table[idx] * 2
        return rows, rows.sum(1)

    torch._dynamo.reset()
    with L.InductorBytes().recording() as recorded:
        torch.compile(gather_and_sum, fullgraph=True)(table, idx)
    summary = recorded.summary()
    (kernel,) = summary["top_kernels"]
    assert kernel["kind"].endswith("FusedSchedulerNode")  # the case Inductor counts whole
    picked, index, sums = 64 * 16 * 4, 64 * 8, 64 * 4
    assert summary["graph_bytes"] == 2 * picked + index + sums  # rows read, rows written
    assert summary["inductor_graph_bytes"] >= table.numel() * 4  # the old count: the whole table


def test_prediction_arithmetic_on_hand_made_counts():
    costs = L.Costs(launch_s=5e-6, custom_op_s=20e-6, efficiency=0.5)
    eager = {"launches": 1000, "custom_op_launches": 10, "bytes": 2e9}
    # graphs run in forward and backward: the ops dispatched there are their extern calls
    compiled = {"launches": 300, "custom_op_launches": 10, "graph_bytes": 0.6e9,
                "inductor_kernels_by_phase": {"forward": 20, "backward": 40},
                "bytes_by_phase": {"data": 0.3e9, "forward": 0.05e9, "backward": 0.02e9,
                                   "optimizer": 0.1e9}}
    assert L.fused_bytes(eager, compiled) == pytest.approx(1e9)  # graphs + data + optimizer
    # eager: 1e12 FLOP at 1e15 x 0.5 = 2 ms; 2e9 bytes at 1e12 x 0.5 = 4 ms: memory-bound, 4 ms.
    # fused: 1e9 bytes = 2 ms, as long as the FLOPs: 2 ms
    step = L.predict_step_s(eager, compiled, flops=1e12, peak=1e15, bandwidth=1e12, costs=costs)
    assert step["arithmetic_eager"] == pytest.approx(4e-3)
    assert step["arithmetic_fused"] == pytest.approx(2e-3)
    assert step["eager"] == pytest.approx(990 * 5e-6 + 10 * 20e-6 + 4e-3)
    assert step["compiled"] == pytest.approx(290 * 5e-6 + 10 * 20e-6 + 2e-3)
    assert step["captured"] == pytest.approx(5e-6 + 2e-3)
    # without compiled counts: no compiled figure, and the captured step moves the eager bytes
    alone = L.predict_step_s(eager, None, 1e12, 1e15, 1e12, costs)
    assert alone["compiled"] is None and alone["captured"] == pytest.approx(5e-6 + 4e-3)
    # FLOP-bound: 1e14 FLOP at 5e14 = 0.2 s
    assert L.arithmetic_s(1e14, 1e9, 1e15, 1e12, 0.5) == pytest.approx(0.2)


def test_paper_check_prediction_against_table1():
    costs = L.Costs(launch_s=10e-6, custom_op_s=0.0, efficiency=1.0)
    gpu = L.GPUS["RTX 3090"]
    paper = {"launches": 100, "custom_op_launches": 0, "flops": gpu.fp32_flops * 1e-3,
             "bytes": gpu.bandwidth * 5e-4}  # 1 ms of FLOPs, 0.5 ms of bytes
    check = L.predict_paper_forward(paper, 256, costs)
    assert check["predicted_img_s"] == pytest.approx(256 / 2e-3)
    assert check["paper_img_s"] == 9721.13
    assert check["predicted_over_paper"] == pytest.approx(256 / 2e-3 / 9721.13)
    assert L.predict_paper_forward(paper, 100, costs)["predicted_over_paper"] is None


def test_recipe_steps_follow_the_paper_recipe():
    import speedrun as S
    assert L.recipe_steps(S.resolve_config("mcls")) == 58500  # 100 epochs of 585 steps of 256
    assert L.recipe_steps(S.resolve_config("mcls", drop_last=False)) == 58593


def test_launches_end_to_end(tmp_path, capsys):
    out = tmp_path / "launches"
    assert L.main(TINY + ["--variants", "baseline", "--out", str(out)]) == 0
    report = json.load(open(out / "launches.json"))
    (row,) = report["variants"]
    eager, compiled = row["eager"], row["compiled"]
    assert 0 < eager["launches"] <= eager["dispatched"] and eager["bytes"] > 0
    # compiled launches: the dispatched ops that launch (extern calls, eager ops) + Inductor's
    assert 0 < compiled["launches"] - compiled["inductor_kernels"] <= compiled["dispatched"]
    assert eager["custom_op_launches"] > 0  # the kernels' custom ops, as on CUDA
    assert set(eager["launches_by_phase"]) <= set(L.PHASES) | {"other"}
    assert all(eager["launches_by_phase"][p] > 0 for p in L.PHASES)
    assert compiled["dynamo_graphs"] >= 1 and compiled["graph_calls"] >= 1
    assert compiled["inductor_kernels"] >= 1 and not compiled["recompiled_while_counting"]
    assert compiled["launches"] < eager["launches"]  # the model's ops became fewer, fused kernels
    assert 0 < compiled["graph_bytes"] == pytest.approx(sum(compiled["bytes_by_graph"]))
    assert compiled["graph_bytes"] <= compiled["inductor_graph_bytes"]  # never more than Inductor's
    assert len(compiled["bytes_by_graph"]) == 2  # data + forward + loss, backward
    # every graph schedules kernels; a CPU runs them grouped into fewer C++ functions
    assert len(compiled["kernels_by_graph"]) == 2 and min(compiled["kernels_by_graph"]) > 0
    assert sum(compiled["kernels_by_graph"]) >= compiled["inductor_kernels"]
    assert row["flops_per_step"] > 0 and row["recipe_steps"] > 0
    for gpu in ("H100", "RTX 3090"):
        step = row["predicted"][gpu]["step_s"]
        assert 0 < step["captured"] < step["compiled"] and 0 < step["captured"] < step["eager"]
        assert row["predicted"][gpu]["recipe_s"]["eager"] == pytest.approx(
            step["eager"] * row["recipe_steps"])
    check = report["paper_check"]
    assert 0 < check["launches"] <= check["dispatched"] and check["predicted_img_s"] > 0
    table = (out / "launches.md").read_text()
    assert "| baseline | RTX 3090 |" in table and "| baseline | H100 |" in table
    assert "Check: the paper's plain model" in table
    assert ("| variant | graph 1 | graph 2 | outside | fused | Inductor's count | kernels scheduled 1 / 2 "
            "| largest kernel |") in table
    assert " / ".join(str(n) for n in compiled["kernels_by_graph"]) in table
    assert "| baseline |" in capsys.readouterr().out


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        L.main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--variants", "--batch-size", "--set", "--device", "--precision", "--compile",
                 "--kernels", "--data", "--threads", "--out", "--steps", "--eager-only",
                 "--launch-us", "--custom-op-us", "--efficiency"):
        assert flag in text


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--batch-size", "0"], "--batch-size and --steps must be >= 1"),
    (["--efficiency", "1.5"], "--efficiency must be in (0, 1]"),
    (["--efficiency", "nan"], "--efficiency must be in (0, 1]"),
    (["--launch-us", "-1"], "--launch-us and --custom-op-us must be >= 0"),
    (["--launch-us", "fast"], "invalid float value"),
    (["--compile", "on"], "counts both the eager and the compiled step"),
    (["--variants", ","], "--variants is empty"),
    (["--variants", "mcls,mcls"], "lists a variant twice"),
    (["--variants", "mcsl"], "did you mean mcls"),
    (["--set", "batch_size=8"], "use --batch-size"),
    (["--set", "mla=q"], "plain model cannot take --set mla='q'"),
    (["--device", "tpu"], "unknown --device"),
])
def test_bad_input_is_one_line_exit_2(argv, message, capsys, tmp_path):
    assert L.main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
