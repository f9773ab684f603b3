"""Softmax attention over (B, H, N, D): Triton kernels, PyTorch references, autograd.

Shapes here are ViT-on-CIFAR shapes: N ≤ 128 tokens, D ∈ {8, 16, 32, 64}. At that size one
program owns a whole (batch, head) pair: it keeps all of K and V (and, in the backward, the
dK/dV accumulators) in registers and walks the query rows in BLOCK_M chunks. No online softmax
rescaling, no atomics, no cross-program reduction, and K/V are read from memory once.

Flash-style memory: beyond its inputs the forward saves only the per-row log-sum-exp (fp32);
the backward recomputes P = exp(scale·QKᵀ − lse) instead of reading a stored N×N matrix, and
does not need O either (the output projection keeps O for its own backward).

LSA (Lee et al. 2021) options: `diag_mask` hides each token from itself; the logit scale is
`scale · temp[h]`, where `temp` is an optional learnable tensor, 0-dim (per layer) or (H,)
(per head), whose gradient the backward returns.

Three implementations of the same maths:
* `attention_math`: plain autograd through matmul/softmax/matmul — the `torch` backend (but for
  fp32 CPU calls, which the dispatcher sends to PyTorch's fused attention); the fastest on CPU
  in bf16 (it keeps the N×N probabilities for backward).
* `attn_fwd_reference` / `attn_bwd_reference`: flash-style forward/backward in PyTorch; they
  back the custom op for backend `reference` and define what the Triton kernels compute.
* `_attn_fwd_kernel` / `_attn_bwd_kernel`: the Triton kernels (backend `triton`).
The custom op `vitk::attn_fwd` (+ `vitk::attn_bwd` for its backward) saves the same tensors
whichever of the last two computes it.

mla-q form (`flash_attention_latent_q`): given the low-rank query latent c (B, N, R) and the
up-projection (W_q, b_q), each program builds its head's queries in registers, so the layer
saves the R-wide latent instead of the H·D-wide queries (R = 64 vs 192 at the baseline width).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import dot_precision, kjit, load_tile, next_pow2, same_dtype, store_tile, tl

MAX_SEQ = 128  # one program holds all keys; longer sequences use the math path
HEAD_DIMS = (8, 16, 32, 64)


# (kernel, fp32?, BLOCK_D) -> (BLOCK_M, num_warps): the fastest-looking settings that neither
# spill nor exceed sm_86's shared memory on sm_80/86/90, picked from register sweeps with
# kernels.aot (no GPU to time on). Fewer query rows per step means less padding of 65..67
# tokens (BLOCK_M 16 pads 65 to 80 rows, 32 to 96); the backward holds K, V, dK, dV and five
# 128×BLOCK_M score-sized tiles, hence more warps. fp32 uses exact (FMA) dots, whose operand
# tiles are larger.
_TUNED = {
    ("fwd", False, 16): (16, 4), ("fwd", False, 32): (32, 4), ("fwd", False, 64): (32, 4),
    ("fwd", True, 16): (16, 4), ("fwd", True, 32): (16, 8), ("fwd", True, 64): (16, 8),
    ("bwd", False, 16): (16, 8), ("bwd", False, 32): (32, 8), ("bwd", False, 64): (32, 8),
    ("bwd", True, 16): (16, 8), ("bwd", True, 32): (16, 16), ("bwd", True, 64): (16, 16),
}
# (kernel, fp32?, BLOCK_D, BLOCK_N, queries from a latent?) -> (BLOCK_M, num_warps, maxnreg):
# where the rule above spills on some target or LSA mode, or keeps fewer warps resident.
# maxnreg lifts ptxas's own occupancy target, which otherwise caps this fp32 kernel at 64
# registers on sm_80 and spills 8 bytes.
_TUNED_EXCEPTIONS = {
    ("bwd", False, 32, 64, False): (16, 4, None),  # not a spill: 12 resident warps/SM instead of 8
    ("bwd", True, 16, 64, False): (16, 8, 128),
}


def attn_config(n: int, d: int, dtype=torch.bfloat16, which: str = "fwd", latent: int = 0) -> dict:
    """Launch meta-parameters for n ≤ MAX_SEQ keys, head dim d ≤ 64 (and queries from an
    R-wide latent if latent > 0), shared with kernels.aot. BLOCK_N covers all keys; tl.dot
    needs every dim ≥ 16, so D = 8 is padded."""
    block_n = max(16, next_pow2(n))
    block_d = max(16, next_pow2(d))
    fp32 = dtype == torch.float32
    block_m, warps, maxnreg = _TUNED_EXCEPTIONS.get((which, fp32, block_d, block_n, latent > 0),
                                                    (*_TUNED[(which, fp32, block_d)], None))
    return dict(BLOCK_M=min(block_m, block_n), BLOCK_N=block_n, BLOCK_D=block_d,
                PREC=dot_precision(dtype), num_warps=warps, num_stages=1, maxnreg=maxnreg)


# ----------------------------------------------------------------------------- Triton kernels

@kjit
def _program_kv(K, V, T, skb, skh, skn, svb, svh, svn, H, NK, scale,
                HAS_T: tl.constexpr, T_PER_HEAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """What every program starts with: its (batch, head), all of that head's keys and values,
    and the logit scale c = scale · temp[h] (or scale alone), in fp32."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_tile(K + b * skb + h * skh, offs_n, offs_d, skn, 1, NK, HEAD_DIM)
    v = load_tile(V + b * svb + h * svh, offs_n, offs_d, svn, 1, NK, HEAD_DIM)
    c = scale
    if HAS_T:
        if T_PER_HEAD:
            c = c * tl.load(T + h).to(tl.float32)
        else:
            c = c * tl.load(T).to(tl.float32)
    return pid, b, h, k, v, c


