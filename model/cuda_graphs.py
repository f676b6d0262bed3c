"""A denoising step replayed as CUDA graphs: one graph per row count, captured on first use.

An eager step of the released model launches thousands of small kernels, and launching them from Python costs
more wall time than the GPU spends running them (docs/quantization.md's profile). A CUDA graph replays the whole
step as one launch: the forward (compiled regions or eager kernels), the vocabulary pass and the sampler's
decision. What makes that possible: the static step (`Denoiser._plain_step`) never waits on the device (no host
reads of tensor values) and has shapes that depend on the row count alone; it is a function of the slot indices,
and everything else it reads or writes (the KV cache, the weights, the denoiser's per-slot state, the
vocabulary workspace) lives at fixed addresses for the denoiser's life, so a graph may use them where they are.
The indices are copied into the graph's own buffer before each replay; the outputs are the graph's buffers:
read them before the next replay.

Capturing needs warm-up runs first (they build compiled kernels and settle the allocator), and those run the
step for real: the state tensors they write are saved before and put back after, so a capture changes nothing.
All graphs share one memory pool: they never run at the same time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    idx: torch.Tensor
    out: tuple[torch.Tensor, ...]


class StepGraphs:
    def __init__(self, step: Callable[[torch.Tensor], tuple], state: list[torch.Tensor], warmup: int = 2):
        self.step = step
        self.state = state  # what a warm-up run writes, restored after it
        self.warmup = warmup
        self.graphs: dict[int, Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        captured = self.graphs.get(idx.shape[0])
        if captured is None:
            captured = self.graphs[idx.shape[0]] = self._capture(idx)
        captured.idx.copy_(idx)
        captured.graph.replay()
        return captured.out

    def _capture(self, idx: torch.Tensor) -> Captured:
        static_idx = idx.clone()
        saved = [t.clone() for t in self.state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.step(static_idx)
        torch.cuda.current_stream().wait_stream(side)
        for t, before in zip(self.state, saved):
            t.copy_(before)
        del saved
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.step(static_idx)
        return Captured(graph, static_idx, out)
