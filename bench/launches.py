"""Kernel launches per training step, and the GPU step time they predict (issue 15).

For each variant it builds the trainer (speedrun.Trainer, the exact training code), runs one
warm-up step, then counts --steps calls of Trainer.step, whatever that step does:
  eager     every operator the step dispatches, seen by a TorchDispatchMode: `dispatched` ops, and
            `launches`, the ones that start a kernel on a GPU. Views and metadata ops (view, t,
            transpose, expand, slice, select, detach, split, ..., empty, _unsafe_view) launch
            nothing; a custom op (vitk::...) is one launch, whatever runs inside it. Split by the
            step's record_function ranges (data, forward, backward, optimizer; `other` outside).
  compiled  the same trainer with --compile on (Inductor; C++ kernels on a CPU): Dynamo's graphs
            and graph breaks, the compiled-graph calls per step, the kernels Inductor generated
            that run per step (counted at run time with Inductor's per-kernel profiling), and the
            dispatched ops that still launch per step, inside the graphs (extern matmuls, custom
            ops) or eagerly around them (augmentation, loss, optimizer).
The counts are the GPU's: which operators a step dispatches does not depend on the device, and
the step is set up as CUDA runs it (--precision auto = bf16 autocast; --kernels auto = the
kernels' custom ops with their PyTorch references inside, where CUDA runs Triton in them).
Two known gaps: Inductor's C++ fusion stands in for its Triton fusion (similar, not equal), and a
fused optimizer op (_fused_adamw_) counts as one launch where CUDA launches one per chunk of
tensors (a handful).

Prediction per GPU (H100 SXM and RTX 3090; bandwidth and bf16 peak from bench/roofline.py):
  arithmetic  max(FLOPs / (peak x --efficiency), bytes / (bandwidth x --efficiency)): FLOPs from
              speedrun.count_flops_per_image x batch (every token: an upper bound for a
              token-dropping preset such as cpu-speedrun); bytes: each tensor that a launching op
              of the eager step reads or writes, once (roofline.py's rule), summed over the step;
              fused bytes (compiled and captured steps): the bytes each kernel of the compiled
              graphs reads and writes, by Inductor's rule (a buffer counts min(whole buffer, the
              kernel's elements x its accesses to it)) applied to each node of a fused kernel,
              where Inductor's own count (num_bytes_accessed) takes every buffer a fused kernel
              touches whole (a gather of 256 images: the whole data set, and the run's whole
              index stream), plus the bytes of the compiled step's dispatched ops in the ranges
              where no graph runs (the optimizer);
  eager       launches x --launch-us (custom ops x --custom-op-us) + arithmetic (eager bytes):
              the host issues every kernel, and small kernels finish before the next is issued;
  compiled    the same with the compiled step's launches and fused bytes;
  captured    one CUDA-graph launch (--launch-us) + arithmetic (fused bytes): nothing else is
              issued per step;
  recipe      step time x the variant's full-recipe steps (50,000 images, its epochs and passes
              per epoch, at this batch).
The per-launch cost is a stated assumption: about 2-4 us for cudaLaunchKernel itself
(bench/roofline.py) plus 2-5 us of PyTorch's Python and dispatcher work per eager op on a fast
host: 6 us. A Triton custom-op call measured about 23 us of host dispatch (issue 15).

Check of the model: the paper's own model (bench/reference_model.py with the baseline's layout and
--set overrides), eager, fp32 with TF32 matmuls off (PyTorch's default, as the paper's plain loop
ran: its published code's fp16 autocast is optional; REFERENCE.md's Table 1 states no precision),
forward only, no_grad, at --batch-size: its ops counted the same way, FLOPs by PyTorch's
FlopCounterMode, predicted on the RTX 3090 at its fp32 peak (35.6 TFLOP/s: NVIDIA Ampere GA102
whitepaper, appendix A) and set beside Table 1's measured images/s.

Counting runs on the CPU (--device cpu); it needs no GPU. Writes launches.json and launches.md
into --out (default bench/results/launches-<variants>-cpu/) and prints the tables.

  python bench/launches.py
  python bench/launches.py --variants mcls --set width=32 depth=1 heads=2 --batch-size 8 --steps 1
"""
import argparse
import collections
import contextlib
import dataclasses
import logging
import math
import os
import sys

