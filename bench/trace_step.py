"""Where a training step's time goes: the paper's Figure 4 as a command, with a browser trace.

Runs --wait + --warmup + --active training steps of a variant (speedrun.Trainer.step, the exact
training code) under torch.profiler: CPU activity always, CUDA activity on a GPU. Only the active
steps are recorded, so the trace stays small. Trainer.step marks four ranges, "data" (sampling +
augmentation + CutMix/MixUp), "forward" (model + loss), "backward" and "optimizer" (AdamW step +
zero_grad); the profiler marks each step as ProfilerStep#N.

The breakdown is computed by reading back the Chrome trace this script wrote (not from the
profiler's in-memory tables), so what it prints is what you see in the browser:
  on CPU   a range's time is its wall time on the main thread (the CPU autograd engine runs the
           backward on that same thread, so the four ranges tile the step);
  on CUDA  kernels run asynchronously, so a CPU range only measures how long it took to enqueue
           its work. Each range's time is instead the GPU time of the kernels (and memcpy/memset)
           it launched: a launch (cudaLaunchKernel...) inside the range's time window, on any
           thread (the backward launches from autograd's device thread), is matched to its GPU
           activity by the profiler's correlation id, and the busy time of those kernels is summed
           (overlaps counted once). The script synchronises the device after every step, so each
           ProfilerStep contains all of its own GPU work and steps do not bleed into each other.
Per range: the median over the active steps. "other" is the rest of each step (Python, launch
gaps, idle GPU); the step is the sum of the medians of its parts, so the parts never exceed it
(the plain median of the step durations is printed beside it). The paper's Figure 4 (baseline,
batch 256, RTX 3090: 120.7 ms = forward 25.2 + backward 79.3 + optimizer 12.7 + other) is printed
next to ours; its "other" includes its data loading.

On CUDA it also lists the GPU kernels of a step: how many, their busy time against the step's,
the gaps between them, and the ten that take longest. With --captured the step is first prepared
as a run prepares it (Trainer.prepare: compiled, and on CUDA recorded as a CUDA graph), so the
profile is of the replayed step a run times; a replay marks no ranges, so its kernels all fall in
"other" and the kernel list is the breakdown.

Writes trace.json (open it at https://ui.perfetto.dev -> "Open trace file", or chrome://tracing ->
"Load"), breakdown.json and breakdown.png into --out
(default bench/results/profile-<variant>-<device>/).

  python bench/trace_step.py --variant mcls
  python bench/trace_step.py --variant baseline --batch-size 256 --active 5
  python bench/trace_step.py --variant mcls --captured --active 20
"""
import os
import sys

import dataclasses
import itertools
import json
import statistics
from typing import Optional

import torch

import common
from common import UsageError, kernels, speedrun

PARTS = ("data", "forward", "backward", "optimizer")
COLUMNS = PARTS + ("other",)
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
# what a GPU kernel is, by its name, first match wins (SDPA's "fmha_cutlass..." is attention, not
# a matmul): the question a replayed step's profile answers is which kind of kernel its time goes to
KERNEL_KINDS = (("attention (ours, Triton)", ("_attn_fwd", "_attn_bwd")),
                ("low-rank (ours, Triton)", ("lowrank",)),
                ("attention (PyTorch's)", ("flash", "fmha", "sdpa", "attention", "attn")),
                ("matmul (cuBLAS/CUTLASS)", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm80_",
                                             "sm90_", "ampere_", "hopper_")),
                ("optimizer", ("multi_tensor", "foreach", "adam", "lion")),
                ("Inductor's fused (triton_)", ("triton_",)),
                ("copies and fills", ("memcpy", "memset", "copy", "fill")))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(m in low for m in marks)), "other")


def build_parser():
    p = common.Parser(prog="bench/trace_step.py", description=__doc__)
    common.add_config_args(p)
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch size [256 on CUDA, as Figure 4; 64 on CPU, to stay quick]")
    p.add_argument("--wait", type=int, default=None,
                   help="steps run before the profiler records anything (compilation, "
                        "autotuning, allocator growth) [3 on CUDA, 1 on CPU]")
    p.add_argument("--warmup", type=int, default=1,
                   help="steps the profiler traces but discards (its own start-up cost) [1]")
    p.add_argument("--active", type=int, default=3,
                   help="steps recorded in the trace; the breakdown is their median [3]")
    p.add_argument("--captured", action="store_true",
                   help="profile the step a run times: compiled and (on CUDA) replayed as a CUDA "
                        "graph, prepared before the profiler starts (with --compile off: eager)")
    return p


