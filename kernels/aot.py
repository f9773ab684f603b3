"""Ahead-of-time build of every kernel configuration the variants use, without a GPU.

    python -m kernels.aot [--arch 80 86 90] [--jobs 2]

For each configuration and target (sm_80 A100, sm_86 RTX 3090, sm_90 H100) it runs
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`, reads the cubin's
resource usage with the `cuobjdump` shipped in the triton wheel, and prints registers, shared
memory (Triton's dynamic shared memory, from the compile metadata) and local memory (spill
stack + local bytes). It exits non-zero if any configuration spills or needs more shared
memory than sm_86 grants one block (99 KB): such a configuration is not done.

Signatures mirror what a JIT launch specialises at the variants' shapes: pointers and the
integer arguments that are multiples of 16 there (widths, row and batch strides) carry
`tt.divisibility=16`; nothing else is specialised.
Results are cached by kernel source, configuration and target in ~/.cache/vitk-aot.
"""
import argparse
import hashlib
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields, replace
from itertools import product
from pathlib import Path

import torch

from . import flash_attn as attention, lowrank

TARGETS = (80, 86, 90)
# opt-in shared memory per block of each target these kernels can build for (bf16 tensor cores:
# sm_80 and newer); one configuration serves every GPU, so each must fit the smallest, sm_86's
SMEM_LIMITS = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
SMEM_LIMIT_SM86 = SMEM_LIMITS[86]
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
CACHE = Path(os.environ.get("VITK_AOT_CACHE", Path.home() / ".cache" / "vitk-aot"))

# What the variants run (key counts pick BLOCK_N): baseline/spt/depth-token-only 65 tokens
# (width 192, 12 heads → D 16), gap 64, mcls 66 (width 96 → D 8), 67 with three CLS tokens, up
# to 128; other head counts give D 32 or 64.
SEQ_LENS = (64, 65, 66, 67, 128)
LSA_MODES = {"off": dict(HAS_T=False, T_PER_HEAD=False, DIAG=False),
             "lsa-layer": dict(HAS_T=True, T_PER_HEAD=False, DIAG=True),
             "lsa-head": dict(HAS_T=True, T_PER_HEAD=True, DIAG=True)}
LOWRANK_SHAPES = ((192, 64, 192), (96, 64, 96))  # (in, latent, out)


@dataclass(frozen=True)
class Build:
    kernel: str               # kernel function name
    config: str               # human-readable configuration
    fn: object = field(repr=False, compare=False)
    signature: tuple = ()     # ((arg, type), ...)
    constexprs: tuple = ()    # ((arg, value), ...)
    aligned: tuple = ()       # args a JIT launch sees divisible by 16 (pointers, most strides)
    num_warps: int = 4
    num_stages: int = 1
    maxnreg: int = None       # ptxas register cap, where a config sets one

    def __reduce__(self):  # to a worker process: the kernel by name (a JITFunction won't pickle)
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "fn"}
        return _unpickle_build, (self.fn.fn.__module__, state)

    def key(self, cap: int) -> str:
        import triton
        blob = json.dumps([self.fn.cache_key, self.signature, self.constexprs, self.aligned, self.num_warps,
                           self.num_stages, self.maxnreg, cap, triton.__version__])
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _unpickle_build(module: str, state: dict) -> Build:
    return Build(fn=getattr(importlib.import_module(module), state["kernel"]), **state)


def _signature(fn, pointers: dict, floats=(), constexprs=None) -> tuple:
    """Every argument typed: pointers by element type, listed floats fp32, constexprs as such,
    the rest i32 (sizes and strides)."""
    constexprs = constexprs or {}
    sig = []
    for name in fn.arg_names:
        if name in constexprs:
            sig.append((name, "constexpr"))
        elif name in pointers:
            sig.append((name, "*" + pointers[name]))
        else:
            sig.append((name, "fp32" if name in floats else "i32"))
    return tuple(sig)


def _build(fn, config, pointers, floats, constexprs, num_warps, num_stages, maxnreg=None, aligned_ints=()):
    """JIT launches specialise pointers and integers divisible by 16 (vector loads); say the
    same here for pointers and for the integer args that are multiples of 16 at real shapes."""
    aligned = tuple(a for a in fn.arg_names if a in pointers or a in aligned_ints)
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    return Build(fn.fn.__name__, config, fn, _signature(fn, pointers, floats, constexprs),
                 tuple(sorted(constexprs.items())), aligned, num_warps, num_stages, maxnreg)


def _dedupe(builds):
    """One build per distinct compile; the configs that share it are listed in its label."""
    merged = {}
    for b in builds:
        key = (b.kernel, b.signature, b.constexprs, b.aligned, b.num_warps, b.num_stages, b.maxnreg)
        shape = b.config.split(" ")[0]
        if key in merged:
            first = merged[key]
            if shape not in first.config.split(" ")[0].split("|"):
                head, rest = first.config.split(" ", 1)
                merged[key] = replace(first, config=f"{head}|{shape} {rest}")
        else:
            merged[key] = b
    return list(merged.values())


