"""Shared plumbing for the bench/ scripts: the paper's speed figures, config flags, synthetic data,
device-synchronised timing, the saved-activation counter, and one-line CLI errors.

A script run as `python bench/X.py` has bench/ as its import root: it imports this module first,
which puts the repository root on sys.path for speedrun, data_gpu and kernels.
"""
import argparse
import difflib
import gc
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import data_gpu  # noqa: E402  (needs ROOT on sys.path)
import kernels  # noqa: E402
import speedrun  # noqa: E402

UsageError = speedrun.UsageError
RESULTS = os.path.join(ROOT, "bench", "results")  # git-ignored

# REFERENCE.md, Table 1: the baseline's forward pass on an RTX 3090 (images/s, memory GB)
PAPER_TABLE1 = {32: (3162.09, 0.31), 64: (6521.61, 0.62), 128: (9449.16, 1.25),
                256: (9721.13, 2.50), 512: (10368.24, 5.00), 1024: (10607.06, 9.98)}
# REFERENCE.md, Figure 4: one baseline training step at batch 256 on an RTX 3090, ms
PAPER_FIG4_STEP_MS = 120.7
PAPER_FIG4_MS = {"forward": 25.2, "backward": 79.3, "optimizer": 12.7}
PAPER_DEVICE = "RTX 3090"


# ----------------------------------------------------------------------------------------------
# CLI: one-line errors, config flags shared by every script

class Parser(speedrun.Parser):
    """The trainer's one-line-error argparse, keeping the scripts' own description layout."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def add_config_args(parser: argparse.ArgumentParser, variant: bool = True) -> None:
    """Flags that pick the configuration: the same meaning as speedrun.py's flags.
    variant=False: the script takes a list of variants its own way (no --variant)."""
    if variant:
        parser.add_argument("--variant", default="baseline",
                            help="speedrun preset(s), comma-separated, later ones win "
                                 f"(one of: {', '.join(speedrun.VARIANTS)}) [baseline]")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override any speedrun Config field on top of the preset, e.g. "
                             "--set width=32 depth=1 heads=2 (names as in `python speedrun.py "
                             "--help`, dashes or underscores)")
    parser.add_argument("--device", default="auto", help="cuda, cpu, or auto: CUDA when present [auto]")
    for name in ("precision", "compile", "kernels"):  # the trainer's own flags, help and choices
        field = speedrun.CONFIG_FIELDS[name]
        parser.add_argument(f"--{name}", default=field.default, choices=field.metadata["choices"],
                            help=f"{field.metadata['help']} [{field.default}]")
    parser.add_argument("--data", default="",
                        help="cifar-10-python.tar.gz (or its extracted folder) to draw batches from; "
                             "default: synthetic random uint8 images of the right shape, which cost "
                             "the same to augment and train on")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for PyTorch ops (torch.set_num_threads); 0: PyTorch's "
                             "default. On a shared, loaded machine 1 avoids threads waiting on each "
                             "other [0]")
    parser.add_argument("--out", default="", help="output folder (default: see above)")


def check_ranges(args, ranges: dict) -> None:
    """Refuse the first flag outside its stated range, e.g. {"--batch-size": "[1, inf)"}, in the
    order given (a list flag: each of its values; a flag left at None was not given)."""
    for flag, interval in ranges.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        for item in value if isinstance(value, list) else [value]:
            error = None if item is None else speedrun.range_error(flag, item, interval)
            if error:
                raise UsageError(error)


def _parse_value(key: str, text: str):
    field = speedrun.CONFIG_FIELDS[key]
    kind = type(field.default)
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            value = lowered in ("1", "true", "yes", "on")
        else:
            value = kind(text)
    except ValueError:
        raise UsageError(f"--set {key}={text}: not a valid {kind.__name__}") from None
    choices = field.metadata.get("choices")
    if choices and value not in choices:
        raise UsageError(f"--set {key}={text}: choose one of {', '.join(choices)}")
    return value


def parse_overrides(items, reserved: dict = None) -> dict:
    """['width=32', 'depth=1'] -> {'width': 32, 'depth': 1}, typed as speedrun.Config declares.
    `reserved` maps fields this script sets itself to the flag that sets them."""
    reserved = reserved or {}
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep:
            raise UsageError(f"--set takes KEY=VALUE pairs (got {item!r})")
        if key in reserved:
            raise UsageError(f"--set {key}: use {reserved[key]} instead")
        if key not in speedrun.CONFIG_FIELDS or key == "variant":
            close = difflib.get_close_matches(key, speedrun.CONFIG_FIELDS, n=1)
            raise UsageError(f"--set {key}: no such config field"
                             + (f"; did you mean {close[0]}?" if close else ""))
        overrides[key] = _parse_value(key, text)
    return overrides


def variant_list(text: str, flag: str = "--variants") -> list:
    """'baseline,mcls+mla-q' -> ['baseline', 'mcls+mla-q']: comma-separated rows, each of presets
    joined with '+' (speedrun composes them); empty or repeated rows are a UsageError."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(f"{flag} is empty")
    if len(set(names)) != len(names):
        raise UsageError(f"{flag} lists a variant twice: {text}")
    return names


