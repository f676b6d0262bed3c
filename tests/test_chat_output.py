"""Thinking and tool calls in the released model's format (Gemma 4): the parser on its notation, and the chat route
end to end through the openai SDK.

The embedded model never learned to call tools, so the end-to-end tests use a tokenizer that carries the released
model's special tokens (the embedded vocabulary plus the tool markers) and a chat template in its format
(tests/data), and a pool that answers with a scripted reply in that format: what stands in for the model is only
its answer; the template rendering, the engine-side protocol and the parsing are the real ones."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import live
import pytest
from openai import OpenAI
from test_frontend import ARGS
from transformers import PreTrainedTokenizerFast

from model.checkpoint import read_checkpoint
from serving.config import AppConfig
from serving.ingress.chat_output import ChatOutput, Malformed, parse_call, special_strings
from serving.request import Accepted, CanvasEvent, FinalEvent, GenerateRequest, Usage

TOOL_MARKERS = ["<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>']
Q = '<|"|>'
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def gemma4_tokenizer() -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast.from_pretrained(read_checkpoint("embedded").path)
    tok.add_tokens(TOOL_MARKERS, special_tokens=True)
    tok.chat_template = (Path(__file__).parent / "data" / "gemma4_chat_template.jinja").read_text()
    return tok


@pytest.fixture(scope="module")
def tok():
    return gemma4_tokenizer()


# ---------------------------------------------------------------- the notation


def test_calls_parse_to_json_arguments():
    text = (
        f"call:plan{{city:{Q}Paris, {{France}}{Q},days:3,ratio:0.5,ok:true,none:null,"
        f"tags:[{Q}a{Q},{Q}b{Q},7],where:{{lat:48.8,lon:2.3,name:{Q}x:y{Q}}},{Q}odd key{Q}:{Q}v{Q}}}"
    )
    name, args = parse_call(text)
    assert name == "plan"
    assert args == {
        "city": "Paris, {France}",
        "days": 3,
        "ratio": 0.5,
        "ok": True,
        "none": None,
        "tags": ["a", "b", 7],
        "where": {"lat": 48.8, "lon": 2.3, "name": "x:y"},
        "odd key": "v",
    }
    assert parse_call("call:ping{}") == ("ping", {})
    for bad in ("ping{}", "call:{a:1}", f"call:f{{a:{Q}open}}", "call:f{a:[1,2}", "call:f{a:1} trailing"):
        with pytest.raises(Malformed):
            parse_call(bad)


def feed_all(specials: list[str], pieces: list[str], tools: bool = True) -> tuple[str, str, list, list]:
    out = ChatOutput(specials, tools)
    reasoning, content, calls, deltas = "", "", [], []
    for piece in pieces + [None]:
        d = out.feed(piece) if piece is not None else out.finish()
        deltas.append(d)
        reasoning, content, calls = reasoning + d.reasoning, content + d.content, calls + d.calls
    return reasoning, content, calls, deltas


def test_reasoning_content_and_calls_come_apart_however_the_text_is_cut(tok):
    answer = (
        "<|channel>thought\nThe user wants the weather.<channel|>Let me look."
        f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>"
        f"<|tool_call>call:get_weather{{city:{Q}Lyon{Q},days:2}}<tool_call|><turn|>"
    )
    specials = special_strings(tok)
    whole = feed_all(specials, [answer])
    assert whole[0] == "The user wants the weather." and whole[1] == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in whole[2]] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Lyon", "days": 2}),
    ]
    assert len({c.id for c in whole[2]}) == 2
    for size in (1, 5, 16, 40):  # the same split whatever the canvas boundaries
        pieces = [answer[i : i + size] for i in range(0, len(answer), size)]
        cut = feed_all(specials, pieces)
        assert cut[:2] == whole[:2]
        assert [(c.name, c.arguments) for c in cut[2]] == [(c.name, c.arguments) for c in whole[2]]
    # a call is sent once, whole, when its closing marker arrives
    halves = feed_all(specials, [answer[: answer.index("Paris")], answer[answer.index("Paris") :]])[3]
    assert [len(d.calls) for d in halves] == [0, 2, 0]


def test_what_is_not_a_call_stays_content(tok):
    specials = special_strings(tok)
    broken = f"Sure.<|tool_call>call:oops{{a:{Q}never closed}}<tool_call|> done<eos>"
    reasoning, content, calls, _ = feed_all(specials, [broken])
    assert not calls and content.startswith("Sure.") and "call:oops" in content and content.endswith(" done")
    unclosed = "Sure.<|tool_call>call:f{a:1"  # cut by the length limit: what the model wrote, markers and all
    assert feed_all(specials, [unclosed])[1] == unclosed
    # without tools asked for, a call's text is content, never parsed
    plain = feed_all(specials, [f"<|tool_call>call:f{{a:{Q}x{Q}}}<tool_call|>"], tools=False)
    assert not plain[2] and "call:f" in plain[1]
    # thinking cut short by the length limit: everything is reasoning
    assert feed_all(specials, ["<|channel>thought\nstill thinking"])[:2] == ("still thinking", "")


# ---------------------------------------------------------------- end to end


class ScriptedPool:
    """Stands in for the model's answer only: the prompt ids it is sent are recorded, and it replies as a replica
    does (Accepted, canvases of 16 tokens, a final event) with the scripted text."""

    def __init__(self, tokenizer: Any, replies: list[str]):
        self.tok = tokenizer
        self.replies = replies
        self.prompts: list[list[int]] = []
        self.sent: list[GenerateRequest] = []

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Any]:
        self.prompts.append(request.prompt)
        self.sent.append(request)
        ids = self.tok.encode(self.replies[(len(self.prompts) - 1) % len(self.replies)], add_special_tokens=False)
        yield Accepted(request.request_id)
        canvases = [ids[i : i + 16] for i in range(0, len(ids), 16)]
        for i, canvas in enumerate(canvases):
            yield CanvasEvent(i, canvas, 4)
        usage = Usage(len(request.prompt), len(ids), len(canvases), [4] * len(canvases), 0.0, 0.01, 0.02)
        yield FinalEvent("eos", usage)

    async def load(self) -> dict:
        return {}


THOUGHT = "I need the weather first. The user asked about Paris, so I will call the tool with that city's name."
CALL_REPLY = (
    f"<|channel>thought\n{THOUGHT}<channel|><|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|><turn|>"
)
FINAL_REPLY = "<|channel>thought\nIt said sunny.<channel|>It is sunny in Paris.<turn|>"


@pytest.fixture(scope="module")
def scripted(tok):
    pools = {}

    def wrap(local):
        pools["scripted"] = ScriptedPool(tok, [CALL_REPLY, FINAL_REPLY])
        return pools["scripted"]

    with live.live_http(AppConfig(**ARGS), tokenizer=tok, wrap=wrap) as (url, _):
        yield OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), pools["scripted"]


def test_a_tool_call_round_trip_through_the_openai_sdk(scripted, tok):
    client, pool = scripted
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model="diffusiongemma-embedded", messages=messages, tools=[WEATHER],
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )  # fmt: skip
    prompt = tok.decode(pool.prompts[-1], skip_special_tokens=False)
    assert "<|think|>" in prompt and "<|tool>declaration:get_weather" in prompt and prompt.endswith("<|turn>model\n")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.model_extra["reasoning_content"] == THOUGHT
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"} and call.id.startswith("call_")

    # the call and its result go back: the template renders both, in the model's notation
    messages += [choice.message.model_dump(exclude_none=True, exclude={"reasoning_content"}),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]  # fmt: skip
    second = client.chat.completions.create(model="diffusiongemma-embedded", messages=messages, tools=[WEATHER])
    prompt = tok.decode(pool.prompts[-1], skip_special_tokens=False)
    assert f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>" in prompt
    assert f"<|tool_response>response:get_weather{{result:{Q}sunny{Q}}}<tool_response|>" in prompt
    assert second.choices[0].message.content == "It is sunny in Paris." and second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.model_extra["reasoning_content"] == "It said sunny."


def test_reasoning_and_tool_calls_stream_as_deltas(scripted):
    client, _ = scripted
    chunks = list(
        client.chat.completions.create(
            model="diffusiongemma-embedded",
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[WEATHER],
            stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert reasoning == THOUGHT
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris"})
    ]
    assert not "".join(d.content or "" for d in deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens > 0
    # the reasoning arrived over several canvases, before the call
    first_call = next(i for i, d in enumerate(deltas) if d.tool_calls)
    assert sum(1 for d in deltas[:first_call] if d.model_extra.get("reasoning_content")) >= 2


def test_thinking_is_off_unless_asked_for_and_the_deployment_default_turns_it_on(tok):
    config = AppConfig(**ARGS)
    from serving.ingress.frontend import Frontend

    messages = [{"role": "user", "content": "hi"}]
    off = Frontend(config, {}, tokenizer=tok).chat_prompt(messages)
    assert tok.decode(off, skip_special_tokens=False).endswith("<|turn>model\n<|channel>thought\n<channel|>")
    on = Frontend(AppConfig(**(ARGS | {"thinking": True})), {}, tokenizer=tok)
    assert "<|think|>" in tok.decode(on.chat_prompt(messages), skip_special_tokens=False)
    asked_off = on.chat_prompt(messages, template_kwargs={"enable_thinking": False})
    assert asked_off == off


def test_a_required_or_named_tool_choice_fixes_the_calls_opening(scripted, tok):
    client, pool = scripted
    messages = [{"role": "user", "content": "Weather?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = client.chat.completions.create(
            model="diffusiongemma-embedded", messages=messages, tools=[WEATHER], tool_choice=choice
        )
        template = pool.sent[-1].template
        assert tok.decode(template, skip_special_tokens=False) == "<|tool_call>call:get_weather{"
        assert pool.sent[-1].constraint.kind == "tool_call"  # and its arguments are constrained to the schema
        assert "get_weather" in pool.sent[-1].constraint.regex
        assert reply.choices[0].finish_reason in ("tool_calls", "stop")
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(
            model="diffusiongemma-embedded", messages=messages, tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )  # fmt: skip
    assert err.value.body["param"] == "tool_choice"


def test_strict_tools_under_auto_and_thinking_mode_shape_the_constraint_sent(scripted):
    """tool_choice auto: a strict tool's calls are constrained (the answer may still be text), tools none strict
    leave the answer free; thinking on, a response_format's constraint lets a thought channel come first."""
    from serving.ingress.chat_output import CHANNEL_CLOSE, CHANNEL_OPEN

    client, pool = scripted
    messages = [{"role": "user", "content": "Weather?"}]
    strict = {**WEATHER, "function": {**WEATHER["function"], "strict": True}}
    client.chat.completions.create(model="diffusiongemma-embedded", messages=messages, tools=[strict])
    sent = pool.sent[-1].constraint
    assert sent.kind == "tool_call" and "get_weather" in sent.regex and pool.sent[-1].template is None
    client.chat.completions.create(model="diffusiongemma-embedded", messages=messages, tools=[WEATHER])
    assert pool.sent[-1].constraint is None

    json_format = {"type": "json_object"}
    for thinking in (True, False):
        client.chat.completions.create(
            model="diffusiongemma-embedded", messages=messages, response_format=json_format,
            extra_body={"chat_template_kwargs": {"enable_thinking": thinking}},
        )  # fmt: skip
        sent = pool.sent[-1].constraint
        assert sent.kind == "json_object"
        assert ((CHANNEL_OPEN, CHANNEL_CLOSE) == sent.specials[-2:]) is thinking
