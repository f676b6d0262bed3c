"""Structured outputs through `serve run deploy/config.yaml`: do constrained answers parse and validate, and does
the constraint keep what the model knows?

    python -m bench.eval_structured [--prompts 3] [--per-task 20] [--tier balanced]

1. Validity: CASES (JSON schemas of varied shape, regexes and choices), each asked with --prompts prompts, once
   constrained (response_format json_schema through the openai SDK, structured_outputs on /v1/generate for
   regexes and choices) and once without the constraint (the same prompt, the schema only described in it): the
   share of answers that parse and validate (jsonschema; a full regex match; one of the choices), per kind.
2. Knowledge: --per-task held-out examples of each embedded-model task at the same tier, answered plainly, and
   asked for {"answer": "..."} (tasks.as_json) with ANSWER_SCHEMA enforced and without it: each task's accuracy
   all three ways (model/training/tasks.py checks the answer string).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jsonschema

from loadtest.serve_run import ServeRun, shipped_config
from model.training.tasks import MANY, SINGLE, as_json, check, held_out

S = {"type": "string"}
I = {"type": "integer"}  # noqa: E741
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": S}, "required": ["answer"]}
CASES: list[tuple[str, str, object]] = [  # (name, kind, the schema / regex / choices)
    ("string", "json", S),
    ("bounded string", "json", {"type": "string", "minLength": 2, "maxLength": 6}),
    ("pattern", "json", {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"}),
    ("integer range", "json", {"type": "integer", "minimum": 10, "maximum": 99}),
    ("negative range", "json", {"type": "integer", "minimum": -40, "maximum": -3}),
    ("number range", "json", {"type": "number", "minimum": 0, "maximum": 1}),
    ("exclusive bounds", "json", {"type": "number", "exclusiveMinimum": -5, "exclusiveMaximum": 5}),
    ("boolean", "json", {"type": "boolean"}),
    ("enum", "json", {"enum": ["red", "green", "blue"]}),
    ("mixed enum", "json", {"enum": ["yes", 1, None, True]}),
    ("const", "json", {"const": "ok"}),
    ("answer", "json", ANSWER_SCHEMA),
    ("flat object", "json", {"type": "object", "properties": {"name": S, "age": I}, "required": ["name", "age"]}),
    ("optional fields", "json", {"type": "object", "properties": {"a": S, "b": I, "c": {"type": "boolean"}}}),
    ("one required of three", "json", {"type": "object", "properties": {"a": S, "b": I, "c": S}, "required": ["b"]}),
    (
        "ranged fields",
        "json",
        {
            "type": "object",
            "properties": {
                "day": {"type": "integer", "minimum": 1, "maximum": 31},
                "month": {"type": "integer", "minimum": 1, "maximum": 12},
            },
            "required": ["day", "month"],
        },
    ),  # fmt: skip
    (
        "nested object",
        "json",
        {
            "type": "object",
            "properties": {"user": {"type": "object", "properties": {"id": I, "tag": S}, "required": ["id", "tag"]}},
            "required": ["user"],
        },
    ),  # fmt: skip
    (
        "two levels",
        "json",
        {
            "type": "object",
            "properties": {
                "a": {
                    "type": "object",
                    "properties": {"b": {"type": "object", "properties": {"c": I}, "required": ["c"]}},
                    "required": ["b"],
                }
            },
            "required": ["a"],
        },
    ),  # fmt: skip
    ("array", "json", {"type": "array", "items": I}),
    ("bounded array", "json", {"type": "array", "items": S, "minItems": 2, "maxItems": 3}),
    ("array of enums", "json", {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 4}),
    (
        "array of objects",
        "json",
        {
            "type": "array",
            "maxItems": 2,
            "items": {"type": "object", "properties": {"k": S, "v": I}, "required": ["k", "v"]},
        },
    ),  # fmt: skip
    (
        "object with array",
        "json",
        {
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": S, "maxItems": 3},
                "count": {"type": "integer", "minimum": 0, "maximum": 9},
            },
            "required": ["tags", "count"],
        },
    ),  # fmt: skip
    ("anyOf", "json", {"anyOf": [I, {"type": "string", "maxLength": 4}]}),
    ("nullable", "json", {"type": "object", "properties": {"x": {"anyOf": [I, {"type": "null"}]}}, "required": ["x"]}),
    (
        "defs and ref",
        "json",
        {
            "$defs": {"pt": {"type": "object", "properties": {"x": I, "y": I}, "required": ["x", "y"]}},
            "type": "object",
            "properties": {"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}},
            "required": ["from", "to"],
        },
    ),  # fmt: skip
    ("date format", "json", {"type": "string", "format": "date"}),
    ("uuid format", "json", {"type": "string", "format": "uuid"}),
    (
        "person",
        "json",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 8},
                "age": {"type": "integer", "minimum": 18, "maximum": 99},
                "role": {"enum": ["admin", "user"]},
                "email": {"type": "string", "format": "email"},
            },
            "required": ["name", "age", "role"],
        },
    ),  # fmt: skip
    ("json object", "json_object", None),
    ("digits regex", "regex", r"[0-9]{3,5}"),
    ("letters regex", "regex", r"( [a-z]){2,5}"),
    ("phone regex", "regex", r"\(\d{3}\) \d{3}-\d{4}"),
    ("word choice", "choice", ["yes", "no", "maybe"]),
    ("sentence choice", "choice", ["the sky is blue", "the grass is green"]),
]
PROMPTS = ["reverse: a b c", "sort: 4213", "add: 12 + 30", "describe a user", "pick 3 distinct: a b c d e"]


def valid(kind: str, spec: object, text: str) -> bool:
    if kind == "regex":
        return re.fullmatch(spec, text) is not None
    if kind == "choice":
        return text in spec
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    if kind == "json_object":
        return isinstance(value, dict)
    try:
        jsonschema.validate(value, spec, format_checker=jsonschema.FormatChecker())
    except jsonschema.ValidationError:
        return False
    return True


def ask(app, client, kind: str, spec: object, prompt: str, tier: str, constrained: bool, max_tokens: int) -> str:
    """The answer text to one prompt, constrained or not (the unconstrained prompt describes the constraint)."""
    if not constrained:
        said = {"json": f"Answer in JSON matching {json.dumps(spec)}", "json_object": "Answer with a JSON object",
                "regex": f"Answer matching {spec}", "choice": f"Answer with one of {spec}"}[kind]  # fmt: skip
        prompt = f"{prompt}\n{said}"
    if kind in ("json", "json_object") and constrained:
        fmt = {"type": "json_object"} if kind == "json_object" else {
            "type": "json_schema", "json_schema": {"name": "case", "schema": spec, "strict": True}}  # fmt: skip
        messages = [{"role": "user", "content": prompt}]
        reply = client.chat.completions.create(
            model=client.model_id, messages=messages, response_format=fmt, max_tokens=max_tokens,
            extra_body={"tier": tier, "seed": 0},
        )  # fmt: skip
        return reply.choices[0].message.content
    body = {"text": prompt, "max_new_tokens": max_tokens, "tier": tier, "seed": 0}
    if constrained:
        body["structured_outputs"] = {kind: spec}
    r = httpx.post(f"{app.http}/v1/generate", json=body, timeout=120)
    r.raise_for_status()
    return r.json()["text"]


def validity(app, client, prompts: int, tier: str) -> dict:
    by_kind: dict[str, dict[str, list[bool]]] = {}
    failures = []
    for name, kind, spec in CASES:
        for prompt in PROMPTS[:prompts]:
            for constrained in (True, False):
                text = ask(app, client, kind, spec, prompt, tier, constrained, max_tokens=128)
                ok = valid(kind, spec, text)
                by_kind.setdefault(kind, {"constrained": [], "unconstrained": []})[
                    "constrained" if constrained else "unconstrained"].append(ok)  # fmt: skip
                if constrained and not ok:
                    failures.append({"case": name, "prompt": prompt, "answer": text})
    rate = lambda xs: round(sum(xs) / len(xs), 3)  # noqa: E731
    return {
        "cases": len(CASES),
        "answers": sum(len(v["constrained"]) for v in by_kind.values()),
        "valid_constrained": {k: rate(v["constrained"]) for k, v in by_kind.items()},
        "valid_unconstrained": {k: rate(v["unconstrained"]) for k, v in by_kind.items()},
        "failures": failures[:10],
    }


def knowledge(app, client, per_task: int, tier: str) -> dict:
    """Per task: the plain prompt's accuracy, and the same prompt asked for JSON (tasks.as_json) with the schema
    enforced ("json") and without it ("json_free": what the model writes asked in words alone)."""
    out = {}
    examples = held_out()
    for task in SINGLE + MANY:
        chosen = [e for e in examples if e.task == task][:per_task]
        plain = shaped = free = 0
        for e in chosen:
            asked = as_json(e)
            plain += check(e, _plain(app, e.prompt, tier, 32))
            shaped += check(asked, ask(app, client, "json", ANSWER_SCHEMA, asked.prompt, tier, True, max_tokens=64))
            free += check(asked, _plain(app, asked.prompt, tier, 64))
        n = len(chosen)
        out[task] = {"plain": round(plain / n, 3), "json": round(shaped / n, 3), "json_free": round(free / n, 3)}
    return out


def _plain(app, prompt: str, tier: str, max_tokens: int) -> str:
    body = {"text": prompt, "max_new_tokens": max_tokens, "tier": tier, "seed": 0}
    return httpx.post(f"{app.http}/v1/generate", json=body, timeout=120).json()["text"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=3, help="prompts per case (up to 5)")
    ap.add_argument("--per-task", type=int, default=20, help="held-out examples per task for the knowledge test")
    ap.add_argument("--tier", default="balanced")
    args = ap.parse_args(argv)
    from openai import OpenAI

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, ServeRun(Path(tmp)) as run:
        app = run.get(shipped_config())
        client = OpenAI(base_url=f"{app.http}/v1", api_key="none", max_retries=0)
        client.model_id = client.models.list().data[0].id
        result = {"tier": args.tier, "validity": validity(app, client, args.prompts, args.tier)}
        result["knowledge"] = knowledge(app, client, args.per_task, args.tier)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
