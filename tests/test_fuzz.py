"""Hostile input, generated: property-based fuzzing (hypothesis) of the HTTP bodies and headers and of the gRPC
messages, in-process over a real engine on the embedded model (tests/test_frontend.py's harness). Whatever
comes in, the answer is a 2xx or a 4xx / INVALID_ARGUMENT-class code, never a 5xx / INTERNAL / UNKNOWN, and the
service answers a plain request correctly afterwards."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_frontend import CHAT, service

from loadtest.hostile import chat_bodies, generate_bodies, headers, metadata, prompt_body, raw_bytes, requests
from protos.diffusiongemma.v1 import diffusion_pb2 as pb

pytestmark = pytest.mark.slow  # 4,000 generated requests: about a minute

EXAMPLES = int(__import__("os").environ.get("FUZZ_EXAMPLES", 1000))  # per HTTP test; twice that for gRPC

ALLOWED_HTTP = {200, 400, 413, 429}
ALLOWED_GRPC = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def live():
    """One ingress and engine for every example: an event loop of its own that each request runs on."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # gRPC's aio calls look the loop up when they are made
    ctx = service(max_body_bytes=64 * 1024)
    http, stub, _, _ = loop.run_until_complete(ctx.__aenter__())
    yield loop, http, stub
    loop.run_until_complete(ctx.__aexit__(None, None, None))
    asyncio.set_event_loop(None)
    loop.close()


def works_afterwards(loop, http, stub) -> None:
    chat = loop.run_until_complete(http.post("/v1/chat/completions", json=CHAT))
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"].split() == ["c", "b", "a"]
    req = pb.GenerateRequest(text="reverse: a b c", tier="fast", seed=0)

    async def unary():
        return await stub.Generate(req, timeout=30)

    assert loop.run_until_complete(unary()).text.split() == ["c", "b", "a"]


# ---------------------------------------------------------------- HTTP

FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FUZZ
@given(route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), data=st.data(), hdrs=headers)
def test_http_openai_routes_never_fail_on_hostile_bodies(live, route, data, hdrs):
    loop, http, _ = live
    obj = data.draw(chat_bodies if route == "/v1/chat/completions" else generate_bodies.map(prompt_body))
    raw = data.draw(raw_bytes(obj))
    r = loop.run_until_complete(http.post(route, content=raw, headers={"content-type": "application/json"} | hdrs))
    assert r.status_code in ALLOWED_HTTP, (r.status_code, r.text[:300])
    if r.status_code != 200:
        assert r.json()["error"]["message"]


@FUZZ
@given(data=st.data(), hdrs=headers)
def test_http_native_route_never_fails_on_hostile_bodies(live, data, hdrs):
    loop, http, stub = live
    raw = data.draw(raw_bytes(data.draw(generate_bodies)))
    r = loop.run_until_complete(
        http.post("/v1/generate", content=raw, headers={"content-type": "application/json"} | hdrs)
    )
    assert r.status_code in ALLOWED_HTTP, (r.status_code, r.text[:300])


def test_http_structural_abuse_is_refused_cleanly(live):
    loop, http, stub = live
    post = lambda content, **h: loop.run_until_complete(  # noqa: E731
        http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"} | h)
    )
    deep = post(b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
    assert deep.status_code in (400, 413), deep.text[:200]
    huge = post(json.dumps({"messages": [{"role": "user", "content": "hi"}], "seed": 10**400}).encode())
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "seed"
    nan = post(b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
    assert nan.status_code == 400
    assert post(b"x" * (65 * 1024)).status_code == 413
    no_tier = {k: v for k, v in CHAT.items() if k != "tier"}
    long_header = post(json.dumps(no_tier).encode(), **{"x-tier": "f" * 16_000})
    assert long_header.status_code == 400 and long_header.json()["error"]["param"] == "tier"
    assert len(long_header.json()["error"]["message"]) < 1000  # the client's 16 KB is not echoed whole
    works_afterwards(loop, http, stub)


# ---------------------------------------------------------------- gRPC


@settings(FUZZ, max_examples=2 * EXAMPLES)  # the two HTTP tests together send as many
@given(req=requests, md=metadata, stream=st.booleans())
def test_grpc_never_fails_on_hostile_messages(live, req, md, stream):
    loop, http, stub = live

    async def call():
        if stream:
            return [c async for c in stub.GenerateStream(req, metadata=md, timeout=60)]
        return await stub.Generate(req, metadata=md, timeout=60)

    try:
        loop.run_until_complete(call())
    except grpc.aio.AioRpcError as err:
        assert err.code() in ALLOWED_GRPC, (err.code(), err.details())
        assert err.details()


def test_the_service_still_answers_after_the_fuzzing(live):
    works_afterwards(*live)
