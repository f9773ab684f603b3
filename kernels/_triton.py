"""Triton plumbing shared by the kernel families.

* The kernel modules must import (and their PyTorch references must run) where triton is
  missing, so `triton`/`tl` degrade to stubs that only let the kernel definitions parse.
* `kjit` builds a real `JITFunction` whatever TRITON_INTERPRET said at import time (the AOT
  compiler needs one), and runs launches on CPU tensors in Triton's interpreter instead. The
  switch is made per launch, so the interpreter tests work even when another test module
  imported the kernels first without TRITON_INTERPRET.
"""
import os

import numpy as np

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    HAVE_TRITON = True
except ImportError:  # CPU-only installs: references only
    triton = None
    HAVE_TRITON = False

    class tl:  # noqa: N801 - just enough of triton.language for the kernel signatures to parse
        constexpr = None

    class JITFunction:  # noqa: D101
        def __init__(self, fn):
            self.fn = fn


def interpret_enabled() -> bool:
    """Read at call time, not import time, so a test can set it after torch was imported."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class _KernelFunction(JITFunction):
    """A JITFunction that sends launches with CPU tensors to the interpreter."""

    def __init__(self, fn):
        super().__init__(fn)
        self._interp = InterpretedFunction(fn) if HAVE_TRITON else None

    def run(self, *args, grid, warmup, **kwargs):
        if not HAVE_TRITON:
            raise RuntimeError("triton is not installed")
        on_cpu = any(getattr(a, "device", None) is not None and a.device.type == "cpu"
                     for a in list(args) + list(kwargs.values()))
        if not on_cpu:
            return super().run(*args, grid=grid, warmup=warmup, **kwargs)
        if not interpret_enabled():
            raise RuntimeError("Triton kernels need CUDA tensors; set TRITON_INTERPRET=1 to run "
                               "them on CPU tensors in Triton's interpreter")
        _fix_interpreter_bf16_dot()
        with _language_restored(), _jit_helpers_interpreted():
            return self._interp.run(*args, grid=grid, warmup=warmup, **kwargs)


class _language_restored:
    """Put triton.language back as it was after an interpreted launch. The interpreter swaps
    tl's builtins, tl.tensor's methods, tl.dtype.to_ir, tl.range, tl.reduce... for numpy
    versions; a launch undoes its own swaps, but a call to a @triton.jit helper from inside a
    kernel (InterpretedFunction.__call__, triton 3.x) swaps them for good, and every later real
    compile in the process then fails (CompilationError). Snapshot and restore every attribute
    of the objects it patches."""

    def __enter__(self):
        core = tl.core
        self.saved = [(obj, dict(vars(obj))) for obj in
                      (tl, core, tl.math, core.tensor, core.dtype, core.tensor_descriptor_base)]

    def __exit__(self, *exc):
        for obj, before in self.saved:
            for name in set(vars(obj)) - set(before):
                delattr(obj, name)
            for name, value in before.items():
                if vars(obj).get(name) is not value:
                    setattr(obj, name, value)


_INTERPRETED = {}


class _jit_helpers_interpreted:
    """While a kernel is interpreted, calls to @triton.jit functions (our helpers, and
    triton.language's own tl.max/tl.sum, which are JITFunctions unless TRITON_INTERPRET was set
    when triton was imported) run interpreted too instead of raising."""

    def __enter__(self):
        def call(jit_fn, *args, **kwargs):
            if jit_fn.fn not in _INTERPRETED:
                _INTERPRETED[jit_fn.fn] = InterpretedFunction(jit_fn.fn)
            return _INTERPRETED[jit_fn.fn](*args, **kwargs)

        self.saved = JITFunction.__call__
        JITFunction.__call__ = call

    def __exit__(self, *exc):
        JITFunction.__call__ = self.saved


def _fix_interpreter_bf16_dot():
    """Triton 3.x's interpreter stores bf16 as uint16 and its tl.dot multiplies those raw bit
    patterns as integers. Widen bf16 operands to fp32 first (exact), as the tensor cores do."""
    from triton.runtime import interpreter as ti
    if getattr(ti.InterpreterBuilder.create_dot, "_widens_bf16", False):
        return
    plain_dot = ti.InterpreterBuilder.create_dot

    def widen(x):
        if getattr(x.dtype, "scalar", x.dtype) != tl.bfloat16:
            return x
        data = ti._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return ti.TensorHandle(data.reshape(x.data.shape), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return plain_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._widens_bf16 = True
    ti.InterpreterBuilder.create_dot = create_dot


def same_dtype(*tensors):
    """The kernels take one element type, as F.linear and matmul demand outside autocast."""
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) > 1:
        raise TypeError(f"expected tensors of one dtype, got {sorted(map(str, dtypes))}")


def kjit(fn):
    return _KernelFunction(fn)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_precision(dtype) -> str:
    """fp32 inputs get exact fp32 dots, as torch's default matmul does ('tf32x3' needs twice
    the shared memory and spills at these tiles); 16-bit inputs use the tensor cores with fp32
    accumulation whatever this says."""
    import torch
    return "ieee" if dtype == torch.float32 else "tf32"


@kjit
def load_tile(base, offs_r, offs_c, stride_r, stride_c, n_r, n_c):
    """A (rows × cols) tile; out-of-range elements read as zero so padded rows/cols add nothing
    to a dot product."""
    mask = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    return tl.load(base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c, mask=mask, other=0.0)


@kjit
def store_tile(base, val, offs_r, offs_c, stride_r, stride_c, n_r, n_c):
    mask = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    tl.store(base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c,
             val.to(base.dtype.element_ty), mask=mask)
