"""A speedrun record, the field's way: the same command over several seeds, with a statistic.

Runs `python speedrun.py --variant V --seed N ...` once per seed, each in a fresh process as a
user would (start-up, data, training and final evaluation all inside the time budget), one after
another, then reports the test accuracies' mean, standard deviation, minimum and maximum and a
one-sided 95 % lower confidence bound of the mean (Student's t: mean - t(0.95, n-1) · s / √n).
With --target, the record claims the target only when that bound reaches it. It names the
machine (CPU model, the flags that decide bf16's speed, threads, and any of ISA_LIMITS set to
hold the kernels below the CPU's instruction set) and writes record.json, record.md (a row for
the README's records table) and each run's output (seedN.log) into --out.

    python bench/record.py --variant cpu-speedrun --seeds 5 --target 80 \
        --data ../shared/data/cifar-10-python.tar.gz
"""
import argparse
import collections
import datetime
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time

import common
from common import UsageError, speedrun

# one-sided 95 % quantiles of Student's t by degrees of freedom (larger df: the normal's 1.645)
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860,
       9: 1.833, 10: 1.812, 12: 1.782, 15: 1.753, 20: 1.725, 30: 1.697}
FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")  # what sets bf16's and fp32's speed
# what keeps PyTorch, oneDNN (bf16 matmuls) and MKL (fp32 ones) below the CPU's own instruction
# set: with all three at AVX2, an AVX-512 CPU stands in for an AVX2-only one
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def t95(df: int) -> float:
    """The quantile for df, or for the largest tabulated df below it (a conservative bound)."""
    return T95[max(k for k in T95 if k <= df)] if df < 30 else 1.645


