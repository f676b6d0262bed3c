"""The ingress in-process, no Ray: the HTTP app through httpx's ASGI transport and the gRPC servicer on a real
grpc.aio server on loopback, over the front end and a real engine on the embedded model (deploy/config.yaml's
tiers and pool). Faults are injected into the pool's stream: an engine error, a stream cut before its final
event, a pool that cannot be reached."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from protos.diffusiongemma.v1 import diffusion_pb2 as pb
from protos.diffusiongemma.v1 import diffusion_pb2_grpc as pb_grpc
from serving.config import AppConfig
from serving.ingress.frontend import Frontend
from serving.ingress.grpc_server import DiffusionServicer
from serving.ingress.http_server import http_app
from serving.ingress.pools import LocalPool
from serving.replica.deployment import local_replica
from serving.request import FinalEvent, GenerateRequest

ROOT = Path(__file__).resolve().parent.parent
ARGS = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())["applications"][0]["args"]


class RecordingPool(LocalPool):
    """The replica's real stream, with what was sent to it recorded and an optional fault injected."""

    def __init__(self, server: Any, fault: str | None = None, spare: Any = None):
        super().__init__(server)
        self.sent: list[GenerateRequest] = []
        self.fault = fault
        self.release = asyncio.Event()  # fault "hold": final events wait for this
        self.spare = spare  # the lost-* faults: a second replica, which a request's second sending reaches

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Any]:
        self.sent.append(request)
        if self.fault == "unreachable":
            raise ConnectionError("no replica")
        # lost-before/after-accepting: every request's first sending dies, its second (to the spare) lives;
        # lost-after-a-canvas: every sending dies after its first canvas (and is never sent again)
        retry = self.fault in ("lost-before-accepting", "lost-after-accepting") and len(self.sent) % 2 == 0
        if self.fault == "lost-before-accepting" and not retry:
            raise ConnectionError("the replica died")
        lost_at = {"lost-after-accepting": 1, "lost-after-a-canvas": 2}.get(self.fault)
        seen = 0
        async for item in (self.spare if retry else self.server).generate(request):
            seen += 1
            if lost_at is not None and seen > lost_at and not retry:
                raise ConnectionError("the replica died")
            if self.fault == "no-final" and isinstance(item, FinalEvent):
                return
            if self.fault == "hold" and isinstance(item, FinalEvent):
                await self.release.wait()
            yield item


@asynccontextmanager
async def service(fault: str | None = None, registry: CollectorRegistry | None = None, **args: Any):
    """The ingress in-process over deploy/config.yaml's app args, with `args` replacing some of them."""
    config = AppConfig(**(ARGS | args))
    (pool_name, pool), *_ = config.pools.items()
    server = await local_replica(config.model, pool.model_dump(), pool_name)
    spare = await local_replica(config.model, pool.model_dump(), pool_name) if fault and "lost" in fault else None
    recording = RecordingPool(server, fault, spare)
    frontend = Frontend(config, {pool_name: recording}, registry=registry or CollectorRegistry())
    recording.frontend = frontend  # the front end over it: a test may drain it
    grpc_server = grpc.aio.server()
    pb_grpc.add_DiffusionServiceServicer_to_server(DiffusionServicer(frontend), grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    transport = httpx.ASGITransport(app=http_app(frontend))
    try:
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://ingress", timeout=60) as http,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            yield http, pb_grpc.DiffusionServiceStub(channel), recording, server
    finally:
        await grpc_server.stop(None)
        await server.engine.stop()
        if spare is not None:
            await spare.engine.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


CHAT = {"messages": [{"role": "user", "content": "reverse: a b c"}], "seed": 0, "tier": "fast"}


def sse_events(text: str) -> list:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_the_engines_request_id_is_the_one_the_client_sees():
    async def main():
        async with service() as (http, stub, pool, _):
            chat = await http.post("/v1/chat/completions", json=CHAT)
            mine = await http.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "client-7.a"})
            native = await http.post("/v1/generate", json={"text": "sort: 312", "tier": "fast", "stream": True})
            req = pb.GenerateRequest(text="reverse: p q r", tier="fast", seed=2)
            unary = await stub.Generate(req)
            streamed = [c async for c in stub.GenerateStream(req)]
            bad = await http.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "no spaces"})
            return chat, mine, native, unary, streamed, bad, [p.request_id for p in pool.sent]

    chat, mine, native, unary, streamed, bad, engine_ids = run(main())
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"].split() == ["c", "b", "a"]
    assert chat.json()["id"] == "chatcmpl-" + chat.headers["x-request-id"] == "chatcmpl-" + engine_ids[0]
    assert uuid.UUID(engine_ids[0])  # without a client's id, a new UUID, as Serve's proxy gives
    assert chat.headers.get_list("x-request-id") == [engine_ids[0]]  # the header once
    assert mine.json()["id"] == "chatcmpl-" + mine.headers["x-request-id"] == "chatcmpl-client-7.a"
    assert engine_ids[1] == "client-7.a"
    final = sse_events(native.text)[-1]
    assert final["type"] == "final" and final["id"] == native.headers["x-request-id"] == engine_ids[2]
    assert unary.request_id == engine_ids[3] and unary.text.split() == ["r", "q", "p"]
    assert streamed[-1].final.request_id == engine_ids[4] != engine_ids[3]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-request-id"
    assert len(engine_ids) == 5  # the refused id never reached the engine