def config_from_args(args, reserved: dict = None, **fixed) -> speedrun.Config:
    """The trainer's Config for these flags: preset, then --set, then the device flags.
    Also applies --threads (run_main restores the thread count afterwards)."""
    check_ranges(args, {"--threads": "[0, inf)"})
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set, reserved)
    overrides.update(device=args.device, precision=args.precision, compile=args.compile,
                     kernels=args.kernels, **fixed)
    return speedrun.resolve_config(args.variant, **overrides)


def run_main(body, argv) -> int:
    """Run a script's body; bad input (UsageError, DataError) is one line on stderr, exit 2.
    The thread count is restored, so main() can be called from tests and notebooks."""
    threads = torch.get_num_threads()
    try:
        return body(argv)
    except (UsageError, data_gpu.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)


def default_out(kind: str, cfg: speedrun.Config, device: torch.device) -> str:
    return os.path.join(RESULTS, f"{kind}-{cfg.variant.replace(',', '+')}-{device.type}")


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# Data, devices, timing

def load_data(path: str = "", n_train: int = 4096, seed: int = 0) -> dict:
    """The trainer's data dict: the real set from `path`, or random uint8 images of CIFAR's shape.
    Throughput does not depend on pixel values (AutoAugment's per-image work is data-independent),
    so synthetic images measure the same pipeline without the 170 MB archive."""
    if path:
        return data_gpu.load_cifar10(path, log=lambda *a, **k: None)
    g = torch.Generator().manual_seed(seed)
    n_test, image = 256, (3, speedrun.SIDE, speedrun.SIDE)
    return {"train_x": torch.randint(0, 256, (n_train, *image), dtype=torch.uint8, generator=g),
            "train_y": torch.randint(0, speedrun.NUM_CLASSES, (n_train,), generator=g),
            "test_x": torch.randint(0, 256, (n_test, *image), dtype=torch.uint8, generator=g),
            "test_y": torch.randint(0, speedrun.NUM_CLASSES, (n_test,), generator=g)}


def sync(device: torch.device) -> None:
    """CUDA runs asynchronously: a clock read means nothing until the queue has drained."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, warmup: int, repeats: int, steps: int) -> list:
    """Seconds per call of fn(), once per repeat: `warmup` untimed calls (compilation, autotuning,
    allocator growth), then `repeats` timed runs of `steps` calls, synchronised at both ends."""
    for _ in range(warmup):
        fn()
    sync(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        seconds.append((time.perf_counter() - start) / steps)
    return seconds


def spread(values) -> dict:
    """Median with min and max: the median resists the odd slow repeat, min..max shows the noise."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": [round(v, 6) for v in values]}


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError ("can't allocate memory")."""
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "allocate memory" in text)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Memory: activation bytes saved for backward

def saved_activation_bytes(fn, exclude=()) -> int:
    """Bytes autograd keeps for backward while fn() builds its graph (fn's result is then dropped).

    Every tensor saved for backward passes the pack hook; counting each storage once (by its
    data_ptr) means views and tensors saved by several ops are not counted twice, and the storages
    of `exclude` (the parameters) are left out: what remains is activation memory, which is what
    grows with the batch and what a smaller layout or a fused kernel saves. Device-independent, so
    CPU runs give the same column as GPU runs."""
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    storages = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            ptr, size = id(t), t.numel() * t.element_size()
        if ptr not in skip:
            storages[ptr] = max(size, storages.get(ptr, 0))
        return t  # keeps the storage alive until fn's graph is dropped: no address is reused

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    del result
    return sum(storages.values())
