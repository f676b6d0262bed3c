"""Prefix-aware routing across two replicas: the prefix cache's hit rate and time to first canvas, with the router
preferring the replica that holds a request's prompt start against the same step-aware router without it.

    python -m bench.bench_prefix_routing [--preset mid] [--systems 6] [--system-tokens 512] [--requests 96]

Two CPU replicas of one pool (one torch thread each) behind `serve run`. Each request is one of `--systems`
system prompts followed by a short question (8 to 32 tokens), answered in one canvas of 2 steps, arriving open
loop (Poisson, `--rate`). Each replica's prefix cache holds about `--cache-prompts` of the system prompts, fewer
than there are: where every replica sees every prompt, the caches evict one another's use; where the router
sends a prompt back to the replica that holds it, the prompts split between the replicas and stay cached. The
same arrivals go through `prefix_routing: true` and `false`, each on a fresh `serve run`.

The last line is one JSON object: per contender, the hit rate (cached prompt tokens over prompt tokens, from
each answer's usage) and time to first canvas (p50, mean), and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx

from bench.bench_serve import generate_stream, served_each, workload_args
from bench.report import machine, percentile

STEPS = 2
BLOCK = 64


def workload(n: int, rate: float, systems: int, system_tokens: int, vocab: int, seed: int) -> list[tuple]:
    """(arrival s, prompt ids) per request."""
    rnd = random.Random(seed)
    heads = [[2] + [rnd.randrange(10, vocab) for _ in range(system_tokens - 1)] for _ in range(systems)]
    t, out = 0.0, []
    for _ in range(n):
        t += rnd.expovariate(rate)
        question = [rnd.randrange(10, vocab) for _ in range(rnd.randint(8, 32))]
        out.append((t, rnd.choice(heads) + question))
    return out


async def replay(base: str, items: list[tuple], canvas: int) -> list[dict]:
    limits = httpx.Limits(max_connections=len(items) + 8)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        start = time.perf_counter()

        async def one(i: int, at: float, prompt: list[int]) -> dict:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            sent = time.perf_counter()
            body = {"token_ids": prompt, "max_new_tokens": canvas, "seed": i}
            first, final = await generate_stream(client, body)
            usage = final["usage"]
            return {"ttfc": first - sent, "prompt": usage["prompt_tokens"], "cached": usage["cached_tokens"]}

        return await asyncio.gather(*(one(i, at, p) for i, (at, p) in enumerate(items)))


def figures(done: list[dict]) -> dict:
    ttfc = [d["ttfc"] for d in done]
    return {
        "hit_rate": round(sum(d["cached"] for d in done) / sum(d["prompt"] for d in done), 3),
        "ttfc_p50_s": round(percentile(ttfc, 0.5), 3),
        "ttfc_mean_s": round(statistics.fmean(ttfc), 3),
        "ttfc_p90_s": round(percentile(ttfc, 0.9), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    workload_args(ap, requests=96, rate=1.5)
    ap.add_argument("--systems", type=int, default=6, help="distinct system prompts")
    ap.add_argument("--system-tokens", type=int, default=512)
    ap.add_argument("--cache-prompts", type=float, default=3.5, help="system prompts one replica's cache holds")
    ap.add_argument("--order", default="prefix,plain", help="which contender runs first")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from model.config import TextConfig
    from model.presets import PRESETS

    cfg = PRESETS[args.preset]
    text = TextConfig.from_hf(cfg)
    canvas = cfg["canvas_length"]
    items = workload(args.requests, args.rate, args.systems, args.system_tokens, text.vocab_size, args.seed)
    token_bytes = sum(2 * k * d for k, d in zip(text.kv_heads, text.head_dims)) * getattr(torch, args.dtype).itemsize
    cache_mb = args.cache_prompts * args.system_tokens * token_bytes / 2**20
    pool = dict(replicas=2, slots=16, max_context=args.system_tokens + 64, max_queue=256, num_cpus=1, threads=1,
                prefix_cache_mb=cache_mb, prefix_block_tokens=BLOCK)  # fmt: skip
    pools = {who: pool | {"prefix_routing": who == "prefix"} for who in args.order.split(",")}
    results = served_each(
        args, pools, {"fast": STEPS}, lambda app: figures(asyncio.run(replay(app.http, items, canvas)))
    )

    prefix, plain = results["prefix"], results["plain"]
    out = {
        "benchmark": "bench_prefix_routing",
        "preset": args.preset,
        "dtype": args.dtype,
        "systems": args.systems,
        "system_tokens": args.system_tokens,
        "cache_prompts_per_replica": args.cache_prompts,
        "requests": args.requests,
        "rate": args.rate,
        "steps": STEPS,
        **machine(),
        "replica_threads": 1,
        **{f"{who}_{k}": v for who, r in results.items() for k, v in r.items()},
        "hit_rate_gain": round(prefix["hit_rate"] - plain["hit_rate"], 3),
        "ttfc_mean_ratio": round(prefix["ttfc_mean_s"] / plain["ttfc_mean_s"], 3),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
