"""The static denoising forward replayed as CUDA graphs: one graph per row count, captured on first use.

An eager forward of the released model launches thousands of small kernels, and launching them from Python costs
more wall time than the GPU spends running them (docs/quantization.md's profile). A CUDA graph replays the whole
forward, compiled regions and glue alike, as one launch. What makes that possible: the static forward
(`Network.denoise_graph(static=True)`) never waits on the device (no host reads of tensor values) and has shapes
that depend on the row count alone; the KV cache and the weights live at fixed addresses for the denoiser's
life, so a graph may read them where they are; and the inputs (slots, canvas, soft embedding) are copied into
the graph's own buffers before each replay. The output is the graph's buffer: read it before the next replay.

All graphs share one memory pool: they never run at the same time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.kv_cache import KVCache
from model.network import Network


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    slots: torch.Tensor
    canvas: torch.Tensor
    soft: torch.Tensor
    out: torch.Tensor


class GraphedDenoise:
    def __init__(self, network: Network, warmup: int = 2):
        self.net = network
        self.warmup = warmup  # eager calls before a capture: compiles the regions, settles allocations
        self.graphs: dict[int, Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(
        self, cache: KVCache, slots: torch.Tensor, canvas: torch.Tensor, soft: torch.Tensor, static: bool = True
    ) -> torch.Tensor:
        rows = slots.shape[0]
        captured = self.graphs.get(rows)
        if captured is None:
            captured = self.graphs[rows] = self._capture(cache, slots, canvas, soft)
        captured.slots.copy_(slots)
        captured.canvas.copy_(canvas)
        captured.soft.copy_(soft)
        captured.graph.replay()
        return captured.out

    def _capture(self, cache: KVCache, slots: torch.Tensor, canvas: torch.Tensor, soft: torch.Tensor) -> Captured:
        static_slots, static_canvas, static_soft = slots.clone(), canvas.clone(), soft.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.net.denoise(cache, static_slots, static_canvas, static_soft, static=True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.net.denoise(cache, static_slots, static_canvas, static_soft, static=True)
        return Captured(graph, static_slots, static_canvas, static_soft, out)
