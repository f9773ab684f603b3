"""Ablation runner: the paper's Table 2 and 3 variants, one after another, under one budget.

Every variant trains with speedrun.py's own `train` under the same budget (--epochs,
--max-steps or --time-budget), the same --seed and, when given, the same --batch-size, each
into its own run folder <out>/<variant>/. After every variant the results so far are written
to <out>/ablate.md (a Markdown table) and <out>/ablate.json; the final table is printed.

How to read the table:
  * steps, wall s, img/s: what the run did -- `wall s` is training time (start-up and the
    final evaluation not included), img/s = steps x batch / wall s.
  * final acc %: top-1 on the 10,000 test images at the end of the run; `final vs base` is its
    difference to the `baseline` row of the same table (only when baseline is in the list).
  * best acc % / best ep: the statistic the paper reports, the best of the evaluations after
    epochs 1, 6, 11, ... (its code evaluates at the end of epochs 0, 5, ..., 95 counted from
    0, never at the end), and the epoch it came from; `best vs base` as above. A run shorter
    than one epoch has no such evaluation (—).
  * paper acc % / `paper vs base`: the paper's 100-epoch figure (that same best-of statistic)
    and its difference to the paper's baseline: read it beside `best acc %` / `best vs base`.
    Short budgets are far from 100 epochs: compare the *differences* between rows with the
    paper's, never the absolute accuracies.
  * --max-steps counts steps, not images: bs1024 and lion see 4x the images of a batch-256
    row per step. A --batch-size given here overrides every preset's own batch, bs1024's and
    lion's included (the runner says so).

Resuming: rerun the same command. A variant whose folder holds a summary.json from a run with
exactly this configuration (budget, seed, batch, data...) is not rerun; an unfinished one is
resumed from its checkpoint when it has one and its budget is in steps or epochs, otherwise
restarted (a --time-budget run cannot be resumed fairly: its budget counts start-up too).

    python bench/ablate.py --variants baseline,mla-q,mcls --max-steps 20 --batch-size 32 \
        --data ../shared/data/cifar-10-python.tar.gz
"""
import os
import sys

import dataclasses
import json
import time

import torch

import common
from common import UsageError, data_gpu, speedrun

# the paper's Table 2 and 3 rows that run on one GPU: the presets with a paper accuracy
PAPER_VARIANTS = [name for name, v in speedrun.VARIANTS.items() if v.paper_acc is not None]
DEFAULT_OUT = os.path.join(common.RESULTS, "ablate")
COLUMNS = [("variant", "variant"), ("status", "status"), ("steps", "steps"),
           ("compiled", "compiled"), ("train_s", "wall s"), ("img_per_s", "img/s"),
           ("test_acc", "final acc %"), ("vs_base", "final vs base"), ("best_test_acc", "best acc %"),
           ("best_epoch", "best ep"), ("best_vs_base", "best vs base"), ("paper_acc", "paper acc %"),
           ("paper_vs_base", "paper vs base")]


def build_parser() -> common.Parser:
    parser = common.Parser(
        description="Train a list of speedrun.py variants one after another under one common "
                    "budget and tabulate steps, wall time, img/s and test accuracy beside the "
                    "paper's accuracy. Rerunning the same command resumes where it stopped.",
        epilog="Give at most one of --epochs, --max-steps, --time-budget; with none, every variant "
               "runs its full recipe (100 epochs: hours on a GPU, days on a CPU). The table and "
               "JSON land in --out after every variant; interrupt freely and rerun to resume.")
    parser.add_argument("--variants", default=",".join(PAPER_VARIANTS),
                        help="comma-separated presets (speedrun.py --list-variants); join presets "
                             "with '+' to compose them into one row, e.g. mcls+mla-q (default: "
                             "the paper's Table 2 and 3 single-GPU rows: %(default)s)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=float,
                        help="epochs per variant (default: each preset's recipe, 100)")
    budget.add_argument("--max-steps", type=int, help="training steps per variant")
    budget.add_argument("--time-budget", type=float,
                        help="seconds per variant, start-up and final evaluation included")
    parser.add_argument("--seed", type=int, default=0,
                        help="the same seed for every variant (default: 0)")
    parser.add_argument("--batch-size", type=int,
                        help="batch for every variant (default: each preset's own)")
    parser.add_argument("--data", default="",
                        help="cifar-10-python.tar.gz or cifar-10-batches-py/ (default: "
                             "speedrun.py's ./data, downloaded if missing)")
    parser.add_argument("--device", default="auto",
                        help="cuda, cpu, or auto: CUDA when present (default: auto)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for PyTorch (torch.set_num_threads); 0: PyTorch's "
                             "default. On a shared, loaded machine 1 avoids threads waiting on "
                             "each other (default: 0)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="folder for the run folders, ablate.md and ablate.json "
                             "(default: bench/results/ablate)")
    return parser