def test_the_front_end_counts_requests_by_tier_protocol_and_outcome():
    registry = CollectorRegistry()

    async def main():
        async with service(registry=registry) as (http, stub, _, _):
            await http.post("/v1/chat/completions", json=CHAT)
            await http.post("/v1/chat/completions", json=CHAT | {"tier": "no-such-tier"})
            await http.post("/v1/generate", json={"text": "sort: 312", "tier": "quality", "stream": True})
            await stub.Generate(pb.GenerateRequest(text="reverse: p q r", tier="fast", seed=2))
        async with service(fault="no-final", registry=registry) as (http, _, _, _):
            await http.post("/v1/generate", json={"text": "sort: 312", "tier": "fast"})

    run(main())
    count = lambda name, **labels: registry.get_sample_value(name, labels) or 0
    requests = "dgs_frontend_requests_total"
    assert count(requests, tier="fast", protocol="http", outcome="ok") == 1
    assert count(requests, tier="quality", protocol="http", outcome="ok") == 1
    assert count(requests, tier="fast", protocol="grpc", outcome="ok") == 1
    assert count(requests, tier="unknown", protocol="http", outcome="invalid") == 1  # no label from a client string
    assert count(requests, tier="fast", protocol="http", outcome="failed") == 1
    assert count("dgs_frontend_refusals_total", protocol="http", reason="tier") == 1
    assert count("dgs_frontend_latency_seconds_count", tier="fast", protocol="grpc") == 1
    assert count("dgs_frontend_time_to_first_canvas_seconds_count", tier="quality", protocol="http") == 1


def test_an_engine_error_is_an_openai_error_on_every_path(monkeypatch):
    async def main():
        async with service() as (http, stub, _, server):

            def poisoned(slots):
                raise RuntimeError("poisoned row")

            monkeypatch.setattr(server.engine.denoiser, "step", poisoned)
            plain = await http.post("/v1/chat/completions", json=CHAT)
            streamed = await http.post("/v1/chat/completions", json=CHAT | {"stream": True})
            native = await http.post("/v1/generate", json={"text": "hi", "tier": "fast"})
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(pb.GenerateRequest(text="hi", tier="fast"))
            monkeypatch.undo()
            after = await http.post("/v1/chat/completions", json=CHAT)
            return plain, streamed, native, err.value, after

    plain, streamed, native, rpc_error, after = run(main())
    for r in (plain, native):
        assert r.status_code == 500 and r.headers["x-request-id"]
        error = r.json()["error"]
        assert error["type"] == "server_error" and "poisoned row" in error["message"]
    assert streamed.status_code == 200  # the headers went out before the failure: it is reported in-band
    assert "poisoned row" in sse_events(streamed.text)[-1]["error"]["message"]
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert rpc_error.code() == grpc.StatusCode.INTERNAL and "poisoned row" in rpc_error.details()
    assert after.status_code == 200  # and the engine serves the next request