ATTN_KERNELS = {"fwd": attention._attn_fwd_kernel, "bwd": attention._attn_bwd_kernel}


def attention_builds(seq_lens=SEQ_LENS, head_dims=attention.HEAD_DIMS, dtypes=tuple(DTYPES),
                     lsa_modes=tuple(LSA_MODES), latents=(0,), kernels=("fwd", "bwd"), tune=None):
    """latent R > 0: the mla-q form that builds queries from an R-wide latent in the kernel.
    tune: {BLOCK_M, num_warps} to try instead of attn_config's (for sweeps)."""
    builds = []
    for n, d, dtype, mode, latent in product(seq_lens, head_dims, dtypes, lsa_modes, latents):
        dt = DTYPES[dtype]
        for which in kernels:
            fn = ATTN_KERNELS[which]
            cfg = {**attention.attn_config(n, d, dtype, which, latent), **(tune or {})}
            meta = {k: cfg.pop(k) for k in ("num_warps", "num_stages", "maxnreg")}
            const = dict(HEAD_DIM=d, LATENT=latent, BLOCK_R=max(16, latent), **LSA_MODES[mode], **cfg)
            ptrs = {a: dt for a in ("Q", "WQ", "BQ", "K", "V", "O", "DO", "DQ", "DK", "DV")}
            ptrs.update(LSE="fp32", T="fp32", DT="fp32")
            # batch and row strides are multiples of 16 at real widths; head strides iff D is
            strides = [a for a in fn.arg_names if a.startswith("s") and a[-1] in "bn" + "h" * (d % 16 == 0)]
            q_up = f" q-up{latent}" if latent else ""
            cap = f" r{meta['maxnreg']}" if meta["maxnreg"] else ""
            label = f"N≤{cfg['BLOCK_N']} D{d} {dt} {mode}{q_up} BM{cfg['BLOCK_M']} w{meta['num_warps']}{cap}"
            builds.append(_build(fn, label, ptrs, ("scale",), const, aligned_ints=strides, **meta))
    return _dedupe(builds)


def lowrank_builds(shapes=LOWRANK_SHAPES, dtypes=tuple(DTYPES)):
    builds = []
    for (c_in, r, c_out), dtype in product(shapes, dtypes):
        dt = DTYPES[dtype]
        for which, fn in (("fwd", lowrank._lowrank_fwd_kernel), ("bwd", lowrank._lowrank_bwd_kernel)):
            cfg = lowrank.lowrank_config(c_in, r, c_out, dtype, which)
            meta = {k: cfg.pop(k) for k in ("num_warps", "num_stages", "maxnreg")}
            ptrs = {a: dt for a in ("X", "WD", "WU", "BIAS", "Y", "DY", "DX", "HID", "DHID")}
            label = f"{c_in}->{r}->{c_out} {dt} BM{cfg['BLOCK_M']} w{meta['num_warps']}"
            builds.append(_build(fn, label, ptrs, (), dict(R=r, HAS_BIAS=True, **cfg),
                                 aligned_ints=("C_IN", "C_OUT", "sxm", "sym", "sdym", "sdxm"), **meta))
    return _dedupe(builds)


def all_builds():
    # queries built in-kernel from the latent: mla-q at width 192 (D 16) and 96 (D 8)
    mla_q = attention_builds(head_dims=(8, 16), latents=(64,))
    return attention_builds() + mla_q + lowrank_builds()


def cuobjdump() -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"no cuobjdump in the triton wheel at {path}")
    return str(path)


def _cached(build: Build, cap: int):
    path = CACHE / f"{build.key(cap)}.json"
    return json.loads(path.read_text()) if path.exists() else None


def compile_one(build: Build, cap: int) -> dict:
    """Compile for sm_<cap> and return its resource usage (cached)."""
    hit = _cached(build, cap)
    if hit is not None:
        return hit
    cached = CACHE / f"{build.key(cap)}.json"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton.language as tl
    from triton.runtime.jit import JITFunction
    if not isinstance(tl.max, JITFunction):
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1, which makes its library "
                           "functions uncompilable: run kernels.aot in a process without it")
    attrs = {(build.fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in build.aligned}
    src = ASTSource(fn=build.fn, signature=dict(build.signature), constexprs=dict(build.constexprs),
                    attrs=attrs)
    options = dict(num_warps=build.num_warps, num_stages=build.num_stages)
    if build.maxnreg:
        options["maxnreg"] = build.maxnreg
    kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
    CACHE.mkdir(parents=True, exist_ok=True)
    cubin = CACHE / f"{build.key(cap)}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    out = subprocess.run([cuobjdump(), "--dump-resource-usage", str(cubin)],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output for {build.kernel}:\n{out}")
    regs, stack, static_smem, local = map(int, m.groups())
    res = dict(regs=regs, smem=static_smem + kernel.metadata.shared, local=stack + local)
    cached.write_text(json.dumps(res))
    cubin.unlink()
    return res


def ok(res: dict) -> bool:
    return res["local"] == 0 and res["smem"] <= SMEM_LIMIT_SM86


def _job(args):
    build, cap = args
    return compile_one(build, cap)


