"""API keys and per-key limits (serving/ingress/auth.py) on both protocols, and the HTTP body size limit, in-process
over a real engine on the embedded model (tests/test_frontend.py's harness)."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from prometheus_client import CollectorRegistry
from test_frontend import CHAT, run, service

from protos.diffusiongemma.v1 import diffusion_pb2 as pb
from serving.config import Auth
from serving.ingress.auth import KeyConfigError, KeyGate, Unauthenticated, parse_keys
from serving.request import InvalidRequest, Overloaded

KEY_A = "sk-team-a-0123456789abcdef"
KEY_B = "sk-team-b-fedcba9876543210"
KEYS = f"# two teams\nteam-a:{KEY_A}\n\n{KEY_B}\n"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_required_on_http_and_grpc_alike_and_probes_stay_open(monkeypatch):
    monkeypatch.setenv("TEST_DGS_KEYS", KEYS)

    async def main():
        async with service(auth={"keys_env": "TEST_DGS_KEYS"}) as (http, stub, pool, _):
            out = {
                "none": await http.post("/v1/chat/completions", json=CHAT),
                "wrong": await http.post("/v1/chat/completions", json=CHAT, headers=bearer(KEY_A + "x")),
                "scheme": await http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": KEY_A}),
                "bad_body_no_key": await http.post("/v1/chat/completions", json={"messages": 3}),
                "a": await http.post("/v1/chat/completions", json=CHAT, headers=bearer(KEY_A)),
                "b": await http.post("/v1/chat/completions", json=CHAT, headers=bearer(KEY_B)),
                "models_none": await http.get("/v1/models"),
                "models_a": await http.get("/v1/models", headers=bearer(KEY_A)),
                "health": await http.get("/health"),
                "ready": await http.get("/ready"),
            }
            req = pb.GenerateRequest(text="reverse: a b c", tier="fast", seed=0)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(req)
            with pytest.raises(grpc.aio.AioRpcError) as refused_stream:
                [c async for c in stub.GenerateStream(req, metadata=(("authorization", "Bearer nope-nope-nope-nope"),))]
            ok = await stub.Generate(req, metadata=(("authorization", f"Bearer {KEY_B}"),))
            return out, refused.value, refused_stream.value, ok, len(pool.sent)

    out, refused, refused_stream, ok, reached = run(main())
    for name in ("none", "wrong", "scheme", "bad_body_no_key", "models_none"):
        r = out[name]
        assert r.status_code == 401, name
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error" and r.json()["error"]["param"] == "authorization"
    assert out["a"].status_code == out["b"].status_code == out["models_a"].status_code == 200
    assert out["health"].status_code == 200 and out["ready"].status_code == 200
    assert refused.code() == refused_stream.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ok.text.split() == ["c", "b", "a"]
    assert reached == 3  # refused calls never reached the engine


def test_key_sources_are_checked_when_the_ingress_starts(tmp_path, monkeypatch):
    keys = parse_keys(KEYS, "test")
    assert set(keys) == {"team-a", "key-" + __import__("hashlib").sha256(KEY_B.encode()).hexdigest()[:8]}
    assert all(len(d) == 32 for d in keys.values())  # digests only: no key is kept
    with pytest.raises(KeyConfigError, match="at least 16 characters"):
        parse_keys("short-key", "test")
    with pytest.raises(KeyConfigError, match="appears twice"):
        parse_keys(f"x:{KEY_A}\nx:{KEY_B}", "test")
    with pytest.raises(KeyConfigError, match="holds no keys"):
        parse_keys("# nothing\n", "test")
    monkeypatch.delenv("TEST_DGS_UNSET", raising=False)
    with pytest.raises(KeyConfigError, match="TEST_DGS_UNSET is not set"):
        KeyGate(Auth(keys_env="TEST_DGS_UNSET"))
    with pytest.raises(KeyConfigError, match="cannot read"):
        KeyGate(Auth(keys_file=str(tmp_path / "missing")))
    (tmp_path / "keys").write_text(KEYS)
    gate = KeyGate(Auth(keys_file=str(tmp_path / "keys")))
    assert gate.identify(f"bearer {KEY_A}") == "team-a"
    with pytest.raises(Unauthenticated):
        gate.identify(f"Bearer {KEY_A[:-1]}")
    with pytest.raises(ValueError, match="exactly one of keys_env or keys_file"):
        Auth(keys_env="A", keys_file="b")


def test_tokens_per_minute_is_a_bucket_that_refills_and_refunds(monkeypatch):
    monkeypatch.setenv("TEST_DGS_KEYS", KEYS)
    now = [100.0]
    gate = KeyGate(Auth(keys_env="TEST_DGS_KEYS", tokens_per_minute=600, max_concurrent=2), clock=lambda: now[0])
    first = gate.admit("team-a", 400)
    with pytest.raises(Overloaded) as over:
        gate.admit("team-a", 300)  # 200 left
    assert over.value.retry_after_s == pytest.approx(10.0)  # 100 tokens at 10 per second
    first.release(used_tokens=150)  # 250 unused come back
    second = gate.admit("team-a", 300)  # 450 left before this one
    third = gate.admit("team-a", 100)
    with pytest.raises(Overloaded, match="requests in flight"):
        gate.admit("team-a", 1)
    second.release(300)
    third.release(100)
    now[0] += 60  # a minute refills the bucket to its size, not beyond
    big = gate.admit("team-a", 600)
    big.release(600)
    with pytest.raises(InvalidRequest, match="exceed"):
        gate.admit("team-a", 601)  # can never fit: an error, not a retry
    gate.admit("key-" + __import__("hashlib").sha256(KEY_B.encode()).hexdigest()[:8], 600)  # keys are separate


def test_per_key_limits_answer_429_with_a_retry_hint_and_count_by_key_id(monkeypatch):
    monkeypatch.setenv("TEST_DGS_KEYS", KEYS)
    registry = CollectorRegistry()

    async def main():
        auth = {"keys_env": "TEST_DGS_KEYS", "max_concurrent": 1}
        async with service("hold", registry=registry, auth=auth) as (http, stub, pool, __):
            # key A's one request stays in flight until the pool lets its final event through
            held = asyncio.create_task(http.post("/v1/chat/completions", json=CHAT, headers=bearer(KEY_A)))
            while not pool.sent:
                await asyncio.sleep(0.01)
            second = await http.post("/v1/chat/completions", json=CHAT, headers=bearer(KEY_A))
            with pytest.raises(grpc.aio.AioRpcError) as grpc_refused:
                req = pb.GenerateRequest(text="reverse: a b", tier="fast")
                await stub.Generate(req, metadata=(("authorization", f"Bearer {KEY_A}"),))
            other_key = asyncio.create_task(http.post("/v1/chat/completions", json=CHAT, headers=bearer(KEY_B)))
            while len(pool.sent) < 2:  # key B is not limited by key A's request
                await asyncio.sleep(0.01)
            pool.release.set()
            first, other_key = await held, await other_key
            after = await http.post("/v1/chat/completions", json=CHAT, headers=bearer(KEY_A))
            return first, second, other_key, grpc_refused.value, after

    first, second, other_key, grpc_refused, after = run(main())
    assert first.status_code == 200
    assert second.status_code == 429 and "requests in flight" in second.json()["error"]["message"]
    assert int(second.headers["retry-after"]) >= 1
    assert other_key.status_code == 200 and after.status_code == 200
    assert grpc_refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    value = lambda name, **labels: registry.get_sample_value(name, labels) or 0  # noqa: E731
    assert value("dgs_frontend_key_requests_total", key_id="team-a", outcome="ok") == 2
    assert value("dgs_frontend_key_requests_total", key_id="team-a", outcome="overloaded") == 2
    assert value("dgs_frontend_key_tokens_total", key_id="team-a") > 0
    assert value("dgs_frontend_refusals_total", protocol="http", reason="key_limit") == 1


def test_oversized_bodies_get_413_before_they_are_read_whole():
    registry = CollectorRegistry()

    async def main():
        async with service(registry=registry, max_body_bytes=4096) as (http, _, pool, __):
            big = {"text": "w " * 5000, "tier": "fast"}
            declared = await http.post("/v1/generate", json=big)

            async def chunks():
                for _ in range(10):
                    yield b" " * 1000  # no Content-Length: counted as it arrives
                yield b'{"text": "sort: 21", "tier": "fast"}'

            streamed = await http.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
            small = await http.post("/v1/generate", json={"text": "sort: 21", "tier": "fast"})
            return declared, streamed, small, len(pool.sent)

    declared, streamed, small, reached = run(main())
    assert declared.status_code == streamed.status_code == 413
    assert declared.json()["error"]["param"] == "body" and "4096 bytes" in declared.json()["error"]["message"]
    assert small.status_code == 200 and reached == 1
    refused = registry.get_sample_value("dgs_frontend_refusals_total", {"protocol": "http", "reason": "body_too_large"})
    assert refused == 2  # by its Content-Length and as it arrived


def test_no_key_and_no_prompt_text_in_the_logs(monkeypatch, caplog):
    monkeypatch.setenv("TEST_DGS_KEYS", KEYS)
    secret_prompt = "reverse: zq9 xk7 secretword"

    async def main():
        async with service(auth={"keys_env": "TEST_DGS_KEYS"}) as (http, stub, _, __):
            chat = {"messages": [{"role": "user", "content": secret_prompt}], "tier": "fast"}
            await http.post("/v1/chat/completions", json=chat, headers=bearer(KEY_A))
            await http.post("/v1/chat/completions", json=chat, headers=bearer(KEY_A + "wrong"))
            req = pb.GenerateRequest(text=secret_prompt, tier="fast")
            await stub.Generate(req, metadata=(("authorization", f"Bearer {KEY_B}"),))
            await asyncio.sleep(0)

    with caplog.at_level(logging.INFO):
        run(main())
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert caplog.records  # the run did log (the replica's start line at least)
    for secret in (KEY_A, KEY_B, "secretword"):
        assert secret not in logged
