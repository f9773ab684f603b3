"""bf16 against fp32: does the fast precision cost accuracy? The same short run in both, over seeds.

For each seed, trains the configuration (preset + --set) for --max-steps steps once with
--precision fp32 and once with --precision bf16, with speedrun.py's own `train` (the exact
trainer), each into <out>/<precision>-seed<N>/, without a time budget (a preset's own is dropped)
so that both follow the same step-based schedule whatever their speed. Reported per run: the training loss at the end
(mean over the last --log-every steps, as the trainer logs it), the test accuracy and the
images/s; then per precision the mean and standard deviation over seeds, and the difference
bf16 - fp32 of the means with its standard error (sqrt(var_bf16/n + var_fp32/n)). "within
noise" means the difference is at most two standard errors, i.e. the seed-to-seed spread
explains it.

Writes results.json and table.md into --out (default bench/results/precision-<variant>-<device>/)
and prints the table.

    python bench/precision.py --variant cpu-speedrun --max-steps 400 --batch-size 128 \
        --seeds 0 1 2 --data ../shared/data/cifar-10-python.tar.gz
"""
import os
import sys

import dataclasses
import json
import math
import statistics

import common
from common import UsageError, speedrun

PRECISIONS = ("fp32", "bf16")
METRICS = ("loss", "test_acc")


def build_parser() -> common.Parser:
    p = common.Parser(prog="bench/precision.py", description=__doc__)
    common.add_config_args(p)
    p.add_argument("--max-steps", type=int, default=400, help="training steps per run [400]")
    p.add_argument("--batch-size", type=int, default=128, help="batch size [128]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds [0 1 2]")
    return p


def run_config(args, precision: str, seed: int, out: str) -> speedrun.Config:
    # no time budget: both precisions follow the same step-based schedule whatever their speed
    reserved = {"max_steps": "--max-steps", "batch_size": "--batch-size", "seed": "--seeds",
                "time_budget": "--max-steps (the runs are step-based)"}
    cfg = common.config_from_args(args, reserved, max_steps=args.max_steps, time_budget=0.0,
                                  batch_size=args.batch_size, seed=seed, data=args.data, out=out)
    return dataclasses.replace(cfg, precision=precision)


def run_one(cfg: speedrun.Config) -> dict:
    # a fresh compile per run: none falls back to eager at Dynamo's recompile limit
    speedrun.torch._dynamo.reset()
    summary = speedrun.train(cfg, overwrite=True)
    precision, seed, out = cfg.precision, cfg.seed, cfg.out
    with open(os.path.join(out, "metrics.jsonl")) as f:
        train = [row for row in map(json.loads, f) if row["kind"] == "train"]
    return {"precision": precision, "seed": seed, "steps": summary["steps"],
            "compiled": summary["compiled"],
            "loss": train[-1]["loss"], "test_acc": summary["test_acc"],
            "img_per_s": summary["img_per_s"]}


def compare(runs: list) -> dict:
    """Per metric: mean and std per precision, the bf16 - fp32 difference and its standard error."""
    out = {}
    for metric in METRICS:
        by = {p: [r[metric] for r in runs if r["precision"] == p] for p in PRECISIONS}
        mean = {p: statistics.fmean(v) for p, v in by.items()}
        std = {p: statistics.stdev(v) if len(v) > 1 else 0.0 for p, v in by.items()}
        diff = mean["bf16"] - mean["fp32"]
        se = math.sqrt(sum(std[p] ** 2 / len(by[p]) for p in PRECISIONS))
        out[metric] = {"mean": mean, "std": std, "diff": diff, "se": se,
                       "within_noise": abs(diff) <= 2 * se}
    return out


def markdown(runs: list, stats: dict, args) -> str:
    lines = [f"`{args.variant}` {' '.join(args.set)}: {args.max_steps} steps of {args.batch_size}, "
             f"seeds {' '.join(map(str, args.seeds))}", "",
             "| precision | seed | steps | compiled | final train loss | test acc % | img/s |",
             "|---|---:|---:|---|---:|---:|---:|"]
    lines += [f"| {r['precision']} | {r['seed']} | {r['steps']} | "
              f"{'yes' if r['compiled'] else 'no'} | {r['loss']:.4f} | "
              f"{r['test_acc']:.2f} | {r['img_per_s']:,.0f} |" for r in runs]
    lines += ["", "| metric | fp32 mean ± std | bf16 mean ± std | bf16 − fp32 | 2 s.e. | verdict |",
              "|---|---:|---:|---:|---:|---|"]
    for metric, s in stats.items():
        lines.append(f"| {metric} | {s['mean']['fp32']:.4f} ± {s['std']['fp32']:.4f} | "
                     f"{s['mean']['bf16']:.4f} ± {s['std']['bf16']:.4f} | {s['diff']:+.4f} | "
                     f"{2 * s['se']:.4f} | {'within noise' if s['within_noise'] else 'outside noise'} |")
    return "\n".join(lines) + "\n"


def body(argv) -> int:
    args = build_parser().parse_args(argv)
    common.check_ranges(args, {"--max-steps": "[1, inf)", "--batch-size": "[1, inf)",
                               "--seeds": speedrun.RANGES["seed"]})
    if args.precision != "auto":
        raise UsageError("--precision: this script runs both fp32 and bf16")
    if len(set(args.seeds)) < 2:
        raise UsageError("give at least two different --seeds: the noise is their spread")
    device = speedrun.pick_device(args.device)
    out = args.out or os.path.join(common.RESULTS, f"precision-{args.variant}-{device.type}")
    # every run's config checked before anything is written
    configs = [run_config(args, precision, seed, os.path.join(out, f"{precision}-seed{seed}"))
               for seed in args.seeds for precision in PRECISIONS]
    os.makedirs(out, exist_ok=True)
    runs = []
    for cfg in configs:
        runs.append(run_one(cfg))
        print(f"{cfg.precision} seed {cfg.seed}: loss {runs[-1]['loss']:.4f}, "
              f"test acc {runs[-1]['test_acc']:.2f} %", flush=True)
    stats = compare(runs)
    table = markdown(runs, stats, args)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "runs": runs, "stats": stats}, f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    print(table + f"wrote {out}/results.json, table.md")
    return 0


def main(argv=None) -> int:
    return common.run_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
