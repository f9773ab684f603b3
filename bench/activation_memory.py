"""Activation memory per image: the bytes autograd keeps for backward in one training step.

    python bench/activation_memory.py [--variants baseline mla-q mla-qkv mcls] [--precision bf16 fp32]

Every tensor saved for backward during the forward pass is caught with
torch.autograd.graph.saved_tensors_hooks and counted once per storage (q, k, v viewed out of
one projection are one allocation; bench/common.py's counter). Measured at two batch sizes and
differenced, so what does not grow with the batch (parameters, their autocast copies) drops out.

Kernels off: plain PyTorch (backend 'torch'). Kernels on: backend 'reference', the kernels'
custom ops computed by their PyTorch references, which save exactly the tensors the Triton
kernels save (tests/test_kernels.py checks it); `--backend triton` counts through the Triton
kernels themselves (on CPU under TRITON_INTERPRET=1: slow). With kernels on, mla-q builds its
queries inside the attention kernel from the latent (kernels.lowrank_q_attention), as the model
does. bf16 is autocast on CPU, which
keeps softmax in bf16; CUDA's autocast runs it in fp32, so on a GPU the math path saves more
than shown here and the kernels' saving is larger.
"""
import sys

import torch

import common  # first: puts the repository root on sys.path
import kernels
import speedrun
from common import saved_activation_bytes


def step_bytes(model, batch: int, precision: str) -> int:
    x = torch.randn(batch, 3, speedrun.SIDE, speedrun.SIDE)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def forward():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            return model(x).float().sum()

    return saved_activation_bytes(forward, exclude=model.parameters())


def per_image(variant: str, backend: str, precision: str, batches=(2, 6)) -> float:
    torch.manual_seed(0)
    kernels.set_backend(backend)
    model = speedrun.build_model(speedrun.resolve_config(variant)).train()
    small, large = (step_bytes(model, b, precision) for b in batches)
    return (large - small) / (batches[1] - batches[0])


def attention_call_bytes(backend: str, heads=12, tokens=65, head_dim=16, dtype=torch.bfloat16) -> int:
    """One attention call at the baseline's shape, per image, beyond its q/k/v input."""
    kernels.set_backend(backend)
    qkv = torch.randn(1, tokens, 3 * heads * head_dim, dtype=dtype, requires_grad=True)
    q, k, v = (t.view(1, tokens, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, -1))
    return saved_activation_bytes(lambda: kernels.attention(q, k, v, head_dim ** -0.5), exclude=[qkv])


def run(argv=None) -> int:
    ap = common.Parser(prog="bench/activation_memory.py", description=__doc__)
    ap.add_argument("--variants", nargs="+", default=["baseline", "mla-q", "mla-qkv", "mcls"],
                    help="presets to count (see python speedrun.py --list-variants)")
    ap.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--backend", default="reference", choices=["reference", "triton"],
                    help="what 'kernels on' runs (triton: set TRITON_INTERPRET=1 on CPU)")
    args = ap.parse_args(argv)
    for v in args.variants:  # every name checked before the first one is measured
        speedrun.resolve_config(v)

    for precision in args.precision:
        rows = {v: (per_image(v, "torch", precision), per_image(v, args.backend, precision))
                for v in args.variants}
        base = rows.get("baseline", (None,))[0]
        print(f"\nactivation memory per image, one training step, {precision}"
              f"{' autocast' if precision == 'bf16' else ''} (KiB; ratio vs baseline kernels off)")
        print(f"{'variant':<16} {'kernels off':>12} {'kernels on':>12} {'on/off':>7} {'off/base':>9} {'on/base':>8}")
        for v, (off, on) in rows.items():
            rel = (f"{off / base:>9.3f} {on / base:>8.3f}" if base else "")
            print(f"{v:<16} {off / 1024:>12.1f} {on / 1024:>12.1f} {on / off:>7.3f} {rel}")
        if "mla-q" in rows and base:
            ratio = rows["mla-q"][1] / base
            print(f"target: mla-q with kernels <= 0.85x baseline without: {ratio:.3f}x "
                  f"({'met' if ratio <= 0.85 else 'NOT met'})")
    dtype = torch.bfloat16
    math, fused = attention_call_bytes("torch", dtype=dtype), attention_call_bytes(args.backend, dtype=dtype)
    print(f"\none attention call (12 heads, 65 tokens, D 16, bf16), saved beyond q/k/v, per image: "
          f"math path {math} B, kernel {fused} B ({fused / math:.2f}x)")
    return 0


def main(argv=None) -> int:
    return common.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