import torch
import torch._functorch.config
import torch._inductor.config
import torch._inductor.metrics
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import common
import reference_model
import roofline
from common import UsageError, data_gpu, speedrun

DEFAULT_VARIANTS = "baseline,mcls,cpu-speedrun"
PHASES = ("data", "forward", "backward", "optimizer")
CIFAR_TRAIN = 50_000
# ops that only make or reinterpret tensor metadata (or allocate): no kernel on a GPU. Plain view
# ops are recognised from their schema (OpOverload.is_view); these are the others.
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
             "_unsafe_view", "_reshape_alias", "lift_fresh", "resize_", "set_", "as_strided_",
             "squeeze_", "unsqueeze_", "t_", "transpose_", "detach_"}
SYNCS = {"_local_scalar_dense", "nonzero"}  # a device-to-host copy the host waits for
# ops that read only the elements they pick from their first input (the data set, a table)
GATHERS = {"index", "index_select", "gather", "take", "embedding"}


@dataclasses.dataclass(frozen=True)
class Gpu:
    bandwidth: float   # bytes/s
    bf16_flops: float  # dense tensor-core FLOP/s
    fp32_flops: float  # FP32 without tensor cores (TF32 matmuls off, PyTorch's default)


GPUS = {  # fp32: NVIDIA H100 datasheet (SXM5, 67 TFLOP/s); GA102 whitepaper (RTX 3090, 35.6)
    "H100": Gpu(roofline.GPUS["H100"][0], roofline.GPUS["H100"][1], 66.9e12),
    "RTX 3090": Gpu(roofline.GPUS["3090"][0], roofline.GPUS["3090"][1], 35.58e12),
}


@dataclasses.dataclass(frozen=True)
class Costs:
    launch_s: float = 6e-6
    custom_op_s: float = 23e-6
    efficiency: float = 0.5


def build_parser():
    p = common.Parser(prog="bench/launches.py", description=__doc__)
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help="comma-separated presets (speedrun.py --list-variants); join presets with "
                        f"'+' to compose them into one row, e.g. mcls+mla-q [{DEFAULT_VARIANTS}]")
    p.add_argument("--batch-size", type=int, default=256,
                   help="batch for every variant (a preset's own is overridden) [256]")
    common.add_config_args(p, variant=False)
    p.add_argument("--steps", type=int, default=3,
                   help="training steps counted after the warm-up step; counts are per step, "
                        "averaged (a step's mix choice changes a few ops) [3]")
    p.add_argument("--eager-only", action="store_true",
                   help="count the eager step only, skipping the compiled one (compiling costs "
                        "about a minute per variant on a small CPU)")
    p.add_argument("--launch-us", type=float, default=Costs.launch_s * 1e6,
                   help="host cost of one eager kernel launch, and of one CUDA-graph launch, "
                        f"in microseconds [{Costs.launch_s * 1e6:g}]")
    p.add_argument("--custom-op-us", type=float, default=Costs.custom_op_s * 1e6,
                   help="host cost of one custom-op (Triton kernel) call, microseconds "
                        f"[{Costs.custom_op_s * 1e6:g}]")
    p.add_argument("--efficiency", type=float, default=Costs.efficiency,
                   help="share of the peak FLOP/s and bandwidth the kernels reach, in (0, 1] "
                        f"[{Costs.efficiency:g}]")
    return p


# ----------------------------------------------------------------------------------------------
# Counting

