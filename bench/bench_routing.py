"""Routing across the replicas of one pool: the step-aware request router against Serve's default, measured.

    python -m bench.bench_routing [--preset mid] [--requests 120] [--rate 0.8] [--quality-share 0.15]

Two CPU replicas of one pool (one torch thread each) behind `serve run`, and a skewed open-loop workload:
Poisson arrivals, most of them 1-canvas `fast` requests (2 steps per canvas), among multi-canvas `quality`
requests (8 steps per canvas, 3 or 4 canvases): one quality request is 12-16x the denoising work of a fast
one, which a count of ongoing requests cannot see. The same arrivals go through the app twice, once with
`router: step_aware` (serving/routing.py) and once with `router: power_of_two` (Serve's default request
router), each on a fresh `serve run`. Every request streams `/v1/generate` with token ids over HTTP.

Latency is arrival to the final event at the client; tokens/s is generated tokens over first arrival to last
completion. The last line is one JSON object with `fast_p99_ours_s`, `fast_p99_default_s`,
`tokens_per_s_ours` and `tokens_per_s_default` (and p50s, the quality tier's figures and the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics

from bench.bench_serve import Done, Item, over_http, served_each, workload, workload_args
from bench.report import machine, percentile

TIER_STEPS = {"fast": 2, "quality": 8}
ROUTERS = {"ours": "step_aware", "default": "power_of_two"}


def figures(items: list[Item], done: list[Done]) -> dict:
    span = max(d.finished for d in done) - min(d.arrived for d in done)
    out = {"tokens_per_s": round(sum(d.tokens for d in done) / span, 1)}
    for tier in TIER_STEPS:
        lat = [d.finished - d.arrived for it, d in zip(items, done) if it.tier == tier]
        out[f"{tier}_p50_s"] = round(statistics.median(lat), 3)
        out[f"{tier}_p99_s"] = round(percentile(lat, 0.99), 3)
        out[f"{tier}_requests"] = len(lat)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    workload_args(ap, requests=120, rate=0.8)
    ap.add_argument("--quality-share", type=float, default=0.15)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--order", default="ours,default", help="which router runs first")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from model.presets import PRESETS

    cfg = PRESETS[args.preset]
    shape = (cfg["canvas_length"], cfg["text_config"]["vocab_size"])
    mix = {"fast": (1 - args.quality_share, (1,)), "quality": (args.quality_share, (3, 4))}
    items = workload(args.requests, args.rate, *shape, args.seed, mix)
    warmup = workload(4, 1.0, *shape, args.seed + 1, {"fast": (1.0, (1,))})
    pool = dict(replicas=2, slots=args.slots, max_context=1280, max_queue=256, num_cpus=1, threads=1)
    pools = {who: pool | {"router": ROUTERS[who]} for who in args.order.split(",")}
    results = served_each(
        args,
        pools,
        TIER_STEPS,
        lambda app: figures(items, asyncio.run(over_http(app.http, items, warmup))),
    )

    ours, default = results["ours"], results["default"]
    out = {
        "benchmark": "bench_routing",
        "preset": args.preset,
        "dtype": args.dtype,
        "requests": args.requests,
        "rate": args.rate,
        "quality_share": args.quality_share,
        "tiers_steps": TIER_STEPS,
        **machine(),  # torch_threads: this process's; each replica runs one
        "replica_threads": 1,
        "fast_p99_ours_s": ours["fast_p99_s"],
        "fast_p99_default_s": default["fast_p99_s"],
        "tokens_per_s_ours": ours["tokens_per_s"],
        "tokens_per_s_default": default["tokens_per_s"],
        "fast_p99_reduction": round(1 - ours["fast_p99_s"] / default["fast_p99_s"], 3),
        "throughput_ratio": round(ours["tokens_per_s"] / default["tokens_per_s"], 3),
        **{f"{who}_{k}": v for who, r in results.items() for k, v in r.items()},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
