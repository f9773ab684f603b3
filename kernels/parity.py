"""The Triton kernels against their float64 PyTorch references on one device, output and every
gradient, over the configurations the variants use (the shapes, head dimensions, LSA modes and
mla-q latents that kernels.aot builds, in fp32 and bf16).

    python -m kernels.parity [--device cuda] [--quick]

On CPU tensors the kernels run in Triton's interpreter (TRITON_INTERPRET=1): slow, so --quick.
"""
import argparse
import os
import sys
from itertools import product

import torch
import torch.nn.functional as F

from . import aot, flash_attn, get_backend, lowrank, set_backend, tf32_matmuls
from . import attention, lowrank_linear, lowrank_q_attention

# max |error| / max |reference|: fp32 kernels, and bf16 ones (bf16 operands, fp32 accumulation)
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def configs(quick: bool = False) -> list:
    """(kind, shape, dtype name, LSA mode) for each check: attention (B, H, queries, keys, D),
    class attention with 1-2 queries (CaiT), mla-q (B, H, N, D, latent), low-rank (in, latent, out)."""
    seq_lens, head_dims, lsa = aot.SEQ_LENS, flash_attn.HEAD_DIMS, list(aot.LSA_MODES)
    lowrank_shapes = aot.LOWRANK_SHAPES
    if quick:
        seq_lens, head_dims, lsa, lowrank_shapes = (65,), (8, 16), ["off", "lsa-head"], lowrank_shapes[:1]
    rows = []
    for n, d, dt, mode in product(seq_lens, head_dims, DTYPES, lsa):
        rows.append(("attention", (2, 3, n, n, d), dt, mode))
    for n, d, dt, mode in product(seq_lens[:2], (8, 16), DTYPES, lsa):
        rows.append(("class-attention", (2, 3, 2, n, d), dt, mode))
        rows.append(("mla-q", (2, 3, n, d, 64), dt, mode))
    for shape, dt in product(lowrank_shapes, DTYPES):
        rows.append(("lowrank", shape, dt, "off"))
    return rows


def _scale(mode: str, heads: int, d: int, gen, device):
    if mode == "off":
        return d ** -0.5
    if mode == "lsa-layer":
        return torch.tensor(d ** -0.5 * 1.3, device=device)
    return (d ** -0.5 * (0.5 + torch.rand(heads, generator=gen))).to(device)


def _problem(kind, shape, dtype, mode, device):
    """(inputs, fn(*inputs) with the kernels, reference(*inputs))."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=gen)).to(device, dtype)
    diag = mode != "off"
    if kind == "lowrank":
        c_in, r, c_out = shape
        inputs = [rand(3, 65, c_in), rand(r, c_in, scale=c_in ** -0.5), rand(c_out, r, scale=r ** -0.5),
                  rand(c_out)]
        return inputs, lowrank_linear, lowrank.lowrank_math
    if kind == "mla-q":
        b, h, n, d, r = shape
        c = h * d
        inputs = [rand(b, n, c), rand(r, c, scale=c ** -0.5), rand(c, r, scale=r ** -0.5),
                  rand(c, scale=0.1), rand(b, h, n, d), rand(b, h, n, d)]
        fused, plain = lowrank_q_attention, _mla_q_reference
    else:
        b, h, nq, nk, d = shape
        inputs = [rand(b, h, nq, d), rand(b, h, nk, d), rand(b, h, nk, d)]
        fused, plain = attention, flash_attn.attention_math
    scale = _scale(mode, shape[1], shape[3] if kind == "mla-q" else shape[4], gen, device)
    fixed = not torch.is_tensor(scale)
    if not fixed:
        inputs.append(scale.float())
    k = len(inputs) - (0 if fixed else 1)
    call = lambda fn: lambda *t: fn(*t[:k], scale if fixed else t[k], diag)
    return inputs, call(fused), call(plain)


def _mla_q_reference(x, w_down, w_up, b_up, k, v, scale, diag):
    b, h, _, d = k.shape
    q = F.linear(F.linear(x, w_down), w_up, b_up).view(b, -1, h, d).transpose(1, 2)
    return flash_attn.attention_math(q, k, v, scale, diag)


def _relative_error(actual, expected) -> float:
    err = (actual.double() - expected.double()).abs().max().item()
    return err / max(expected.double().abs().max().item(), 1e-6)


def check(kind, shape, dtype_name, mode, device) -> dict:
    """The worst relative error of the output and of each gradient, kernels vs float64."""
    dtype = DTYPES[dtype_name]
    inputs, run, reference = _problem(kind, shape, dtype, mode, device)
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = run(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = reference(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
    errors = [_relative_error(out, ref)] + [_relative_error(g, r) for g, r in zip(grads, ref_grads)]
    worst = max(errors)
    return {"kind": kind, "shape": list(shape), "dtype": dtype_name, "lsa": mode,
            "output_error": errors[0], "worst_error": worst, "ok": worst <= TOL[dtype]}


def sweep(device, quick: bool = False) -> list:
    """check() for every configuration, on the Triton kernels; the backend and the TF32 switch
    are put back after. The wrappers' own torch matmuls (weight gradients, the latent of the
    low-rank query) must run in true fp32 here: a trainer in the same process turns TF32 on, and
    TF32's 1e-3 would fail the fp32 comparisons (seen on an H200 after a training run)."""
    before = get_backend()
    set_backend("triton")
    try:
        with tf32_matmuls(False):
            return [check(*c, torch.device(device)) for c in configs(quick)]
    finally:
        set_backend(before)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="a few configurations only")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    rows = sweep(args.device, args.quick)
    for r in rows:
        print(f"{r['kind']:<16} {str(r['shape']):<20} {r['dtype']} {r['lsa']:<9} "
              f"worst {r['worst_error']:.2e}{'' if r['ok'] else '  <-- FAIL'}")
    bad = sum(not r["ok"] for r in rows)
    print(f"\n{len(rows)} configurations, {bad} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
