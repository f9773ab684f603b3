"""The first command to run on a GPU machine: does the product work there, and how fast is it?

    python bench/gpu_check.py [--data ../shared/data/cifar-10-python.tar.gz]

In about 8 minutes on a fresh H200 (measured before the profile and probes parts, which add
five compiles of mcls) it runs, in order (a part that fails is reported and the rest still run):
  1. tests       tests/test_cuda.py in a fresh process: no host syncs inside training steps,
                 the Triton kernels against their references on the device, compiled against
                 eager losses, no recompiles after the warm-up;
  2. kernels     the parity sweep (kernels/parity.py): every kernel configuration the variants
                 use, output and gradients against float64;
  3. steps       --steps compiled training steps each of mcls and baseline as a run takes
                 them (after Trainer.prepare: compiled, and on CUDA replayed as a CUDA graph),
                 then as many unrecorded ones split into data+forward / backward / optimizer
                 by CUDA events (on CPU by the clock, eager);
  4. profile     20 replays of that mcls step under the profiler (bench/trace_step.py
                 --captured): its GPU kernels, their busy time against the step's, the gaps
                 between them, the ten longest, the time by kind of kernel (ours, matmuls,
                 Inductor's, optimizer); a trace to open in Perfetto;
  5. probes      the steps part's measurement of mcls with one thing changed, to tell where its
                 time goes: --kernels torch (Inductor's attention in place of ours); 4x the
                 batch (a step bound by per-kernel costs, not by bytes, takes about as long for
                 4x the images); no AutoAugment (Inductor schedules 43 kernels for a step's
                 data, 14 without it); Inductor's combo kernels (independent small kernels, such
                 as the ~110 casts of weights to bf16 a step, launched a few at a time);
  6. table1      bench/throughput.py's forward and training throughput and memory of the
                 baseline at --batch-sizes (eager: a compile per batch size would not fit);
  7. epoch       one epoch of mcls through speedrun.train (compiled: warm-up, then the timed run
                 with its final evaluation), extrapolated to the full recipe.
--parts runs some of them, in the order given (on a short lease: the step first). Writes
gpu_check.md and gpu_check.json into --out (default bench/results/gpu_check-<device>/), rewritten
after every part so that a run stopped at a time limit keeps what it measured, and prints one
line per part. Without a CIFAR-10 archive the epoch runs on random images of the official
layout (timing only: its accuracy means nothing). With --device cpu it runs a reduced form: the
CUDA tests and the kernel sweep are skipped (it says so; tests/test_kernels.py runs the kernels
in Triton's interpreter), and the other parts run a few eager steps on batches of 64.
"""
import math
import os
import subprocess
import sys
import time
import traceback

import dataclasses

import torch
import torch._inductor.config  # the probes patch it

import common
import throughput
import trace_step
from common import UsageError, kernels, speedrun

DEFAULT_DATA = os.path.join(common.ROOT, "..", "shared", "data", "cifar-10-python.tar.gz")
# data and forward are one compiled graph (the step reads nothing from the host), so one phase
PHASES = ("data+forward", "backward", "optimizer")
PARTS = ("tests", "kernels", "steps", "profile", "probes", "table1", "epoch")


def build_parser() -> common.Parser:
    p = common.Parser(prog="bench/gpu_check.py", description=__doc__)
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto: CUDA when present [auto]")
    p.add_argument("--data", default="",
                   help="CIFAR-10 archive for the one-epoch run [../shared/data/cifar-10-python.tar.gz "
                        "if present, else speedrun's default: ./data, downloaded if missing]")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides for every part (e.g. width=32 depth=1 heads=2 for a "
                        "quick trial)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed training steps per variant [200 on CUDA, 2 on CPU]")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="Table 1 sweep [64 128 256 512 1024 on CUDA, 64 on CPU]")
    p.add_argument("--epoch-steps", type=int, default=None,
                   help="steps of the 'one epoch' run [a whole epoch on CUDA, 2 on CPU]")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), metavar="PART",
                   help="the parts to run, in this order [all: " + " ".join(PARTS) + "]")
    p.add_argument("--out", default="", help="output folder (default: see above)")
    return p


# ----------------------------------------------------------------------------------------------
# 1-2: what needs CUDA