# ----------------------------------------------------------------------------------------------
# Profiling

def profile_steps(trainer, wait, warmup, active, trace_path):
    device = trainer.device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1)
    written = []

    def export(prof):
        prof.export_chrome_trace(trace_path)
        written.append(trace_path)

    with kernels.tf32_matmuls(True), \
            torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=export) as prof:
        for s in range(wait + warmup + active):
            trainer.step(s)
            common.sync(device)  # the step's GPU work ends inside its ProfilerStep range
            prof.step()
    if not written:
        raise RuntimeError("the profiler wrote no trace")


# ----------------------------------------------------------------------------------------------
# Reading the trace back

def union_us(intervals) -> float:
    """Length of the union of (start, end) intervals: concurrent kernels count once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def trace_events(trace_path) -> list:
    """The complete events ('X': a start and a duration) of a Chrome trace file, read once for
    read_breakdown and read_kernels (a GPU trace of 20 steps runs to tens of MB)."""
    with open(trace_path) as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def read_breakdown(events: list, source: str = "the trace") -> dict:
    """Per active step, ms spent in each named range (and the step), from a trace's events."""
    marks = [e for e in events if e.get("cat") == "user_annotation"]
    steps = sorted((e for e in marks if e["name"].startswith("ProfilerStep#")), key=lambda e: e["ts"])
    ranges = [e for e in marks if e["name"] in PARTS]
    gpu = {}
    for e in events:
        if e.get("cat") in GPU_CATS and "correlation" in e.get("args", {}):
            gpu.setdefault(e["args"]["correlation"], []).append((e["ts"], e["ts"] + e["dur"]))
    launches = [e for e in events
                if e.get("cat") in LAUNCH_CATS and e.get("args", {}).get("correlation") in gpu]
    timing = "gpu-kernels" if gpu else "cpu-ranges"

    def within(e, outer):
        return outer["ts"] <= e["ts"] and e["ts"] + e.get("dur", 0) <= outer["ts"] + outer["dur"]

    def range_us(r):
        if timing == "cpu-ranges":
            return r["dur"]
        return union_us([iv for launch in launches if within(launch, r)
                         for iv in gpu[launch["args"]["correlation"]]])

    per_step = []
    for step in steps:
        ms = {part: 0.0 for part in PARTS}
        for r in ranges:
            if within(r, step):
                ms[r["name"]] += range_us(r) / 1000
        ms["step"] = step["dur"] / 1000
        ms["other"] = max(0.0, ms["step"] - sum(ms[p] for p in PARTS))
        per_step.append(ms)
    if not per_step:
        raise RuntimeError(f"{source} holds no ProfilerStep ranges")
    median = {c: statistics.median(s[c] for s in per_step) for c in COLUMNS}
    step_ms = sum(median.values())
    return {"timing": timing, "active_steps": len(per_step), "per_step_ms": per_step,
            "median_ms": median, "step_ms": step_ms,
            "step_median_ms": statistics.median(s["step"] for s in per_step),
            "percent": {c: 100 * v / step_ms if step_ms else 0.0 for c, v in median.items()}}