def run(builds, targets=TARGETS, jobs=1):
    """[(build, cap, resources)] for every build × target. Compiles run in fresh processes
    without TRITON_INTERPRET: a process that imported triton under it cannot compile (and
    compiles run in parallel there)."""
    work = [(b, cap) for b in builds for cap in targets]
    results = {w: _cached(*w) for w in work}
    todo = [w for w in work if results[w] is None]
    if todo:
        interpret = os.environ.pop("TRITON_INTERPRET", None)  # the workers inherit the env
        try:
            with ProcessPoolExecutor(max(1, jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
                results.update(zip(todo, pool.map(_job, todo)))
        finally:
            if interpret is not None:
                os.environ["TRITON_INTERPRET"] = interpret
    return [(b, cap, results[(b, cap)]) for b, cap in work]


def table(rows) -> str:
    """One line per configuration, the targets side by side: registers/shared bytes/spill bytes."""
    caps = sorted({cap for _, cap, _ in rows})
    by_build = {}
    for b, cap, r in rows:
        by_build.setdefault(b, {})[cap] = r
    head = "".join(f" {'sm_%d regs/smem/spill' % cap:>24}" for cap in caps)
    lines = [f"{'kernel':<20} {'config':<46}{head}"]
    for b, res in by_build.items():
        cells = "".join(f" {'%d/%d/%d' % (res[c]['regs'], res[c]['smem'], res[c]['local']):>24}" for c in caps)
        flag = "" if all(ok(r) for r in res.values()) else "  <-- FAIL"
        lines.append(f"{b.kernel:<20} {b.config:<46}{cells}{flag}")
    return "\n".join(lines)


def sweep(which: str, n: int, d: int, dtype, latent: int = 0, block_ms=(16, 32), warps=(4, 8, 16)):
    """Try (BLOCK_M, num_warps) for one attention kernel over every LSA mode and target:
    [(block_m, warps, worst regs, worst smem, worst spill, sm_86 resident warps)]."""
    out = []
    for bm, w in product(block_ms, warps):
        builds = attention_builds((n,), (d,), (dtype,), latents=(latent,), kernels=(which,),
                                  tune=dict(BLOCK_M=bm, num_warps=w))
        res = [r for _, _, r in run(builds)]
        regs, smem = max(r["regs"] for r in res), max(r["smem"] for r in res)
        blocks = min(16, 65536 // (-(-regs // 8) * 8 * 32 * w), SMEM_LIMIT_SM86 // max(smem, 1))
        out.append((bm, w, regs, smem, max(r["local"] for r in res), min(48, blocks * w)))
    return out


class UsageError(Exception):
    """Bad flags: one line `error: ...`, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _sweep_args(kernel, n, d, dtype, latent):
    """--sweep's five words, checked: (kernel, N, D, torch dtype, latent)."""
    names = {v: k for k, v in DTYPES.items()}
    if kernel not in ATTN_KERNELS:
        raise UsageError(f"--sweep KERNEL must be one of {', '.join(ATTN_KERNELS)} (got {kernel!r})")
    if not (n.isdigit() and 1 <= int(n) <= attention.MAX_SEQ):
        raise UsageError(f"--sweep N must be in [1, {attention.MAX_SEQ}] (got {n!r})")
    if not (d.isdigit() and int(d) in attention.HEAD_DIMS):
        raise UsageError(f"--sweep D must be one of {', '.join(map(str, attention.HEAD_DIMS))} "
                         f"(got {d!r})")
    if dtype not in names:
        raise UsageError(f"--sweep DTYPE must be one of {', '.join(names)} (got {dtype!r})")
    if not latent.isdigit():
        raise UsageError(f"--sweep LATENT must be an integer >= 0 (got {latent!r})")
    return kernel, int(n), int(d), names[dtype], int(latent)


def main(argv=None):
    ap = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=list(TARGETS), choices=sorted(SMEM_LIMITS),
                    help=f"targets, sm_XY as XY [{' '.join(map(str, TARGETS))}]")
    ap.add_argument("--jobs", type=int, default=1,
                    help="parallel compiles, at least 1 (the machine may be shared) [1]")
    ap.add_argument("--sweep", nargs=5, metavar=("KERNEL", "N", "D", "DTYPE", "LATENT"),
                    help="try block/warp settings for one attention config, e.g. bwd 65 16 bf16 0")
    try:
        args = ap.parse_args(argv)
        if args.jobs < 1:
            raise UsageError(f"--jobs must be in [1, inf) (got {args.jobs})")
        sweep_args = args.sweep and _sweep_args(*args.sweep)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if sweep_args:
        print("BLOCK_M warps worst-regs worst-smem worst-spill sm86-warps/SM")
        for row in sweep(*sweep_args):
            print("%7d %5d %10d %10d %11d %13d" % row)
        return 0
    rows = run(all_builds(), args.arch, args.jobs)
    print(table(rows))
    bad = [r for r in rows if not ok(r[2])]
    print(f"\n{len(rows)} kernel builds, {len(bad)} failing (spills, or smem > {SMEM_LIMIT_SM86} B)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