@kjit
def _logits_t(k, q, c2, offs_n, offs_m, NK, DIAG: tl.constexpr, PREC: tl.constexpr):
    """Transposed scores, keys on rows: k·qᵀ (fp32) and the base-2 logits c2·k·qᵀ with padded
    keys (and, for LSA, each query's own key) at -inf.

    Keys on rows because the key axis is the long one (up to 128) while a query block is 16-32
    rows: split along keys, a warp holds BLOCK_N·BLOCK_M/(32·warps) scores, where an MMA split
    along 16 query rows would give every warp a whole 16×BLOCK_N slab (2-3× the registers)."""
    kq = tl.dot(k, tl.trans(q), input_precision=PREC)
    valid = offs_n[:, None] < NK
    if DIAG:
        valid = valid & (offs_n[:, None] != offs_m[None, :])
    return kq, tl.where(valid, kq * c2, float("-inf"))


@kjit
def _query_tile(Q, WQ, BQ, b, h, offs_m, offs_d, sqb, sqh, sqn, NQ, HEAD_DIM: tl.constexpr,
                LATENT: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr):
    """Query rows offs_m of head h: loaded (LATENT = 0), or built from the low-rank latent
    (mla-q): q_h = c W_q[hD:(h+1)D]ᵀ + b_q[hD:(h+1)D], rounded to c's dtype as the unfused
    up-projection would store it. Neither q nor its latent needs to be written by this layer:
    Q points at the latent c (B, NQ, LATENT), which every head re-reads from L2."""
    if LATENT == 0:
        q = load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, 1, NQ, HEAD_DIM)
    else:
        offs_r = tl.arange(0, BLOCK_R)
        c = load_tile(Q + b * sqb, offs_m, offs_r, sqn, 1, NQ, LATENT)
        w_t = load_tile(WQ + h * HEAD_DIM * LATENT, offs_r, offs_d, 1, LATENT, LATENT, HEAD_DIM)
        bias = tl.load(BQ + h * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)
        q = (tl.dot(c, w_t, input_precision=PREC) + bias[None, :]).to(c.dtype)
    return q


