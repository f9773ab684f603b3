"""Throughput and memory per batch size: the paper's Table 1 as a command, on the device at hand.

For each batch size it builds the trainer (speedrun.Trainer, the exact training code) and measures
  forward img/s   the model alone, eval mode, no_grad, inside the trainer's autocast, on a fixed
                  normalised batch: what the paper's Table 1 measured (RTX 3090, baseline);
  train img/s     whole training steps via Trainer.step: augmentation + forward + backward + AdamW;
  activations     bytes autograd saves for backward in one training forward + loss of the eager
                  model (saved-tensor hooks, each storage once, parameters excluded; autocast's
                  bf16 weight copies count, they live until the backward): the same meaning on
                  every device. torch.compile may save less (it can recompute cheap ops), which
                  the CUDA peak shows;
  CUDA peak       torch.cuda.max_memory_allocated during the forward and the training timing,
                  reset per batch size; it includes the weights, the optimizer state and the
                  data set that the trainer keeps on the device.
Timing: --warmup untimed calls (compilation, autotuning, allocator growth), then --repeats runs of
--steps calls, each synchronised with the device; the tables give the median run and (min-max).
A batch size that does not fit is reported as OOM and the sweep goes on.

--compare-reference also times bench/reference_model.py, the same model written the plain way
(separate q/k/v Linear layers, explicit matmul/softmax/matmul, eager, fp32 with TF32 matmuls off
as PyTorch's default), with the same parameter count, batch, device, data and augmentation path,
loss and optimizer (it runs inside the same Trainer.step), and reports our speed-up over it.

Writes results.json, table.md and throughput.png into --out
(default bench/results/throughput-<variant>-<device>/) and prints the table.

  python bench/throughput.py --variant baseline --batch-sizes 32 64 128
  python bench/throughput.py --compare-reference --set width=64 depth=2 --batch-sizes 16 32
"""
import os
import sys

import dataclasses
import itertools
import math

import torch

import common, reference_model
from common import UsageError, data_gpu, kernels, speedrun

DEFAULT_BATCH_SIZES = (32, 64, 128, 256, 512, 1024)
MB = 2 ** 20


def build_parser():
    p = common.Parser(prog="bench/throughput.py", description=__doc__)
    common.add_config_args(p)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=list(DEFAULT_BATCH_SIZES),
                   metavar="B", help="batch sizes to sweep [32 64 128 256 512 1024]")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls before each measurement [5 on CUDA, 1 on CPU]")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs per measurement; the median and min-max are reported [5]")
    p.add_argument("--steps", type=int, default=None,
                   help="calls per timed run [20 on CUDA, 2 on CPU]")
    p.add_argument("--compare-reference", action="store_true",
                   help="also time the plain-layout model (bench/reference_model.py) and report "
                        "our speed-up, forward and training")
    return p


# ----------------------------------------------------------------------------------------------
# What is measured

def our_trainer(cfg, data, device):
    return speedrun.Trainer(cfg, data, device)


def plain_trainer(cfg, data, device):
    """A Trainer of the plain layout: eager, fp32, same optimizer recipe, data path, loss and
    step code as ours."""
    model = reference_model.from_config(cfg)
    ours = sum(p.numel() for p in speedrun.build_model(cfg).parameters())
    plain = sum(p.numel() for p in model.parameters())
    assert plain == ours, f"plain layout has {plain:,} parameters, ours {ours:,}"
    return speedrun.Trainer(dataclasses.replace(cfg, precision="fp32", compile="off"), data,
                            device, model=model)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def measure(trainer, timing) -> dict:
    device, bs = trainer.device, trainer.cfg.batch_size
    row = {"status": "ok"}
    if device.type == "cuda":
        row["cuda_resident_bytes"] = torch.cuda.memory_allocated(device)

    # forward only, as Table 1: a fixed batch, so augmentation is not part of it
    x = data_gpu.normalize(trainer.data["train_x"][:bs])
    trainer.net.eval()

    def forward():
        with torch.no_grad(), trainer.autocast():
            trainer.net(x)

    reset_peak(device)
    seconds = common.time_calls(forward, device, *timing)
    row["forward_img_s"] = common.spread([bs / s for s in seconds])
    row["cuda_peak_forward_bytes"] = peak(device)

    # whole training steps (Trainer.step sets train mode itself)
    steps = itertools.count()
    reset_peak(device)
    seconds = common.time_calls(lambda: trainer.step(next(steps)), device, *timing)
    row["train_img_s"] = common.spread([bs / s for s in seconds])
    row["cuda_peak_train_bytes"] = peak(device)

    # activations: one training forward + loss of the eager model, counted, not timed
    trainer.model.train()
    xb, targets = trainer.batch(trainer.step_t)

    def loss():
        with trainer.autocast():
            return speedrun.soft_cross_entropy(trainer.model(xb), targets, trainer.cfg.label_smoothing)

    row["activation_bytes"] = common.saved_activation_bytes(loss, exclude=trainer.model.parameters())
    return row


