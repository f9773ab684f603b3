"""Low-rank (MLA) projection y = (x W_downᵀ) W_upᵀ + b: Triton kernels, PyTorch reference,
autograd.

Plain PyTorch keeps the latent h = x W_downᵀ alive for W_up's backward, so a low-rank layer
stores more activation than the full-rank Linear it replaces. Here the forward keeps h in
registers (one program = BLOCK_M rows: h is BLOCK_M × R, R = 64), and the backward recomputes
it, so the layer saves only x (which the neighbouring k/v projections save anyway).

Backward: one row-parallel kernel recomputes h, forms dh = dy W_up and dx = dh W_down without
a round trip through memory for dh, and writes h and dh (each M × R, transient) for the weight
gradients dW_up = dyᵀ h, dW_down = dhᵀ x, which are long reductions over all M = batch·tokens
rows — cuBLAS's split-K GEMMs do those better than per-program partial sums or atomics.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import dot_precision, kjit, load_tile, next_pow2, same_dtype, store_tile, tl


def lowrank_config(c_in: int, r: int, c_out: int, dtype=torch.bfloat16, which: str = "fwd") -> dict:
    """Launch meta-parameters (shared with kernels.aot). 64 rows a program: 260 programs at
    batch 256 × 65 tokens, and the BLOCK_M × R latent stays in registers. fp32 operand tiles
    are twice the size, so its backward takes 32 rows and 8 warps to stay spill-free."""
    fp32 = dtype == torch.float32
    block_m = 32 if fp32 and which == "bwd" else 64
    return dict(BLOCK_M=block_m, BLOCK_K=64, BLOCK_N=64, BLOCK_R=max(16, next_pow2(r)),
                PREC=dot_precision(dtype), num_warps=8 if fp32 else 4, num_stages=1, maxnreg=None)


@kjit
def _latent(X, WD, offs_m, offs_r, M, C_IN, sxm, R: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr):
    """h = x W_downᵀ for BLOCK_M rows, rounded to x's dtype as F.linear would store it."""
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, C_IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_tile(X, offs_m, offs_k, sxm, 1, M, C_IN)
        wdt = load_tile(WD, offs_k, offs_r, 1, C_IN, C_IN, R)  # W_downᵀ tile (BLOCK_K × R)
        h = tl.dot(x, wdt, h, input_precision=PREC)
    return h.to(X.dtype.element_ty)


