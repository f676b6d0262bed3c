"""Faults under `serve run` (a real local Ray, loopback only, bounded): a pool replica's process is killed by
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

import httpx
import pytest
import yaml

from loadtest.drills.reliability import DEADLINE_S, http_stream, recovered_after, under_load
from loadtest.serve_run import App, shipped_config

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # two replicas, a kill and a restart: about a minute


def two_replicas() -> dict:
    config = shipped_config()
    config["applications"][0]["args"]["pools"]["cpu"].update(replicas=2, threads=1)
    return config


def test_a_denoiser_replica_killed_mid_load_loses_nothing_and_recovers(served):
    app: App = served.get(two_replicas())
    deadline = time.monotonic() + 120
    while len(before := app.running_replica_pids("Pool-cpu")) < 2:  # /ready needs only one of them
        assert time.monotonic() < deadline, "the pool's second replica did not start"
        time.sleep(1)
    assert app.replica_pids("Pool-cpu") == before  # Ray's state API sees the same two processes
    routed_to_both(app, before)

    killed_at = []

    def kill() -> None:  # once the first canvas is out: some answers are under way, others still queued
        os.kill(before[0], signal.SIGKILL)
        killed_at.append(time.monotonic())

    # 8 native streams, 4 unary native requests, 4 gRPC calls; none may hang past its deadline
    outcomes = [outcome for _, outcome in asyncio.run(under_load(app, kill))]
    assert set(outcomes) <= {"answered", "error:retryable"}, outcomes  # never cut, lost or a 5xx
    assert outcomes.count("answered") >= 1
    # recovery: Serve starts a replacement; the pool answers with two replicas again
    recovered_s = recovered_after(app, "Pool-cpu", before[0], 2, killed_at[0])

    assert asyncio.run(burst(app)) == [200] * 6
    resent = 0
    for _ in range(40):  # the ingress's warnings reach the serve run's log through Ray's log monitor, later
        log = app.log.read_text()
        resent = log.count("sending it again") + log.count("retrying once")
        if resent or outcomes.count("error:retryable"):
            break
        time.sleep(1)
    retryable = outcomes.count("error:retryable")
    print(f"outcomes: {outcomes.count('answered')} complete ({resent} of them sent again, unseen), "
          f"{retryable} retryable errors; recovery {recovered_s:.1f} s")  # fmt: skip
    assert retryable + resent >= 1, "the killed replica held none of the requests: nothing proved"


async def burst(app: App, n: int = 6) -> list[int]:
    """`n` short fast-tier requests at once: their status codes."""
    async with httpx.AsyncClient(base_url=app.http, timeout=60) as client:
        body = {"text": "reverse: a b c", "tier": "fast", "seed": 0}
        replies = await asyncio.gather(*(client.post("/v1/generate", json=body) for _ in range(n)))
        return [r.status_code for r in replies]


def routed_to_both(app: App, pids: list[int], timeout_s: float = 90) -> None:
    """Until the request router has sent requests to every replica in `pids` (each replica's request log names its PID):
    Serve reports a replica RUNNING before every request router has it in its set, and a killed replica that held no
    request would prove nothing."""
    deadline = time.monotonic() + timeout_s

    while True:
        asyncio.run(burst(app))
        calls = [line for line in app.log.read_text().splitlines() if "-- CALL " in line]
        if all(any(f"Pool-cpu pid={pid})" in line for line in calls) for pid in pids):
            return
        assert time.monotonic() < deadline, f"the request router did not send requests to all of {pids}"
        time.sleep(1)


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
        tasks = [asyncio.ensure_future(http_stream(client, i, first_canvas)) for i in range(streams)]
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


def test_a_redeploy_under_load_changes_tiers_and_replicas_in_place_and_refuses_nothing(served, tmp_path):
    """`serve deploy` of a changed config to the running cluster (what KubeRay does with a serveConfigV2 change):
    a tier added, another tier's steps changed, the pool from one replica to two. Serve starts the new replicas
    before it drains the old ones: every stream in flight completes, every new request is answered, and the
    change is live on the same cluster."""
    app: App = served.get(shipped_config())
    session = (app.ray_dir / "ray" / "session_latest").resolve()
    changed = copy.deepcopy(app.config)
    args = changed["applications"][0]["args"]
    args["tiers"]["fast"]["sampler"]["max_denoising_steps"] = 3
    args["tiers"]["draft"] = copy.deepcopy(args["tiers"]["fast"]) | {"description": "1 step per canvas"}
    args["tiers"]["draft"]["sampler"]["max_denoising_steps"] = 1
    args["pools"]["cpu"].update(replicas=2, threads=1)
    deploy = lambda: serve_cli(app, tmp_path, "ray.serve.scripts", "deploy", "-a", app.dashboard(), config=changed)  # noqa: E731
    outcomes, probes, _ = asyncio.run(during(app, deploy))
    print(f"redeploy: streams {sorted(set(outcomes))}, new requests {sorted(set(probes))} ({len(probes)})")
    assert outcomes == ["answered"] * len(outcomes)
    assert probes and set(probes) == {"200"}

    deadline = time.monotonic() + 180
    while len(app.running_replica_pids("Pool-cpu")) < 2 or "draft" not in tiers(app):
        assert time.monotonic() < deadline, f"the new config is not live: {tiers(app)}"
        time.sleep(1)
    assert tiers(app)["fast"]["max_denoising_steps"] == 3
    draft = httpx.post(f"{app.http}/v1/generate", json={"text": "reverse: a b c", "tier": "draft"}, timeout=60)
    assert draft.status_code == 200 and draft.json()["tier"] == "draft", draft.text
    assert (app.ray_dir / "ray" / "session_latest").resolve() == session  # the same cluster: nothing restarted
    served.stop()  # the app now runs another config than the one it was started with


def tiers(app: App) -> dict[str, dict]:
    return httpx.get(f"{app.http}/v1/models", timeout=30).json()["data"][0]["tiers"]


def test_a_drain_then_shutdown_refuses_new_requests_with_503_and_cuts_nothing(served, tmp_path):
    """deploy/drain.py: the ingress refuses new requests (503 Retry-After), the streams in flight finish, and
    only then are the apps deleted."""
    app: App = served.get(shipped_config())
    drain = lambda: serve_cli(app, tmp_path, "deploy.drain", "--dashboard", app.dashboard(), "--http", app.http,  # noqa: E731
                              "--timeout", "60", "--shutdown", config=app.config)  # fmt: skip
    outcomes, probes, done = asyncio.run(during(app, drain))
    served.stop()
    result = json.loads(done.stdout.splitlines()[-1])
    print(f"drain: {result}; streams {sorted(set(outcomes))}, new requests {sorted(set(probes))} ({len(probes)})")
    assert result["drained"] is True and result["in_flight"] == 0
    assert outcomes == ["answered"] * len(outcomes)
    assert "503 retry-after 5" in probes  # refused while draining, with a hint
    first_503 = probes.index("503 retry-after 5")
    assert set(probes[:first_503]) == {"200"}, probes  # before the drain took effect: answered
    # after it: refused; once Serve shuts down, no route (404), then no proxy (a refused connection, or one closed
    # while the proxy went away); never answered
    after = {p for p in probes[first_503:] if not p.startswith("connection error")}
    assert after <= {"503 retry-after 5", "404"}, probes


def test_the_ingress_replica_killed_mid_load_recovers_and_no_client_hangs(served):
    """The ingress replica killed under load: what in-flight clients see is recorded (docs/fleet.md),
    none hangs past its deadline, and new requests succeed once Serve has restarted the ingress."""
    app: App = served.get(two_replicas())
    deadline = time.monotonic() + 120
    while len(app.running_replica_pids("Pool-cpu")) < 2 or not app.running_replica_pids("Ingress"):
        assert time.monotonic() < deadline, "the app did not come up"
        time.sleep(1)
    (ingress,) = app.running_replica_pids("Ingress")

    killed_at = []

    def kill() -> None:
        os.kill(ingress, signal.SIGKILL)
        killed_at.append(time.monotonic())

    outcomes = asyncio.run(under_load(app, kill))  # none hangs past its deadline
    recovered_s = recovered_after(app, "Ingress", ingress, 1, killed_at[0])
    seen = sorted({f"{kind}: {outcome}" for kind, outcome in outcomes})
    print(f"in-flight requests saw: {seen}; recovery {recovered_s:.1f} s")
    assert "lost" not in {outcome for _, outcome in outcomes}  # cut visibly, never silently short
    # an HTTP stream relayed by the dead ingress ends at the transport, not with a 5xx; Serve's proxies answer a
    # unary HTTP request whose ingress died with 500, and gRPC calls sometimes with an error status other than
    # UNAVAILABLE (docs/fleet.md)
    assert not any(kind == "http stream" and o == "error:server_error" for kind, o in outcomes), outcomes
