"""What ordinary OpenAI clients send, through the openai SDK against the app on uvicorn over a real engine on the
embedded model: temperature, stream_options, content parts, the developer role, stop, n, logprobs, the reply's
id / created / system_fingerprint, and the fields that stay refused naming themselves."""

from __future__ import annotations

import json
import math

import grpc
import httpx
import live
import pytest
from openai import BadRequestError, OpenAI
from test_frontend import ARGS, run, service

from protos.diffusiongemma.v1 import diffusion_pb2 as pb
from serving.config import AppConfig

ASK = [{"role": "user", "content": "reverse: a b c d"}]  # the embedded model answers "d c b a"


@pytest.fixture(scope="module")
def server():
    with live.live_http(AppConfig(**ARGS)) as (url, frontend):
        yield url, frontend


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def chat(client, **kw):
    return client.chat.completions.create(model="diffusiongemma-embedded", messages=kw.pop("messages", ASK), **kw)


def test_temperature_is_a_factor_on_the_schedule_and_zero_is_deterministic(client):
    for t in (0.0, 0.7, 1.0, 2.0):
        assert chat(client, temperature=t, seed=1, max_tokens=16).choices[0].message.content.split() == list("dcba")
    a, b = (chat(client, temperature=0, seed=s, max_tokens=16, n=1) for s in (1, 1))
    assert a.choices[0].message.content == b.choices[0].message.content
    with pytest.raises(BadRequestError) as err:
        chat(client, temperature=2.5)
    assert err.value.body["param"] == "temperature"
    assert chat(client, top_p=1, seed=1, max_tokens=16).choices[0].finish_reason == "stop"
    with pytest.raises(BadRequestError) as err:
        chat(client, top_p=0.9)
    assert err.value.body["param"] == "top_p"


def test_reply_fields_follow_the_spec(client, server):
    reply = chat(client, seed=2, max_tokens=16)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert abs(reply.created - __import__("time").time()) < 120
    assert reply.system_fingerprint and reply.system_fingerprint == server[1].fingerprint
    plain = client.completions.create(model="diffusiongemma-embedded", prompt="sort: 4132", max_tokens=16)
    assert plain.id.startswith("cmpl-") and plain.system_fingerprint == reply.system_fingerprint
    card = client.models.list().data[0]
    assert card.id == "diffusiongemma-embedded" and set(card.model_extra["tiers"]) == set(ARGS["tiers"])


