"""What every benchmark's JSON line shares: percentiles, and the machine the figures came from (CPU ratios move
with the CPU's bf16 support, so each figure carries the flags)."""

from __future__ import annotations

import math
import platform
from pathlib import Path


def percentile(xs: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..1): a value that was measured, never an interpolation."""
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))]


def machine() -> dict:
    """CPU model, the flags that decide bf16 speed, core count, torch version and threads."""
    import os

    import torch

    model, flags = platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == platform.machine():
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = sorted(f for f in line.split() if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cpu_flags": flags,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
