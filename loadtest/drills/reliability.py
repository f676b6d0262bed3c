"""The reliability report: overload, faults and hostile input against `serve run` of deploy/config.yaml (the
embedded model; its pool at 8 slots and 8 queue places per replica of one thread, with a latency bound of 2x),
loopback only, bounded (about 8 minutes on 2 cores).

    python -m loadtest.drills.reliability                          # every scenario
    python -m loadtest.drills.reliability --overload-s 60 --fuzz 400 --scenarios overload,fuzz
    python -m loadtest.drills.reliability --scenarios overload --overload-mix fast:3,balanced:2,quality:1/short:3,long:1

Scenarios, in order:
- overload (one replica): locust (loadtest/locustfile.py, native HTTP and gRPC users; quality answers to long
  prompts unless --overload-mix says otherwise) first unloaded (2 users), then at the sustainable rate (32 users
  back to back: its answers per second are the rate), then at about 10x that rate for `--overload-s` (paced
  users). Reported: the refusals' latency, admitted requests' p99 against the unloaded p99, the replicas' and
  ingress's resident memory before, during and after, and how long the queues take to drain to zero.
- denoiser_killed / router_killed: streams and unary calls of both protocols under way when a pool replica's
  (or the ingress's) process is killed by its PID; then time until Serve has replaced it and a request succeeds.
- fuzz: hypothesis-generated hostile HTTP bodies and gRPC messages (loadtest/hostile.py) through Serve's proxies.

Every request is counted once: `answered`, `refused` by reason (queue_full, invalid, body_too_large, draining,
...), `errors` by class (retryable: 503 / UNAVAILABLE / an error event marked retryable; connection_cut: the
transport closed mid-answer, which the client sees; server_error: any other 5xx / INTERNAL / UNKNOWN or
non-retryable error event), `server_errors` (that last count) and `lost`: accepted but neither answered nor
failed in a way the client can see (a stream that ends without its final event or an error, an answer empty
or malformed, a request still open at its deadline). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import psutil

from bench.report import machine, percentile
from loadtest.serve_run import ROOT, App, ServeRun, shipped_config
from protos.diffusiongemma.v1 import diffusion_pb2 as pb
from protos.diffusiongemma.v1 import diffusion_pb2_grpc as pb_grpc

# the most work a request may ask for on the embedded model: up to 16 canvases of 48 steps
LONG = {"tier": "quality", "adaptive_stop": False, "max_denoising_steps": 48, "max_new_tokens": 256}
DEADLINE_S = 90
SCENARIOS = ("overload", "denoiser_killed", "router_killed", "fuzz")
LOCUST_USERS = ("NativeUser", "GrpcUser")


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    refused: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    lost: int = 0

    def add(self, outcome: str, n: int = 1) -> None:
        """outcome: 'answered', 'refused:<reason>', 'error:<class>' or 'lost'."""
        self.sent += n
        kind, _, detail = outcome.partition(":")
        if kind == "answered":
            self.answered += n
        elif kind == "refused":
            self.refused[detail] += n
        elif kind == "error":
            self.errors[detail] += n
        else:
            self.lost += n

    def report(self) -> dict:
        return {
            "sent": self.sent,
            "answered": self.answered,
            "refused": dict(self.refused),
            "errors": dict(self.errors),
            "server_errors": self.errors["server_error"],
            "lost": self.lost,
        }


def http_status_outcome(status: int) -> str:
    refusals = {400: "invalid", 401: "unauthenticated", 404: "not_found", 405: "invalid", 413: "body_too_large",
                422: "invalid", 429: "queue_full"}  # fmt: skip
    if status == 200:
        return "answered"
    if status in refusals:
        return f"refused:{refusals[status]}"
    return "error:retryable" if status == 503 else "error:server_error"


def grpc_code_outcome(code: grpc.StatusCode) -> str:
    return {
        grpc.StatusCode.OK: "answered",
        grpc.StatusCode.INVALID_ARGUMENT: "refused:invalid",
        grpc.StatusCode.RESOURCE_EXHAUSTED: "refused:queue_full",
        grpc.StatusCode.UNAUTHENTICATED: "refused:unauthenticated",
        grpc.StatusCode.UNAVAILABLE: "error:retryable",
        grpc.StatusCode.DEADLINE_EXCEEDED: "lost",
    }.get(code, "error:server_error")


# ---------------------------------------------------------------- one request, classified


async def http_stream(client: httpx.AsyncClient, i: int, first_canvas: asyncio.Event) -> str:
    body = {"text": f"Tell me about topic {i}.", "stream": True, **LONG}
    try:
        async with client.stream("POST", "/v1/generate", json=body) as r:
            if r.status_code != 200:
                return http_status_outcome(r.status_code)
            last = None
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    last = json.loads(line[6:])
                    if last["type"] == "canvas":
                        first_canvas.set()
    except httpx.TimeoutException:
        return "lost"
    except httpx.HTTPError:
        return "error:connection_cut"
    if last is None or last["type"] not in ("final", "error"):
        return "lost"  # a stream that ended without its final event or an error
    if last["type"] == "error":
        return "error:retryable" if last.get("retryable") else "error:server_error"
    return "answered"


async def http_unary(client: httpx.AsyncClient, i: int) -> str:
    try:
        r = await client.post("/v1/generate", json={"text": f"Describe item {i}.", **LONG})
    except httpx.TimeoutException:
        return "lost"
    except httpx.HTTPError:
        return "error:connection_cut"
    outcome = http_status_outcome(r.status_code)
    if outcome == "answered" and not r.json().get("usage", {}).get("generated_tokens"):
        return "lost"  # an empty 200
    return outcome


async def grpc_call(target: str, i: int, stream: bool) -> str:
    req = pb.GenerateRequest(text=f"Explain thing {i}.", tier="quality", max_new_tokens=256)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.DiffusionServiceStub(channel)
        try:
            if stream:
                chunks = [c async for c in stub.GenerateStream(req, timeout=DEADLINE_S)]
                if not chunks or chunks[-1].WhichOneof("kind") != "final":
                    return "lost"
            elif not (await stub.Generate(req, timeout=DEADLINE_S)).finish_reason:
                return "lost"
        except grpc.aio.AioRpcError as err:
            return grpc_code_outcome(err.code())
    return "answered"


# ---------------------------------------------------------------- overload


@dataclass(frozen=True)
class Mix:
    """What the locust users ask for (loadtest/locustfile.py's --tier-mix and --prompt-mix)."""

    tiers: str
    prompts: str


# Quality answers to the longer prompts: each request's denoising outweighs its routing, as it does with the full
# model on a GPU (seconds of forwards against milliseconds of routing). The embedded model's fast answers to short
# prompts take about as long to denoise as Serve takes to route them, so with that mix the test would measure the
# ingress's CPU on 2 cores, not overload (docs/fleet.md has both).
HEAVY = Mix("quality:1", "long:1")


def locust(app: App, out: Path, users: int, seconds: int, pace: float = 0.0, mix: Mix | None = None) -> dict:
    """A headless locust run (bounded; it stops by itself): its JSON rows by (type, name), and its failures.
    `mix`: None for the locustfile's own default mixes."""
    cmd = [
        sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless", *LOCUST_USERS,
        "-u", str(users), "-r", str(max(1, users // 2)), "-t", f"{seconds}s", "--stop-timeout", "60",
        "--host", app.http, "--grpc-host", app.grpc_target, "--pace", str(pace),
        "--csv", str(out), "--json-file", str(out), "--only-summary",
    ]  # fmt: skip
    if mix is not None:
        cmd += ["--tier-mix", mix.tiers, "--prompt-mix", mix.prompts]
    subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 180)
    rows = {(e["method"], e["name"]): e for e in json.loads(Path(f"{out}.json").read_text())}
    with open(f"{out}_failures.csv") as f:
        failures = [(r["Name"], r["Error"], int(r["Occurrences"])) for r in csv.DictReader(f)]
    return {"rows": rows, "failures": failures}


def failure_outcome(error: str) -> str:
    if "HTTP 503" in error or "UNAVAILABLE" in error:
        return "error:retryable"
    if "bad answer" in error or "empty" in error or "without" in error:
        return "lost"
    if "DEADLINE_EXCEEDED" in error or "Timeout" in error:
        return "lost"
    if "HTTP 4" in error or "INVALID_ARGUMENT" in error:
        return "refused:invalid"
    if "Connection" in error or "RemoteDisconnected" in error:
        return "error:connection_cut"
    return "error:server_error"


# the rows that count admitted requests once each, with their whole time (an HTTP stream's POST row ends at its
# headers; its STREAM total row at its final event)
ADMITTED = {
    ("POST", "/v1/generate"),
    ("STREAM", "/v1/generate total"),
    ("grpc", "Generate"),
    ("grpc", "GenerateStream"),
}


def times_ms(rows: dict, keys) -> list[float]:
    """Every response time (ms, as locust rounds them) of the rows named."""
    out = []
    for key in keys:
        if key in rows:
            for ms, n in rows[key]["response_times"].items():
                out += [float(ms)] * n
    return out


def tally_locust(run: dict, tally: Tally) -> None:
    """Each request once: refusals from the OVERLOAD rows, answers from the ADMITTED rows (a stream's from its
    'total' row: the POST row of an HTTP stream counts its headers), failures from locust's failure list."""
    for (kind, _), row in run["rows"].items():
        if kind == "OVERLOAD":
            tally.add("refused:queue_full", row["num_requests"])
    tally.add("answered", answered(run))
    for _, error, n in run["failures"]:
        tally.add(failure_outcome(error), n)


def answered(run: dict) -> int:
    rows = run["rows"]
    return sum(rows[k]["num_requests"] - rows[k]["num_failures"] for k in ADMITTED if k in rows)


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return round(total / 2**20, 1)


def drained_after(app: App, timeout_s: float = 120) -> float | None:
    """Seconds until the pool reports nothing queued or live six reads in a row (each read shows the replica
    the request router picks; six in a row make a pool of a few replicas unlikely to hide one still busy), or None."""
    started, clean = time.monotonic(), 0
    while time.monotonic() - started < timeout_s:
        load = app.load()
        clean = clean + 1 if load["queue_depth"] == 0 and load["live_requests"] == 0 else 0
        if clean >= 6:
            return round(time.monotonic() - started, 1)
        time.sleep(0.25)
    return None


def overload(app: App, tally: Tally, seconds: int, work: Path, phase_s: int = 20, mix: Mix = HEAVY) -> dict:
    pids = app.running_replica_pids("Pool-cpu") + app.running_replica_pids("Ingress")
    rss_cold = rss_mb(pids)
    unloaded = locust(app, work / "unloaded", users=2, seconds=phase_s, mix=mix)  # one user of each protocol
    sustained = locust(app, work / "sustained", users=32, seconds=phase_s, mix=mix)
    rss_before = rss_mb(pids)  # warm: every code path and batch size has run
    rate = answered(sustained) / phase_s
    users = 96
    pace = users / (10 * rate)
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            samples.append(rss_mb(pids))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    loaded = locust(app, work / "overload", users=users, seconds=seconds, pace=pace, mix=mix)
    stop.set()
    sampler.join()
    drained_s = drained_after(app)
    time.sleep(5)  # memory freed after the load settles
    rss_after = rss_mb(pids)
    for run in (unloaded, sustained, loaded):
        tally_locust(run, tally)
    refusals = times_ms(loaded["rows"], [k for k in loaded["rows"] if k[0] == "OVERLOAD"])
    base, admitted = times_ms(unloaded["rows"], ADMITTED), times_ms(loaded["rows"], ADMITTED)
    offered = sum(r["num_requests"] for k, r in loaded["rows"].items() if k[0] != "STREAM") / seconds
    return {
        "mix": {"tiers": mix.tiers, "prompts": mix.prompts},
        "replicas": len(app.running_replica_pids("Pool-cpu")),
        "sustainable_rate_rps": round(rate, 2),
        "offered_rate_rps": round(offered, 1),
        "users": users,
        "pace_s": round(pace, 3),
        "admitted": len(admitted),
        "refused": len(refusals),
        "refusal_ms_p50": percentile(refusals, 0.5) if refusals else None,
        "refusal_ms_p99": percentile(refusals, 0.99) if refusals else None,
        "unloaded_p99_ms": percentile(base, 0.99),
        "admitted_p99_ms": percentile(admitted, 0.99) if admitted else None,
        "p99_ratio": round(percentile(admitted, 0.99) / percentile(base, 0.99), 2) if admitted else None,
        "rss_mb": {
            "cold": rss_cold,
            "before": rss_before,
            "during_max": max(samples, default=None),
            "after": rss_after,
        },  # fmt: skip
        "drained_s": drained_s,
    }


# ---------------------------------------------------------------- faults


async def under_load(app: App, kill) -> list[tuple[str, str]]:
    """Streams and unary calls of both protocols; `kill()` once the first canvas is out; every (call, outcome)."""
    first_canvas = asyncio.Event()
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=app.http, timeout=DEADLINE_S, limits=limits) as client:
        kinds = ["http stream"] * 8 + ["http unary"] * 4 + ["grpc stream", "grpc unary"] * 2
        calls = [http_stream(client, i, first_canvas) for i in range(8)]
        calls += [http_unary(client, i) for i in range(4)]
        calls += [grpc_call(app.grpc_target, i, stream=i % 2 == 0) for i in range(4)]
        tasks = [asyncio.ensure_future(c) for c in calls]
        await asyncio.wait_for(first_canvas.wait(), 60)
        kill()
        return list(zip(kinds, await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE_S + 30)))


