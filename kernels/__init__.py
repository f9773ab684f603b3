"""The one dispatch point for fused kernels: Triton on CUDA, the PyTorch reference elsewhere.

The model calls `attention` and `lowrank_linear` (and, for low-rank queries, may call
`lowrank_q_attention`, which fuses the query up-projection into the attention kernel);
`set_backend` (from `--kernels`) decides which implementation runs:

* 'auto'      Triton kernels when the tensors are on CUDA and triton imports, else 'torch'.
* 'triton'    the Triton kernels always (CPU tensors only under TRITON_INTERPRET=1, in Triton's
              interpreter: slow, for tests and tiny runs).
* 'torch'     plain PyTorch: two F.linear, and attention by matmul/softmax/matmul autograd, or by
              PyTorch's fused CPU attention (F.scaled_dot_product_attention) for fp32 CPU tensors
              with a plain float scale: the fastest on CPU. (In fp32 the fused attention gives the
              baseline's forward ×1.4 on an AVX2 CPU and its training step a few %; in bf16 its
              backward is far slower than matmul/softmax/matmul.)
* 'reference' the kernels' custom ops with their PyTorch references inside: the same saved
              tensors (activation memory) and the same maths as 'triton', at CPU speed.

Kernel families live one per file: flash_attn.py (attention) and lowrank.py (MLA projection),
each with its Triton kernels, PyTorch references and autograd registration. The file is not
called attention.py because that name would shadow this package's `attention` function.
"""
import contextlib
import warnings

import torch
import torch.nn.functional as F

from ._triton import HAVE_TRITON
from .flash_attn import HEAD_DIMS, MAX_SEQ, attention_math, flash_attention, flash_attention_latent_q
from .lowrank import fused_lowrank, lowrank_math

BACKENDS = ("auto", "triton", "torch", "reference")
_BACKEND = "auto"
_warned = set()


def set_backend(name: str) -> None:
    global _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} (choose {', '.join(BACKENDS)})")
    if name == "triton" and not HAVE_TRITON:
        raise RuntimeError("kernel backend 'triton' needs the triton package")
    _BACKEND = name


def get_backend() -> str:
    return _BACKEND


def backend_for(device: torch.device) -> str:
    """What runs for tensors on `device`: the backend, with 'auto' resolved. Each name means one
    thing here and in the kernel files: 'torch' plain autograd, 'reference' the custom ops with
    their PyTorch references inside, 'triton' the custom ops with the Triton kernels."""
    if _BACKEND == "auto":
        return "triton" if torch.device(device).type == "cuda" and HAVE_TRITON else "torch"
    return _BACKEND


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """CUDA's fp32 matmuls on TF32 tensor cores (PyTorch's default: off) inside the block, the
    caller's setting put back after. The trainer runs with them on; a comparison in true fp32
    (parity.sweep, the paper's plain loop) turns them off. No effect on CPU matmuls."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _impl(t: torch.Tensor) -> str:
    return backend_for(t.device)


def _autocast(device_type: str, *tensors):
    """Custom ops are invisible to autocast, so cast as F.linear/matmul would have."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _fallback(why: str) -> str:
    if why not in _warned:
        _warned.add(why)
        warnings.warn(f"kernels: {why}; using the PyTorch math path", stacklevel=3)
    return "torch"


def _attention_impl(q_like, k, scale, diag_mask: bool):
    """The implementation for an attention call: the backend's ('torch' becomes 'sdpa', PyTorch's
    fused CPU attention, where that is faster), falling back to 'torch' outside the kernels' range."""
    impl = _impl(q_like)
    # fp32 only: under bf16 autocast SDPA would run its slow bf16 backward; a learnable
    # temperature (LSA) or the diagonal mask stay on the math path, which covers them
    if (impl == "torch" and k.device.type == "cpu" and k.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.is_tensor(scale) and not diag_mask):
        return "sdpa"
    N, D = k.shape[2], k.shape[3]
    if impl != "torch" and (N > MAX_SEQ or D > max(HEAD_DIMS)):
        impl = _fallback(f"attention kernel covers N ≤ {MAX_SEQ} keys, D ≤ {max(HEAD_DIMS)} (got N={N}, D={D})")
    return impl


def _plain_attention(impl, q, k, v, scale, diag_mask):
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return attention_math(q, k, v, scale, diag_mask)


def _scale_args(scale, heads: int):
    """A float scale stays a float; a tensor becomes the kernel's learnable temperature,
    0-dim (per layer) or (H,) (per head)."""
    if not torch.is_tensor(scale):
        return float(scale), None
    if scale.numel() not in (1, heads):
        raise ValueError(f"scale tensor must be 0-dim or (H,)=({heads},), got {tuple(scale.shape)}")
    return 1.0, (scale.reshape(()) if scale.numel() == 1 else scale.reshape(heads))


def attention(q, k, v, scale, diag_mask: bool = False):
    """softmax(scale · q kᵀ) v over (B, H, N, D) tensors; `scale` is a float or a learnable
    tensor (scalar per layer or (H,) per head); diag_mask hides each token from itself (LSA)."""
    impl = _attention_impl(q, k, scale, diag_mask)
    if impl in ("torch", "sdpa"):
        return _plain_attention(impl, q, k, v, scale, diag_mask)
    q, k, v = _autocast(q.device.type, q, k, v)
    return flash_attention(q, k, v, *_scale_args(scale, k.shape[1]), diag_mask, impl)


def lowrank_q_attention(x, w_down, w_up, b_up, k, v, scale, diag_mask: bool = False,
                        num_query: int = 0):
    """attention(q, k, v, scale, diag_mask) with the low-rank queries of mla-q,
    q = ((x W_downᵀ) W_upᵀ + b_up) split into k's heads, without storing q: the kernel builds
    each head's queries from the 64-wide latent, which is all the layer keeps for backward
    (the per-token saving over lowrank_linear + attention is 2·(H·D − R) bytes in bf16).
    x: (B, N, C); k, v: (B, H, N, D); num_query > 0 keeps only the first num_query queries
    (class attention)."""
    c = F.linear(x, w_down)
    if num_query:
        c = c[:, :num_query]
    impl = _attention_impl(c, k, scale, diag_mask)
    if impl in ("torch", "sdpa"):
        B, H, _, D = k.shape
        q = F.linear(c, w_up, b_up).view(B, -1, H, D).transpose(1, 2)
        return _plain_attention(impl, q, k, v, scale, diag_mask)
    c, w_up, b_up, k, v = _autocast(x.device.type, c, w_up, b_up, k, v)
    return flash_attention_latent_q(c, w_up, b_up, k, v, *_scale_args(scale, k.shape[1]), diag_mask, impl)


def lowrank_linear(x, w_down, w_up, b):
    """y = (x W_downᵀ) W_upᵀ + b: the low-rank (MLA) projection."""
    impl = _impl(x)
    if impl == "torch":
        return lowrank_math(x, w_down, w_up, b)
    x, w_down, w_up, b = _autocast(x.device.type, x, w_down, w_up, b)
    return fused_lowrank(x, w_down, w_up, b, impl)