def run_one(make, cfg, data, device, timing) -> dict:
    """Build and measure one trainer; out of memory gives {'status': 'OOM'} and frees everything."""
    if speedrun.pick_compile(cfg.compile, device):
        import torch._dynamo
        torch._dynamo.reset()  # each batch size compiles afresh, with static shapes, as a run would
    error = None
    try:
        trainer = make(cfg, data, device)
        decided = {"precision": "bf16" if trainer.amp_dtype else "fp32",
                   "compile": trainer.compiled, "kernels": trainer.kernels}
        return {**decided, **measure(trainer, timing)}
    except (RuntimeError, MemoryError) as e:
        if not common.is_out_of_memory(e):
            raise
        error = str(e).strip().splitlines()[0][:200]  # keep no reference to the failed frames
    finally:
        trainer = None
        common.free_memory(device)
    return {"status": "OOM", "error": error}


def ratio(ours, theirs, key):
    if ours["status"] != "ok" or theirs["status"] != "ok":
        return None
    return ours[key]["median"] / theirs[key]["median"]


# ----------------------------------------------------------------------------------------------
# Reporting

def fmt_rate(fig):
    return f"{fig['median']:,.0f} ({fig['min']:,.0f}–{fig['max']:,.0f})"


def fmt_mb(n):
    return "—" if n is None else f"{n / MB:,.1f}"


def fmt_x(r):
    return "—" if r is None else f"×{r:.3g}"


def paper_cells(bs):
    if bs not in common.PAPER_TABLE1:
        return ["—", "—"]
    rate, gb = common.PAPER_TABLE1[bs]
    return [f"{rate:,.0f}", f"{gb:.2f}"]


