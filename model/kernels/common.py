"""What the kernels share: the dtype their dots multiply in, and rounding to bf16 that the interpreter gets right."""

from __future__ import annotations

import torch

from model.kernels import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def rounded(x, T: tl.constexpr, BY_BITS: tl.constexpr):
        """fp32 x rounded to dtype T's precision (to nearest, ties to even), still fp32. BY_BITS does it on the
        bits, for bf16 under the interpreter, whose fp32 -> bf16 cast truncates."""
        if BY_BITS:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        return x.to(T).to(tl.float32)

else:  # importable without Triton: the torch paths run, and nothing here is called
    rounded = None


def by_bits(dtype: torch.dtype) -> bool:
    """Whether `rounded` must round on the bits: bf16 outputs under the interpreter."""
    return interpreting() and dtype == torch.bfloat16


def mma_dtype(dtype: torch.dtype, fp8: bool = False):
    """The dtype a kernel's dot operands are cast to: the inputs' (bf16, or fp8 for FP8 tensor cores); fp32
    under the interpreter, which has no bf16 or fp8 arithmetic (on values every one of which fp32 holds exactly)."""
    if interpreting() or dtype == torch.float32:
        return tl.float32
    return tl.float8e4nv if fp8 else tl.bfloat16


def tl_dtype(dtype: torch.dtype):
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]