@kjit
def _attn_fwd_kernel(Q, WQ, BQ, K, V, O, LSE, T,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                     H, NQ, NK, scale,
                     HEAD_DIM: tl.constexpr, HAS_T: tl.constexpr, T_PER_HEAD: tl.constexpr,
                     DIAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, PREC: tl.constexpr, LATENT: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    pid, b, h, k, v, c = _program_kv(K, V, T, skb, skh, skn, svb, svh, svn, H, NK, scale,
                                     HAS_T, T_PER_HEAD, HEAD_DIM, BLOCK_N, BLOCK_D)
    c2 = c * 1.4426950408889634  # exp2 is the fast path
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(0, NQ, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q = _query_tile(Q, WQ, BQ, b, h, offs_m, offs_d, sqb, sqh, sqn, NQ, HEAD_DIM, LATENT, BLOCK_R, PREC)
        _, s2t = _logits_t(k, q, c2, offs_n, offs_m, NK, DIAG, PREC)
        m = tl.max(s2t, 0)
        pt = tl.exp2(s2t - m[None, :])
        denom = tl.sum(pt, 0)
        o = tl.dot(tl.trans(pt.to(v.dtype)), v, input_precision=PREC) / denom[:, None]
        store_tile(O + b * sob + h * soh, o, offs_m, offs_d, son, 1, NQ, HEAD_DIM)
        # natural-log lse, so every backend saves the same number
        tl.store(LSE + pid * NQ + offs_m, (m + tl.log2(denom)) * 0.6931471805599453, mask=offs_m < NQ)


@kjit
def _attn_bwd_kernel(Q, WQ, BQ, K, V, DO, LSE, T, DQ, DK, DV, DT,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                     sdob, sdoh, sdon, sdqb, sdqh, sdqn, sdkb, sdkh, sdkn,
                     H, NQ, NK, scale,
                     HEAD_DIM: tl.constexpr, HAS_T: tl.constexpr, T_PER_HEAD: tl.constexpr,
                     DIAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, PREC: tl.constexpr, LATENT: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    """dQ rows are complete once a query block has met every key, so they are stored at once;
    dK, dV (same strides) and the temperature gradient accumulate in registers. Owning every
    key also gives the exact softmax-backward term rowsum(P∘dP) in fp32, where flash attention
    must use rowsum(dO∘O) with O rounded to bf16: O is never read."""
    pid, b, h, k, v, c = _program_kv(K, V, T, skb, skh, skn, svb, svh, svn, H, NK, scale,
                                     HAS_T, T_PER_HEAD, HEAD_DIM, BLOCK_N, BLOCK_D)
    c2 = c * 1.4426950408889634
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, NQ, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q = _query_tile(Q, WQ, BQ, b, h, offs_m, offs_d, sqb, sqh, sqn, NQ, HEAD_DIM, LATENT, BLOCK_R, PREC)
        do = load_tile(DO + b * sdob + h * sdoh, offs_m, offs_d, sdon, 1, NQ, HEAD_DIM).to(q.dtype)
        # padded query columns get lse = +inf, hence P = 0 and no contribution anywhere
        lse2 = tl.load(LSE + pid * NQ + offs_m, mask=offs_m < NQ, other=float("inf")) * 1.4426950408889634
        kq, s2t = _logits_t(k, q, c2, offs_n, offs_m, NK, DIAG, PREC)
        pt = tl.exp2(s2t - lse2[None, :])
        dv += tl.dot(pt.to(q.dtype), do, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        delta = tl.sum(pt * dpt, 0)
        dst = pt * (dpt - delta[None, :])  # d loss / d logits, transposed
        if HAS_T:
            dt += tl.sum(dst * kq, 1)
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
        dq = tl.dot(tl.trans(dst.to(q.dtype)), k, input_precision=PREC) * c
        store_tile(DQ + b * sdqb + h * sdqh, dq, offs_m, offs_d, sdqn, 1, NQ, HEAD_DIM)
    store_tile(DK + b * sdkb + h * sdkh, dk * c, offs_n, offs_d, sdkn, 1, NK, HEAD_DIM)
    store_tile(DV + b * sdkb + h * sdkh, dv, offs_n, offs_d, sdkn, 1, NK, HEAD_DIM)
    if HAS_T:
        tl.store(DT + pid, tl.sum(dt, 0) * scale)  # d logits / d temp = scale · q·k


def _bnhd(B, H, N, D, like: Tensor) -> Tensor:
    """A (B, H, N, D) tensor laid out as (B, N, H, D): the model's own layout, so O's (B, N, C)
    view for the output projection is free and dq/dk/dv land where q/k/v's views came from.
    Real and fake (torch.compile) implementations both allocate through here."""
    return like.new_empty((B, N, H, D)).transpose(1, 2)


def _row_major(t: Tensor) -> Tensor:
    """The kernels read rows with unit stride along D; views of a fused qkv projection already
    are, so they are passed (and saved) as they are, without a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _temp_flags(temp: Optional[Tensor], dummy: Tensor):
    if temp is None:
        return dummy, dict(HAS_T=False, T_PER_HEAD=False)
    return temp.reshape(-1), dict(HAS_T=True, T_PER_HEAD=temp.dim() == 1)


def _query_args(q, k, wq, bq):
    """(NQ, leading kernel args, constexprs) for the queries: q itself (B, H, NQ, D), or with
    wq given the latent c (B, NQ, R) plus the up-projection wq (H·D, R) and its bias bq."""
    if wq is None:
        q = _row_major(q)
        return q.shape[2], (q, q, q, *q.stride()[:3]), dict(LATENT=0, BLOCK_R=16)
    c = _row_major(q)
    args = (c, wq.contiguous(), bq.contiguous(), c.stride(0), 0, c.stride(1))
    return c.shape[1], args, dict(LATENT=c.shape[2], BLOCK_R=max(16, next_pow2(c.shape[2])))


def _attn_fwd_triton(q, k, v, wq, bq, scale, temp, diag_mask):
    (B, H, NK, D), (NQ, qargs, qmeta) = k.shape, _query_args(q, k, wq, bq)
    k, v = _row_major(k), _row_major(v)
    o = _bnhd(B, H, NQ, D, k)
    lse = torch.empty((B, H, NQ), dtype=torch.float32, device=k.device)
    t, tflags = _temp_flags(temp, lse)
    _attn_fwd_kernel[(B * H,)](
        *qargs[:3], k, v, o, lse, t, *qargs[3:], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, NQ, NK, float(scale), HEAD_DIM=D, DIAG=diag_mask, **tflags, **qmeta,
        **attn_config(NK, D, k.dtype, "fwd", qmeta["LATENT"]))
    return o, lse


def _attn_bwd_triton(do, q, k, v, wq, bq, lse, scale, temp, diag_mask):
    (B, H, NK, D), (NQ, qargs, qmeta) = k.shape, _query_args(q, k, wq, bq)
    k, v, do = _row_major(k), _row_major(v), _row_major(do)
    dq, dk, dv = _bnhd(B, H, NQ, D, k), _bnhd(B, H, NK, D, k), _bnhd(B, H, NK, D, k)
    dt = torch.empty((B, H) if temp is not None else (0,), dtype=torch.float32, device=k.device)
    t, tflags = _temp_flags(temp, lse)
    _attn_bwd_kernel[(B * H,)](
        *qargs[:3], k, v, do, lse, t, dq, dk, dv, dt,
        *qargs[3:], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        *dq.stride()[:3], *dk.stride()[:3], H, NQ, NK, float(scale),
        HEAD_DIM=D, DIAG=diag_mask, **tflags, **qmeta, **attn_config(NK, D, k.dtype, "bwd", qmeta["LATENT"]))
    return dq, dk, dv, _reduce_temp_grad(dt, temp)


def _reduce_temp_grad(dt_bh: Tensor, temp: Optional[Tensor]) -> Tensor:
    """Per-(batch, head) partials → the temperature's shape; an empty tensor when there is none
    (custom ops cannot return None)."""
    if temp is None:
        return dt_bh.new_zeros(0)
    g = dt_bh.sum(0)
    return (g if temp.dim() == 1 else g.sum()).to(temp.dtype)


# ----------------------------------------------------------------------------- PyTorch references

def attention_math(q, k, v, scale, diag_mask: bool = False):
    """softmax(scale · q kᵀ) v by plain autograd: the `torch` backend and the kernels-off
    baseline. Left as matmul/softmax/matmul on purpose: on CPU in bf16 this beats PyTorch's
    fused CPU attention (whose bf16 backward is very slow)."""
    if torch.is_tensor(scale):  # a per-head (H,) scale would otherwise promote bf16 q to fp32
        scale = scale.to(q.dtype).view(1, -1, 1, 1) if scale.dim() == 1 else scale
    # scaling q (N x D) rather than the scores (N x N) is 4x fewer multiplies at D=16, and the
    # product is the contiguous copy that matmul would otherwise make of the strided q view
    s = torch.matmul(q * scale, k.transpose(-2, -1))
    if diag_mask:
        nq, nk = s.shape[-2:]
        s = s.masked_fill(torch.eye(nq, nk, dtype=torch.bool, device=s.device), float("-inf"))
    return torch.matmul(s.softmax(-1), v)


def _scale_f32(scale: float, temp: Optional[Tensor]):
    if temp is None:
        return scale
    return scale * (temp.float().view(1, -1, 1, 1) if temp.dim() == 1 else temp.float())


def _logits_reference(q, k, c, diag_mask):
    qk = torch.matmul(q.float(), k.float().transpose(-2, -1))
    s = qk * c
    if diag_mask:  # query i never sees key i (also when there are fewer queries than keys)
        nq, nk = s.shape[-2:]
        s = s.masked_fill(torch.eye(nq, nk, dtype=torch.bool, device=s.device), float("-inf"))
    return qk, s


def _queries(q, k, wq, bq):
    """q, or with wq given q = c wqᵀ + bq from the latent c, split into heads like k."""
    if wq is None:
        return q
    B, H, _, D = k.shape
    q = F.linear(q.float(), wq.float(), bq.float()).to(q.dtype)
    return q.view(B, -1, H, D).transpose(1, 2)


def attn_fwd_reference(q, k, v, wq, bq, scale: float, temp: Optional[Tensor], diag_mask: bool):
    """What the forward kernel computes, in fp32: (O in q's dtype and the kernel's layout, lse)."""
    q = _queries(q, k, wq, bq)
    B, H, NQ, D = q.shape
    _, s = _logits_reference(q, k, _scale_f32(scale, temp), diag_mask)
    lse = torch.logsumexp(s, -1)
    o = _bnhd(B, H, NQ, D, q)
    o.copy_(torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v.float()))
    return o, lse


def attn_bwd_reference(do, q, k, v, wq, bq, lse, scale: float, temp: Optional[Tensor], diag_mask: bool):
    """What the backward kernel computes: P recomputed from lse, fp32 throughout; dq is the
    gradient of the (projected) queries."""
    q = _queries(q, k, wq, bq)
    c = _scale_f32(scale, temp)
    qk, s = _logits_reference(q, k, c, diag_mask)
    p = torch.exp(s - lse.unsqueeze(-1))
    do32 = do.float()
    dv = torch.matmul(p.transpose(-2, -1), do32)
    dp = torch.matmul(do32, v.float().transpose(-2, -1))
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k.float()) * c
    dk = torch.matmul(ds.transpose(-2, -1), q.float()) * c
    dt = (ds * qk).sum((2, 3)) * scale if temp is not None else ds.new_zeros(0)
    grads = [_bnhd(*g.shape, q).copy_(g) for g in (dq, dk, dv)]  # the kernel's layout and dtype
    return (*grads, _reduce_temp_grad(dt, temp))


# ----------------------------------------------------------------------------- custom ops + autograd

@torch.library.custom_op("vitk::attn_fwd", mutates_args=())
def attn_fwd(q: Tensor, k: Tensor, v: Tensor, wq: Optional[Tensor], bq: Optional[Tensor],
             scale: float, temp: Optional[Tensor], diag_mask: bool, impl: str) -> Tuple[Tensor, Tensor]:
    if impl == "triton":
        return _attn_fwd_triton(q, k, v, wq, bq, scale, temp, diag_mask)
    return attn_fwd_reference(q, k, v, wq, bq, scale, temp, diag_mask)


def _num_queries(q, wq):
    return q.shape[2] if wq is None else q.shape[1]


@attn_fwd.register_fake
def _(q, k, v, wq, bq, scale, temp, diag_mask, impl):
    (B, H, _, D), NQ = k.shape, _num_queries(q, wq)
    return _bnhd(B, H, NQ, D, k), k.new_empty((B, H, NQ), dtype=torch.float32)


@torch.library.custom_op("vitk::attn_bwd", mutates_args=())
def attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, wq: Optional[Tensor], bq: Optional[Tensor],
             lse: Tensor, scale: float, temp: Optional[Tensor], diag_mask: bool, impl: str
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if impl == "triton":
        return _attn_bwd_triton(do, q, k, v, wq, bq, lse, scale, temp, diag_mask)
    return attn_bwd_reference(do, q, k, v, wq, bq, lse, scale, temp, diag_mask)


@attn_bwd.register_fake
def _(do, q, k, v, wq, bq, lse, scale, temp, diag_mask, impl):
    (B, H, NK, D), NQ = k.shape, _num_queries(q, wq)
    dt = temp.new_empty(temp.shape) if temp is not None else k.new_empty(0, dtype=torch.float32)
    return _bnhd(B, H, NQ, D, k), _bnhd(B, H, NK, D, k), _bnhd(B, H, NK, D, k), dt


def _setup_context(ctx, inputs, output):
    q, k, v, wq, bq, scale, temp, diag_mask, impl = inputs
    _, lse = output
    # lse (B·H·N fp32) replaces the N×N probabilities; q, k, v are usually views of the qkv
    # projection's output, so saving them costs nothing extra (with wq: the latent, R wide,
    # instead of the H·D-wide queries). O is not needed (see the backward kernel); the output
    # projection saves it anyway.
    ctx.save_for_backward(q, k, v, wq, bq, lse, temp)
    ctx.scale, ctx.diag_mask, ctx.impl = scale, diag_mask, impl


def _backward(ctx, do, _dlse):
    q, k, v, wq, bq, lse, temp = ctx.saved_tensors
    dq, dk, dv, dt = attn_bwd(do, q, k, v, wq, bq, lse, ctx.scale, temp, ctx.diag_mask, ctx.impl)
    dt = dt if temp is not None else None
    if wq is None:
        return dq, dk, dv, None, None, None, dt, None, None
    # the up-projection's backward, from dq in its (B, N, H·D) layout (a view: no copy)
    B, H, NQ, D = dq.shape
    dq = dq.transpose(1, 2).reshape(B * NQ, H * D)
    dc = (dq @ wq).view(q.shape)
    return dc, dk, dv, dq.t() @ q.reshape(B * NQ, -1), dq.sum(0), None, dt, None, None


attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q, k, v, scale=1.0, temp: Optional[Tensor] = None, diag_mask: bool = False,
                    impl: str = "triton") -> Tensor:
    """softmax(scale · temp · q kᵀ) v with flash-style memory; impl 'triton' or 'reference'."""
    same_dtype(q, k, v)
    return attn_fwd(q, k, v, None, None, float(scale), temp, diag_mask, impl)[0]


def flash_attention_latent_q(c, wq, bq, k, v, scale=1.0, temp: Optional[Tensor] = None,
                             diag_mask: bool = False, impl: str = "triton") -> Tensor:
    """Attention whose queries q = c wqᵀ + bq (c: (B, NQ, R) latent of a low-rank query
    projection, wq: (H·D, R)) are built inside the kernel: the layer saves the R-wide latent
    instead of the H·D-wide queries, and q never goes through memory."""
    if bq is None:
        bq = wq.new_zeros(wq.shape[0])
    same_dtype(c, wq, bq, k, v)
    return attn_fwd(c, k, v, wq, bq, float(scale), temp, diag_mask, impl)[0]
