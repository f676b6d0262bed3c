"""Our step-level batcher against static request batching and sequential transformers, one workload.

    python -m bench.bench_batcher [--preset mid] [--requests 24] [--rate 1.0] [--dtype bfloat16]

The workload is open-loop: Poisson arrivals at `--rate` requests/s, step caps 4, 8 and 16 mixed, one or two
canvases each, random prompts; fixed steps and no EOS, so every contender does exactly the same denoising
work. The contenders run one after another on the same arrival schedule (each replays it from its own start):

1. ours: serving.replica.engine.Engine, continuous batching at step granularity (`--slots` requests live at once);
2. static: request batching in the style of Ray Serve's `@serve.batch` (a batch forms from the queue when
   `--max-batch` requests wait or `--batch-wait-s` has passed since the first, then runs until all its requests
   finish; arrivals meanwhile wait), on the same denoiser, in two flavours:
   - `static`: the batch steps in lock-step, as transformers' batched generate does (a finished row keeps
     being computed, frozen, until the whole batch finishes);
   - `static_early_exit`: a finished row leaves the forward at once (our denoiser's own `generate`); only the
     batch membership is static;
3. sequential: transformers' `generate` one request at a time, in arrival order (same weights, dtype, steps).

Throughput is generated tokens over the time from the first arrival to the last completion; latency is
completion minus arrival. The last line printed is one JSON object; `ours_busy_fraction` is the share of that
time our engine spent in iterations (forwards and their events). The default rate offers more than any
contender can serve here, so each one's tokens/s is its capacity: at 0.5 requests/s ours sat idle between
arrivals for 13% of its run (busy 62.9 of 72.2 s, 64 of 140 iterations a single row), and its tokens/s measured
the arrival process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry

from model.config import DTYPE_NAMES, SamplerSettings, TextConfig, canvas_count
from model.denoiser import Denoiser, Request
from model.presets import PRESETS, preset, random_hf_model
from model.weights import from_state_dict
from serving.replica.engine import Engine
from serving.request import GenerateRequest


@dataclass(frozen=True)
class Item:
    arrival_s: float
    prompt: list[int]
    step_cap: int
    max_new_tokens: int
    seed: int

    def settings(self) -> SamplerSettings:
        return SamplerSettings(max_denoising_steps=self.step_cap, confidence_threshold=None)


@dataclass(frozen=True)
class Done:
    arrived: float
    finished: float
    tokens: int


def workload(n: int, rate: float, caps: list[int], canvas: int, vocab: int, seed: int) -> list[Item]:
    rnd = random.Random(seed)
    t, items = 0.0, []
    for i in range(n):
        t += rnd.expovariate(rate)
        prompt = [2] + [rnd.randrange(5, vocab - 3) for _ in range(rnd.randint(8, 64))]
        items.append(Item(t, prompt, rnd.choice(caps), canvas * rnd.choice((1, 1, 2)), seed=i))
    return items


async def until(start: float, offset: float) -> float:
    await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
    return time.perf_counter()


# ---------------------------------------------------------------- contenders


async def ours(denoiser: Denoiser, items: list[Item], busy: dict[str, float]) -> list[Done]:
    """Also records in `busy["s"]` the time the engine spent in iterations (the rest it waited for arrivals)."""
    engine = Engine(denoiser, max_queue=len(items), registry=CollectorRegistry())
    engine.start()
    start = time.perf_counter()

    async def one(it: Item) -> Done:
        arrived = await until(start, it.arrival_s)
        c = await engine.generate(GenerateRequest(it.prompt, it.max_new_tokens, it.settings(), it.seed))
        return Done(arrived, time.perf_counter(), len(c.tokens))

    done = await asyncio.gather(*(one(it) for it in items))
    await engine.stop()
    busy["s"] = engine.busy_s
    return done


def lockstep_generate(d: Denoiser, requests: list[Request]) -> list[int]:
    """transformers' batch semantics on our denoiser: every row is stepped until every row is finished, and
    canvases are committed when all rows' current canvases are done. Returns tokens per request.

    A row that is done is stepped on a fresh canvas (its result ignored) rather than frozen: it costs the same
    forward row as transformers' frozen row, without running its temperature schedule past its step cap."""
    C = d.canvas_length
    slots = list(range(len(requests)))
    for s, r in zip(slots, requests):
        d.admit(s, r.settings, r.seed)
    d.prefill(slots, [r.prompt for r in requests])
    d.start_canvas(slots)
    left = [canvas_count(r.max_new_tokens, C) for r in requests]
    tokens = [0] * len(requests)
    while any(left):
        active = [s for s in slots if left[s]]
        done: set[int] = set()
        while len(done) < len(active):
            result = d.step(slots)
            finished = [s for s in slots if result.done[s]]
            done.update(s for s in finished if s in active)
            d.start_canvas([s for s in finished if s not in active or len(done) < len(active)])
        for s in active:
            left[s] -= 1
            tokens[s] += C
        more = [s for s in active if left[s]]
        if more:
            d.commit(more)
            d.start_canvas(more)
    d.release(slots)
    return tokens