def test_a_stream_cut_before_its_final_event_is_an_error_not_a_crash():
    async def main():
        async with service(fault="no-final") as (http, stub, _, _):
            plain = await http.post("/v1/chat/completions", json=CHAT)
            streamed = await http.post("/v1/generate", json={"text": "hi", "tier": "fast", "stream": True})
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [c async for c in stub.GenerateStream(pb.GenerateRequest(text="hi", tier="fast"))]
            return plain, streamed, err.value

    plain, streamed, rpc_error = run(main())
    assert plain.status_code == 500 and "without a final event" in plain.json()["error"]["message"]
    events = sse_events(streamed.text)
    assert events[0]["type"] == "canvas" and events[-1]["type"] == "error" and events[-1]["retryable"] is False
    assert "without a final event" in events[-1]["message"]
    assert rpc_error.code() == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize("fault", ["lost-before-accepting", "lost-after-accepting"])
def test_a_replica_lost_before_the_first_canvas_is_retried_unseen(fault):
    async def main():
        async with service(fault=fault) as (http, stub, pool, _):
            plain = await http.post("/v1/chat/completions", json=CHAT)
            streamed = await http.post("/v1/generate", json={"text": "reverse: a b c", "tier": "fast", "stream": True})
            unary = await stub.Generate(pb.GenerateRequest(text="reverse: a b c", tier="fast", seed=0))
            return plain, streamed, unary, pool.sent

    plain, streamed, unary, sent = run(main())
    assert plain.status_code == 200 and plain.json()["choices"][0]["message"]["content"].split() == ["c", "b", "a"]
    events = sse_events(streamed.text)
    assert [e["type"] for e in events] == ["canvas", "final"]
    assert unary.text.split() == ["c", "b", "a"]
    assert len(sent) == 6 and sent[0] == sent[1]  # each request sent twice, the same request


def test_a_replica_lost_after_a_canvas_is_a_retryable_error():
    async def main():
        async with service(fault="lost-after-a-canvas") as (http, stub, pool, _):
            long = {"tier": "quality", "max_denoising_steps": 8, "adaptive_stop": False, "max_new_tokens": 64}
            plain = await http.post("/v1/generate", json={"text": "hello there", **long})
            streamed = await http.post("/v1/generate", json={"text": "hello there", "stream": True, **long})
            with pytest.raises(grpc.aio.AioRpcError) as err:
                req = pb.GenerateRequest(text="hello there", tier="quality", max_new_tokens=64)
                [c async for c in stub.GenerateStream(req)]
            return plain, streamed, err.value, len(pool.sent)

    plain, streamed, rpc_error, sent = run(main())
    assert plain.status_code == 503 and plain.headers["retry-after"] == "1"
    assert plain.json()["error"]["type"] == "service_unavailable"
    events = sse_events(streamed.text)
    assert events[0]["type"] == "canvas" and events[-1]["type"] == "error" and events[-1]["retryable"] is True
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert rpc_error.code() == grpc.StatusCode.UNAVAILABLE
    assert sent == 3  # a canvas had gone out: no second sending


def test_draining_refuses_new_requests_with_a_retry_hint_and_lets_those_in_flight_finish():
    """What deploy/drain.py sets on every ingress replica (Ingress.reconfigure) before a shutdown."""
    from serving.ingress.deployment import Ingress

    async def main():
        async with service(fault="hold") as (http, stub, pool, _):
            body = {"text": "reverse: a b c", "tier": "fast", "seed": 0}
            in_flight = asyncio.ensure_future(http.post("/v1/generate", json=body | {"stream": True}))
            while not pool.sent:
                await asyncio.sleep(0.01)
            ingress = Ingress.__new__(Ingress)  # the deployment class's hook, over this front end
            ingress.frontend = pool.frontend
            ingress.reconfigure({"draining": True})
            refused = await http.post("/v1/generate", json=body)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(pb.GenerateRequest(text="reverse: a b c", tier="fast"))
            ready, health = await http.get("/ready"), await http.get("/health")
            pool.release.set()
            finished = await in_flight
            ingress.reconfigure({"draining": False})
            after = await http.post("/v1/generate", json=body)
            return refused, err.value, ready, health, finished, after, len(pool.sent)

    refused, rpc_error, ready, health, finished, after, sent = run(main())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert "draining" in refused.json()["error"]["message"]
    assert rpc_error.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(rpc_error.trailing_metadata())["retry-after-s"] == "5.0"
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert ready.json()["pools"]["cpu"]["live_requests"] == 1  # the request in flight, which a drain waits for
    assert health.status_code == 200
    assert sse_events(finished.text)[-1]["type"] == "final"
    assert after.status_code == 200 and after.json()["text"].split() == ["c", "b", "a"]
    assert sent == 2  # the refused requests never reached the pool


