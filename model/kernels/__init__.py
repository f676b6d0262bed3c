"""GPU kernels in Triton, each beside the torch code that defines what it computes.

- moe.py: the experts of one layer as two grouped GEMMs over route-sorted blocks of token-expert pairs, reading
  bf16, fp8 or packed int4 weights where they lie and dequantizing in registers; gate/up with GELU-tanh fused,
  down with the routing weights applied; the top-k sum once, after.
- attention.py: a denoising pass's attention over the slot cache in place (no mask, gather or concatenation).
- vocab.py: the vocabulary pass between the LM head and the soft embedding (softcap, temperature, max and argmax,
  the weights, entropy, the draw) per token row, with nothing in fp32 the size of the vocabulary.

Which implementation runs is the network's choice (`Network(kernels=...)`): "triton" where Triton and a CUDA
device are present, else "torch". Every kernel is tested on the CPU in Triton's interpreter (TRITON_INTERPRET=1,
set before triton is imported): the interpreter has no bf16 arithmetic, so there the kernels multiply in fp32 on
the same values (every bf16, fp8 and int4 value is exact in fp32) and differ from the GPU by summation order only.
"""

from __future__ import annotations

import importlib.util
import os

import torch

KERNEL_CHOICES: tuple[str, ...] = ("auto", "torch", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's interpreter runs the kernels on the CPU (numpy underneath), for the tests."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(choice: str, device: torch.device) -> str:
    """'auto' -> 'triton' on a CUDA device with Triton installed (or under the interpreter, which runs anywhere),
    else 'torch'. Asking for 'triton' where it cannot run is an error, not a silent fallback."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {choice!r}")
    runnable = triton_available() and (device.type == "cuda" or interpreting())
    if choice == "triton" and not runnable:
        raise ValueError("kernels='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1 on a CPU)")
    if choice == "auto":
        return "triton" if runnable and device.type == "cuda" else "torch"
    return choice
