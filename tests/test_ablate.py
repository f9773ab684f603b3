"""bench/ablate.py: runs variants under one budget, writes its table and JSON, resumes."""
import json
import os

import pytest
import torch

import speedrun
import ablate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_runs_variants_writes_table_and_skips_finished_on_rerun(tiny_cifar, tmp_path, monkeypatch,
                                                               capsys):
    out = tmp_path / "ablate"
    argv = ["--variants", "dim96,mcls", "--max-steps", "3", "--batch-size", "8",
            "--data", tiny_cifar, "--device", "cpu", "--out", str(out)]
    resets = []
    reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1) or reset())
    assert ablate.main(argv) == 0
    assert len(resets) == 2  # before each variant: none may hit the recompile limit
    report = json.load(open(out / "ablate.json"))
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["dim96", "mcls"] and report["budget"]["max_steps"] == 3
    for name, row in rows.items():
        assert row["status"] == "ran" and row["steps"] == 3 and row["compiled"] is False
        assert 0 <= row["test_acc"] <= 100 and row["img_per_s"] > 0
        assert row["best_test_acc"] is None  # 3 steps: no evaluation before the end
        assert row["paper_acc"] == speedrun.VARIANTS[name].paper_acc
        assert json.load(open(out / name / "summary.json"))["steps"] == 3
    table = (out / "ablate.md").read_text()
    assert "| dim96 |" in table and "| mcls |" in table and "90.41" in table and "93.95" in table
    assert "| compiled |" in table and "| mcls | ran | 3 | no |" in table
    assert "| mcls |" in capsys.readouterr().out  # the final table on stdout

    # rerun: both are finished with this budget, so the trainer is never called
    calls = []
    monkeypatch.setattr(speedrun, "train", lambda *a, **k: calls.append(a) or {})
    assert ablate.main(argv) == 0
    assert calls == []
    assert [r["status"] for r in json.load(open(out / "ablate.json"))["rows"]] == ["cached"] * 2

    # an unfinished run (no summary) with a checkpoint of this very config resumes from it
    os.remove(out / "dim96" / "summary.json")
    seen = []
    monkeypatch.setattr(speedrun, "train", lambda cfg, **k: seen.append((cfg.variant, k)) or
                        {"steps": 3, "test_acc": 10.0, "train_s": 1.0})
    assert ablate.main(argv) == 0
    resumed = [(v, k["resume_state"]["step"], k["overwrite"]) for v, k in seen]
    assert resumed == [("dim96", 3, False)]

    # another budget is another experiment: both run again
    monkeypatch.setattr(speedrun, "train", lambda cfg, **k: calls.append(cfg.max_steps) or
                        {"steps": cfg.max_steps, "test_acc": 10.0, "train_s": 1.0})
    assert ablate.main(argv[:3] + ["4"] + argv[4:]) == 0
    assert calls == [4, 4]


def test_table_puts_final_and_best_beside_the_papers_figure(tiny_cifar, tmp_path, monkeypatch,
                                                            capsys):
    """The paper's figure is its best evaluation every 5 epochs: the table sets ours of the same
    statistic beside it (and the final accuracy), each with its difference to the baseline."""
    out = tmp_path / "ablate"
    finals = {"baseline": (60.0, 62.5, 96.0), "mcls": (61.0, 64.0, 91.0), "dim96": (50.0, None, None)}
    monkeypatch.setattr(speedrun, "train", lambda cfg, **k: dict(
        zip(("test_acc", "best_test_acc", "best_epoch"), finals[cfg.variant]), steps=3, train_s=1.0))
    assert ablate.main(["--variants", "baseline,mcls,dim96", "--max-steps", "3", "--data", tiny_cifar,
                        "--device", "cpu", "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in json.load(open(out / "ablate.json"))["rows"]}
    assert (rows["mcls"]["vs_base"], rows["mcls"]["best_vs_base"], rows["mcls"]["paper_vs_base"]) == \
        (1.0, 1.5, 0.3)
    table = capsys.readouterr().out
    assert "| final acc % | final vs base | best acc % | best ep | best vs base | paper acc % |" in table
    assert "| 61.00 | +1.00 | 64.00 | 91 | +1.50 | 93.95 | +0.30 |" in table
    assert "| 50.00 | -10.00 | — | — | — | 90.41 | -3.24 |" in table  # never evaluated on the way


def test_unfinished_variant_is_restarted_with_overwrite(tiny_cifar, tmp_path, monkeypatch):
    out = tmp_path / "ablate"
    argv = ["--variants", "dim96", "--max-steps", "3", "--batch-size", "8", "--data", tiny_cifar,
            "--device", "cpu", "--out", str(out)]
    (out / "dim96").mkdir(parents=True)
    (out / "dim96" / "config.json").write_text("{}")  # started once, never finished
    seen = []
    monkeypatch.setattr(speedrun, "train", lambda cfg, **k: seen.append(k) or
                        {"steps": 3, "test_acc": 10.0, "train_s": 1.0})
    assert ablate.main(argv) == 0
    assert seen[0]["overwrite"] is True and seen[0]["resume_state"] is None


@pytest.mark.parametrize("argv, message", [
    (["--variants", "baseline,mcsl"], "did you mean mcls"),
    (["--variants", "baseline", "--batch-size", "0"], "--batch-size must be in [1, inf) (got 0)"),
    (["--variants", "baseline,baseline"], "twice"),
    (["--variants", "baseline", "--epochs", "1"], "not allowed with argument --epochs"),
])
def test_bad_input_is_one_line_exit_2(argv, message, tmp_path, capsys):
    assert ablate.main(argv + ["--max-steps", "3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        ablate.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--variants", "--epochs", "--max-steps", "--time-budget", "--seed",
                 "--batch-size", "--data", "--device", "--out"):
        assert flag in text