# ----------------------------------------------------------------------------------------------
# Which variants to run, and what each folder already holds

def plan(args) -> list:
    """[(row name, Config)] for every requested variant; bad input raises UsageError."""
    names = common.variant_list(args.variants)
    overrides = {"seed": args.seed, "data": args.data, "device": args.device}
    for flag in ("epochs", "max_steps", "time_budget", "batch_size"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    runs = []
    for name in names:
        cfg = speedrun.resolve_config(name.replace("+", ","), **overrides,
                                      out=os.path.join(args.out, name))
        runs.append((name, cfg))
    return runs


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def same_config(saved, cfg) -> bool:
    """A saved config (config.json or a checkpoint's) describes the run cfg would make. The
    output path is left out: the same folder may be spelt relative or absolute."""
    if not isinstance(saved, dict):
        return False
    wanted = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as config.json has it
    return {k: v for k, v in saved.items() if k != "out"} == \
        {k: v for k, v in wanted.items() if k != "out"}


def folder_state(cfg):
    """('done', summary) | ('resume', checkpoint state) | ('fresh', None) for cfg's run folder."""
    summary = _read_json(os.path.join(cfg.out, "summary.json"))
    if summary and same_config(_read_json(os.path.join(cfg.out, "config.json")), cfg):
        return "done", summary
    ckpt = os.path.join(cfg.out, "ckpt.pt")
    if os.path.exists(ckpt) and not cfg.time_budget:
        try:
            state = speedrun.load_checkpoint(ckpt)
        except UsageError:  # torn or foreign checkpoint: start again
            return "fresh", None
        if same_config(state.get("config"), cfg):
            return "resume", state
    return "fresh", None


# ----------------------------------------------------------------------------------------------
# Results: one row per variant, the Markdown table, the JSON file

def make_row(name: str, status: str, summary: dict = None, error: str = "") -> dict:
    paper = speedrun.VARIANTS.get(name)  # a composed row (mcls+mla-q) has no paper figure
    row = {"variant": name, "status": status, "paper_acc": paper.paper_acc if paper else None}
    for key in ("steps", "compiled", "train_s", "total_s", "img_per_s", "test_acc", "test_loss",
                "best_test_acc", "best_epoch", "out"):
        row[key] = (summary or {}).get(key)
    if error:
        row["error"] = error
    return row


def add_differences(rows: list) -> list:
    """Each row's accuracies (final, best) minus the baseline row's, and the paper's."""
    base = next((r for r in rows if r["variant"] == "baseline"), None)
    paper_base = speedrun.VARIANTS["baseline"].paper_acc
    for r in rows:
        for key, diff in (("test_acc", "vs_base"), ("best_test_acc", "best_vs_base")):
            ok = base and base.get(key) is not None and r.get(key) is not None
            r[diff] = round(r[key] - base[key], 2) if ok else None
        r["paper_vs_base"] = round(r["paper_acc"] - paper_base, 2) \
            if r["paper_acc"] is not None else None
    return rows


def budget_text(args) -> str:
    if args.max_steps is not None:
        return f"{args.max_steps} steps per variant"
    if args.time_budget is not None:
        return f"{args.time_budget:g} s per variant"
    return f"{args.epochs if args.epochs is not None else 'recipe'} epochs per variant"


def markdown(rows: list, args) -> str:
    def cell(key, value):
        if value is None:
            return "—"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if key in ("vs_base", "best_vs_base", "paper_vs_base"):
            return f"{value:+.2f}"
        if key == "best_epoch":
            return f"{value:g}"
        if isinstance(value, float):
            return f"{value:,.1f}" if key in ("train_s", "img_per_s") else f"{value:.2f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    batch = args.batch_size if args.batch_size is not None else "each preset's"
    lines = [f"Ablation: {budget_text(args)}, batch {batch}, seed {args.seed}, device "
             f"{args.device}, torch {speedrun.torch.__version__}. Paper: 100 epochs, batch 256, "
             f"best of its evaluations every 5 epochs.",
             "",
             "| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "|".join("---" if key in ("variant", "status") else "---:"
                            for key, _ in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(key, r.get(key)) for key, _ in COLUMNS) + " |")
    failed = [f"- {r['variant']} failed: {r['error']}" for r in rows if r.get("error")]
    if failed:
        lines += [""] + failed
    return "\n".join(lines) + "\n"