def statistics_of(accs: list, target=None) -> dict:
    n, mean = len(accs), statistics.fmean(accs)
    std = statistics.stdev(accs) if n > 1 else float("nan")
    lower = mean - t95(n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    stats = {"n": n, "mean": mean, "std": std, "min": min(accs), "max": max(accs),
             "lower95": lower, "target": target}
    if target is not None:
        stats["target_met"] = n > 1 and lower >= target
    return stats


def machine() -> dict:
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    import torch
    return {"cpu": model, "flags": [f for f in FLAGS if f in flags], "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "kernels_isa": torch.backends.cpu.get_cpu_capability(),
            "isa_limits": {k: os.environ[k] for k in ISA_LIMITS if os.environ.get(k)}}


def limits_text(machine: dict) -> str:
    """The instruction-set limits a record ran under, as a shell prefix ('' for none)."""
    return " ".join(f"{k}={v}" for k, v in machine["isa_limits"].items())


def limited_by(machine: dict) -> str:
    """'; limited by …' after the machine's description, or '' with no limits."""
    return f"; limited by {limits_text(machine)}" if machine["isa_limits"] else ""


def build_parser() -> argparse.ArgumentParser:
    p = common.Parser(prog="bench/record.py", description=__doc__)
    p.add_argument("--variant", default="cpu-speedrun",
                   help="preset to record (see python speedrun.py --list-variants) [cpu-speedrun]")
    p.add_argument("--seeds", type=int, default=5, help="runs, with seeds 0..N-1 [5]")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds per run, start-up and final evaluation included [the preset's]")
    p.add_argument("--target", type=float, default=None,
                   help="test accuracy %% the record claims if its 95 %% lower bound reaches it")
    p.add_argument("--data", default="", help="cifar-10-python.tar.gz or its extracted folder")
    p.add_argument("--set", nargs="+", default=[], metavar="FLAG=VALUE",
                   help="more speedrun.py flags for every run, e.g. --set depth=4 precision=fp32")
    p.add_argument("--out", default="", help="folder for the runs and the report "
                                             "[bench/results/record-<variant>-<time>]")
    return p


def run_command(args, seed: int, out: str) -> list:
    cmd = [sys.executable, os.path.join(common.ROOT, "speedrun.py"), "--variant", args.variant,
           "--seed", str(seed), "--out", out, "--overwrite"]
    if args.time_budget is not None:
        cmd += ["--time-budget", f"{args.time_budget:g}"]
    if args.data:
        cmd += ["--data", args.data]
    for key, value in common.parse_overrides(args.set).items():
        flag = "--" + key.replace("_", "-")
        cmd += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return cmd


def tuning_of(run_out: str) -> tuple:
    """What a run trained and why, as its config.json says: a preset that fits itself to the CPU
    (cpu-speedrun) may choose differently from one run to the next, and keeps the reason (the
    probe's figures; None where nothing was fitted)."""
    with open(os.path.join(run_out, "config.json")) as f:
        cfg = json.load(f)
    return speedrun.tuning_text(cfg), cfg.get("fitted_because") or None


def markdown(report: dict) -> str:
    s, m = report["stats"], report["machine"]
    target = ""
    if s["target"] is not None:
        target = f"; 95 % lower bound {s['lower95']:.2f} % {'≥' if s['target_met'] else '<'} {s['target']:g} %"
    budget = report["budget_s"]
    used = max(r["total_s"] for r in report["runs"])
    counts = collections.Counter(r["tuning"] for r in report["runs"])
    tunings = "; ".join(f"{t} ×{n}" for t, n in counts.items())
    limits = limits_text(m)
    command = f"{limits} {report['command']}" if limits else report["command"]
    return ("| date | preset | CPU | runs | budget | test acc: mean ± std (min–max) | command |\n"
            "|---|---|---|---:|---|---|---|\n"
            f"| {report['date']} | {report['variant']} ({tunings}) | {m['cpu']} ({', '.join(m['flags']) or 'no bf16 flags'}, "
            f"{m['threads']} threads{limited_by(m)}) | {s['n']} | {budget} (≤ {used:.1f} s used) | "
            f"**{s['mean']:.2f} ± {s['std']:.2f} %** ({s['min']:.2f}–{s['max']:.2f}){target} | "
            f"`{command}` |")


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1 (got {args.seeds})")
    if args.time_budget is not None and not 0 < args.time_budget < math.inf:
        raise UsageError(f"--time-budget must be a positive number of seconds (got {args.time_budget})")
    if args.target is not None and not 0 <= args.target <= 100:
        raise UsageError(f"--target must be a test accuracy in [0, 100] % (got {args.target})")
    cfg = speedrun.resolve_config(args.variant, **common.parse_overrides(args.set))
    budget = f"{args.time_budget or cfg.time_budget:g} s" if (args.time_budget or cfg.time_budget) else "none"
    out = args.out or os.path.join(common.RESULTS, f"record-{args.variant}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    report = {"variant": args.variant, "date": datetime.date.today().isoformat(), "budget_s": budget,
              "machine": machine(), "runs": []}
    m = report["machine"]
    print(f"record: {args.variant}, {args.seeds} runs of {budget} on {m['cpu']} (PyTorch's "
          f"kernels {m['kernels_isa']}{limited_by(m)}) -> {out}")
    started = time.monotonic()
    for seed in range(args.seeds):
        run_out = os.path.join(out, f"seed{seed}")
        cmd = run_command(args, seed, run_out)
        log_path = os.path.join(out, f"seed{seed}.log")  # beside the run: --overwrite owns its folder
        with open(log_path, "w") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            with open(log_path) as f:
                lines = f.read().splitlines()
            last = lines[-1] if lines else f"exit status {done.returncode}"
            raise UsageError(f"seed {seed} failed: {last} (its output: {log_path})")
        with open(os.path.join(run_out, "summary.json")) as f:
            summary = json.load(f)
        tuning, because = tuning_of(run_out)
        report["runs"].append({"seed": seed, "test_acc": summary["test_acc"], "steps": summary["steps"],
                               "total_s": summary["total_s"], "img_per_s": summary["img_per_s"],
                               "eval_s": summary["eval_s"], "eval_reserve_s": summary["eval_reserve_s"],
                               "tuning": tuning, "chosen_because": because,
                               "log": log_path})
        spent = time.monotonic() - started
        eta = spent / (seed + 1) * (args.seeds - seed - 1)
        print(f"  seed {seed}: {summary['test_acc']:.2f} % in {summary['total_s']:.1f} s "
              f"(final evaluation {summary['eval_s']:.1f} s of {summary['eval_reserve_s']:.1f} s kept "
              f"for it), {summary['steps']:,} steps, {report['runs'][-1]['tuning']} | "
              f"ETA {eta / 60:.1f} min",
              flush=True)
    report["stats"] = statistics_of([r["test_acc"] for r in report["runs"]], args.target)
    report["command"] = shlex.join(["python", "bench/record.py"] + (argv if argv is not None else sys.argv[1:]))
    table = markdown(report)
    common.write_json(os.path.join(out, "record.json"), report)
    with open(os.path.join(out, "record.md"), "w") as f:
        f.write(table + "\n")
    print()
    print(table)
    print(f"wrote {out}/record.json, record.md")
    return 0


def main(argv=None) -> int:
    return common.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