def read_kernels(events: list, top: int = 10) -> Optional[dict]:
    """Per active step (means): the GPU kernels (and copies) that ran inside it, their busy time,
    the span from the first start to the last end, and the gaps between them; the `top` kernels
    by time per step, and every kernel summed by kind (KERNEL_KINDS). None for a trace without
    GPU activity (a CPU run)."""
    steps = [e for e in events if e.get("cat") == "user_annotation"
             and e["name"].startswith("ProfilerStep#")]
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    if not gpu or not steps:
        return None
    per_step, by_name = [], {}
    for step in steps:
        inside = [e for e in gpu if step["ts"] <= e["ts"] < step["ts"] + step["dur"]]
        if not inside:
            continue
        ends = [e["ts"] + e["dur"] for e in inside]
        gaps = [max(0.0, b["ts"] - a_end) for a_end, b in zip(itertools.accumulate(ends, max), inside[1:])]
        busy = union_us([(e["ts"], e["ts"] + e["dur"]) for e in inside])
        per_step.append({"kernels": len(inside), "step_ms": step["dur"] / 1000, "busy_ms": busy / 1000,
                         "span_ms": (max(ends) - inside[0]["ts"]) / 1000,
                         "gaps_ms": sum(gaps) / 1000,
                         "median_gap_us": statistics.median(gaps) if gaps else 0.0})
        for e in inside:
            calls, us = by_name.get(e["name"], (0, 0.0))
            by_name[e["name"]] = (calls + 1, us + e["dur"])
    if not per_step:
        return None
    n = len(per_step)
    mean = {k: statistics.fmean(s[k] for s in per_step) for k in per_step[0]}
    by_kind = {}
    for name, (calls, us) in by_name.items():
        kind = kernel_kind(name)
        kind_calls, kind_us = by_kind.get(kind, (0, 0.0))
        by_kind[kind] = (kind_calls + calls, kind_us + us)

    def rows(totals, key):
        return [{key: name, "calls": calls / n, "ms": us / n / 1000, "mean_us": us / calls,
                 "percent_of_busy": 100 * us / n / 1000 / mean["busy_ms"] if mean["busy_ms"] else 0.0}
                for name, (calls, us) in sorted(totals.items(), key=lambda kv: -kv[1][1])]
    return {"steps": n, **mean, "top": rows(by_name, "name")[:top], "kinds": rows(by_kind, "kind")}


def kernel_text(k: dict) -> str:
    lines = [f"GPU per step (mean of {k['steps']}): {k['kernels']:.0f} kernels busy {k['busy_ms']:.2f} ms "
             f"of a {k['step_ms']:.2f} ms step; from the first kernel's start to the last's end "
             f"{k['span_ms']:.2f} ms, of which {k['gaps_ms']:.2f} ms between kernels "
             f"(median gap {k['median_gap_us']:.1f} us)", "",
             "| kernel | calls/step | ms/step | % of busy |", "|---|---:|---:|---:|"]
    lines += [f"| `{t['name'][:70]}` | {t['calls']:.0f} | {t['ms']:.3f} | {t['percent_of_busy']:.1f} |"
              for t in k["top"]]
    lines += ["", "| kind of kernel | calls/step | ms/step | mean us/call | % of busy |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {t['kind']} | {t['calls']:.0f} | {t['ms']:.3f} | {t['mean_us']:.1f} | "
              f"{t['percent_of_busy']:.1f} |" for t in k["kinds"]]
    return "\n".join(lines)


def paper_breakdown() -> dict:
    ms = dict(common.PAPER_FIG4_MS)
    ms["other"] = common.PAPER_FIG4_STEP_MS - sum(ms.values())  # includes its data loading
    return {"step_ms": common.PAPER_FIG4_STEP_MS, "median_ms": ms,
            "percent": {k: 100 * v / common.PAPER_FIG4_STEP_MS for k, v in ms.items()}}


# ----------------------------------------------------------------------------------------------
# Reporting

def table(ours, paper, label) -> str:
    lines = [f"| part | {label} ms | % | paper ms ({common.PAPER_DEVICE}, baseline, batch 256) | % |",
             "|---|---:|---:|---:|---:|"]
    for c in COLUMNS:
        pm = paper["median_ms"].get(c)
        paper_cells = (f"{pm:.1f} | {paper['percent'][c]:.1f}" if pm is not None
                       else "— (in other) | —")
        lines.append(f"| {c} | {ours['median_ms'][c]:.1f} | {ours['percent'][c]:.1f} | {paper_cells} |")
    lines.append(f"| **step** | **{ours['step_ms']:.1f}** | 100 | **{paper['step_ms']:.1f}** | 100 |")
    return "\n".join(lines)