def write_results(rows: list, args) -> str:
    """Write ablate.md and ablate.json (each atomically); returns the table."""
    rows = add_differences(rows)
    table = markdown(rows, args)
    report = {"budget": {"epochs": args.epochs, "max_steps": args.max_steps,
                         "time_budget": args.time_budget},
              "batch_size": args.batch_size, "seed": args.seed, "device": args.device,
              "data": args.data, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    for name, text in (("ablate.md", table), ("ablate.json", json.dumps(report, indent=2))):
        path = os.path.join(args.out, name)
        with data_gpu.atomic_write(path, "w") as f:
            f.write(text)
    return table


# ----------------------------------------------------------------------------------------------
# Progress: overall ETA from the runs done so far

class Eta:
    """Remaining time of the ablation. A --time-budget run lasts its budget; otherwise a run's
    cost is taken as its training FLOPs, approximated as parameters x tokens x images in the
    budget (so bs1024's 4x images and dim96's 1/4 FLOPs count; counting FLOPs exactly costs
    seconds per variant on a CPU), and seconds per unit of cost come from the runs done so far."""

    def __init__(self, clock):
        self.clock, self.seconds, self.work, self._per_image = clock, 0.0, 0.0, {}

    def cost(self, cfg) -> float:
        if cfg.variant not in self._per_image:
            params = sum(p.numel() for p in speedrun.build_model(cfg).parameters())
            tokens = cfg.num_patches + cfg.num_cls
            self._per_image[cfg.variant] = params * tokens
        images = cfg.max_steps * cfg.batch_size if cfg.max_steps \
            else cfg.epochs * cfg.passes_per_epoch * 50_000
        return self._per_image[cfg.variant] * images

    def observe(self, cfg, seconds: float):
        """A run made from scratch in this invocation took `seconds`."""
        self.seconds += seconds
        if not cfg.time_budget:
            self.work += self.cost(cfg)

    def remaining(self, cfgs: list):
        if not cfgs:
            return 0.0
        if all(c.time_budget for c in cfgs):
            return sum(c.time_budget for c in cfgs)
        if not self.work:
            return None  # nothing measured yet
        return self.seconds / self.work * sum(self.cost(c) for c in cfgs)


def run_all(args, clock=time.monotonic) -> int:
    runs = plan(args)
    # bad --device or --data fail here, before any variant; the data read warms its cache
    if args.threads < 0:
        raise UsageError("--threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    speedrun.pick_device(args.device)
    data_gpu.load_cifar10(args.data or None, log=lambda *a, **k: None)
    if args.batch_size is not None:
        for name, _ in runs:
            own = speedrun.resolve_config(name.replace("+", ",")).batch_size
            if own != args.batch_size:
                print(f"ablate: note: --batch-size {args.batch_size} replaces {name}'s own "
                      f"batch {own}")
    rows, eta, started, failures = [], Eta(clock), clock(), 0
    for i, (name, cfg) in enumerate(runs):
        state, found = folder_state(cfg)
        if state == "done":
            rows.append(make_row(name, "cached", found))
            print(f"ablate [{i + 1}/{len(runs)}] {name}: finished earlier with this budget "
                  f"({found.get('test_acc')}%), not rerun")
            write_results(rows, args)
            continue
        left = eta.remaining([c for _, c in runs[i:]])
        print(f"ablate [{i + 1}/{len(runs)}] {name}: "
              f"{'resuming at step ' + str(found['step']) if state == 'resume' else 'starting'}"
              f" | elapsed {speedrun.fmt_time(clock() - started)} | ETA "
              f"{'?' if left is None else speedrun.fmt_time(left)} -> {cfg.out}", flush=True)
        t0 = clock()
        # each variant compiles afresh: otherwise Dynamo's recompile limit (8) is reached after
        # a few variants, and the rest run eagerly without a word
        torch._dynamo.reset()
        try:
            summary = speedrun.train(cfg, resume_state=found, overwrite=state == "fresh",
                                     clock=clock, start_time=t0)
        except KeyboardInterrupt:
            summary = {"stopped": "SIGINT"}
        except data_gpu.DataError:
            raise  # the same data for every variant: nothing else can run either
        except Exception as e:  # a failed variant must not cost the rest of a long ablation
            failures += 1
            message = data_gpu.one_line(e)
            rows.append(make_row(name, "failed", error=message))
            print(f"ablate [{i + 1}/{len(runs)}] {name}: failed: {message}", flush=True)
            write_results(rows, args)
            continue
        if "stopped" in summary:
            write_results(rows, args)
            print(f"ablate: stopped during {name}; rerun the same command to resume", flush=True)
            return 130
        if state == "fresh":
            eta.observe(cfg, clock() - t0)
        rows.append(make_row(name, "resumed" if state == "resume" else "ran", summary))
        write_results(rows, args)
    table = write_results(rows, args)
    print(f"\nablate: {len(rows)} variants in {speedrun.fmt_time(clock() - started)} "
          f"-> {os.path.join(args.out, 'ablate.md')}, ablate.json\n")
    print(table, end="")
    return 1 if failures else 0


def main(argv=None) -> int:
    def body(argv):
        try:
            return run_all(build_parser().parse_args(argv))
        except KeyboardInterrupt:  # between variants: every finished one is already on disk
            print("\nablate: interrupted; rerun the same command to resume", file=sys.stderr)
            return 130
    return common.run_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
