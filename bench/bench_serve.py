"""What the Serve path costs: one open-loop workload through the engine in-process, Serve's HTTP proxy and its
gRPC proxy, with the same model and replica settings.

    python -m bench.bench_serve [--preset mid] [--dtype bfloat16] [--requests 24] [--rate 0.5]

The model is a random checkpoint of the preset, saved to a folder (config, safetensors, a word-level
tokenizer) and loaded by path, as a released model is. The workload: Poisson arrivals at `--rate` requests/s,
tiers fast / balanced / quality (fixed 2 / 4 / 8 steps per canvas, so every path does the same denoising work),
one or two canvases each, random prompt token ids. Contenders, one after another on the same arrival schedule:

1. inprocess: a pool replica object in this process (serving.replica.deployment.local_replica), called as the
   ingress calls it: token ids in, the engine's events out, no Ray;
2. http: `serve run` of an app with that replica (one pool, one replica), streaming `/v1/generate` with token
   ids through Serve's HTTP proxy, the ingress (tier, limits, detokenization, SSE) and the replica's handle;
3. grpc: the same app, `GenerateStream` with token ids through Serve's gRPC proxy.

Time to first canvas is arrival to the first canvas the client holds; latency is arrival to the final
event; tokens/s is generated tokens over first arrival to last completion. The last line is one JSON object
with `http_vs_inprocess` and `grpc_vs_inprocess` (tokens/s ratios) and `http_ttfc_added_ms` and
`grpc_ttfc_added_ms` (p50 time to first canvas, Serve path minus in-process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx

from bench.report import machine, percentile
from loadtest.serve_run import ServeRun, shipped_config
from protos.diffusiongemma.v1 import diffusion_pb2 as pb
from protos.diffusiongemma.v1 import diffusion_pb2_grpc as pb_grpc
from serving.config import AppConfig
from serving.request import Accepted, CanvasEvent, ErrorEvent, FinalEvent, GenerateRequest

TIER_STEPS = {"fast": 2, "balanced": 4, "quality": 8}


@dataclass(frozen=True)
class Item:
    arrival_s: float
    prompt: list[int]
    tier: str
    max_new_tokens: int
    seed: int


@dataclass(frozen=True)
class Done:
    arrived: float
    first_canvas: float
    finished: float
    tokens: int


def workload(
    n: int, rate: float, canvas: int, vocab: int, seed: int, mix: dict[str, tuple[float, tuple[int, ...]]]
) -> list[Item]:
    """Poisson arrivals; mix: tier -> (weight, canvas counts to draw from)."""
    rnd = random.Random(seed)
    t, items = 0.0, []
    tiers, weights = list(mix), [w for w, _ in mix.values()]
    for i in range(n):
        t += rnd.expovariate(rate)
        prompt = [2] + [rnd.randrange(5, vocab - 4) for _ in range(rnd.randint(8, 64))]
        tier = rnd.choices(tiers, weights)[0]
        items.append(Item(t, prompt, tier, canvas * rnd.choice(mix[tier][1]), seed=i))
    return items


def app_args(model: str, tier_steps: dict[str, int], pool: dict) -> dict:
    """deploy/config.yaml's args with a benchmark's model, fixed-step tiers and one pool."""
    tiers = {
        name: {
            "pool": "cpu",
            "sampler": {"max_denoising_steps": steps, "confidence_threshold": None},
            "limits": {"max_denoising_steps": {"min": 1, "max": 64}},
        }
        for name, steps in tier_steps.items()
    }
    return {"model": model, "default_tier": next(iter(tier_steps)), "tiers": tiers, "pools": {"cpu": pool}}


def workload_args(ap: argparse.ArgumentParser, requests: int, rate: float) -> None:
    """The options the Serve benchmarks share: the random model's preset and dtype, the workload's size and rate."""
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--requests", type=int, default=requests)
    ap.add_argument("--rate", type=float, default=rate, help="arrivals per second")


def served_each(
    args: argparse.Namespace, pools: dict[str, dict], tier_steps: dict[str, int], measure: Callable[[Any], dict]
) -> dict[str, dict]:
    """A random checkpoint of `args.preset` served under `serve run` once per pool setting, in the order given,
    each measured by `measure(app)` (loadtest/serve_run.py's App)."""
    import torch

    from model.presets import save_random_checkpoint

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench") as tmp:
        model = Path(tmp) / "model"
        save_random_checkpoint(model, args.preset, seed=args.seed, dtype=getattr(torch, args.dtype))
        with ServeRun(Path(tmp)) as runs:
            for who, pool in pools.items():
                app = runs.get(serve_config("bench", app_args(str(model), tier_steps, pool)))
                results[who] = measure(app)
                print(who, results[who], flush=True)
    return results


def serve_config(app_name: str, args: dict) -> dict:
    """deploy/config.yaml with one application of these args (ports are ServeRun's)."""
    config = shipped_config()
    config["applications"][0].update(name=app_name, args=args)
    return config


async def replay(items: list[Item], one: Callable[[Item], Awaitable[tuple[float, int]]]) -> list[Done]:
    """Send each item at its arrival time; `one` returns (first canvas time, generated tokens)."""
    start = time.perf_counter()

    async def timed(it: Item) -> Done:
        await asyncio.sleep(max(0.0, start + it.arrival_s - time.perf_counter()))
        arrived = time.perf_counter()
        first, tokens = await one(it)
        return Done(arrived, first, time.perf_counter(), tokens)

    return await asyncio.gather(*(timed(it) for it in items))


# ---------------------------------------------------------------- contenders


async def inprocess(config: AppConfig, items: list[Item], warmup: list[Item]) -> list[Done]:
    from serving.replica.deployment import local_replica

    pool = config.pools["cpu"]
    server = await local_replica(config.model, pool.model_dump(), "bench")

    async def one(it: Item) -> tuple[float, int]:
        settings = config.tiers[it.tier].resolve(it.tier, {})
        request = GenerateRequest(it.prompt, it.max_new_tokens, settings, it.seed, request_id=f"bench-{it.seed}")
        first = None
        async for event in server.generate(request):
            if isinstance(event, CanvasEvent) and first is None:
                first = time.perf_counter()
            elif isinstance(event, FinalEvent):
                return first, event.usage.generated_tokens
            elif isinstance(event, ErrorEvent):
                raise RuntimeError(event.message)
            elif not isinstance(event, (Accepted, CanvasEvent)):
                raise RuntimeError(f"refused: {event}")
        raise RuntimeError("no final event")

    try:
        await asyncio.gather(*(one(it) for it in warmup))
        return await replay(items, one)
    finally:
        await server.engine.stop()


async def generate_stream(
    client: httpx.AsyncClient, body: dict, headers: dict | None = None
) -> tuple[float | None, dict]:
    """One streaming /v1/generate: (perf_counter time of the first canvas, the final event)."""
    first = None
    async with client.stream("POST", "/v1/generate", json=body | {"stream": True}, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            obj = json.loads(line[6:])
            if obj["type"] == "canvas" and first is None:
                first = time.perf_counter()
            elif obj["type"] == "final":
                return first, obj
            elif obj["type"] == "error":
                raise RuntimeError(obj["message"])
    raise RuntimeError("no final event")


async def http_stream(client: httpx.AsyncClient, it: Item) -> tuple[float, int]:
    """One streaming /v1/generate with token ids: (first canvas time, generated tokens)."""
    body = {"token_ids": it.prompt, "tier": it.tier, "max_new_tokens": it.max_new_tokens, "seed": it.seed}
    headers = {"x-request-id": f"bench-{it.seed}"}  # names the request in Serve's log (--serve-log)
    first, final = await generate_stream(client, body, headers)
    return first, final["usage"]["generated_tokens"]


async def over_http(base: str, items: list[Item], warmup: list[Item]) -> list[Done]:
    limits = httpx.Limits(max_connections=len(items) + 8)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        await asyncio.gather(*(http_stream(client, it) for it in warmup))
        return await replay(items, lambda it: http_stream(client, it))


async def over_grpc(target: str, items: list[Item], warmup: list[Item]) -> list[Done]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.DiffusionServiceStub(channel)

        async def one(it: Item) -> tuple[float, int]:
            req = pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=it.prompt), tier=it.tier, max_new_tokens=it.max_new_tokens, seed=it.seed
            )
            first = None
            async for chunk in stub.GenerateStream(req, metadata=(("application", "bench"),), timeout=600):
                kind = chunk.WhichOneof("kind")
                if kind == "canvas" and first is None:
                    first = time.perf_counter()
                elif kind == "final":
                    return first, chunk.final.usage.generated_tokens
            raise RuntimeError("no final chunk")

        await asyncio.gather(*(one(it) for it in warmup))
        return await replay(items, one)


