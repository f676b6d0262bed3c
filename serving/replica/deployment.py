"""The pool replica: one per GPU (or a CPU process), hosting one engine. serving/app.py makes it a deployment.

The ingress calls `generate` through a DeploymentHandle with `stream=True` and gets back first `Accepted` (the
engine took the request: slot or queue place) or a `Refusal`, then the engine's events one by one (token ids
only), so it can answer 200 and open a stream as soon as a request is accepted, before its first canvas. When
the caller goes away (client disconnect, deadline), Serve cancels this generator and leaving the stream
cancels the request in the engine, which frees its slot at the next iteration.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import AsyncIterator

import torch

from model.automaton import vocabulary_of
from model.denoiser import Denoiser
from model.kernels import resolve
from model.weights import load_network
from serving.config import Pool
from serving.replica.engine import Engine
from serving.request import Accepted, Event, GenerateRequest, InvalidRequest, Overloaded, Refusal

log = logging.getLogger("ray.serve")

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ROUTED_KEYS = 8192  # cached prompt blocks a replica names to routers at most (the most recently used)
# The engine's event loop (scheduling, events to callers) and the model runner's thread share the GIL. A thread
# that wants it waits up to the switch interval while the other runs Python between torch calls; at Python's
# 5 ms default every hand-over of a step's results could wait that long (docs/fleet.md measures it). The
# replica's process hosts nothing else, so it takes a shorter interval.
GIL_SWITCH_INTERVAL_S = 0.0005


def device_for(pool: Pool) -> torch.device:
    if pool.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pool.device)


class PoolReplica:
    async def __init__(self, model: str, pool: dict, pool_name: str = "default"):  # async: the engine loop needs one
        spec = Pool(**pool)
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        if spec.threads:
            torch.set_num_threads(spec.threads)
        device = device_for(spec)
        dtype = None if spec.dtype == "auto" else getattr(torch, spec.dtype)
        net, ckpt = load_network(model, device=device, dtype=dtype, weights=spec.weights)
        net.kernels = resolve(spec.kernels, device)
        graphs = spec.compile and device.type == "cuda" if spec.cuda_graphs is None else spec.cuda_graphs
        buckets = ROW_BUCKETS if spec.compile or graphs else None
        slots = spec.slots + (1 if buckets else 0)  # the scratch slot that pads row buckets
        denoiser = Denoiser(
            net, slots, spec.max_context, ckpt.generation.eos_token_ids, compile=spec.compile, cuda_graphs=graphs,
            prefix_cache_bytes=int(spec.prefix_cache_mb * 2**20), prefix_block_tokens=spec.prefix_block_tokens,
        )  # fmt: skip
        self.engine = Engine(
            denoiser,
            max_batch_rows=spec.max_batch_rows,
            max_queue=spec.max_queue,
            tier_queue_share=spec.tier_queue_share,
            max_slowdown=spec.max_slowdown,
            row_buckets=buckets,
            name=pool_name,
            vocabulary=vocabulary_of(ckpt.path),
        )
        self.engine.start()
        log.info(
            "denoiser %s: %s (%s weights) on %s, %d slots x %d tokens, %d torch threads",
            pool_name,
            model,
            spec.weights,
            device,
            spec.slots,
            spec.max_context,
            torch.get_num_threads(),
        )

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Accepted | Refusal | Event]:
        try:
            if request.constraint is not None:
                await self.engine.constraints.prepare(request.constraint)
            stream = self.engine.submit(request)
        except (InvalidRequest, Overloaded) as exc:
            yield Refusal.of(exc)
            return
        async with stream:
            yield Accepted(stream.request_id)
            async for event in stream:
                yield event

    def load(self) -> dict:
        return dataclasses.asdict(self.engine.load())

    def record_routing_stats(self) -> dict:
        """Pulled by the controller for serving.routing.StepAwareRouter: the steps left per request, room left,
        and when they were read (the request router counts what it sent after that on top)."""
        at, canvas = time.time(), self.engine.denoiser.canvas_length
        stats = self.load() | {"work": self.engine.work(), "at": at, "canvas_length": canvas}
        prefix = self.engine.denoiser.prefix
        if prefix is not None:  # the prompt blocks it holds, for prefix-aware routing
            stats |= {"prefix_block_tokens": prefix.block_tokens, "prefix_keys": prefix.recent_keys(ROUTED_KEYS)}
        return stats

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Pulled by Serve for serving.autoscaling.WorkPolicy: the work this replica holds."""
        load = self.engine.load()
        return {"outstanding_steps": float(load.outstanding_steps), "live_canvases": float(load.live_canvases)}

    def check_health(self) -> None:
        self.engine.check_health()


async def local_replica(model: str, pool: dict, pool_name: str = "default") -> PoolReplica:
    """A replica in this process, for tests and in-process benchmarks (serving.ingress.pools.LocalPool). Serve awaits
    the async __init__ itself; plain Python cannot construct such a class, so this does what Serve does."""
    server = PoolReplica.__new__(PoolReplica)
    await server.__init__(model, pool, pool_name)
    return server