async def static(denoiser: Denoiser, items: list[Item], max_batch: int, wait_s: float, lockstep: bool) -> list[Done]:
    queue: asyncio.Queue[tuple[Item, float, asyncio.Future]] = asyncio.Queue()
    pool = ThreadPoolExecutor(max_workers=1)
    loop = asyncio.get_running_loop()

    @torch.inference_mode()
    def run_batch(batch: list[Item]) -> list[int]:
        reqs = [Request(it.prompt, it.max_new_tokens, it.settings(), it.seed) for it in batch]
        if lockstep:
            return lockstep_generate(denoiser, reqs)
        return [len(g.tokens) for g in denoiser.generate(reqs)]

    async def batcher() -> None:
        while True:
            batch = [await queue.get()]
            deadline = time.perf_counter() + wait_s
            while len(batch) < max_batch:
                try:
                    batch.append(await asyncio.wait_for(queue.get(), max(0.0, deadline - time.perf_counter())))
                except asyncio.TimeoutError:
                    break
            try:
                counts = await loop.run_in_executor(pool, run_batch, [b[0] for b in batch])
            except Exception as exc:
                for _, _, fut in batch:
                    fut.set_exception(exc)
                continue
            now = time.perf_counter()
            for (_, arrived, fut), n in zip(batch, counts):
                fut.set_result(Done(arrived, now, n))

    task = loop.create_task(batcher())
    start = time.perf_counter()

    async def one(it: Item) -> Done:
        arrived = await until(start, it.arrival_s)
        fut = loop.create_future()
        queue.put_nowait((it, arrived, fut))
        return await fut

    done = await asyncio.gather(*(one(it) for it in items))
    task.cancel()
    pool.shutdown()
    return done


def sequential(hf, items: list[Item], pad: int) -> list[Done]:
    start = time.perf_counter()
    out = []
    for it in items:
        arrived = start + it.arrival_s
        time.sleep(max(0.0, arrived - time.perf_counter()))
        r = hf.generate(
            torch.tensor([it.prompt]),
            max_new_tokens=it.max_new_tokens,
            max_denoising_steps=it.step_cap,
            confidence_threshold=None,
            eos_token_id=None,
            pad_token_id=pad,
        )
        out.append(Done(arrived, time.perf_counter(), r.sequences.shape[1] - len(it.prompt)))
    return out


def summary(done: list[Done]) -> dict:
    lat = sorted(d.finished - d.arrived for d in done)
    span = max(d.finished for d in done) - min(d.arrived for d in done)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, math.ceil(p * len(lat)) - 1)]

    return {
        "tokens_per_s": round(sum(d.tokens for d in done) / span, 2),
        "p50_s": round(statistics.median(lat), 3),
        "p99_s": round(pct(0.99), 3),
        "makespan_s": round(span, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="mid")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--rate", type=float, default=1.0, help="Poisson arrival rate, requests per second")
    ap.add_argument("--caps", default="4,8,16")
    ap.add_argument("--slots", type=int, default=8, help="requests live at once in our engine")
    ap.add_argument("--max-batch", type=int, default=8, help="static batching: largest batch")
    ap.add_argument("--batch-wait-s", type=float, default=0.01, help="static batching: @serve.batch's default")
    ap.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16")
    ap.add_argument("--contenders", default="ours,static,static_early_exit,sequential")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    cfg = preset(args.preset)
    text = TextConfig.from_hf(cfg)
    dtype = getattr(torch, args.dtype)
    hf = random_hf_model(cfg, seed=args.seed, dtype=dtype)
    net = from_state_dict(text, hf.state_dict(), device="cpu", dtype=dtype)
    C = text.canvas_length
    items = workload(args.requests, args.rate, [int(c) for c in args.caps.split(",")], C, text.vocab_size, args.seed)
    context = max(len(it.prompt) for it in items) + 2 * C
    names = args.contenders.split(",")

    def denoiser(slots: int) -> Denoiser:
        return Denoiser(net, slots=slots, max_context=context, eos_token_ids=())

    busy: dict[str, float] = {}
    runs: dict[str, Callable[[], list[Done]]] = {
        "ours": lambda: asyncio.run(ours(denoiser(args.slots), items, busy)),
        "static": lambda: asyncio.run(
            static(denoiser(args.max_batch), items, args.max_batch, args.batch_wait_s, lockstep=True)
        ),
        "static_early_exit": lambda: asyncio.run(
            static(denoiser(args.max_batch), items, args.max_batch, args.batch_wait_s, lockstep=False)
        ),
        "sequential": lambda: sequential(hf, items, text.pad_token_id),
    }
    warm = denoiser(1)
    warm.generate([Request(items[0].prompt, C, items[0].settings(), 0)])  # first-call allocations
    results = {}
    with torch.inference_mode():
        for name in names:
            results[name] = summary(runs[name]())
            print(json.dumps({name: results[name]}), flush=True)
    out = {
        "preset": args.preset,
        "dtype": args.dtype,
        "ours_compute_dtype": str(net.dtype).removeprefix("torch."),
        "requests": args.requests,
        "rate_per_s": args.rate,
        "offered_tokens_per_s": round(args.rate * sum(it.max_new_tokens for it in items) / len(items), 1),
        "caps": args.caps,
        "slots": args.slots,
        "max_batch": args.max_batch,
    }
    if "ours" in results:  # near 1: ours was saturated, so its tokens/s is its capacity, not the arrival rate
        out["ours_busy_fraction"] = round(busy["s"] / results["ours"]["makespan_s"], 3)
    for name, r in results.items():
        out[f"{name}_tokens_per_s"] = r["tokens_per_s"]
        out[f"{name}_p50_s"] = r["p50_s"]
        out[f"{name}_p99_s"] = r["p99_s"]
        out[f"{name}_makespan_s"] = r["makespan_s"]
    for name in names:
        if name != "ours" and "ours" in results:
            out[f"ours_vs_{name}"] = round(results["ours"]["tokens_per_s"] / results[name]["tokens_per_s"], 3)
    out |= {"torch_threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine()}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