# ---------------------------------------------------------------- report


def summary(done: list[Done]) -> dict:
    span = max(d.finished for d in done) - min(d.arrived for d in done)
    ttfc = [d.first_canvas - d.arrived for d in done]
    total = [d.finished - d.arrived for d in done]
    return {
        "tokens_per_s": round(sum(d.tokens for d in done) / span, 1),
        "tokens": sum(d.tokens for d in done),
        "ttfc_p50_ms": round(1000 * statistics.median(ttfc), 1),
        "ttfc_p99_ms": round(1000 * percentile(ttfc, 0.99), 1),
        "latency_p50_s": round(statistics.median(total), 3),
        "latency_p99_s": round(percentile(total, 0.99), 3),
    }


def paired_added_ms(base: list[Done], other: list[Done]) -> float:
    """Median over requests of (time to first canvas on `other` - on `base`): the same arrivals in order."""
    ttfc = lambda d: d.first_canvas - d.arrived
    return round(1000 * statistics.median(ttfc(o) - ttfc(b) for b, o in zip(base, other)), 1)


def replica_split(items: list[Item], base: list[Done], http: list[Done], log: str) -> dict:
    """Per HTTP request (id bench-<n> in Serve's access log): the client's latency minus the replica's own call
    time (the path: proxy, ingress, hops), and the replica's call time minus the same request in-process (the
    engine inside a Ray worker). Medians, ms."""
    calls = {}
    for m in re.finditer(r"bench-(\d+) -- CALL generate OK ([\d.]+)ms", log):
        calls[int(m.group(1))] = float(m.group(2)) / 1000  # the last one: warm-up requests come first
    path, replica = [], []
    for it, b, h in zip(items, base, http):
        if it.seed in calls:
            path.append((h.finished - h.arrived) - calls[it.seed])
            replica.append(calls[it.seed] - (b.finished - b.arrived))
    if not path:
        return {}
    return {
        "http_path_ms": round(1000 * statistics.median(path), 1),
        "replica_vs_inprocess_ms": round(1000 * statistics.median(replica), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    workload_args(ap, requests=40, rate=0.25)
    ap.add_argument("--slots", type=int, default=16)
    # one thread leaves a core to Serve's proxies, controller and the client, as a GPU replica leaves the CPUs:
    # with two, the replica's compute shares both cores with them (docs/fleet.md has both)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the replica")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve-log", type=Path, help="keep the serve run log here (request ids bench-<n>)")
    ap.add_argument("--serve-env", action="append", default=[], help="KEY=VALUE for the serve run cluster")
    ap.add_argument("--dump", type=Path, help="write every request's timings (seconds) per path as JSON here")
    args = ap.parse_args()

    import torch

    from model.presets import PRESETS, save_random_checkpoint

    cfg = PRESETS[args.preset]
    shape = (cfg["canvas_length"], cfg["text_config"]["vocab_size"])
    mix = {tier: (1.0, (1, 1, 2)) for tier in TIER_STEPS}
    items = workload(args.requests, args.rate, *shape, args.seed, mix)
    warmup = workload(2, 1.0, *shape, args.seed + 1, mix)
    results: dict[str, dict] = {}
    runs: dict[str, list[Done]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_serve") as tmp:
        model = Path(tmp) / "model"
        save_random_checkpoint(model, args.preset, seed=args.seed, dtype=getattr(torch, args.dtype))
        pool = dict(replicas=1, slots=args.slots, max_context=1024, max_queue=256, num_cpus=1, threads=args.threads)
        args_block = app_args(str(model), TIER_STEPS, pool)
        config = AppConfig(**args_block)

        torch.set_num_threads(args.threads)
        runs["inprocess"] = asyncio.run(inprocess(config, items, warmup))
        results["inprocess"] = summary(runs["inprocess"])
        print("inprocess", results["inprocess"], flush=True)

        env = dict(kv.split("=", 1) for kv in args.serve_env)
        with ServeRun(Path(tmp), env) as serve:
            app = serve.get(serve_config("bench", args_block))
            runs["http"] = asyncio.run(over_http(app.http, items, warmup))
            results["http"] = summary(runs["http"])
            print("http", results["http"], flush=True)
            runs["grpc"] = asyncio.run(over_grpc(app.grpc_target, items, warmup))
            results["grpc"] = summary(runs["grpc"])
            print("grpc", results["grpc"], flush=True)
            split = replica_split(items, runs["inprocess"], runs["http"], app.log.read_text())
            if args.serve_log:
                shutil.copyfile(app.log, args.serve_log)

    if args.dump:
        rows = {path: [asdict(d) | {"tier": it.tier} for it, d in zip(items, done)] for path, done in runs.items()}
        args.dump.write_text(json.dumps(rows))
    base = results["inprocess"]
    out = {
        "benchmark": "bench_serve",
        "preset": args.preset,
        "dtype": args.dtype,
        "requests": args.requests,
        "rate": args.rate,
        "tiers_steps": TIER_STEPS,
        "serve_env": args.serve_env,
        **machine(),
        **{f"{k}_{m}": v for k, r in results.items() for m, v in r.items()},
        "http_vs_inprocess": round(results["http"]["tokens_per_s"] / base["tokens_per_s"], 3),
        "grpc_vs_inprocess": round(results["grpc"]["tokens_per_s"] / base["tokens_per_s"], 3),
        "http_ttfc_added_ms": round(results["http"]["ttfc_p50_ms"] - base["ttfc_p50_ms"], 1),
        "grpc_ttfc_added_ms": round(results["grpc"]["ttfc_p50_ms"] - base["ttfc_p50_ms"], 1),
        # the same request through both paths, paired: less noisy than a difference of two medians
        "http_ttfc_added_paired_ms": paired_added_ms(runs["inprocess"], runs["http"]),
        "grpc_ttfc_added_paired_ms": paired_added_ms(runs["inprocess"], runs["grpc"]),
        **split,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
