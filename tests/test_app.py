"""The Ray Serve application as users start it: `serve run deploy/config.yaml` (a real local Ray started by the
CLI), with free ports in place of 8000 / 9000 and everything else as shipped. Real clients: the `openai`
package on /v1, httpx for the native routes and the errors, the generated gRPC stubs."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time

import grpc
import httpx
import pytest
import yaml

from loadtest.serve_run import App, shipped_config
from protos.diffusiongemma.v1 import diffusion_pb2 as pb
from protos.diffusiongemma.v1 import diffusion_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow  # a local Ray cluster and Serve: about a minute

CONFIG = shipped_config()
TIERS = CONFIG["applications"][0]["args"]["tiers"]
POOL = CONFIG["applications"][0]["args"]["pools"]["cpu"]


@pytest.fixture()
def app(shipped_app) -> App:
    return shipped_app


def chat_prompt_text(task: str) -> str:
    from transformers import AutoTokenizer

    from model.checkpoint import EMBEDDED

    tok = AutoTokenizer.from_pretrained(EMBEDDED)
    return tok.apply_chat_template([{"role": "user", "content": task}], add_generation_prompt=True, tokenize=False)


# ---------------------------------------------------------------- OpenAI clients


def test_openai_client_plain_and_streaming(app):
    from openai import OpenAI

    client = OpenAI(base_url=f"{app.http}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id

    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "reverse: a b c d"}], seed=3, max_tokens=16
    )
    chat = raw.parse()
    assert chat.choices[0].message.content.split() == ["d", "c", "b", "a"]
    # the engine's id is Serve's request id: the response id, and the x-request-id header once (not echoed twice)
    assert ["chatcmpl-" + i for i in raw.headers.get_list("x-request-id")] == [chat.id]
    assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 0

    pieces, last = [], None
    for chunk in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "reverse: a b c d"}],
        seed=3,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    ):
        pieces += [c.delta.content or "" for c in chunk.choices]
        last = chunk
    assert "".join(pieces) == chat.choices[0].message.content  # same seed, same answer, streamed
    assert last.usage is not None and last.usage.completion_tokens == chat.usage.completion_tokens

    prompt = chat_prompt_text("sort: 4132")  # completions take the prompt as is: we apply the template
    plain = client.completions.create(model=model, prompt=prompt, seed=0, max_tokens=16)
    assert plain.choices[0].text.strip() == "1234"
    streamed = client.completions.create(model=model, prompt=prompt, seed=0, max_tokens=16, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == plain.choices[0].text


def test_models_lists_the_tiers(app):
    card = httpx.get(f"{app.http}/v1/models").json()["data"][0]
    assert set(card["tiers"]) == set(TIERS)
    assert card["default_tier"] == CONFIG["applications"][0]["args"]["default_tier"]


# ---------------------------------------------------------------- tiers and the native route


def generate(app: App, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{app.http}/v1/generate", json=body, headers=headers, timeout=120)


def test_a_request_runs_with_its_tiers_step_cap(app):
    fast = generate(app, {"text": "shift: a b c", "tier": "fast", "seed": 1}).json()
    assert fast["tier"] == "fast"
    cap = TIERS["fast"]["sampler"]["max_denoising_steps"]
    assert fast["usage"]["steps_per_canvas"] == [cap]  # fast runs fixed steps: exactly its cap
    assert fast["text"].split() == ["b", "c", "d"]

    quality = generate(app, {"text": "shift: a b c", "adaptive_stop": False}, headers={"x-tier": "quality"}).json()
    assert quality["tier"] == "quality"
    assert quality["usage"]["steps_per_canvas"] == [TIERS["quality"]["sampler"]["max_denoising_steps"]]

    override = generate(app, {"text": "shift: a b c", "tier": "fast", "max_denoising_steps": 1}).json()
    assert override["usage"]["steps_per_canvas"] == [1]


def test_native_stream_sends_drafts_canvases_and_a_final_event(app):
    body = {"text": "reverse: x y z", "tier": "fast", "stream": True, "stream_drafts": True, "max_new_tokens": 32}
    kinds = []
    with httpx.stream("POST", f"{app.http}/v1/generate", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                kinds.append(yaml.safe_load(line[6:])["type"])
    steps = TIERS["fast"]["sampler"]["max_denoising_steps"]
    assert kinds[:steps] == ["draft"] * steps and kinds[steps] == "canvas" and kinds[-1] == "final"


# ---------------------------------------------------------------- bad input, HTTP


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/v1/generate", {"text": "hi", "tier": "turbo"}, "tier"),
        ("/v1/generate", {"text": "hi", "tier": "fast", "max_denoising_steps": 1000}, "max_denoising_steps"),
        ("/v1/generate", {"text": "hi", "max_denoising_steps": -3}, "max_denoising_steps"),
        ("/v1/generate", {"token_ids": []}, "prompt"),
        ("/v1/generate", {"token_ids": [5, 10**9]}, "prompt"),
        ("/v1/generate", {"text": "hi", "max_new_tokens": 10**7}, "max_new_tokens"),
        ("/v1/generate", {"text": "hi", "temperature_schedule": 1}, "temperature_schedule"),
        ("/v1/completions", {"prompt": "x" * 20000}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "temperature": 3.0}, "temperature"),
        ("/v1/completions", {"prompt": "hi", "presence_penalty": 0.3}, "presence_penalty"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 9}, "n"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, "model"),
    ],
)
def test_bad_input_gets_a_400_naming_the_field(app, route, body, field):
    r = httpx.post(f"{app.http}{route}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field or field in error["message"], error


def test_the_server_keeps_serving_after_bad_input(app):
    bad = httpx.post(f"{app.http}/v1/generate", content=b"{not json", timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    ok = generate(app, {"text": "reverse: a b c", "tier": "fast", "seed": 0})
    assert ok.status_code == 200 and ok.json()["text"].split() == ["c", "b", "a"]


# ---------------------------------------------------------------- gRPC


def test_grpc_unary_and_streaming(app):
    with grpc.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.DiffusionServiceStub(channel)
        req = pb.GenerateRequest(text="reverse: p q r", tier="fast", seed=2, max_new_tokens=16)
        reply = stub.Generate(req, timeout=60)
        assert reply.text.split() == ["r", "q", "p"]
        assert reply.tier == "fast" and reply.finish_reason == "eos"
        assert list(reply.usage.steps_per_canvas) == [TIERS["fast"]["sampler"]["max_denoising_steps"]]

        chunks = list(stub.GenerateStream(req, timeout=60))
        assert [c.WhichOneof("kind") for c in chunks] == ["canvas", "final"]
        assert chunks[0].canvas.text == reply.text

        by_header = stub.Generate(pb.GenerateRequest(text="reverse: p q r"), metadata=(("x-tier", "fast"),), timeout=60)
        assert by_header.tier == "fast"

        ids = pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(reply.token_ids)), tier="fast", max_new_tokens=16)
        assert stub.Generate(ids, timeout=60).usage.prompt_tokens == len(reply.token_ids)


def test_grpc_health_checks_answer_without_metadata(app):
    """What a Kubernetes gRPC probe or grpc_health_probe sends: grpc.health.v1 Check, no application metadata."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(app.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == serving
        ready = health.Check(health_pb2.HealthCheckRequest(service="diffusiongemma.v1.DiffusionService"), timeout=30)
        assert ready.status == serving
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"text": "hi", "tier": "turbo"}, "tier"),
        ({"text": "hi", "tier": "fast", "sampler": pb.SamplerOverrides(max_denoising_steps=99)}, "max_denoising_steps"),
        ({"tier": "fast"}, "input"),
        ({"text": "hi", "max_new_tokens": -5}, "max_new_tokens"),
    ],
)
@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_grpc_bad_input_is_invalid_argument(app, request_fields, field, rpc):
    # a stream refused before its first chunk must not end OK and empty (Serve's proxy sets a context's code
    # only on a yielded message)
    with grpc.insecure_channel(app.grpc_target) as channel:
        call = getattr(pb_grpc.DiffusionServiceStub(channel), rpc)
        with pytest.raises(grpc.RpcError) as err:
            reply = call(pb.GenerateRequest(**request_fields), timeout=30)
            list(reply) if rpc == "GenerateStream" else reply
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()