def markdown(report) -> str:
    cuda = report["device"].startswith("cuda")
    head = (f"Throughput of `{report['variant']}` on {report['device_name']} "
            f"({report['precision']}, compile {'on' if report['compile'] else 'off'}, kernels "
            f"{report['kernels']}, {report['data']} data); median of {report['timing']['repeats']} "
            f"runs of {report['timing']['steps']} calls after {report['timing']['warmup']} "
            f"warm-up, (min–max). Paper: baseline forward pass on an {common.PAPER_DEVICE}.")
    cols = ["batch", "forward img/s", "train img/s", "activations MB/step"]
    cols += ["CUDA peak MB fwd / train"] if cuda else []
    cols += [f"paper fwd img/s ({common.PAPER_DEVICE})", "paper memory GB"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for row in report["results"]:
        ours, bs = row["ours"], row["batch_size"]
        if ours["status"] == "ok":
            cells = [fmt_rate(ours["forward_img_s"]), fmt_rate(ours["train_img_s"]),
                     fmt_mb(ours["activation_bytes"])]
            if cuda:
                cells.append(f"{fmt_mb(ours['cuda_peak_forward_bytes'])} / "
                             f"{fmt_mb(ours['cuda_peak_train_bytes'])}")
        else:
            cells = ["OOM"] * (4 if cuda else 3)
        lines.append("| " + " | ".join([str(bs)] + cells + paper_cells(bs)) + " |")
    if report["compare_reference"]:
        lines += ["", f"Speed-up over the plain layout ({report['reference_differs']}):", "",
                  "| batch | fwd ours | fwd plain | fwd speed-up | train ours | train plain | "
                  "train speed-up | activations MB ours / plain |", "|" + "---:|" * 8]
        for row in report["results"]:
            ours, ref = row["ours"], row["reference"]

            def rate(r, key):
                return f"{r[key]['median']:,.0f}" if r["status"] == "ok" else "OOM"

            act = " / ".join(fmt_mb(r.get("activation_bytes")) for r in (ours, ref))
            lines.append(f"| {row['batch_size']} | {rate(ours, 'forward_img_s')} | "
                         f"{rate(ref, 'forward_img_s')} | {fmt_x(row['speedup']['forward'])} | "
                         f"{rate(ours, 'train_img_s')} | {rate(ref, 'train_img_s')} | "
                         f"{fmt_x(row['speedup']['train'])} | {act} |")
    return "\n".join(lines) + "\n"


def progress_line(row) -> str:
    ours = row["ours"]
    if ours["status"] != "ok":
        text = f"batch {row['batch_size']:>5} | OOM ({ours['error']})"
    else:
        text = (f"batch {row['batch_size']:>5} | forward {fmt_rate(ours['forward_img_s'])} img/s | "
                f"train {fmt_rate(ours['train_img_s'])} img/s | activations "
                f"{fmt_mb(ours['activation_bytes'])} MB")
        if ours.get("cuda_peak_train_bytes") is not None:
            text += f" | CUDA peak {fmt_mb(ours['cuda_peak_train_bytes'])} MB"
    if "reference" in row:
        text += (f" | plain: speed-up fwd {fmt_x(row['speedup']['forward'])}, "
                 f"train {fmt_x(row['speedup']['train'])}")
    return text


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    sizes = [r["batch_size"] for r in rows]

    def series(who, key, scale=1.0):
        vals = []
        for r in rows:
            m = r.get(who, {})
            v = m.get(key) if m.get("status") == "ok" else None
            v = v["median"] if isinstance(v, dict) else v
            vals.append(math.nan if v is None else v / scale)
        return vals

    fig, (ax_rate, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    paper_bs = sorted(common.PAPER_TABLE1)
    ax_rate.plot(sizes, series("ours", "forward_img_s"), "o-", label="ours, forward")
    ax_rate.plot(sizes, series("ours", "train_img_s"), "s-", label="ours, training step")
    if report["compare_reference"]:
        ax_rate.plot(sizes, series("reference", "forward_img_s"), "o--", label="plain layout, forward")
        ax_rate.plot(sizes, series("reference", "train_img_s"), "s--", label="plain layout, training step")
    ax_rate.plot(paper_bs, [common.PAPER_TABLE1[b][0] for b in paper_bs], "k^:",
                 label=f"paper, forward ({common.PAPER_DEVICE})")
    ax_rate.set_ylabel("images / s")
    ax_rate.set_title(f"{report['variant']} on {report['device_name']}")

    ax_mem.plot(sizes, series("ours", "activation_bytes", MB), "o-", label="ours, activations saved")
    if report["compare_reference"]:
        ax_mem.plot(sizes, series("reference", "activation_bytes", MB), "o--",
                    label="plain layout, activations saved")
    if report["device"].startswith("cuda"):
        ax_mem.plot(sizes, series("ours", "cuda_peak_forward_bytes", MB), "d-", label="ours, CUDA peak (forward)")
        ax_mem.plot(sizes, series("ours", "cuda_peak_train_bytes", MB), "d-", label="ours, CUDA peak (training)")
    ax_mem.plot(paper_bs, [common.PAPER_TABLE1[b][1] * 1024 for b in paper_bs], "k^:",
                label=f"paper ({common.PAPER_DEVICE})")
    ax_mem.set_ylabel("memory, MB")
    ax_mem.set_title("memory per batch")
    ticks = sorted(set(sizes) | set(paper_bs))
    for ax in (ax_rate, ax_mem):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------

def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    common.check_ranges(args, {"--batch-sizes": "[1, inf)", "--repeats": "[1, inf)",
                               "--steps": "[1, inf)", "--warmup": "[0, inf)"})
    device = speedrun.pick_device(args.device)
    cuda = device.type == "cuda"
    timing = (5 if cuda else 1) if args.warmup is None else args.warmup, args.repeats, \
        (20 if cuda else 2) if args.steps is None else args.steps
    batch_sizes = list(dict.fromkeys(args.batch_sizes))  # sweep each once, in the order given
    reserved = {"batch_size": "--batch-sizes"}
    configs = {bs: common.config_from_args(args, reserved, batch_size=bs) for bs in batch_sizes}
    cfg = configs[batch_sizes[0]]
    if args.compare_reference and reference_model.layout_mismatches(cfg):
        raise UsageError("--compare-reference needs the paper's layout; this config has "
                         + ", ".join(reference_model.layout_mismatches(cfg)))
    data = common.load_data(args.data, n_train=max(4096, max(batch_sizes)), seed=cfg.seed)
    out = args.out or common.default_out("throughput", cfg, device)
    os.makedirs(out, exist_ok=True)

    report = {
        "variant": cfg.variant, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__, "data": args.data or "synthetic",
        "timing": dict(zip(("warmup", "repeats", "steps"), timing)),
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "batch_size"},
        "compare_reference": args.compare_reference,
        "paper": {"device": common.PAPER_DEVICE, "what": "baseline, forward pass",
                  "table1": {str(b): {"forward_img_s": r, "memory_gb": g}
                             for b, (r, g) in common.PAPER_TABLE1.items()}},
        "results": [],
    }
    print(f"throughput: {cfg.variant} on {report['device_name']}, batch sizes "
          f"{' '.join(map(str, batch_sizes))} -> {out}")
    for bs in batch_sizes:
        row = {"batch_size": bs}
        with kernels.tf32_matmuls(True):
            row["ours"] = run_one(our_trainer, configs[bs], data, device, timing)
        if "precision" not in report and "precision" in row["ours"]:  # what the trainer chose
            report.update({k: row["ours"][k] for k in ("precision", "compile", "kernels")})
            print(f"throughput: {report['precision']}, compile {'on' if report['compile'] else 'off'},"
                  f" kernels {report['kernels']} (the trainer's choices)")
        if args.compare_reference:
            with kernels.tf32_matmuls(False):
                row["reference"] = run_one(plain_trainer, configs[bs], data, device, timing)
            row["speedup"] = {"forward": ratio(row["ours"], row["reference"], "forward_img_s"),
                              "train": ratio(row["ours"], row["reference"], "train_img_s")}
        if bs in common.PAPER_TABLE1:
            row["paper_forward_img_s"], row["paper_memory_gb"] = common.PAPER_TABLE1[bs]
        report["results"].append(row)
        print(progress_line(row), flush=True)

    report.setdefault("precision", "—")  # no trainer was ever built (every batch ran out of memory)
    report.setdefault("compile", None)
    report.setdefault("kernels", "—")
    if args.compare_reference:
        report["reference_differs"] = (
            f"plain = separate q/k/v Linear, explicit matmul/softmax/matmul, eager, fp32"
            f"{', TF32 matmuls off' if cuda else ''}; ours = fused qkv Linear, kernels "
            f"{report['kernels']}, {report['precision']}, compile "
            f"{'on' if report['compile'] else 'off'}; same data path, loss, optimizer, batch and device")
    table = markdown(report)
    common.write_json(os.path.join(out, "results.json"), report)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    plot(report, os.path.join(out, "throughput.png"))
    print()
    print(table)
    print(f"wrote {out}/results.json, table.md, throughput.png")
    return 0


def main(argv=None) -> int:
    return common.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