def test_stream_options_include_usage_adds_a_last_chunk_with_the_usage(client):
    plain = list(chat(client, seed=3, max_tokens=16, stream=True))
    assert all(c.usage is None for c in plain)  # no usage unless asked for, as OpenAI streams
    chunks = list(chat(client, seed=3, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens > 0 and last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in body)
    assert body[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in body).split() == list("dcba")
    assert body[-1].choices[0].finish_reason == "stop"
    running = list(
        chat(client, seed=3, max_tokens=16, stream=True,
             stream_options={"include_usage": True, "continuous_usage_stats": True})
    )  # fmt: skip
    assert all(c.usage is not None for c in running)


def test_content_parts_developer_role_and_names_read_as_plain_messages(client):
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "name": "ana", "content": [{"type": "text", "text": "reverse: a b c d"}]}]  # fmt: skip
    plain = [{"role": "system", "content": "Be brief."}, *ASK]
    a, b = (chat(client, messages=m, seed=4, max_tokens=16) for m in (parts, plain))
    assert a.choices[0].message.content == b.choices[0].message.content
    with pytest.raises(BadRequestError) as err:
        chat(client, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert err.value.body["param"].startswith("messages.0.content")


def test_stop_strings_cut_the_committed_text(client, server):
    whole = chat(client, seed=5, max_tokens=16).choices[0].message.content  # "d c b a"
    cut = chat(client, seed=5, max_tokens=16, stop=[" b"])
    assert cut.choices[0].message.content == whole[: whole.index(" b")] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < chat(client, seed=5, max_tokens=16).usage.completion_tokens
    streamed = list(chat(client, seed=5, max_tokens=16, stop=" b", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.choices[0].message.content
    assert streamed[-1].choices[0].finish_reason == "stop"
    never = chat(client, seed=5, max_tokens=16, stop=["zzz"])
    assert never.choices[0].message.content == whole and never.choices[0].finish_reason == "stop"
    native = httpx.post(f"{server[0]}/v1/generate", json={"text": "reverse: a b c d", "seed": 5, "stop": [" b"]})
    assert native.json()["finish_reason"] == "stop" and native.json()["text"] == cut.choices[0].message.content
    assert len(native.json()["token_ids"]) == native.json()["usage"]["generated_tokens"]
    with pytest.raises(BadRequestError) as err:
        chat(client, stop=[""])
    assert err.value.body["param"] == "stop"


def test_stop_strings_on_grpc():
    async def main():
        async with service() as (_, stub, _pool, _server):
            whole = await stub.Generate(pb.GenerateRequest(text="reverse: a b c d", seed=5))
            cut = await stub.Generate(pb.GenerateRequest(text="reverse: a b c d", seed=5, stop=[" b"]))
            stream = [c async for c in stub.GenerateStream(pb.GenerateRequest(text="reverse: a b c d", seed=5,
                                                                                stop=[" b"]))]  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(pb.GenerateRequest(text="x", stop=["a" * 300]))
            return whole, cut, stream, err.value

    whole, cut, stream, err = run(main())
    assert cut.finish_reason == "stop" and cut.text == whole.text[: whole.text.index(" b")]
    text = "".join(c.canvas.text for c in stream if c.HasField("canvas")) + stream[-1].final.text
    assert text == cut.text and stream[-1].final.finish_reason == "stop"
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "stop" in err.details()


def test_n_choices_are_independent_seeds_in_one_request(client):
    three = chat(client, n=3, seed=10, max_tokens=16, temperature=1.5)
    assert [c.index for c in three.choices] == [0, 1, 2]
    for i, choice in enumerate(three.choices):
        alone = chat(client, seed=10 + i, max_tokens=16, temperature=1.5)
        assert choice.message.content == alone.choices[0].message.content
    assert three.usage.completion_tokens == sum(
        chat(client, seed=10 + i, max_tokens=16, temperature=1.5).usage.completion_tokens for i in range(3)
    )
    streamed = list(chat(client, n=2, seed=10, max_tokens=16, temperature=1.5, stream=True))
    for i in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i)
        assert text == three.choices[i].message.content
    with pytest.raises(BadRequestError) as err:
        chat(client, n=9)
    assert err.value.body["param"] == "n"


def test_logprobs_of_the_committed_tokens(client):
    reply = chat(client, seed=6, max_tokens=16, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert "".join(e.token for e in content).startswith(reply.choices[0].message.content)
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        alts = [a.logprob for a in e.top_logprobs]
        assert alts == sorted(alts, reverse=True) and math.isclose(alts[0], e.logprob, abs_tol=1e-5)
        assert sum(math.exp(a) for a in alts) <= 1 + 1e-4
    plain = client.completions.create(model="diffusiongemma-embedded", prompt="sort: 4132", max_tokens=16, logprobs=2)
    lp = plain.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.text_offset[0] == 0 and all(len(t) == 2 for t in lp.top_logprobs)
    streamed = list(chat(client, seed=6, max_tokens=16, logprobs=True, stream=True))
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in content]
    assert chat(client, seed=6, max_tokens=16).choices[0].logprobs is None


@pytest.mark.parametrize(
    ("field", "value", "accepted"),
    [
        ("presence_penalty", 0, True),
        ("presence_penalty", 0.5, False),
        ("frequency_penalty", 0, True),
        ("logit_bias", {}, True),
        ("logit_bias", {"5": 1}, False),
        ("response_format", {"type": "text"}, True),
        ("response_format", {"type": "json_object"}, True),
        ("response_format", {"type": "json_schema"}, False),  # the schema missing
        ("response_format", {"type": "yaml"}, False),
        ("tool_choice", "required", False),
    ],
)
def test_fields_at_their_neutral_values_pass_and_others_are_named(server, field, value, accepted):
    body = {"messages": ASK, "max_tokens": 16, field: value}
    if field == "tool_choice":
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = httpx.post(f"{server[0]}/v1/chat/completions", json=body, timeout=60)
    if accepted:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400 and r.json()["error"]["param"].split(".")[0] == field, r.text


def test_tools_on_a_model_whose_template_cannot_render_them_are_refused(server):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = httpx.post(f"{server[0]}/v1/chat/completions", json={"messages": ASK, "tools": tools}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    off = {"messages": ASK, "tools": tools, "tool_choice": "none", "max_tokens": 16}
    assert httpx.post(f"{server[0]}/v1/chat/completions", json=off, timeout=60).status_code == 200
    call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}
    bad = {"messages": [{"role": "assistant", "tool_calls": [call]}]}
    r = httpx.post(f"{server[0]}/v1/chat/completions", json=bad, timeout=60)
    assert r.status_code == 400 and "arguments" in r.json()["error"]["param"], r.text
    assert json.loads(r.text)["error"]["type"] == "invalid_request_error"


def test_chat_template_kwargs_reach_the_template(client, server):
    thinking = chat(client, seed=7, max_tokens=16, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert thinking.choices[0].finish_reason in ("stop", "length")  # the embedded model never learned to think
    r = httpx.post(
        f"{server[0]}/v1/chat/completions", json={"messages": ASK, "chat_template_kwargs": {"tokenize": False}}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


def test_a_shared_system_prompt_comes_from_the_prefix_cache_with_the_same_answer(client):
    system = {"role": "system", "content": "You answer tasks on short lists. " * 12}
    ask = lambda text, **kw: chat(client, messages=[system, {"role": "user", "content": text}], seed=9,  # noqa: E731
                                  max_tokens=16, **kw)  # fmt: skip
    ask("reverse: q r s")  # the system prompt's blocks are stored
    hit = ask("reverse: a b c d")
    cached = hit.usage.prompt_tokens_details.cached_tokens
    assert cached >= 64 and cached % 64 == 0 and cached < hit.usage.prompt_tokens

    pools = {name: pool | {"prefix_cache_mb": 0} for name, pool in ARGS["pools"].items()}

    async def without_cache():
        async with service(pools=pools) as (http, *_):
            body = {"messages": [system, {"role": "user", "content": "reverse: a b c d"}], "seed": 9, "max_tokens": 16}
            return (await http.post("/v1/chat/completions", json=body)).json()

    cold = run(without_cache())
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert cold["choices"][0]["message"]["content"] == hit.choices[0].message.content


def test_a_client_leaving_a_stream_of_several_choices_cancels_every_one(server):
    import time

    from prometheus_client import REGISTRY  # the live app's engine counts into the process's registry

    cancelled = lambda: REGISTRY.get_sample_value("dgs_requests_total", {"engine": "cpu", "outcome": "cancelled"}) or 0  # noqa: E731
    before = cancelled()
    body = {"messages": ASK, "n": 3, "max_tokens": 256, "stream": True, "tier": "quality", "adaptive_stop": False}
    with httpx.stream("POST", f"{server[0]}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data: {"))  # the stream is under way; leave
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        load = httpx.get(f"{server[0]}/ready").json()["pools"]["cpu"]
        if load["live_requests"] == 0 and load["queue_depth"] == 0:
            break
        time.sleep(0.2)
    assert load["live_requests"] == 0 and load["queue_depth"] == 0, load
    assert cancelled() - before == 3  # every choice was cancelled, not run to its end
