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


# ---------------------------------------------------------------- strategies

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
anything = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
small_ints = st.integers(min_value=-3, max_value=70)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "", "USER"]) | anything,
     "content": st.text(max_size=60) | anything},
)  # fmt: skip
controls = {
    "tier": st.sampled_from(["fast", "balanced", "quality", "turbo", ""]) | anything,
    "seed": small_ints | anything,
    "max_denoising_steps": small_ints | anything,
    "entropy_bound": st.floats(allow_nan=True, allow_infinity=True) | anything,
    "confidence_threshold": st.floats(allow_nan=True, allow_infinity=True) | anything,
    "temperature": st.floats(allow_nan=True, allow_infinity=True) | anything,
    "stream": st.booleans() | anything,
}


def body(required: dict) -> st.SearchStrategy[dict]:
    optional = dict(controls)
    extra = st.dictionaries(st.text(min_size=1, max_size=10).map(lambda k: "x_" + k), anything, max_size=2)
    return st.builds(lambda b, e: b | e, st.fixed_dictionaries(required, optional=optional), extra)


chat_bodies = body({"messages": st.lists(message, max_size=3) | anything}) | body(
    {"messages": st.lists(message, min_size=1, max_size=2), "max_tokens": small_ints | anything}
)
generate_bodies = body({"text": st.text(max_size=60) | anything, "max_new_tokens": small_ints | anything}) | body(
    {"token_ids": st.lists(st.integers(min_value=-(2**40), max_value=2**40), max_size=20) | anything}
)
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=300)
headers = st.fixed_dictionaries(
    {}, optional={"x-tier": header_text, "x-request-id": header_text, "authorization": header_text}
)


def raw_bytes(obj) -> st.SearchStrategy[bytes]:
    """The body as JSON (NaN and Infinity included), or damaged: cut short, invalid UTF-8 spliced in."""
    text = json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass")
    return st.sampled_from(
        [text, text[: len(text) // 2], text.replace(b'"', b'"\xff\xfe', 1), b"\xc3\x28" + text, text * 2]
    )


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


def prompt_body(b: dict) -> dict:
    """/v1/completions takes `prompt` where /v1/generate takes `text`."""
    b = dict(b)
    if "text" in b:
        b["prompt"] = b.pop("text")
    return b


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

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
overrides = st.builds(
    pb.SamplerOverrides,
    max_denoising_steps=int32 | st.integers(0, 70),
    entropy_bound=floats,
    t_min=floats,
    t_max=floats,
    stability_threshold=int32,
    confidence_threshold=floats,
    adaptive_stop=st.booleans(),
)
inputs = st.one_of(
    st.builds(dict, text=st.text(max_size=80)),
    st.builds(dict, raw_prompt=st.text(max_size=80)),
    st.builds(lambda ids: {"token_ids": pb.TokenIds(ids=ids)}, st.lists(int32, max_size=30)),
    st.just({}),
)
requests = st.builds(
    lambda i, tier, max_new, seed, sampler, drafts: pb.GenerateRequest(
        **i, tier=tier, max_new_tokens=max_new, sampler=sampler, stream_drafts=drafts,
        **({} if seed is None else {"seed": seed}),
    ),
    inputs,
    st.sampled_from(["fast", "balanced", "quality", "", "nope"]) | st.text(max_size=20),
    int32 | st.integers(0, 70),
    st.none() | st.integers(min_value=0, max_value=2**64 - 1),
    st.none() | overrides,
    st.booleans(),
)  # fmt: skip
metadata = st.lists(st.tuples(st.sampled_from(["x-tier", "x-request-id", "x-other"]), header_text), max_size=2).map(
    tuple
)


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