def plot(ours, paper, label, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3))
    bars = [(label, ours), (f"paper ({common.PAPER_DEVICE}, baseline, batch 256)", paper)]
    colors = dict(zip(COLUMNS, ("#8c8c8c", "#4c72b0", "#dd8452", "#55a868", "#c9c9c9")))
    labelled = set()
    for y, (name, b) in enumerate(bars):
        left = 0.0
        for c in COLUMNS:
            share = b["percent"].get(c, 0.0)
            if share <= 0:
                continue
            ax.barh(y, share, left=left, color=colors[c], edgecolor="white",
                    label=None if c in labelled else c)
            labelled.add(c)
            if share >= 6:  # label segments wide enough to hold the text
                ax.text(left + share / 2, y, f"{c}\n{b['median_ms'][c]:.1f} ms", ha="center",
                        va="center", fontsize=8)
            left += share
    ax.set_yticks(range(len(bars)), [f"{n}\n{b['step_ms']:.1f} ms/step" for n, b in bars])
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of one training step (median over active steps)")
    ax.invert_yaxis()
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles, names, ncol=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------

def profile(cfg, data, device, out, wait: int, warmup: int, active: int, captured: bool) -> dict:
    """Profile cfg's training step; write trace.json, breakdown.json and breakdown.png into out
    and return the breakdown's report."""
    os.makedirs(out, exist_ok=True)
    trace_path = os.path.join(out, "trace.json")
    trainer = speedrun.Trainer(cfg, data, device)
    precision = "bf16" if trainer.amp_dtype else "fp32"
    print(f"profile: {cfg.variant} on {device}, batch {cfg.batch_size}, {precision}, compile "
          f"{'on' if trainer.compiled else 'off'}, kernels {trainer.kernels}: "
          f"{wait} wait + {warmup} warm-up + {active} active steps")
    if captured:
        trainer.prepare([cfg.token_keep])
        how = ("replayed as a CUDA graph" if trainer.graphs else
               "compiled, not recorded" if trainer.compiled else "eager: nothing to prepare")
        print(f"profile: the step prepared as a run prepares it ({how})")
    profile_steps(trainer, wait, warmup, active, trace_path)

    events = trace_events(trace_path)
    ours, paper = read_breakdown(events, trace_path), paper_breakdown()
    report = {"variant": cfg.variant, "device": str(device), "batch_size": cfg.batch_size,
              "precision": precision, "config": dataclasses.asdict(cfg),
              "captured": captured, "graph": bool(trainer.graphs),
              "gpu_kernels": read_kernels(events),
              "trace": trace_path, "trace_bytes": os.path.getsize(trace_path), **ours,
              "paper": {"device": common.PAPER_DEVICE, "variant": "baseline", "batch_size": 256,
                        **paper}}
    common.write_json(os.path.join(out, "breakdown.json"), report)
    label = f"{device.type}, {cfg.variant}, batch {cfg.batch_size}"
    plot(ours, paper, f"ours ({label})", os.path.join(out, "breakdown.png"))
    return report


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    common.check_ranges(args, {"--batch-size": "[1, inf)", "--wait": "[0, inf)",
                               "--warmup": "[0, inf)", "--active": "[1, inf)"})
    device = speedrun.pick_device(args.device)
    if args.wait is None:
        args.wait = 3 if device.type == "cuda" else 1
    batch_size = args.batch_size if args.batch_size is not None else 256 if device.type == "cuda" else 64
    cfg = common.config_from_args(args, {"batch_size": "--batch-size"}, batch_size=batch_size)
    out = args.out or common.default_out("profile", cfg, device)
    data = common.load_data(args.data, n_train=max(4096, batch_size), seed=cfg.seed)
    report = profile(cfg, data, device, out, args.wait, args.warmup, args.active, args.captured)

    how = ("GPU kernel time launched from each range" if report["timing"] == "gpu-kernels"
           else "CPU wall time of each range")
    print(f"\nper-step breakdown ({device.type}, {cfg.variant}, batch {batch_size}; {how}; median of "
          f"{report['active_steps']} active steps; plain median step {report['step_median_ms']:.1f} ms):\n")
    print(table(report, report["paper"], "ours"))
    if report["gpu_kernels"]:
        print("\n" + kernel_text(report["gpu_kernels"]))
    print(f"\nwrote {out}/breakdown.json, breakdown.png")
    print(f"trace: {report['trace']} ({report['trace_bytes'] / 2 ** 20:.1f} MB); open it at "
          f"https://ui.perfetto.dev (Open trace file) or in Chrome at chrome://tracing (Load)")
    return 0


def main(argv=None) -> int:
    return common.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
