"""Faults under `serve run` (a real local Ray, loopback only, bounded): a Denoiser replica's process is killed by
its PID, found through Ray's state API, while it holds streaming and unary requests of both protocols."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
import yaml

from loadtest.serve_run import App, shipped_config
from protos.diffusiongemma.v1 import diffusion_pb2 as pb
from protos.diffusiongemma.v1 import diffusion_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # two replicas, a kill and a restart: about a minute

LONG = {"tier": "quality", "adaptive_stop": False, "max_denoising_steps": 48, "max_new_tokens": 256}
DEADLINE_S = 90


def two_replicas() -> dict:
    config = shipped_config()
    config["applications"][0]["args"]["pools"]["cpu"].update(replicas=2, threads=1)
    return config


async def http_stream(client: httpx.AsyncClient, i: int, first_canvas: asyncio.Event) -> str:
    """'complete' (a final event), 'retryable' (an error event marked so); anything else fails the test."""
    body = {"text": f"Tell me about topic {i}.", "stream": True, **LONG}
    async with client.stream("POST", "/v1/generate", json=body) as r:
        if r.status_code == 503:
            return "retryable"
        assert r.status_code == 200, r.status_code
        last = None
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                last = json.loads(line[6:])
                if last["type"] == "canvas":
                    first_canvas.set()
        assert last is not None and last["type"] in ("final", "error"), f"a stream cut short: {last}"
        if last["type"] == "error":
            assert last["retryable"] is True, last
            return "retryable"
        return "complete"


async def http_unary(client: httpx.AsyncClient, i: int) -> str:
    r = await client.post("/v1/generate", json={"text": f"Describe item {i}.", **LONG})
    if r.status_code == 503:
        assert int(r.headers["retry-after"]) >= 1
        return "retryable"
    assert r.status_code == 200, (r.status_code, r.text[:300])
    assert r.json()["finish_reason"] in ("eos", "length") and r.json()["usage"]["generated_tokens"] > 0
    return "complete"


async def grpc_call(target: str, i: int, stream: bool) -> str:
    req = pb.GenerateRequest(text=f"Explain thing {i}.", tier="quality", max_new_tokens=256)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.DiffusionServiceStub(channel)
        try:
            if stream:
                chunks = [c async for c in stub.GenerateStream(req, timeout=DEADLINE_S)]
                assert chunks and chunks[-1].WhichOneof("kind") == "final", "a stream cut short"
            else:
                reply = await stub.Generate(req, timeout=DEADLINE_S)
                assert reply.finish_reason in ("eos", "length")
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
            return "retryable"
    return "complete"


def test_a_denoiser_replica_killed_mid_load_loses_nothing_and_recovers(served):
    app: App = served.get(two_replicas())
    deadline = time.monotonic() + 120
    while len(before := app.running_replica_pids("Denoiser-cpu")) < 2:  # /ready needs only one of them
        assert time.monotonic() < deadline, "the pool's second replica did not start"
        time.sleep(1)
    assert app.replica_pids("Denoiser-cpu") == before  # Ray's state API sees the same two processes

    async def load_and_kill() -> tuple[list[str], float]:
        first_canvas = asyncio.Event()
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=app.http, timeout=DEADLINE_S, limits=limits) as client:
            calls = [http_stream(client, i, first_canvas) for i in range(8)]
            calls += [http_unary(client, i) for i in range(4)]
            calls += [grpc_call(app.grpc_target, i, stream=i % 2 == 0) for i in range(4)]
            tasks = [asyncio.ensure_future(c) for c in calls]
            await asyncio.wait_for(first_canvas.wait(), 60)  # some answers are under way, others still queued
            os.kill(before[0], signal.SIGKILL)
            killed_at = time.monotonic()
            outcomes = await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE_S + 30)  # none hangs
        return outcomes, killed_at

    outcomes, killed_at = asyncio.run(load_and_kill())
    assert set(outcomes) <= {"complete", "retryable"}
    assert outcomes.count("complete") >= 1

    # recovery: Serve starts a replacement; the pool answers with two replicas again
    recovered_s = None
    while time.monotonic() - killed_at < 120:
        pids = app.running_replica_pids("Denoiser-cpu")
        if len(pids) == 2 and before[0] not in pids:
            ok = httpx.post(f"{app.http}/v1/generate", json={"text": "reverse: a b c", "tier": "fast"}, timeout=60)
            if ok.status_code == 200:
                recovered_s = time.monotonic() - killed_at
                break
        time.sleep(1)
    assert recovered_s is not None, "the pool did not get its second replica back within 120 s"

    async def after() -> list[int]:
        async with httpx.AsyncClient(base_url=app.http, timeout=60) as client:
            body = {"text": "reverse: a b c", "tier": "fast", "seed": 0}
            replies = await asyncio.gather(*(client.post("/v1/generate", json=body) for _ in range(6)))
            return [r.status_code for r in replies]

    assert asyncio.run(after()) == [200] * 6
    resent = 0
    for _ in range(20):  # the router's warnings reach the serve run's log through Ray's log monitor, later
        log = app.log.read_text()
        resent = log.count("sending it again") + log.count("retrying once")
        if resent or outcomes.count("retryable"):
            break
        time.sleep(1)
    print(f"outcomes: {outcomes.count('complete')} complete ({resent} of them sent again, unseen), "
          f"{outcomes.count('retryable')} retryable errors; recovery {recovered_s:.1f} s")  # fmt: skip
    assert outcomes.count("retryable") + resent >= 1, "the killed replica held none of the requests: nothing proved"


async def stream_outcome(client: httpx.AsyncClient, i: int, first_canvas: asyncio.Event) -> str:
    """What one streaming client saw: 'complete', 'http <status>', 'ended after <event>' or a connection error."""
    body = {"text": f"Tell me about topic {i}.", "stream": True, **LONG}
    try:
        async with client.stream("POST", "/v1/generate", json=body) as r:
            if r.status_code != 200:
                return f"http {r.status_code}"
            last = None
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    last = json.loads(line[6:])
                    first_canvas.set()
            return "complete" if last and last["type"] == "final" else f"ended after {last and last['type']}"
    except httpx.HTTPError as exc:
        return f"connection error ({type(exc).__name__})"


async def probe(http: str, stop: asyncio.Event) -> list[str]:
    """New short requests, one every 0.2 s until `stop`: what each got ('200', '503 retry-after 5', ...)."""
    seen = []
    async with httpx.AsyncClient(base_url=http, timeout=60) as client:
        while not stop.is_set():
            try:
                r = await client.post("/v1/generate", json={"text": "reverse: a b c", "tier": "fast"})
                retry = f" retry-after {r.headers['retry-after']}" if "retry-after" in r.headers else ""
                seen.append(f"{r.status_code}{retry}")
            except httpx.HTTPError as exc:
                seen.append(f"connection error ({type(exc).__name__})")
            await asyncio.sleep(0.2)
    return seen


async def during(app: App, action, streams: int = 12) -> tuple[list[str], list[str], object]:
    """Streams under way and new requests arriving while `action` (a blocking call, run in a thread) runs:
    (the streams' outcomes, the probes' outcomes, what the action returned)."""
    first_canvas, stop = asyncio.Event(), asyncio.Event()
    async with httpx.AsyncClient(base_url=app.http, timeout=DEADLINE_S) as client:
        tasks = [asyncio.ensure_future(stream_outcome(client, i, first_canvas)) for i in range(streams)]
        await asyncio.wait_for(first_canvas.wait(), 60)
        probes = asyncio.ensure_future(probe(app.http, stop))
        result = await asyncio.to_thread(action)
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE_S + 30)
        await asyncio.sleep(2)  # a few requests after the action
        stop.set()
        return outcomes, await probes, result


def serve_cli(app: App, tmp_path, *args: str, config: dict | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    if config is not None:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        args = (*args, str(path))
    command = [sys.executable, "-m", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=ROOT, check=True)


def test_a_redeploy_under_load_finishes_what_is_in_flight_and_refuses_nothing(served, tmp_path):
    """`serve deploy` of a changed config: Serve starts new replicas and drains the old ones."""
    app: App = served.get(shipped_config())
    changed = copy.deepcopy(app.config)
    changed["applications"][0]["args"]["pools"]["cpu"]["max_queue"] = 60
    deploy = lambda: serve_cli(app, tmp_path, "ray.serve.scripts", "deploy", "-a", app.dashboard(), config=changed)  # noqa: E731
    outcomes, probes, _ = asyncio.run(during(app, deploy))
    served.stop()  # the app now runs another config than the one it was started with
    print(f"redeploy: streams {sorted(set(outcomes))}, new requests {sorted(set(probes))} ({len(probes)})")
    assert outcomes == ["complete"] * len(outcomes)
    assert probes and set(probes) == {"200"}


def test_a_drain_then_shutdown_refuses_new_requests_with_503_and_cuts_nothing(served, tmp_path):
    """deploy/drain.py: the router refuses new requests (503 Retry-After), the streams in flight finish, and
    only then are the apps deleted."""
    app: App = served.get(shipped_config())
    drain = lambda: serve_cli(app, tmp_path, "deploy.drain", "--dashboard", app.dashboard(), "--http", app.http,  # noqa: E731
                              "--timeout", "60", "--shutdown", config=app.config)  # fmt: skip
    outcomes, probes, done = asyncio.run(during(app, drain))
    served.stop()
    result = json.loads(done.stdout.splitlines()[-1])
    print(f"drain: {result}; streams {sorted(set(outcomes))}, new requests {sorted(set(probes))} ({len(probes)})")
    assert result["drained"] is True and result["in_flight"] == 0
    assert outcomes == ["complete"] * len(outcomes)
    assert "503 retry-after 5" in probes  # refused while draining, with a hint
    # before the drain took effect: answered; once Serve shuts down: no route (404), then no proxy
    assert set(probes) <= {"200", "503 retry-after 5", "404", "connection error (ConnectError)"}, probes
    first_503 = probes.index("503 retry-after 5")
    assert "200" not in probes[first_503:], "a request was answered after the drain began"


def test_the_router_replica_killed_mid_load_recovers_and_no_client_hangs(served):
    """The Ingress (router) replica killed under load: what in-flight clients see is recorded (docs/fleet.md),
    none hangs past its deadline, and new requests succeed once Serve has restarted the router."""
    app: App = served.get(two_replicas())
    deadline = time.monotonic() + 120
    while len(app.running_replica_pids("Denoiser-cpu")) < 2 or not app.running_replica_pids("Ingress"):
        assert time.monotonic() < deadline, "the app did not come up"
        time.sleep(1)
    (router,) = app.running_replica_pids("Ingress")

    async def load_and_kill() -> tuple[list[str], float]:
        first_canvas = asyncio.Event()
        async with httpx.AsyncClient(base_url=app.http, timeout=DEADLINE_S) as client:
            tasks = [asyncio.ensure_future(stream_outcome(client, i, first_canvas)) for i in range(8)]
            await asyncio.wait_for(first_canvas.wait(), 60)
            os.kill(router, signal.SIGKILL)
            killed_at = time.monotonic()
            outcomes = await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE_S + 30)  # none hangs
        return outcomes, killed_at

    outcomes, killed_at = asyncio.run(load_and_kill())
    recovered_s = None
    while time.monotonic() - killed_at < 120:
        pids = app.running_replica_pids("Ingress")
        if pids and router not in pids:
            try:
                r = httpx.post(f"{app.http}/v1/generate", json={"text": "reverse: a b c", "tier": "fast"}, timeout=30)
                if r.status_code == 200 and r.json()["text"].split() == ["c", "b", "a"]:
                    recovered_s = time.monotonic() - killed_at
                    break
            except httpx.HTTPError:
                pass
        time.sleep(1)
    assert recovered_s is not None, "the router did not come back within 120 s"
    print(f"in-flight streams saw: {sorted(set(outcomes))} ({len(outcomes)} streams); recovery {recovered_s:.1f} s")
    assert not any(o.startswith("http 5") and o != "http 503" for o in outcomes), outcomes