@kjit
def _lowrank_fwd_kernel(X, WD, WU, BIAS, Y, M, C_IN, C_OUT, sxm, sym,
                        R: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                        PREC: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    h = _latent(X, WD, offs_m, offs_r, M, C_IN, sxm, R, BLOCK_M, BLOCK_K, BLOCK_R, PREC)
    for n0 in range(0, C_OUT, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        wut = load_tile(WU, offs_r, offs_n, 1, R, R, C_OUT)  # W_upᵀ tile (R × BLOCK_N)
        y = tl.dot(h, wut, input_precision=PREC)
        if HAS_BIAS:
            y += tl.load(BIAS + offs_n, mask=offs_n < C_OUT, other=0.0).to(tl.float32)[None, :]
        store_tile(Y, y, offs_m, offs_n, sym, 1, M, C_OUT)


@kjit
def _lowrank_bwd_kernel(X, WD, WU, DY, DX, HID, DHID, M, C_IN, C_OUT, sxm, sdym, sdxm,
                        R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    h = _latent(X, WD, offs_m, offs_r, M, C_IN, sxm, R, BLOCK_M, BLOCK_K, BLOCK_R, PREC)
    store_tile(HID, h, offs_m, offs_r, R, 1, M, R)
    dh = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, C_OUT, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = load_tile(DY, offs_m, offs_n, sdym, 1, M, C_OUT)
        wu = load_tile(WU, offs_n, offs_r, R, 1, C_OUT, R)  # W_up tile (BLOCK_N × R)
        dh = tl.dot(dy, wu, dh, input_precision=PREC)
    dh = dh.to(X.dtype.element_ty)
    store_tile(DHID, dh, offs_m, offs_r, R, 1, M, R)
    for k0 in range(0, C_IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        wd = load_tile(WD, offs_r, offs_k, C_IN, 1, R, C_IN)  # W_down tile (R × BLOCK_K)
        store_tile(DX, tl.dot(dh, wd, input_precision=PREC), offs_m, offs_k, sdxm, 1, M, C_IN)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rows(t: Tensor) -> Tensor:
    """(..., C) → (M, C) with unit column stride; a view for the usual contiguous input."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _lowrank_fwd_triton(x, w_down, w_up, b):
    x2 = _rows(x)
    (M, c_in), (r, c_out) = x2.shape, (w_down.shape[0], w_up.shape[0])
    y = torch.empty((M, c_out), dtype=x.dtype, device=x.device)
    cfg = lowrank_config(c_in, r, c_out, x.dtype, "fwd")
    grid = (_cdiv(M, cfg["BLOCK_M"]),)
    _lowrank_fwd_kernel[grid](x2, w_down.contiguous(), w_up.contiguous(), b if b is not None else y, y,
                              M, c_in, c_out, x2.stride(0), y.stride(0), R=r, HAS_BIAS=b is not None, **cfg)
    return y.view(*x.shape[:-1], c_out)


def _lowrank_bwd_triton(dy, x, w_down, w_up, has_bias):
    x2, dy2 = _rows(x), _rows(dy.to(x.dtype))
    (M, c_in), (r, c_out) = x2.shape, (w_down.shape[0], w_up.shape[0])
    dx = torch.empty((M, c_in), dtype=x.dtype, device=x.device)
    h = torch.empty((M, r), dtype=x.dtype, device=x.device)
    dh = torch.empty_like(h)
    cfg = lowrank_config(c_in, r, c_out, x.dtype, "bwd")
    grid = (_cdiv(M, cfg["BLOCK_M"]),)
    _lowrank_bwd_kernel[grid](x2, w_down.contiguous(), w_up.contiguous(), dy2, dx, h, dh,
                              M, c_in, c_out, x2.stride(0), dy2.stride(0), dx.stride(0), R=r, **cfg)
    return (dx.view(x.shape), *_weight_grads(dy2, x2, h, dh, has_bias))


def _weight_grads(dy2, x2, h, dh, has_bias):
    """dW_up = dyᵀ h, dW_down = dhᵀ x, db = Σ dy: reductions over all rows, left to the BLAS."""
    db = dy2.sum(0) if has_bias else dy2.new_zeros(0)
    return dh.t() @ x2, dy2.t() @ h, db


# ----------------------------------------------------------------------------- PyTorch references

def lowrank_math(x, w_down, w_up, b):
    """Two F.linear calls: the `torch` backend and the kernels-off baseline (it saves the
    latent for W_up's backward)."""
    return F.linear(F.linear(x, w_down), w_up, b)


def lowrank_bwd_reference(dy, x, w_down, w_up, has_bias):
    """What the backward kernel computes: latent recomputed from x."""
    x2, dy2 = _rows(x), _rows(dy.to(x.dtype))
    h = F.linear(x2, w_down)
    dh = dy2 @ w_up
    return ((dh @ w_down).view(x.shape), *_weight_grads(dy2, x2, h, dh, has_bias))


# ----------------------------------------------------------------------------- custom ops + autograd

@torch.library.custom_op("vitk::lowrank_fwd", mutates_args=())
def lowrank_fwd(x: Tensor, w_down: Tensor, w_up: Tensor, b: Optional[Tensor], impl: str) -> Tensor:
    if impl == "triton":
        return _lowrank_fwd_triton(x, w_down, w_up, b)
    return lowrank_math(x, w_down, w_up, b)


@lowrank_fwd.register_fake
def _(x, w_down, w_up, b, impl):
    return x.new_empty((*x.shape[:-1], w_up.shape[0]))


@torch.library.custom_op("vitk::lowrank_bwd", mutates_args=())
def lowrank_bwd(dy: Tensor, x: Tensor, w_down: Tensor, w_up: Tensor, has_bias: bool, impl: str
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if impl == "triton":
        return _lowrank_bwd_triton(dy, x, w_down, w_up, has_bias)
    return lowrank_bwd_reference(dy, x, w_down, w_up, has_bias)


@lowrank_bwd.register_fake
def _(dy, x, w_down, w_up, has_bias, impl):
    # contiguous, as the real implementations return them (compile relies on matching strides)
    db = dy.new_empty((w_up.shape[0],) if has_bias else (0,))
    return x.new_empty(x.shape), w_down.new_empty(w_down.shape), w_up.new_empty(w_up.shape), db


def _setup_context(ctx, inputs, output):
    x, w_down, w_up, b, impl = inputs
    ctx.save_for_backward(x, w_down, w_up)  # no latent: the backward recomputes it
    ctx.has_bias, ctx.impl = b is not None, impl


def _backward(ctx, dy):
    x, w_down, w_up = ctx.saved_tensors
    dx, dwd, dwu, db = lowrank_bwd(dy, x, w_down, w_up, ctx.has_bias, ctx.impl)
    return dx, dwd, dwu, (db if ctx.has_bias else None), None


lowrank_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_lowrank(x, w_down, w_up, b=None, impl: str = "triton") -> Tensor:
    """(x W_downᵀ) W_upᵀ + b saving only x; impl 'triton' or 'reference'."""
    same_dtype(x, w_down, w_up, b)
    return lowrank_fwd(x, w_down, w_up, b, impl)