def test_an_unreachable_pool_is_503_and_unavailable():
    async def main():
        async with service(fault="unreachable") as (http, stub, _, _):
            r = await http.post("/v1/chat/completions", json=CHAT)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(pb.GenerateRequest(text="hi"))
            return r, err.value

    r, rpc_error = run(main())
    assert r.status_code == 503 and "no replica" in r.json()["error"]["message"]
    assert rpc_error.code() == grpc.StatusCode.UNAVAILABLE


def test_bad_input_names_the_field_in_process():
    async def main():
        async with service() as (http, stub, _, _):
            not_json = await http.post(
                "/v1/generate", content=b"{not json", headers={"content-type": "application/json"}
            )
            steps = await http.post("/v1/generate", json={"text": "hi", "tier": "fast", "max_denoising_steps": 9})
            seed = await http.post("/v1/generate", json={"text": "hi", "seed": -1})
            no_ids = await http.post("/v1/completions", json={"prompt": []})
            floats_as_bools = [  # JSON numbers are not booleans, nor booleans or strings numbers (schemathesis)
                await http.post(route, json=body)
                for route, body in [
                    ("/v1/completions", {"prompt": "a", "stream_options": {"continuous_usage_stats": 0.0}}),
                    ("/v1/completions", {"prompt": "a", "echo": 1}),
                    ("/v1/generate", {"text": "hi", "stream_drafts": 0}),
                    ("/v1/generate", {"text": "hi", "adaptive_stop": 1.0}),
                    ("/v1/completions", {"prompt": "", "frequency_penalty": False}),
                    ("/v1/generate", {"text": "hi", "temperature": True}),
                    ("/v1/completions", {"prompt": "a", "top_p": "1"}),
                ]
            ]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                sampler = pb.SamplerOverrides(entropy_bound=-1.0)
                await stub.Generate(pb.GenerateRequest(text="hi", sampler=sampler))
            return not_json, steps, seed, no_ids, err.value, floats_as_bools

    not_json, steps, seed, no_ids, rpc_error, floats_as_bools = run(main())
    params = [r.json()["error"]["param"] for r in floats_as_bools]
    assert all(r.status_code == 400 for r in floats_as_bools)
    assert params == [
        "stream_options.continuous_usage_stats", "echo", "stream_drafts", "adaptive_stop", "frequency_penalty",
        "temperature", "top_p",
    ]  # fmt: skip
    assert no_ids.status_code == 400 and no_ids.json()["error"]["param"] == "prompt"
    assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"
    assert steps.status_code == 400 and steps.json()["error"]["param"] == "max_denoising_steps"
    assert "[1, 4]" in steps.json()["error"]["message"]  # the fast tier's limit
    assert seed.status_code == 400 and seed.json()["error"]["param"] == "seed"
    assert rpc_error.code() == grpc.StatusCode.INVALID_ARGUMENT and "entropy_bound" in rpc_error.details()


def test_the_ingress_imports_no_torch():
    """The ingress process tokenizes and speaks HTTP and gRPC; torch is the replicas' (gigabytes of import)."""
    code = (
        "import sys, yaml\n"
        "from serving.app import build\n"
        "from serving.config import AppConfig\n"
        "from serving.ingress.frontend import Frontend\n"
        "from serving.ingress.http_server import http_app\n"
        "from serving.ingress.deployment import Ingress\n"
        f"args = yaml.safe_load(open({str(ROOT / 'deploy' / 'config.yaml')!r}))['applications'][0]['args']\n"
        "frontend = Frontend(AppConfig(**args), {})\n"
        "http_app(frontend)\n"
        "assert frontend.user_prompt('reverse: a b')[0] == 2\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