def _nbytes(t: torch.Tensor) -> int:
    """Bytes an op touches in t: an expanded (stride-0) tensor reads only its storage."""
    size = t.numel() * t.element_size()
    try:
        return min(size, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return size


def _tensors(tree):
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def launches_kernel(func) -> bool:
    return func.namespace != "profiler" and not func.is_view and func._opname not in NO_KERNEL


class OpCounter(TorchDispatchMode):
    """Counts dispatched ops per record_function range; for the ones that launch a kernel also the
    bytes they read and write. ignore_compile_internals: off while torch.compile traces, on while
    compiled code runs, so a compiled region stays compiled and its extern calls are counted."""

    def __init__(self):
        super().__init__()
        self.ranges = []  # the open record_function names, innermost last
        self.dispatched = collections.Counter()                 # op -> calls
        self.launching = collections.Counter()                  # op -> calls, launching ones
        self.launches = collections.Counter()                   # phase -> kernel-launching ops
        self.custom = collections.Counter()                     # phase -> custom-op calls
        self.bytes = collections.Counter()                      # phase -> bytes
        self.syncs = 0

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def phase(self) -> str:
        return next((r for r in reversed(self.ranges) if r in PHASES), "other")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "profiler":  # record_function enters and leaves a range this way
            if func._opname == "_record_function_enter_new":
                self.ranges.append(args[0])
            elif func._opname == "_record_function_exit" and self.ranges:
                self.ranges.pop()
            return out
        name = f"{func.namespace}::{func._opname}"
        self.dispatched[name] += 1
        if launches_kernel(func):
            phase = self.phase()
            self.launching[name] += 1
            self.launches[phase] += 1
            self.custom[phase] += func.namespace not in ("aten", "prims")
            self.syncs += func._opname in SYNCS
            self.bytes[phase] += self._bytes(func, args, kwargs, out)
        return out

    @staticmethod
    def _bytes(func, args, kwargs, out) -> int:
        """Inputs read once; outputs written once; inputs the op mutates written too. A gather
        reads as many elements of its source as it writes."""
        inputs = _tensors((args, kwargs))
        seen = {id(t) for t in inputs}
        written = [t for t in _tensors(out) if id(t) not in seen]
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                written += _tensors(value)
        read = sum(map(_nbytes, inputs))
        if func._opname in GATHERS and isinstance(args[0], torch.Tensor):
            read += sum(map(_nbytes, written)) - _nbytes(args[0])
        return read + sum(map(_nbytes, written))

    def summary(self, steps: int, top: int = 12) -> dict:
        per = lambda counter: {k: v / steps for k, v in counter.items()}  # noqa: E731
        return {"dispatched": sum(self.dispatched.values()) / steps,
                "launches": sum(self.launches.values()) / steps,
                "custom_op_launches": sum(self.custom.values()) / steps,
                "launches_by_phase": per(self.launches),
                "bytes": sum(self.bytes.values()) / steps, "bytes_by_phase": per(self.bytes),
                "host_syncs": self.syncs / steps,
                "top_launching_ops": {n: c / steps for n, c in self.launching.most_common(top)}}


def count_eager(trainer, steps: int) -> dict:
    trainer.step(0)  # lazy state (optimizer moments, constants), not counted
    with OpCounter() as counter:
        for s in range(1, steps + 1):
            trainer.step(s)
    return counter.summary(steps)


def _members(node) -> list:
    """The plain scheduler nodes a fused node is made of (fusions nest)."""
    from torch._inductor.scheduler import FusedSchedulerNode
    if not isinstance(node, FusedSchedulerNode):
        return [node]
    return [m for sub in node.get_nodes() for m in _members(sub)]


def kernel_bytes(node) -> dict:
    """Bytes one scheduled kernel reads and writes, per buffer (call inside Inductor's graph
    context). Inductor's rule (Scheduler node get_read_write_buffer_accesses): a buffer counts
    min(whole buffer, the kernel's elements x its accesses to it). For a fused kernel Inductor
    takes the kernel's elements as 1e9, so every buffer it touches counts whole: a gather of
    256 images counts the whole data set, a step's 256 indices the run's whole index stream.
    Here a fused kernel's buffer counts min(Inductor's figure, the sum over its member nodes of
    their elements x their accesses to it), the rule Inductor applies to a node alone."""
    from torch._inductor.scheduler import FusedSchedulerNode, SchedulerNode
    from torch._inductor.utils import sympy_product
    from torch._inductor.virtualized import V
    counted = node.get_read_write_buffer_accesses(include_reads=True, include_writes=True)
    if not isinstance(node, FusedSchedulerNode):
        return counted
    elements = collections.Counter()
    for member in _members(node):
        if not isinstance(member, SchedulerNode):
            return counted
        ranges = member.get_ranges()
        numel = V.graph.sizevars.optimization_hint(
            sympy_product(ranges[0]) * sympy_product(ranges[1]), fallback=0)
        for dep in (*member.read_writes.reads, *member.read_writes.writes):
            elements[dep.name] += numel
    for name, nbytes in counted.items():
        buf = V.graph.name_to_buffer.get(name) or V.graph.graph_inputs.get(name)
        try:
            itemsize = buf.get_dtype().itemsize
        except (AttributeError, NotImplementedError):
            continue  # a multi-output or mutation layout: Inductor's figure stands
        if elements[name]:
            counted[name] = min(nbytes, elements[name] * itemsize)
    return counted


def _buffer_type(graph, name: str) -> str:
    """'bfloat16[16896, 288]' for a buffer of a graph being compiled."""
    buf = graph.name_to_buffer.get(name) or graph.graph_inputs.get(name)
    try:
        return f"{str(buf.get_dtype()).removeprefix('torch.')}{[int(d) for d in buf.get_size()]}"
    except (AttributeError, NotImplementedError, TypeError):
        return "(several outputs)"


class InductorBytes:
    """Per compiled graph, the bytes of each kernel Inductor scheduled (kernel_bytes), recorded
    while it compiles (the fx graph and AOT-autograd caches are off, so every graph compiles).
    graphs: [{"bytes": total, "inductor_bytes": Inductor's own count, "kernels": [...]}]."""

    def __init__(self):
        self.graphs = []

    @contextlib.contextmanager
    def recording(self):
        from torch._inductor.graph import GraphLowering
        original = GraphLowering.count_bytes
        recorder = self

        def count_bytes(graph):
            total, node_counts, runtimes = original(graph)
            kernels = []
            for node, _ in node_counts:
                per_buffer = kernel_bytes(node)
                if per_buffer:
                    kernels.append({"name": node.get_name(), "kind": type(node).__name__,
                                    "bytes": sum(per_buffer.values()),
                                    "buffers": {f"{name} {_buffer_type(graph, name)}": n for name, n
                                                in collections.Counter(per_buffer).most_common(4)}})
            recorder.graphs.append({"bytes": sum(k["bytes"] for k in kernels),
                                    "inductor_bytes": total, "kernels": kernels})
            return total, node_counts, runtimes

        GraphLowering.count_bytes = count_bytes
        try:
            with inductor_byte_count():
                yield self
        finally:
            GraphLowering.count_bytes = original

    def total(self) -> float:
        return sum(g["bytes"] for g in self.graphs)

    def summary(self, top: int = 8) -> dict:
        kernels = sorted(((i, k) for i, g in enumerate(self.graphs) for k in g["kernels"]),
                         key=lambda ik: -ik[1]["bytes"])
        return {"graph_bytes": self.total(),
                "inductor_graph_bytes": sum(g["inductor_bytes"] for g in self.graphs),
                "bytes_by_graph": [g["bytes"] for g in self.graphs],
                "kernels_by_graph": [len(g["kernels"]) for g in self.graphs],
                "top_kernels": [{"graph": i, **k} for i, k in kernels[:top]]}


@contextlib.contextmanager
def inductor_byte_count():
    """Inductor counts its graphs' bytes (GraphLowering.count_bytes) only while its metrics log is
    on, and only when it compiles: the log goes nowhere, the caches are off."""
    log = logging.getLogger("torch._inductor.compile_fx.__inductor_metrics")
    saved = log.level, log.propagate
    log.setLevel(logging.INFO)
    log.propagate = False
    sink = logging.NullHandler()
    log.addHandler(sink)
    torch._inductor.metrics.reset()
    try:
        with torch._inductor.config.patch({"fx_graph_cache": False}), \
                torch._functorch.config.patch({"enable_autograd_cache": False}):
            yield
    finally:
        log.removeHandler(sink)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def count_compiled(make_trainer, steps: int) -> dict:
    """Dynamo and Inductor counts of a freshly compiled trainer, and the run-time launches."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    # per-kernel profiler events: what runs per step, not what codegen built (its counter also
    # counts the scalar twin of every vectorised C++ kernel)
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        with InductorBytes().recording() as inductor_bytes:
            trainer = make_trainer()
            trainer.step(0)
        graphs = counters["stats"]["unique_graphs"]
        with OpCounter() as counter, torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for s in range(1, steps + 1):
                trainer.step(s)
    graph_calls, inductor = 0, collections.Counter()
    for event in prof.events():
        parent = event.cpu_parent
        if event.name.startswith("## Call CompiledFxGraph"):
            graph_calls += 1
        elif parent is not None and parent.name.startswith("## Call CompiledFxGraph") \
                and "::" not in event.name:  # not an op: an Inductor kernel
            inductor[_enclosing_phase(event)] += 1
    result = counter.summary(steps)
    result.update(
        dynamo_graphs=graphs, graph_breaks=sum(counters["graph_break"].values()),
        recompiled_while_counting=counters["stats"]["unique_graphs"] > graphs,
        graph_calls=graph_calls / steps, inductor_kernels=sum(inductor.values()) / steps,
        **inductor_bytes.summary(),
        inductor_kernels_by_phase={k: v / steps for k, v in inductor.items()})
    result["launches"] += result["inductor_kernels"]
    for phase, n in result["inductor_kernels_by_phase"].items():
        result["launches_by_phase"][phase] = result["launches_by_phase"].get(phase, 0) + n
    return result


def _enclosing_phase(event) -> str:
    while event is not None and event.name not in PHASES:
        event = event.cpu_parent
    return event.name if event is not None else "other"


def count_paper_forward(cfg, batch_size: int) -> dict:
    """The paper's plain model, eager fp32 forward (eval, no_grad) at this batch: ops and FLOPs."""
    model = reference_model.from_config(cfg).eval()
    x = data_gpu.normalize(common.load_data(n_train=batch_size, seed=cfg.seed)["train_x"][:batch_size])
    with torch.no_grad():
        model(x)  # lazy initialisation outside the count
        with FlopCounterMode(display=False) as flops, OpCounter() as counter:
            model(x)
    return {**counter.summary(1), "flops": flops.get_total_flops()}


# ----------------------------------------------------------------------------------------------
# Prediction

def arithmetic_s(flops: float, nbytes: float, peak: float, bandwidth: float, efficiency: float) -> float:
    return max(flops / (peak * efficiency), nbytes / (bandwidth * efficiency))


def host_s(launches: float, custom_launches: float, costs: Costs) -> float:
    return (launches - custom_launches) * costs.launch_s + custom_launches * costs.custom_op_s


def fused_bytes(eager: dict, compiled) -> float:
    """A compiled step's traffic: the bytes of its graphs' kernels (kernel_bytes; each graph runs
    once a step, extern calls included) plus outside_graph_bytes; without compiled counts, the
    eager step's."""
    if compiled is None:
        return eager["bytes"]
    return compiled["graph_bytes"] + outside_graph_bytes(compiled)


def outside_graph_bytes(compiled: dict) -> float:
    """The bytes of the ops dispatched in the ranges where no graph runs (what stays eager there,
    such as the optimizer); ops dispatched where a graph runs are its extern calls, counted in it."""
    in_graphs = compiled["inductor_kernels_by_phase"]
    return sum(b for p, b in compiled["bytes_by_phase"].items() if not in_graphs.get(p))


def predict_step_s(eager: dict, compiled, flops: float, peak: float, bandwidth: float,
                   costs: Costs) -> dict:
    """Seconds per training step: eager, compiled (None without its counts), captured, and
    their arithmetic alone (eager: unfused traffic; compiled and captured: fused)."""
    unfused = arithmetic_s(flops, eager["bytes"], peak, bandwidth, costs.efficiency)
    fused = arithmetic_s(flops, fused_bytes(eager, compiled), peak, bandwidth, costs.efficiency)
    return {"arithmetic_eager": unfused, "arithmetic_fused": fused,
            "eager": host_s(eager["launches"], eager["custom_op_launches"], costs) + unfused,
            "compiled": None if compiled is None else
            host_s(compiled["launches"], compiled["custom_op_launches"], costs) + fused,
            "captured": costs.launch_s + fused}


def recipe_steps(cfg) -> int:
    return data_gpu.steps_for(cfg.epochs, cfg.batch_size, CIFAR_TRAIN, cfg.passes_per_epoch,
                              cfg.drop_last)


def predict_paper_forward(paper: dict, batch_size: int, costs: Costs) -> dict:
    gpu = GPUS["RTX 3090"]
    step = host_s(paper["launches"], paper["custom_op_launches"], costs) + arithmetic_s(
        paper["flops"], paper["bytes"], gpu.fp32_flops, gpu.bandwidth, costs.efficiency)
    measured = common.PAPER_TABLE1.get(batch_size, (None,))[0]
    predicted = batch_size / step
    return {"predicted_img_s": predicted, "paper_img_s": measured,
            "predicted_over_paper": predicted / measured if measured else None}


# ----------------------------------------------------------------------------------------------
# Reporting

def _ms(seconds):
    return "—" if seconds is None else f"{seconds * 1e3:,.2f}"


def _s(seconds):
    return "—" if seconds is None else f"{seconds:,.0f}"


def _n(value):
    return "—" if value is None else f"{value:,.0f}"


def _bytes_table(report) -> list:
    """Where each compiled step's fused bytes go: per graph (in compile order: data + forward +
    loss, then backward), outside the graphs, and the largest kernel."""
    rows = [row for row in report["variants"] if row.get("compiled")]
    if not rows:
        return []
    lines = ["", "Fused bytes per step (GB): the compiled graphs in compile order (1: data + forward "
             "+ loss, 2: backward), the ops outside them (optimizer), and Inductor's own count of "
             "the graphs (a fused kernel's buffers counted whole); and the kernels Inductor "
             "scheduled per graph (extern ones included), nearer what a GPU launches than the "
             "C++ functions a CPU runs, which group several.", "",
             "| variant | graph 1 | graph 2 | outside | fused | Inductor's count | kernels scheduled 1 / 2 "
             "| largest kernel |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        c = row["compiled"]
        graphs = [f"{b / 1e9:,.2f}" for b in c["bytes_by_graph"][:2]] + ["—"] * (2 - len(c["bytes_by_graph"][:2]))
        top = c["top_kernels"][0] if c["top_kernels"] else None
        largest = "—" if top is None else (f"{top['bytes'] / 1e6:,.1f} MB (graph {top['graph'] + 1}: "
                                           + ", ".join(top["buffers"]) + ")")
        lines.append(f"| {row['variant']} | {' | '.join(graphs)} | "
                     f"{outside_graph_bytes(c) / 1e9:,.2f} | {fused_bytes(row['eager'], c) / 1e9:,.2f} | "
                     f"{c['inductor_graph_bytes'] / 1e9:,.2f} | "
                     f"{' / '.join(str(n) for n in c['kernels_by_graph'])} | {largest} |")
    return lines


def markdown(report) -> str:
    costs = report["costs"]
    lines = [f"Launches per training step at batch {report['batch_size']}, counted on "
             f"{report['cpu']} (torch {report['torch']}; {report['precision']}, kernels "
             f"{report['kernels']}); mean of {report['steps']} steps after one warm-up step.", "",
             "| variant | dispatched ops | eager launches | data / fwd / bwd / opt / other | custom ops | "
             "graphs (breaks) | graph calls | Inductor kernels | compiled launches | "
             "GFLOP/step | GB/step eager / fused |", "|---|" + "---:|" * 10]
    for row in report["variants"]:
        e, c = row["eager"], row.get("compiled")
        split = " / ".join(_n(e["launches_by_phase"].get(p, 0)) for p in PHASES + ("other",))
        compiled = (["—"] * 4 if c is None else
                    [f"{c['dynamo_graphs']} ({c['graph_breaks']})", _n(c["graph_calls"]),
                     _n(c["inductor_kernels"]), _n(c["launches"])])
        lines.append(f"| {row['variant']} | {_n(e['dispatched'])} | {_n(e['launches'])} | {split} | "
                     f"{_n(e['custom_op_launches'])} | " + " | ".join(compiled) +
                     f" | {row['flops_per_step'] / 1e9:,.1f} | {e['bytes'] / 1e9:,.2f} / "
                     f"{fused_bytes(e, c) / 1e9:,.2f} |")
    lines += _bytes_table(report)
    lines += ["", f"Predicted step time (ms) and full-recipe time (s): launch {costs['launch_us']:g} µs, "
              f"custom op {costs['custom_op_us']:g} µs, {costs['efficiency']:.0%} of peak FLOP/s "
              f"({report['precision']}) and bandwidth.", "",
              "| variant | GPU | arithmetic ms eager / fused | eager ms | compiled ms | captured ms | recipe steps "
              "| eager s | compiled s | captured s | paper s |", "|---|---|" + "---:|" * 9]
    for row in report["variants"]:
        for gpu, p in row["predicted"].items():
            paper = row["paper_runtime_s"] if gpu == common.PAPER_DEVICE else None
            lines.append(f"| {row['variant']} | {gpu} | {_ms(p['step_s']['arithmetic_eager'])} / "
                         f"{_ms(p['step_s']['arithmetic_fused'])} | "
                         f"{_ms(p['step_s']['eager'])} | {_ms(p['step_s']['compiled'])} | "
                         f"{_ms(p['step_s']['captured'])} | {row['recipe_steps']:,} | "
                         f"{_s(p['recipe_s']['eager'])} | {_s(p['recipe_s']['compiled'])} | "
                         f"{_s(p['recipe_s']['captured'])} | {_s(paper)} |")
    check = report["paper_check"]
    paper = check["paper_img_s"]
    lines += ["", f"Check: the paper's plain model ({check['model']}), eager fp32 forward at batch "
              f"{report['batch_size']} on an {common.PAPER_DEVICE}: {_n(check['launches'])} launches "
              f"({_n(check['dispatched'])} ops), {check['flops'] / 1e9:,.1f} GFLOP, "
              f"{check['bytes'] / 1e9:,.2f} GB; predicted {check['predicted_img_s']:,.0f} img/s"
              + (f", Table 1 measured {paper:,.0f} img/s: prediction / measured = "
                 f"{check['predicted_over_paper']:.2f}." if paper else
                 " (Table 1 has no figure at this batch).")]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------

def plan(args) -> list:
    """[(row name, eager Config)] for every requested variant; bad input raises UsageError."""
    return [(name, config_for(args, name.replace("+", ","))) for name in common.variant_list(args.variants)]


def config_for(args, variant: str):
    """The eager trainer's Config of one variant under these flags."""
    flags = argparse.Namespace(**{**vars(args), "variant": variant, "compile": "off"})
    return common.config_from_args(flags, {"batch_size": "--batch-size"}, batch_size=args.batch_size)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "CPU")
    except OSError:
        name = "CPU"
    return f"{name} ({os.cpu_count()} cores)"


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.steps < 1:
        raise UsageError("--batch-size and --steps must be >= 1")
    if not all(math.isfinite(v) and v >= 0 for v in (args.launch_us, args.custom_op_us)):
        raise UsageError("--launch-us and --custom-op-us must be >= 0")
    if not 0 < args.efficiency <= 1:
        raise UsageError("--efficiency must be in (0, 1]")
    if args.compile != "auto":
        raise UsageError("--compile: this script counts both the eager and the compiled step "
                         "(--eager-only skips the compiled one)")
    device = speedrun.pick_device("cpu" if args.device == "auto" else args.device)
    if device.type != "cpu":
        raise UsageError("--device: the counts are taken on the CPU (--device cpu); they need no GPU")
    # the step as CUDA runs it: bf16 autocast, the custom ops where CUDA runs Triton kernels
    args.precision = "bf16" if args.precision == "auto" else args.precision
    args.kernels = "reference" if args.kernels == "auto" else args.kernels
    costs = Costs(args.launch_us * 1e-6, args.custom_op_us * 1e-6, args.efficiency)
    configs = plan(args)
    paper_cfg = config_for(args, "baseline")
    if reference_model.layout_mismatches(paper_cfg):
        raise UsageError("the paper's plain model cannot take --set "
                         + ", ".join(reference_model.layout_mismatches(paper_cfg)))
    data = common.load_data(args.data, n_train=max(4096, args.batch_size), seed=configs[0][1].seed)
    joined = "+".join(name for name, _ in configs)
    out = args.out or os.path.join(common.RESULTS, f"launches-{joined}-{device.type}")
    os.makedirs(out, exist_ok=True)

    report = {"cpu": cpu_name(), "torch": torch.__version__, "batch_size": args.batch_size,
              "steps": args.steps, "precision": args.precision, "kernels": args.kernels,
              "costs": {"launch_us": args.launch_us, "custom_op_us": args.custom_op_us,
                        "efficiency": args.efficiency},
              "gpus": {name: dataclasses.asdict(g) for name, g in GPUS.items()}, "variants": []}
    for name, cfg in configs:
        print(f"launches: {name}: eager step ...", flush=True)
        eager = count_eager(speedrun.Trainer(cfg, data, device), args.steps)
        compiled = None
        if not args.eager_only:
            print(f"launches: {name}: compiled step (compiling) ...", flush=True)
            compiled = count_compiled(
                lambda: speedrun.Trainer(dataclasses.replace(cfg, compile="on"), data, device),
                args.steps)
        flops = speedrun.count_flops_per_image(cfg) * cfg.batch_size
        steps = recipe_steps(cfg)
        predicted = {}
        for gpu_name, gpu in GPUS.items():
            peak = gpu.bf16_flops if args.precision == "bf16" else gpu.fp32_flops
            step_s = predict_step_s(eager, compiled, flops, peak, gpu.bandwidth, costs)
            predicted[gpu_name] = {"step_s": step_s,
                                   "recipe_s": {k: None if step_s[k] is None else step_s[k] * steps
                                                for k in ("eager", "compiled", "captured")}}
        report["variants"].append({
            "variant": name, "config": dataclasses.asdict(cfg), "eager": eager, "compiled": compiled,
            "flops_per_step": flops, "recipe_steps": steps, "predicted": predicted,
            "paper_runtime_s": speedrun.VARIANTS[name].paper_runtime_s if name in speedrun.VARIANTS else None})

    paper = count_paper_forward(paper_cfg, args.batch_size)
    report["paper_check"] = {**paper, **predict_paper_forward(paper, args.batch_size, costs),
                             "model": f"width {paper_cfg.width}, depth {paper_cfg.depth}, "
                                      f"{paper_cfg.heads} heads"}

    table = markdown(report)
    common.write_json(os.path.join(out, "launches.json"), report)
    with data_gpu.atomic_write(os.path.join(out, "launches.md"), "w") as f:
        f.write(table)
    print()
    print(table)
    print(f"wrote {out}/launches.json, launches.md")
    return 0


def main(argv=None) -> int:
    return common.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
