"""Counter-based random numbers: every draw is a pure function of (seed, canvas, step, stream, position).

A request's randomness therefore does not depend on which other requests share its batch, needs no
generator state carried between steps, and is the same on every device. The mixer is splitmix64's
finaliser, evaluated in int64 arithmetic (wrapping multiply; logical shifts emulated with masks).
"""

from __future__ import annotations

import torch

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685  # 0x94D049BB133111EB

# Streams: independent draws taken at the same (canvas, step, position).
INIT = 0  # the uniform random starting canvas
NOISE = 1  # the ids that replace rejected positions
DRAW = 2  # the uniform that picks the categorical sample
PATH = 3  # the uniforms that draw a constrained row's path (model/constraint.py)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def random_bits(seed: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """63 random bits as int64 [rows, n], one row per (seed, canvas, step) triple of int64 [rows]."""
    counter = (canvas * 4096 + step) * 4 + stream
    key = _mix(_mix(seed) ^ counter)[:, None]
    pos = torch.arange(n, device=seed.device, dtype=torch.int64)[None, :]
    return _shr(_mix(key ^ (pos * _GOLDEN)), 1)


def random_ids(seed, canvas, step, stream: int, n: int, vocab_size: int) -> torch.Tensor:
    """Uniform token ids in [0, vocab_size) (modulo bias below 2**-40 for any real vocabulary)."""
    return random_bits(seed, canvas, step, stream, n) % vocab_size


def random_uniform(seed, canvas, step, stream: int, n: int) -> torch.Tensor:
    """Uniform float32 in [0, 1) with 24 random bits."""
    return _shr(random_bits(seed, canvas, step, stream, n), 39).to(torch.float32) * (1.0 / (1 << 24))
