"""Structured outputs: the schema and range conversions, the engine's refusals, and answers through every protocol
in-process (the embedded model behind the real ingress, as tests/test_frontend.py runs it) that parse and
validate whatever the model would have written."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from prometheus_client import CollectorRegistry
from test_frontend import run, service, sse_events

from protos.diffusiongemma.v1 import diffusion_pb2 as pb
from serving.ingress.structured import integer_regex, json_schema_constraint, number_regex
from serving.request import InvalidRequest

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 2},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags"],
}


@pytest.mark.parametrize(
    "lo,hi", [(0, 9), (5, 123), (-50, 7), (-300, -12), (None, 5), (17, None), (None, None), (0, 0)]
)
def test_an_integer_range_is_exactly_its_decimal_spellings(lo, hi):
    r = re.compile(integer_regex(lo, hi))
    for x in range(-1100, 1100):
        assert bool(r.fullmatch(str(x))) == ((lo is None or x >= lo) and (hi is None or x <= hi)), x
    assert not any(r.fullmatch(s) for s in ("-0", "007", "+1", ""))


@pytest.mark.parametrize(
    "bounds",
    [{"minimum": 0, "maximum": 1}, {"minimum": -2.5, "maximum": 3.5}, {"exclusiveMinimum": 0, "maximum": 10},
     {"minimum": -10, "exclusiveMaximum": -2}, {"minimum": 0.1}, {"maximum": -0.5}],
)  # fmt: skip
def test_a_bounded_number_admits_only_values_in_range(bounds):
    r = re.compile(number_regex(bounds, integer=False, field="f"))
    texts = [str(k) for k in range(-15, 16)] + [f"{k}.{f}" for k in range(-15, 16) for f in ("0", "5", "25", "999")]
    admitted = [t for t in texts if r.fullmatch(t)]
    assert admitted  # the range is not empty
    for t in admitted:
        jsonschema.validate(json.loads(t), {"type": "number", **bounds})


def test_schemas_a_regular_language_cannot_hold_are_refused_naming_the_field():
    for bad in ({"type": "array", "uniqueItems": True}, {"type": "integer", "multipleOf": 3}, {"not": {}}):
        with pytest.raises(InvalidRequest) as e:
            json_schema_constraint(bad, "response_format.json_schema.schema")
        assert e.value.field == "response_format.json_schema.schema"
    with pytest.raises(InvalidRequest, match="not a valid JSON schema"):
        json_schema_constraint({"type": "strnig"}, "f")
    with pytest.raises(InvalidRequest, match="no integer"):
        json_schema_constraint({"type": "integer", "minimum": 5, "maximum": 2}, "f")


def chat(schema: dict, content: str, **extra) -> dict:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    return {"messages": [{"role": "user", "content": content}], "response_format": fmt, "max_tokens": 96} | extra


def test_answers_match_their_schema_on_every_route_and_protocol():
    """Chat (whole and streamed, n=2, with logprobs), completions, the native route and gRPC: each answer parses
    and validates, across seeds and tiers; the unconstrained model writes no JSON at all."""

    registry = CollectorRegistry()

    async def main():
        async with service(registry=registry) as (http, stub, pool, _):
            out = {}
            out["chat"] = [
                await http.post("/v1/chat/completions", json=chat(PERSON, "reverse: a b c", seed=s, tier=t))
                for s, t in ((0, "fast"), (1, "balanced"), (2, "quality"))
            ]
            out["n"] = await http.post("/v1/chat/completions", json=chat(PERSON, "sort: 312", n=2, logprobs=True))
            out["stream"] = await http.post("/v1/chat/completions", json=chat(PERSON, "sort: 21", stream=True))
            body = {"prompt": "add: 12 + 30 =", "max_tokens": 96, "response_format": {"type": "json_object"}}
            out["completion"] = await http.post("/v1/completions", json=body)
            native = {"text": "reverse: x y", "max_new_tokens": 64, "structured_outputs": {"choice": ["yes", "no"]}}
            out["native"] = await http.post("/v1/generate", json=native)
            out["plain"] = await http.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "reverse: a b c"}]}
            )
            so = pb.StructuredOutputs(json=json.dumps(PERSON))
            out["grpc"] = await stub.Generate(
                pb.GenerateRequest(text="sort: 4 2", max_new_tokens=96, structured_outputs=so)
            )
            return out, [r.constraint for r in pool.sent]

    out, sent = run(main())
    for r in out["chat"] + [out["n"]]:
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
            assert choice["finish_reason"] == "stop"
    assert len(out["n"].json()["choices"]) == 2 and out["n"].json()["choices"][0]["logprobs"]["content"]
    streamed = "".join(
        e["choices"][0]["delta"].get("content", "") for e in sse_events(out["stream"].text) if e["choices"]
    )
    jsonschema.validate(json.loads(streamed), PERSON)
    assert isinstance(json.loads(out["completion"].json()["choices"][0]["text"]), dict)
    assert out["native"].json()["text"] in ("yes", "no")
    jsonschema.validate(json.loads(out["grpc"].text), PERSON)
    plain = out["plain"].json()["choices"][0]["message"]["content"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(plain)
    assert {c.kind for c in sent if c is not None} == {"json_schema", "json_object", "choice"}
    counted = lambda tier, kind: registry.get_sample_value(
        "dgs_frontend_structured_total", {"tier": tier, "kind": kind}
    )  # noqa: E731
    assert counted("balanced", "json_schema") == 5  # chat 1, n 2, the stream, gRPC (the default tier)
    assert counted("fast", "json_schema") == counted("balanced", "choice") == counted("balanced", "json_object") == 1


def test_constraints_that_cannot_be_served_are_400s_naming_the_field():
    async def main():
        async with service() as (http, stub, _, _):
            long_enum = {"enum": ["a" * 80]}  # at least 80 characters: more than 16 tokens
            replies = [
                await http.post("/v1/chat/completions", json=chat(long_enum, "x", max_tokens=16)),
                await http.post("/v1/chat/completions", json=chat({"type": "array", "uniqueItems": True}, "x")),
                await http.post("/v1/generate", json={"text": "x", "structured_outputs": {"regex": "(unclosed"}}),
                await http.post(
                    "/v1/generate", json={"text": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}}
                ),
                await http.post(
                    "/v1/chat/completions", json=chat(PERSON, "x") | {"structured_outputs": {"regex": "a"}}
                ),
            ]
            try:
                await stub.Generate(pb.GenerateRequest(text="x", structured_outputs=pb.StructuredOutputs(regex="(")))
            except Exception as exc:  # grpc.aio.AioRpcError
                replies.append(exc)
            return replies

    *http_replies, grpc_error = run(main())
    assert [r.status_code for r in http_replies] == [400] * 5
    fields = [r.json()["error"]["param"] for r in http_replies]
    assert fields[:3] == ["response_format.json_schema.schema", "response_format.json_schema.schema",
                          "structured_outputs.regex"]  # fmt: skip
    assert "max_tokens" in http_replies[0].json()["error"]["message"]
    assert grpc_error.code().name == "INVALID_ARGUMENT" and "structured_outputs.regex" in grpc_error.details()


def test_a_constrained_row_leaves_its_batch_neighbours_alone_and_keeps_a_template():
    """In one batch: a free row gives the tokens it gives alone; a constrained row matches its schema over
    several canvases; a constrained row with a template keeps the template's tokens and still matches."""
    from transformers import AutoTokenizer

    from model.automaton import compile_regex, vocabulary_of
    from model.chat import prompt_ids
    from model.checkpoint import EMBEDDED
    from model.denoiser import Denoiser, Request
    from model.weights import load_network

    net, ckpt = load_network(str(EMBEDDED))
    tok = AutoTokenizer.from_pretrained(EMBEDDED)
    gen = ckpt.generation
    eos = tuple(gen.eos_token_ids)
    a = compile_regex(json_schema_constraint(PERSON, "f").regex, vocabulary_of(EMBEDDED), eos, net.config.vocab_size)
    prompts = [prompt_ids(tok, p) for p in ("reverse: a b c", "sort: 4213", "pick 3 distinct: a b c d e")]
    template = tok('{"name": "', add_special_tokens=False)["input_ids"]
    free = Request(prompts[0], 32, gen.sampler, seed=5)
    d = Denoiser(net, slots=3, max_context=256, eos_token_ids=eos)
    alone = d.generate([free])[0]
    together = d.generate([
        free,
        Request(prompts[1], 96, gen.sampler, seed=6, constraint=a),
        Request(prompts[2], 96, gen.sampler, seed=7, constraint=a, template=template),
    ])  # fmt: skip
    assert together[0].tokens == alone.tokens
    for g in together[1:]:
        jsonschema.validate(json.loads(tok.decode(g.tokens, skip_special_tokens=True)), PERSON)
    assert together[1].finish_reason == together[2].finish_reason == "eos"
    assert len(together[1].steps) >= 2  # the answer spans canvases: the walk carried over
    assert together[2].tokens[: len(template)] == template


WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "units": {"enum": ["c", "f"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["city", "days"],
}
Q = '<|"|>'


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    """The embedded tokenizer with Gemma 4's tool markers, saved, and its automaton vocabulary."""
    from test_chat_output import gemma4_tokenizer

    from model.automaton import vocabulary_of

    tok, path = gemma4_tokenizer(), tmp_path_factory.mktemp("gemma4")
    tok.save_pretrained(path)
    return tok, vocabulary_of(path)


def canvases_wanting(gemma4, constraint, targets: list[str], seed: int = 0) -> list[str]:
    """For each target text, a 64-position canvas whose logits favour writing it and ending the turn, constrained
    (and required to end the answer): its argmax and its sampled canvas, decoded with the special tokens, cut at
    the turn's end."""
    import torch

    from model.automaton import compile_regex
    from model.constraint import constrained_canvas
    from serving.request import placeholder

    tok, vocab = gemma4
    ids = dict(vocab.special_ids)
    specials = tuple((ids[s], placeholder(k)) for k, s in enumerate(constraint.specials))
    a = compile_regex(constraint.regex, vocab, (1, 4), len(tok), specials)
    gen = torch.Generator().manual_seed(seed)
    texts = []
    for target in targets:
        want = tok(target + "<turn|>", add_special_tokens=False)["input_ids"][:64]
        logits = torch.randn(64, len(tok), generator=gen)
        logits[torch.arange(len(want)), torch.tensor(want)] += 12.0  # a model that wants to write `target`
        logits[: len(want) - 1, [1, 4]] -= 30.0  # ... and not to end before it
        u = torch.rand(2, 65, generator=gen)
        out = constrained_canvas(a, torch.tensor(a.start), logits, torch.tensor(1.0), a.steps_to_done == 0, u)
        for canvas in (out.argmax, out.sample):
            texts.append(tok.decode(canvas.tolist(), skip_special_tokens=False).split("<turn|>")[0].split("<eos>")[0])
    return texts


def a_call(text: str) -> tuple[str, dict]:
    from serving.ingress.chat_output import CALL_CLOSE, CALL_OPEN, parse_call

    assert text.startswith(CALL_OPEN) and text.endswith(CALL_CLOSE), text
    return parse_call(text[len(CALL_OPEN) : -len(CALL_CLOSE)])


def test_a_forced_calls_arguments_match_the_functions_parameters(gemma4):
    """calls_constraint over a Gemma 4 tokenizer (the embedded one with the tool markers): whatever the logits,
    the canvas is one call, in the notation chat_output parses, with arguments that validate (optional ones
    included); the markers and the quote are the only special tokens it writes."""
    from serving.ingress.call_grammar import calls_constraint
    from serving.ingress.chat_output import CALL_CLOSE, CALL_OPEN

    wanted = f"{CALL_OPEN}call:get_weather{{city:{Q}oslo{Q},days:3,units:{Q}c{Q}}}{CALL_CLOSE}"
    wrong = f"{CALL_OPEN}call:get_weather{{city:{Q}oslo{Q},days:9,wind:{Q}high{Q}}}{CALL_CLOSE}"
    calls = []
    for text in canvases_wanting(gemma4, calls_constraint([("get_weather", WEATHER_PARAMS)]), [wanted, wrong]):
        name, args = a_call(text)
        assert name == "get_weather"
        jsonschema.validate(args, WEATHER_PARAMS)
        calls.append(args)
    assert calls[0] == {"city": "oslo", "days": 3, "units": "c"}  # what the model wanted, where it is valid
    assert calls[2]["city"] == "oslo" and 1 <= calls[2]["days"] <= 7 and "wind" not in calls[2]


def test_under_tool_choice_auto_a_strict_tools_call_is_valid_and_text_stays_free(gemma4):
    """auto_constraint: text the model wants is written as it is; a call of the strict tool gets valid
    arguments; a tool not strict whose schema the notation cannot hold is called with what the model wants; with a
    response_format, the answer is either its JSON or a valid call."""
    from serving.ingress.call_grammar import auto_constraint
    from serving.ingress.chat_output import CALL_CLOSE, CALL_OPEN
    from serving.ingress.structured import json_schema_constraint

    free = {"type": "object", "properties": {"q": {"type": "string"}}, "minProperties": 1}
    tools = [("get_weather", WEATHER_PARAMS, True), ("search", free, False)]
    text = "It is sunny in Oslo today."
    wrong = f"{CALL_OPEN}call:get_weather{{city:{Q}oslo{Q},days:9}}{CALL_CLOSE}"
    loose = f"{CALL_OPEN}call:search{{q:{Q}rain{Q},n:2}}{CALL_CLOSE}"
    got = canvases_wanting(gemma4, auto_constraint(tools, None), [text, wrong, loose])
    assert got[0] == text  # free text is the model's own
    name, args = a_call(got[2])
    assert name == "get_weather" and args["city"] == "oslo" and 1 <= args["days"] <= 7
    assert a_call(got[4]) == ("search", {"q": "rain", "n": 2})  # not strict, not constrainable: as wanted

    answer = json_schema_constraint(PERSON, "response_format.json_schema.schema")
    for reply in canvases_wanting(gemma4, auto_constraint(tools[:1], answer), [text, wrong], seed=1):
        if reply.startswith(CALL_OPEN):
            jsonschema.validate(a_call(reply)[1], WEATHER_PARAMS)
        else:
            jsonschema.validate(json.loads(reply), PERSON)
    with pytest.raises(InvalidRequest) as err:
        auto_constraint([("search", free, True)], None)
    assert err.value.field == "tools.search"


def test_in_thinking_mode_the_thought_is_free_and_the_answer_after_it_constrained(gemma4):
    """after_thought: the thought channel the model wants is kept word for word and the answer after it still
    matches; a thought that would run on past the canvas is closed in time for a valid answer; no thought at all
    is an answer too."""
    from serving.ingress.call_grammar import after_thought
    from serving.ingress.chat_output import CHANNEL_CLOSE, CHANNEL_OPEN
    from serving.ingress.structured import json_schema_constraint

    c = after_thought(json_schema_constraint(PERSON, "response_format.json_schema.schema"))
    thought = f"{CHANNEL_OPEN}thought\nAn adult named Ann.{CHANNEL_CLOSE}"
    wanted = thought + '{"name": "ann", "age": 30, "tags": ["a"]}'
    endless = f"{CHANNEL_OPEN}thought\n" + "and then " * 40
    got = canvases_wanting(gemma4, c, [wanted, endless, '{"name": "bo", "age": 5, "tags": []}'])
    assert got[0] == wanted
    for reply in got:
        answer = reply.split(CHANNEL_CLOSE)[-1]
        jsonschema.validate(json.loads(answer), PERSON)
        assert reply.startswith(CHANNEL_OPEN + "thought\n") == (CHANNEL_CLOSE in reply)
    assert got[2].startswith(CHANNEL_OPEN)  # the endless thought was closed
    assert not got[4].startswith(CHANNEL_OPEN)  # no thought wanted, none written