def recovered_after(app: App, deployment: str, dead: int, want: int, since: float, timeout_s: float = 120) -> float:
    while time.monotonic() - since < timeout_s:
        pids = app.running_replica_pids(deployment)
        if len(pids) >= want and dead not in pids:
            try:
                r = httpx.post(f"{app.http}/v1/generate", json={"text": "reverse: a b c", "tier": "fast"}, timeout=30)
                if r.status_code == 200 and r.json()["text"].split() == ["c", "b", "a"]:
                    return round(time.monotonic() - since, 1)
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise RuntimeError(f"{deployment} did not recover within {timeout_s:.0f} s")


def fault(app: App, tally: Tally, deployment: str) -> dict:
    deadline = time.monotonic() + 120
    want = 2 if deployment == "Pool-cpu" else 1
    while len(app.running_replica_pids("Pool-cpu")) < 2 or not app.running_replica_pids("Ingress"):
        if time.monotonic() > deadline:
            raise RuntimeError("the app did not come up whole")
        time.sleep(1)
    victim = app.running_replica_pids(deployment)[0]
    killed_at = [0.0]

    def kill() -> None:
        os.kill(victim, signal.SIGKILL)
        killed_at[0] = time.monotonic()

    outcomes = asyncio.run(under_load(app, kill))
    for _, outcome in outcomes:
        tally.add(outcome)
    recovery_s = recovered_after(app, deployment, victim, want, killed_at[0])
    return {"outcomes": dict(Counter(f"{kind} {outcome}" for kind, outcome in outcomes)), "recovery_s": recovery_s}