def run_cuda_tests() -> dict:
    """tests/test_cuda.py in its own process, so that nothing here shares its compiled state;
    without its kernel sweep, which the part 'kernels' runs."""
    module = os.path.join(common.ROOT, "tests", "test_cuda.py")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", module,
           "--deselect", module + "::test_kernels_match_their_references_on_the_device"]
    done = subprocess.run(cmd, cwd=common.ROOT, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    return {"ok": done.returncode == 0, "summary": lines[-1] if lines else done.stderr[-300:],
            "failures": [l for l in lines if l.startswith(("FAILED", "ERROR"))]}


def run_kernel_sweep(device) -> dict:
    from kernels import parity
    rows = parity.sweep(device)
    worst = max(rows, key=lambda r: r["worst_error"] / parity.TOL[parity.DTYPES[r["dtype"]]])
    return {"ok": all(r["ok"] for r in rows), "configurations": len(rows),
            "failing": [r for r in rows if not r["ok"]], "worst": worst}


# ----------------------------------------------------------------------------------------------
# 3: the step, phase by phase

class PhaseTimer:
    """The time of each phase of each step: CUDA events on a GPU (read once, after the last
    step: no sync inside the loop), the clock on a CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.spans = {name: [] for name in PHASES}

    def __call__(self, name):
        timer = self

        class Span:
            def __enter__(self):
                self.start = torch.cuda.Event(enable_timing=True) if timer.cuda else time.perf_counter()
                if timer.cuda:
                    self.start.record()

            def __exit__(self, *exc):
                if timer.cuda:
                    end = torch.cuda.Event(enable_timing=True)
                    end.record()
                    timer.spans[name].append((self.start, end))
                else:
                    timer.spans[name].append(time.perf_counter() - self.start)

        return Span()

    def mean_ms(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            return {n: sum(a.elapsed_time(b) for a, b in s) / max(len(s), 1) for n, s in self.spans.items()}
        return {n: 1000 * sum(s) / max(len(s), 1) for n, s in self.spans.items()}


def probe_rows(mcls) -> list:
    """(label, config, Inductor options) of the probes: mcls with one thing changed each."""
    return [("mcls, kernels torch", dataclasses.replace(mcls, kernels="torch"), {}),
            ("mcls, 4x batch", dataclasses.replace(mcls, batch_size=4 * mcls.batch_size), {}),
            ("mcls, no AutoAugment", dataclasses.replace(mcls, autoaugment=False), {}),
            ("mcls, combo kernels", mcls, {"combo_kernels": True})]


def time_rows(rows, data, device, steps: int) -> list:
    """time_steps of each (label, config, Inductor options); a row's failure is its own, not
    the part's."""
    timed = []
    for label, cfg, options in rows:
        try:
            with torch._inductor.config.patch(options):
                timed.append({"label": label, **time_steps(cfg, data, device, steps)})
        except Exception as e:  # noqa: BLE001  the other rows still say what they measured
            traceback.print_exc()
            timed.append({"label": label, "variant": cfg.variant, "batch_size": cfg.batch_size,
                          "error": speedrun.data_gpu.one_line(e)[:200]})
    return timed


def time_steps(cfg, data, device, steps: int) -> dict:
    torch._dynamo.reset()
    trainer = speedrun.Trainer(cfg, data, device)
    keep = cfg.token_keep
    trainer.prepare({keep})  # compiles; on CUDA records the step as a CUDA graph
    untimed = 3 if device.type == "cuda" else 1  # autotuning, allocator growth
    for s in range(untimed):
        trainer.step(s, token_keep=keep)
    common.sync(device)
    start = time.perf_counter()
    for s in range(untimed, untimed + steps):
        trainer.step(s, token_keep=keep)
    common.sync(device)
    wall_ms = 1000 * (time.perf_counter() - start) / steps
    # the phases: the pieces Trainer.step runs, called one by one outside any CUDA graph
    timer = PhaseTimer(device)
    trainer.net.train()
    for _ in range(steps):
        with timer("data+forward"):
            loss = trainer.forward_loss(keep)
        with timer("backward"):
            loss.backward()
        with timer("optimizer"):
            trainer.update(loss)
            trainer.optimizer.zero_grad(set_to_none=True)
    phases = timer.mean_ms()
    return {"variant": cfg.variant, "batch_size": cfg.batch_size, "compiled": trainer.compiled,
            "cuda_graph": bool(trainer.graphs),
            "precision": "bf16" if trainer.amp_dtype else "fp32", "kernels": trainer.kernels,
            "steps": steps, "step_ms": wall_ms, "img_per_s": cfg.batch_size * 1000 / wall_ms,
            "phase_ms": phases}


def profile_step(cfg, data, device, out: str) -> dict:
    """Where the replayed step's time goes: its kernels, from a profile of the prepared step."""
    torch._dynamo.reset()
    active = 20 if device.type == "cuda" else 1
    report = trace_step.profile(cfg, data, device, out, wait=1, warmup=1, active=active, captured=True)
    return {"variant": cfg.variant, "batch_size": cfg.batch_size, "cuda_graph": report["graph"],
            "step_ms": report["step_median_ms"], "gpu_kernels": report["gpu_kernels"],
            "trace": report["trace"]}


# ----------------------------------------------------------------------------------------------
# 5: Table 1, with bench/throughput.py's own measurement

def table1(cfg, batch_sizes, device, timing) -> list:
    data = common.load_data("", n_train=max(4096, max(batch_sizes)), seed=cfg.seed)
    rows = []
    for bs in batch_sizes:
        with kernels.tf32_matmuls(True):
            row = throughput.run_one(throughput.our_trainer, dataclasses.replace(cfg, batch_size=bs),
                                     data, device, timing)
        rows.append({"batch_size": bs, **row})
    return rows


# ----------------------------------------------------------------------------------------------
# 6: one epoch of mcls, extrapolated

def synthetic_cifar(folder: str) -> str:
    """Random images in the official folder layout (50,000 + 10,000): the epoch's timing on a
    machine without the archive (a GPU lease that cannot fetch, or carry, 170 MB)."""
    import pickle
    import numpy as np
    path = os.path.join(folder, "cifar-10-batches-py")
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in speedrun.data_gpu._BATCHES:
        batch = {"data": rng.integers(0, 256, (10_000, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, 10_000).tolist()}
        with open(os.path.join(path, name), "wb") as f:
            pickle.dump(batch, f, protocol=4)
    return path


def one_epoch(cfg, steps: int, out: str) -> dict:
    torch._dynamo.reset()
    run_cfg = dataclasses.replace(cfg, max_steps=steps, out=out, eval_every=1e9, time_budget=0.0)
    summary = speedrun.train(run_cfg, overwrite=True)
    recipe = speedrun.resolve_config(cfg.variant)  # its own batch size (the reduced form's is 64)
    total = speedrun.data_gpu.steps_for(recipe.epochs, recipe.batch_size, 50_000,
                                        recipe.passes_per_epoch, recipe.drop_last)
    # from img/s, which the summary takes from the unrounded wall time: train_s is rounded to
    # 0.1 s, and a few tiny steps on a fast CPU round to 0.0
    image_s = 1 / max(summary["img_per_s"], 1e-9)
    eval_s = max(summary["timed_s"] - summary["train_s"], 0.0)  # the final evaluation (+ start-up)
    evaluations = math.ceil(recipe.epochs / recipe.eval_every)
    full = summary["warmup_s"] + total * recipe.batch_size * image_s + evaluations * eval_s
    return {"variant": cfg.variant, "steps": summary["steps"], "compiled": summary["compiled"],
            "warmup_s": summary["warmup_s"], "train_s": summary["train_s"],
            "eval_s": eval_s, "img_per_s": summary["img_per_s"], "recipe_steps": total,
            "recipe_evaluations": evaluations, "recipe_s": full, "test_acc": summary["test_acc"]}


# ----------------------------------------------------------------------------------------------
# Report

def fmt_ms(phases: dict) -> str:
    return " / ".join(f"{phases[n]:.2f}" for n in PHASES)


def markdown(report) -> str:
    lines = [f"# GPU check: {report['device_name']}", "",
             f"torch {report['torch']}, triton {report['triton']}, CUDA {report['cuda']}; "
             f"{report['seconds']:.0f} s in all.", "", "## Figures", ""]
    lines += [f"- {line}" for line in report["figures"]]
    parts = report["parts"]
    lines += ["", "## Parts", ""]
    for name, part in parts.items():
        if "skipped" in part:
            lines.append(f"- **{name}**: skipped: {part['skipped']}")
        elif "error" in part:
            lines.append(f"- **{name}**: FAILED: {part['error']}")
    yes = lambda flag: "yes" if flag else "no"
    for part, title in (("steps", "Training step"), ("probes", "Probes: mcls with one thing changed")):
        if "rows" not in parts.get(part, {}):
            continue
        lines += ["", f"### {title}, phase by phase (mean ms)", "",
                  "| row | batch | kernels | compiled | CUDA graph | step ms | img/s | "
                  "data+forward / backward / optimizer ms (unrecorded) |",
                  "|---|---:|---|---|---|---:|---:|---:|"]
        for r in parts[part]["rows"]:
            if "error" in r:
                lines.append(f"| {r['label']} | {r['batch_size']} | FAILED: {r['error']} ||||||")
                continue
            lines.append(f"| {r['label']} | {r['batch_size']} | {r['kernels']} | {yes(r['compiled'])} | "
                         f"{yes(r['cuda_graph'])} | {r['step_ms']:.2f} | {r['img_per_s']:,.0f} | "
                         f"{fmt_ms(r['phase_ms'])} |")
    if parts.get("profile", {}).get("gpu_kernels"):
        p = parts["profile"]
        lines += ["", f"### The replayed {p['variant']} step's kernels (batch {p['batch_size']})", "",
                  trace_step.kernel_text(p["gpu_kernels"]), "", f"Trace: `{p['trace']}`."]
    if "table1" in parts and "rows" in parts["table1"]:
        lines += ["", f"### Table 1: baseline (eager, {parts['table1']['precision']})", "",
                  "| batch | forward img/s | train img/s | activations MB | CUDA peak MB train | "
                  f"paper fwd img/s ({common.PAPER_DEVICE}) |", "|---:|---:|---:|---:|---:|---:|"]
        for r in parts["table1"]["rows"]:
            paper = common.PAPER_TABLE1.get(r["batch_size"], (None, None))[0]
            paper = f"{paper:,.0f}" if paper else "—"
            if r["status"] != "ok":
                lines.append(f"| {r['batch_size']} | OOM | OOM | — | — | {paper} |")
                continue
            lines.append(f"| {r['batch_size']} | {throughput.fmt_rate(r['forward_img_s'])} | "
                         f"{throughput.fmt_rate(r['train_img_s'])} | "
                         f"{throughput.fmt_mb(r['activation_bytes'])} | "
                         f"{throughput.fmt_mb(r.get('cuda_peak_train_bytes'))} | {paper} |")
    if "epoch" in parts and "recipe_s" in parts["epoch"]:
        e = parts["epoch"]
        lines += ["", "### One epoch of mcls, extrapolated", "",
                  f"{e['steps']} steps (compiled: {'yes' if e['compiled'] else 'no'}): warm-up "
                  f"{e['warmup_s']:.1f} s, training {e['train_s']:.1f} s ({e['img_per_s']:,.0f} img/s), "
                  f"final evaluation and start-up {e['eval_s']:.1f} s. The recipe: "
                  f"{e['recipe_steps']:,} steps and {e['recipe_evaluations']} evaluations, about "
                  f"{e['recipe_s'] / 60:.1f} min (warm-up + the recipe's images x this run's time per "
                  f"image + evaluations x this evaluation's time)."]
    tests = parts.get("tests", {})
    if tests.get("failures"):
        lines += ["", "### Failing CUDA tests", ""] + [f"- {f}" for f in tests["failures"]]
    return "\n".join(lines) + "\n"


def figures(parts) -> list:
    """The lines a person reads first: one per part run."""
    def part(name, text):
        p = parts.get(name, {})
        if "skipped" in p:
            return f"{name}: skipped ({p['skipped']})"
        if "error" in p:
            return f"{name}: FAILED ({p['error']})"
        return f"{name}: {text(p)}"

    def steps(p):
        return "; ".join(f"{r['label']} FAILED ({r['error']})" if "error" in r else
                         f"{r['label']} {r['step_ms']:.2f} ms/step at batch {r['batch_size']} "
                         f"({r['img_per_s']:,.0f} img/s; data+fwd/bwd/opt {fmt_ms(r['phase_ms'])} ms)"
                         for r in p["rows"])

    def t1(p):
        ok = [r for r in p["rows"] if r["status"] == "ok"]
        if not ok:
            return "every batch size ran out of memory"
        best = max(ok, key=lambda r: r["forward_img_s"]["median"])
        peak = ok[-1].get("cuda_peak_train_bytes")
        return (f"baseline forward {best['forward_img_s']['median']:,.0f} img/s at batch "
                f"{best['batch_size']}; training peak {throughput.fmt_mb(peak)} MB at batch "
                f"{ok[-1]['batch_size']}")

    def prof(p):
        k = p["gpu_kernels"]
        if not k:
            return (f"{p['variant']} step {p['step_ms']:.2f} ms under the profiler "
                    f"(no GPU kernels in a CPU trace)")
        top = k["top"][0]
        return (f"{p['variant']} replayed step {k['step_ms']:.2f} ms under the profiler: "
                f"{k['kernels']:.0f} kernels busy {k['busy_ms']:.2f} ms, {k['gaps_ms']:.2f} ms between "
                f"them (median gap {k['median_gap_us']:.1f} us); longest {top['name'][:40]} "
                f"{top['ms']:.3f} ms")

    texts = {
        "tests": lambda p: ("passed" if p["ok"] else "FAILED") + f" ({p['summary']})",
        "kernels": lambda p: (f"{p['configurations'] - len(p['failing'])}/{p['configurations']} "
                              f"configurations match; worst {p['worst']['kind']} {p['worst']['dtype']} "
                              f"{p['worst']['lsa']}: {p['worst']['worst_error']:.1e}"),
        "steps": steps,
        "probes": steps,
        "profile": prof,
        "table1": t1,
        "epoch": lambda p: (f"mcls full recipe about {p['recipe_s'] / 60:.1f} min "
                            f"({p['img_per_s']:,.0f} img/s, warm-up {p['warmup_s']:.0f} s)"),
    }
    return [part(name, texts[name]) for name in parts]  # the parts run so far, in their order


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = speedrun.pick_device(args.device)
    cuda = device.type == "cuda"
    steps = args.steps or (200 if cuda else 2)
    batch_sizes = args.batch_sizes or ([64, 128, 256, 512, 1024] if cuda else [64])
    if min([steps] + batch_sizes + [args.epoch_steps or 1]) < 1:
        raise UsageError("--steps, --batch-sizes and --epoch-steps must be positive")
    overrides = common.parse_overrides(args.set, {"batch_size": "--batch-sizes"})
    data_path = args.data or (DEFAULT_DATA if os.path.exists(DEFAULT_DATA) else "")

    def config(variant):
        # on a CPU the reduced form runs eagerly (a recipe-length run would compile there), on
        # batches of 64
        reduced = {} if cuda else {"compile": "off", "batch_size": 64}
        return speedrun.resolve_config(variant, **{**reduced, **overrides, "device": args.device})

    mcls, baseline = config("mcls"), config("baseline")  # bad --set fails here, before any part
    out = args.out or os.path.join(common.RESULTS, f"gpu_check-{device.type}")
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"gpu_check: {name} -> {out}", flush=True)
    parts = {}

    def attempt(part, fn):
        t = time.perf_counter()
        print(f"gpu_check: {part} ...", flush=True)
        try:
            parts[part] = fn()
        except Exception as e:  # one failing part must not hide what the others would show
            traceback.print_exc()
            parts[part] = {"error": speedrun.data_gpu.one_line(e)[:300]}
        parts[part]["seconds"] = round(time.perf_counter() - t, 1)

    no_cuda = "needs CUDA; this machine has none usable"
    skipped = {} if cuda else {"tests": no_cuda,
                               "kernels": no_cuda + " (tests/test_kernels.py interprets them on CPU)"}
    data = common.load_data("", n_train=4096, seed=0)
    if "epoch" in args.parts and not data_path:
        data_path = synthetic_cifar(os.path.join(out, "synthetic"))
        print(f"gpu_check: no CIFAR-10 archive; the epoch runs on random images ({data_path})")
    epoch_steps = args.epoch_steps or (speedrun.data_gpu.steps_for(1, mcls.batch_size, 50_000,
                                                                   mcls.passes_per_epoch)
                                       if cuda else 2)
    runs = {
        "tests": run_cuda_tests,
        "kernels": lambda: run_kernel_sweep(device),
        "steps": lambda: {"rows": time_rows([("mcls", mcls, {}), ("baseline", baseline, {})], data,
                                            device, steps)},
        "probes": lambda: {"rows": time_rows(probe_rows(mcls), data, device, steps)},
        "profile": lambda: profile_step(mcls, data, device, os.path.join(out, "profile-mcls")),
        "table1": lambda: {"precision": "bf16" if cuda else "auto",
                           "rows": table1(dataclasses.replace(baseline, compile="off"), batch_sizes,
                                          device, (3, 3, 10) if cuda else (1, 1, 1))},
        "epoch": lambda: one_epoch(dataclasses.replace(mcls, data=data_path), epoch_steps,
                                   os.path.join(out, "epoch-run")),
    }
    report = {"device": str(device), "device_name": name, "torch": torch.__version__,
              "triton": _triton_version(), "cuda": torch.version.cuda, "parts": parts}
    for part in args.parts:
        if part in skipped:
            parts[part] = {"skipped": skipped[part]}
        else:
            attempt(part, runs[part])
        write_report(report, out, time.perf_counter() - started)
    print()
    for line in report["figures"]:
        print(line)
    print(f"\ngpu_check: {report['seconds']:.0f} s; wrote {out}/gpu_check.md, gpu_check.json")
    failed = any("error" in p or p.get("ok") is False or any("error" in r for r in p.get("rows", []))
                 for p in parts.values())
    return 1 if failed else 0


def write_report(report: dict, out: str, seconds: float) -> None:
    report["seconds"] = seconds
    report["figures"] = figures(report["parts"])
    common.write_json(os.path.join(out, "gpu_check.json"), report)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(markdown(report))


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "absent"


def main(argv=None) -> int:
    return common.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