def wait_idle(app: App, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        load = app.load()
        if load["live_requests"] == 0 and load["queue_depth"] == 0:
            return load
        if time.monotonic() > deadline:
            raise AssertionError(f"the batcher still holds work: {load}")
        time.sleep(0.5)


# the most work a request may ask for: up to 16 canvases of 48 steps (English prompts end in a few canvases)
LONG = {"tier": "quality", "adaptive_stop": False, "max_denoising_steps": 48, "max_new_tokens": 256}


def test_grpc_deadline_cancels_the_work(app):
    with grpc.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.DiffusionServiceStub(channel)
        sampler = pb.SamplerOverrides(adaptive_stop=False, max_denoising_steps=48)
        req = pb.GenerateRequest(text="Tell me about classes.", tier="quality", max_new_tokens=256, sampler=sampler)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.GenerateStream(req, timeout=0.3))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_idle(app, 30)["free_slots"] == POOL["slots"]


# ---------------------------------------------------------------- overload and disconnects


def test_overload_gets_429_and_disconnects_free_their_slots(app):
    """A flood of quality requests fills the slots and the quality tier's share of the queue; more get 429 /
    RESOURCE_EXHAUSTED, while a fast request still finds a place (the other tiers' share)."""
    quality_places = math.ceil(POOL["tier_queue_share"] * POOL["max_queue"])
    capacity = POOL["slots"] + quality_places

    async def flood() -> list[int]:
        limits = httpx.Limits(max_connections=capacity + 120)
        async with httpx.AsyncClient(base_url=app.http, timeout=120, limits=limits) as client:
            streams = []
            try:
                for i in range(capacity + 100):  # arriving faster than 48-step canvases finish
                    body = {"text": f"Tell me about topic {i}.", "stream": True, **LONG}
                    req = client.build_request("POST", "/v1/generate", json=body)
                    streams.append(asyncio.ensure_future(client.send(req, stream=True)))
                responses = await asyncio.gather(*streams)
                codes = [r.status_code for r in responses]
                refused = next(r for r in responses if r.status_code == 429)
                assert "Retry-After" in refused.headers
                load = app.load()
                assert load["free_slots"] == 0 and load["queue_depth"] == quality_places, load
                with grpc.insecure_channel(app.grpc_target) as channel:
                    stub = pb_grpc.DiffusionServiceStub(channel)
                    flooded = pb.GenerateRequest(text="hi", tier="quality")
                    with pytest.raises(grpc.RpcError) as err:
                        stub.Generate(flooded, timeout=30)
                    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    with pytest.raises(grpc.RpcError) as err:
                        list(stub.GenerateStream(flooded, timeout=30))
                    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    fast = stub.GenerateStream(pb.GenerateRequest(text="reverse: a b", tier="fast"), timeout=120)
                    next(fast)  # accepted and given its first canvas while the quality flood holds every slot
                    fast.cancel()
                return codes
            finally:  # close every stream mid-flight: the client goes away
                for fut in streams:
                    if fut.done() and not fut.cancelled() and fut.exception() is None:
                        await fut.result().aclose()

    codes = asyncio.run(flood())
    assert codes.count(200) >= POOL["slots"] and codes.count(429) >= 1, codes
    assert set(codes) <= {200, 429}
    assert wait_idle(app, 60)["free_slots"] == POOL["slots"]  # every disconnected request was cancelled

    with grpc.insecure_channel(app.grpc_target) as channel:  # and the server still answers
        reply = pb_grpc.DiffusionServiceStub(channel).Generate(
            pb.GenerateRequest(text="reverse: a b c", tier="fast", seed=0), timeout=60
        )
        assert reply.text.split() == ["c", "b", "a"]