# ---------------------------------------------------------------- hostile input


def fuzz(app: App, tally: Tally, examples: int) -> dict:
    """Generated hostile requests through Serve's proxies, half HTTP (the three generation routes), half gRPC."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from loadtest.hostile import chat_bodies, generate_bodies, headers, metadata, prompt_body, raw_bytes, requests

    seen: Counter = Counter()
    odd: list[str] = []  # the first few requests answered with neither a success nor a refusal, to reproduce
    http = httpx.Client(base_url=app.http, timeout=DEADLINE_S)
    channel = grpc.insecure_channel(app.grpc_target)
    stub = pb_grpc.DiffusionServiceStub(channel)
    routes = {"/v1/chat/completions": chat_bodies, "/v1/completions": generate_bodies.map(prompt_body),
              "/v1/generate": generate_bodies}  # fmt: skip
    once = settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)

    @once
    @given(route=st.sampled_from(sorted(routes)), data=st.data(), hdrs=headers)
    def over_http(route, data, hdrs):
        raw = data.draw(raw_bytes(data.draw(routes[route])))
        try:
            r = http.post(route, content=raw, headers={"content-type": "application/json"} | hdrs)
            outcome, detail = http_status_outcome(r.status_code), f"HTTP {r.status_code} {r.text[:100]!r}"
        except httpx.LocalProtocolError:
            return  # httpx itself will not send it (a header value with edge whitespace): never sent
        except httpx.HTTPError as exc:
            outcome, detail = "error:connection_cut", type(exc).__name__
        tally.add(outcome)
        seen[f"http {outcome}"] += 1
        if outcome.startswith("error:"):
            odd.append(f"{route} {detail} headers={hdrs} body={raw[:120]!r}")

    @once
    @given(req=requests, md=metadata, stream=st.booleans())
    def over_grpc(req, md, stream):
        md = (*md, ("application", "diffusiongemma"))
        try:
            if stream:
                list(stub.GenerateStream(req, metadata=md, timeout=DEADLINE_S))
            else:
                stub.Generate(req, metadata=md, timeout=DEADLINE_S)
            outcome = "answered"
        except grpc.RpcError as err:
            outcome = grpc_code_outcome(err.code())
            if outcome.startswith("error:"):
                odd.append(f"grpc {err.code().name} {err.details()!r} request={str(req)[:120]!r} metadata={md}")
        tally.add(outcome)
        seen[f"grpc {outcome}"] += 1

    try:
        over_http()
        over_grpc()
        after = http.post("/v1/generate", json={"text": "reverse: a b c", "tier": "fast", "seed": 0})
        still_answers = after.status_code == 200 and after.json()["text"].split() == ["c", "b", "a"]
    finally:
        http.close()
        channel.close()
    return {"outcomes": dict(seen), "still_answers": still_answers, "odd": odd[:5]}


# ---------------------------------------------------------------- the run


def config(slots: int, max_queue: int, max_slowdown: float | None, replicas: int = 2) -> dict:
    cfg = shipped_config()
    pool = cfg["applications"][0]["args"]["pools"]["cpu"]
    pool.update(replicas=replicas, threads=1, slots=slots, max_queue=max_queue, max_slowdown=max_slowdown)
    return cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overload-s", type=int, default=60, help="seconds at about 10x the sustainable rate")
    parser.add_argument("--phase-s", type=int, default=20, help="seconds of the unloaded and sustainable phases")
    parser.add_argument("--fuzz", type=int, default=300, help="generated requests per protocol")
    parser.add_argument("--slots", type=int, default=8, help="slots per replica (the shipped config: 32)")
    parser.add_argument("--max-queue", type=int, default=8, help="queue places per replica (shipped: 64)")
    parser.add_argument("--max-slowdown", type=float, default=2.0, help="the pool's latency bound (0: none)")
    parser.add_argument("--overload-mix", help="TIERS/PROMPTS for locust (default quality:1/long:1)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"some of {','.join(SCENARIOS)}")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"--scenarios: unknown {sorted(unknown)}; choose from {SCENARIOS}")
    tally, results = Tally(), {}
    slowdown = args.max_slowdown or None
    mix = Mix(*args.overload_mix.split("/")) if args.overload_mix else HEAVY
    with tempfile.TemporaryDirectory(prefix="reliability") as tmp, ServeRun(Path(tmp)) as runs:
        for name in chosen:
            print(f"{name} ...", file=sys.stderr, flush=True)
            # overload: one replica, so that the ingress, Serve's proxy and locust have the other core to themselves;
            # the faults: two, so that a request can be sent again to the one that lives
            app = runs.get(config(args.slots, args.max_queue, slowdown, replicas=1 if name == "overload" else 2))
            if name == "overload":
                results[name] = overload(app, tally, args.overload_s, Path(tmp), args.phase_s, mix)
            elif name == "denoiser_killed":
                results[name] = fault(app, tally, "Pool-cpu")
            elif name == "router_killed":
                results[name] = fault(app, tally, "Ingress")
            else:
                results[name] = fuzz(app, tally, args.fuzz)
            print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
    recovery = {k: v["recovery_s"] for k, v in results.items() if "recovery_s" in v}
    print(json.dumps(tally.report() | {"recovery_s": recovery, "scenarios": results, "machine": machine()}))


if __name__ == "__main__":
    main()
