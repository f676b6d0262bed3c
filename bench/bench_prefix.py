"""Time to first canvas with and without the prefix cache, on a shared-prefix workload.

    python -m bench.bench_prefix [--preset mid] [--system-tokens 1024] [--requests 24] [--rate 1.0] [--steps 4]

Every request is one system prompt of `--system-tokens` tokens followed by a short question of its own (8 to 32
tokens), answered in one canvas of fixed steps (no adaptive stop, no EOS: both contenders do the same denoising
work). Two engines on the same random network, one with the prefix cache and one without, each replay the same
arrivals, one after the other:

- `idle`: one request at a time (the next arrives after the last is answered): the cache's saving alone;
- `loaded`: open-loop Poisson arrivals at `--rate` requests/s, where prefills of other requests' prompts delay
  every live row in the engine (a prefill and the denoising steps share the iterations).

The cache starts cold: the first request stores the system prompt's blocks. The last line printed is one JSON
object: time to first canvas (p50, mean, p90) per contender and phase, the cached / uncached ratios, and the
cache's hit rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import torch
from prometheus_client import CollectorRegistry

from bench.report import machine, percentile
from model.config import DTYPE_NAMES, SamplerSettings, TextConfig
from model.denoiser import Denoiser
from model.presets import PRESETS, preset, random_hf_model
from model.weights import from_state_dict
from serving.replica.engine import Engine
from serving.request import CanvasEvent, GenerateRequest


def prompts(n: int, system_tokens: int, vocab: int, seed: int) -> list[list[int]]:
    rnd = random.Random(seed)
    system = [2] + [rnd.randrange(10, vocab) for _ in range(system_tokens - 1)]
    return [system + [rnd.randrange(10, vocab) for _ in range(rnd.randint(8, 32))] for _ in range(n)]


async def first_canvases(engine: Engine, items: list[list[int]], steps: int, arrivals: list[float] | None) -> list:
    """Time from each request's arrival to its first canvas; arrivals None: one request at a time."""
    settings = SamplerSettings(max_denoising_steps=steps, confidence_threshold=None)
    C = engine.denoiser.canvas_length
    engine.start()

    async def one(i: int, prompt: list[int], at: float) -> float:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
        sent = time.perf_counter()
        async with engine.submit(GenerateRequest(prompt, C, settings, seed=i)) as stream:
            async for event in stream:
                if isinstance(event, CanvasEvent):
                    return time.perf_counter() - sent
        raise RuntimeError("no canvas")

    start = time.perf_counter()
    if arrivals is None:
        return [await one(i, p, 0.0) for i, p in enumerate(items)]
    return list(await asyncio.gather(*(one(i, p, a) for i, (p, a) in enumerate(zip(items, arrivals)))))


def stats(times: list[float]) -> dict:
    return {
        "p50_s": round(percentile(times, 0.5), 4),
        "mean_s": round(statistics.fmean(times), 4),
        "p90_s": round(percentile(times, 0.9), 4),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="mid")
    ap.add_argument("--system-tokens", type=int, default=1024)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--rate", type=float, default=1.0, help="loaded phase: Poisson arrivals per second")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps of the one canvas")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--prefix-cache-mb", type=float, default=64)
    ap.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    cfg = preset(args.preset)
    text = TextConfig.from_hf(cfg)
    hf = random_hf_model(cfg, seed=args.seed, dtype=getattr(torch, args.dtype))
    net = from_state_dict(text, hf.state_dict(), device="cpu", dtype=getattr(torch, args.dtype))
    del hf
    items = prompts(args.requests, args.system_tokens, text.vocab_size, args.seed)
    rnd = random.Random(args.seed + 1)
    arrivals, t = [], 0.0
    for _ in items:
        arrivals.append(t)
        t += rnd.expovariate(args.rate)
    context = max(len(p) for p in items) + 8

    def engine(cache_mb: float) -> Engine:
        d = Denoiser(net, slots=args.slots, max_context=context, eos_token_ids=(),
                     prefix_cache_bytes=int(cache_mb * 2**20))  # fmt: skip
        return Engine(d, max_queue=args.requests, registry=CollectorRegistry())

    keys = ("preset", "dtype", "system_tokens", "requests", "rate", "steps", "slots", "prefix_cache_mb")
    out: dict = {k: getattr(args, k) for k in keys}
    with torch.inference_mode():
        warm = engine(0)
        asyncio.run(first_canvases(warm, items[:1], args.steps, None))  # first-call allocations
        for phase, when in (("idle", None), ("loaded", arrivals)):
            for name, mb in (("no_cache", 0), ("cache", args.prefix_cache_mb)):
                e = engine(mb)
                times = asyncio.run(first_canvases(e, items, args.steps, when))
                out[f"{phase}_{name}"] = stats(times)
                if e.denoiser.prefix is not None:
                    s = e.denoiser.prefix.stats
                    out[f"{phase}_hit_rate"] = round(s.hit_tokens / s.queried_tokens, 3)
                print(json.dumps({f"{phase}_{name}": out[f"{phase}_{name}"]}), flush=True)
            for k in ("p50_s", "mean_s"):
                out[f"{phase}_cache_over_no_cache_{k[:-2]}"] = round(
                    out[f"{phase}_cache"][k] / out[f"{phase}_no_cache"][k], 3
                )
    out |= machine()
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