def test_disconnects_and_cancellations_at_random_points_never_leak_a_slot(app):
    """Clients that leave before acceptance, between canvases or during drafts, on both protocols: after each,
    the load report shows every slot free and nothing queued; and a disconnect is one log line, no traceback."""
    rng = random.Random(7)
    logged_before = len(app.log.read_text())

    async def http_leave(point: str, after: int) -> None:
        body = {"text": f"Tell me about point {after}.", "stream": True, "stream_drafts": point == "draft", **LONG}
        async with httpx.AsyncClient(base_url=app.http, timeout=60) as client:
            if point == "before":  # gone while the request is on its way to the replica
                task = asyncio.ensure_future(client.post("/v1/generate", json=body))
                await asyncio.sleep(after / 1000)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return
            seen = 0
            async with client.stream("POST", "/v1/generate", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["type"] == point:
                        seen += 1
                        if seen > after:
                            return  # leaving the block closes the connection mid-stream

    async def grpc_leave(point: str, after: int) -> None:
        sampler = pb.SamplerOverrides(adaptive_stop=False, max_denoising_steps=48)
        req = pb.GenerateRequest(text=f"Explain point {after}.", tier="quality", max_new_tokens=256,
                                 sampler=sampler, stream_drafts=point == "draft")  # fmt: skip
        async with grpc.aio.insecure_channel(app.grpc_target) as channel:
            call = pb_grpc.DiffusionServiceStub(channel).GenerateStream(req)
            if point == "before":
                await asyncio.sleep(after / 1000)
                call.cancel()
                return
            seen = 0
            async for chunk in call:
                if chunk.WhichOneof("kind") == point:
                    seen += 1
                    if seen > after:
                        call.cancel()
                        return

    leaves = [(proto, point) for proto in ("http", "grpc") for point in ("before", "canvas", "draft") for _ in range(3)]
    for proto, point in leaves:
        after = rng.randint(0, 30) if point == "before" else rng.randint(0, 3)
        asyncio.run(asyncio.wait_for((http_leave if proto == "http" else grpc_leave)(point, after), 60))
        load = wait_idle(app, 30)
        assert load["free_slots"] == POOL["slots"], (proto, point, after, load)

    time.sleep(3)  # the replicas' log lines reach the serve run's log through Ray's log monitor
    logged = app.log.read_text()[logged_before:]
    # the ingress's and the pool's lines (Serve's own gRPC proxy logs "Task exception was never retrieved" for some
    # cancelled calls, in Ray's code: docs/fleet.md)
    ours = "\n".join(line for line in logged.splitlines() if "ServeReplica:" in line)
    assert "Traceback" not in ours and "Error" not in ours, ours[-3000:]


# ---------------------------------------------------------------- API keys through Serve's proxies


def test_api_keys_through_serves_http_and_grpc_proxies(served, tmp_path):
    """The `authorization` header and metadata reach the ingress through Serve's proxies; probes stay open."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    key = "sk-serve-test-0123456789"
    (tmp_path / "keys").write_text(f"tests:{key}\n")
    config = shipped_config()
    config["applications"][0]["args"]["auth"] = {"keys_file": str(tmp_path / "keys")}
    app = served.get(config)
    chat = {"messages": [{"role": "user", "content": "reverse: a b c"}], "tier": "fast", "seed": 0}
    assert httpx.post(f"{app.http}/v1/chat/completions", json=chat, timeout=60).status_code == 401
    bearer = {"Authorization": f"Bearer {key}"}
    ok = httpx.post(f"{app.http}/v1/chat/completions", json=chat, headers=bearer, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"].split() == ["c", "b", "a"]
    assert httpx.get(f"{app.http}/health", timeout=30).status_code == 200
    with grpc.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.DiffusionServiceStub(channel)
        req = pb.GenerateRequest(text="reverse: a b c", tier="fast", seed=0)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(req, timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.Generate(req, metadata=(("authorization", f"Bearer {key}"),), timeout=60)
        assert reply.text.split() == ["c", "b", "a"]
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
