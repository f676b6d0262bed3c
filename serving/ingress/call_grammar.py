"""Tool-call arguments in Gemma 4's call notation as a regular expression, from a tool's parameter schema; and
the thought channel a constrained answer may open with in thinking mode.

A forced call (`tool_choice` naming a function, or `required`) is constrained to
`<|tool_call>call:NAME{ARGS}<tool_call|>` with ARGS matching the function's `parameters` in the notation
serving/ingress/chat_output.py parses: bare keys, strings between `<|"|>` tokens, numbers, true/false/null,
{...} and [...]. The markers and the quote are special tokens, which no text spells: the regex writes each as a
placeholder character (serving/request.py: placeholder) and the Constraint lists them, so the replica maps each
to its token and allows no other special token anywhere.

The schema keywords served: types, properties (in order, optional ones may be left out, no others written),
required, enum, const, anyOf, string lengths and patterns, numeric bounds, arrays with bounds. Any other is
refused naming the field for a strict tool; a tool that is not strict and uses one is called unconstrained.

Under `tool_choice` auto a tool marked strict still gets valid arguments (as OpenAI's strict tools do): the
answer is text (free, or the response_format's language) or calls, and each call's arguments match (a non-strict
tool whose schema the notation cannot hold is written freely between its braces). In thinking mode a constrained
answer may first write its thought channel, freely: the constraint holds from the channel's close, as vLLM applies
structured outputs after the reasoning.
"""

from __future__ import annotations

import re
from typing import Any

from serving.ingress.chat_output import CALL_CLOSE, CALL_OPEN, CHANNEL_CLOSE, CHANNEL_OPEN, QUOTE, THOUGHT_LABEL
from serving.ingress.structured import MAX_REPEAT, number_regex
from serving.request import Constraint, InvalidRequest, placeholder

SPECIALS = (CALL_OPEN, CALL_CLOSE, QUOTE)
OPEN, CLOSE, Q = (placeholder(i) for i in range(3))
ANNOTATIONS = {"title", "description", "default", "examples", "$comment"}
KNOWN = ANNOTATIONS | {
    "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum", "const",
    "anyOf", "minLength", "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
}  # fmt: skip
KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
FREE_TEXT = f"[^{re.escape(OPEN + CLOSE + Q)}]*"  # text with none of the notation's special tokens


def calls_constraint(tools: list[tuple[str, dict]], field: str = "tools") -> Constraint:
    """The answer is one call of one of `tools` ((name, parameters) pairs), its arguments valid."""
    calls = [_call(name, _arguments(params, f"{field}.{name}")) for name, params in tools]
    return Constraint("|".join(f"(?:{c})" for c in calls), field, "tool_call", SPECIALS)


def auto_constraint(tools: list[tuple[str, dict, bool]], answer: Constraint | None, field: str = "tools") -> Constraint:
    """tool_choice auto: the answer is text (any text, or `answer`'s language) or calls of `tools` ((name,
    parameters, strict) triples), each with valid arguments; a tool not strict whose schema the notation cannot
    hold is called with any arguments. Free text may lead into calls; `answer`'s language stands alone."""
    calls = []
    for name, params, strict in tools:
        try:
            calls.append(_call(name, _arguments(params, f"{field}.{name}")))
        except InvalidRequest:
            if strict:
                raise
            calls.append(_call(name, r"\{" + f"[^{re.escape(OPEN + CLOSE)}]*" + r"\}"))
    call = "(?:" + "|".join(f"(?:{c})" for c in calls) + ")"
    if answer is None:
        return Constraint(f"{FREE_TEXT}{call}*", field, "tool_call", SPECIALS)
    if answer.specials:
        raise ValueError("an answer constraint with special tokens of its own cannot be joined with calls")
    return Constraint(f"(?:{answer.regex})|{call}+", answer.field, answer.kind, SPECIALS)


def after_thought(c: Constraint) -> Constraint:
    """`c` preceded by an optional thought channel (`<|channel>thought\\n...<channel|>`), its text free of
    special tokens: thinking mode's reasoning is the model's own; the answer after it is constrained."""
    k = len(c.specials)
    opening, closing = placeholder(k), placeholder(k + 1)
    label = re.escape(THOUGHT_LABEL.removesuffix("\n")) + r"\n"
    text = "[^" + re.escape("".join(placeholder(i) for i in range(k + 2))) + "]*"
    thought = f"(?:{re.escape(opening)}{label}{text}{re.escape(closing)})?"
    return Constraint(f"{thought}(?:{c.regex})", c.field, c.kind, (*c.specials, CHANNEL_OPEN, CHANNEL_CLOSE))


def _call(name: str, arguments: str) -> str:
    return f"{re.escape(OPEN)}call:{re.escape(name)}{arguments}{re.escape(CLOSE)}"


def _arguments(params: Any, field: str) -> str:
    """A function's arguments: an object, its schema's keywords all served."""
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise InvalidRequest(field, "parameters must be a JSON schema of type object")
    return _value({**params, "type": "object"}, field)


def _value(s: Any, field: str) -> str:
    if not isinstance(s, dict):
        raise InvalidRequest(field, "must be a JSON schema object")
    unknown = sorted(set(s) - KNOWN)
    if unknown:
        raise InvalidRequest(field, f"uses {unknown[0]!r}, which strict tool arguments do not support")
    if "const" in s:
        return _literal(s["const"], field)
    if "enum" in s:
        if not s["enum"]:
            raise InvalidRequest(field, "has an empty enum")
        return "|".join(f"(?:{_literal(v, field)})" for v in s["enum"])
    if "anyOf" in s:
        return "|".join(f"(?:{_value(b, f'{field}.anyOf')})" for b in s["anyOf"])
    kind = s.get("type")
    if isinstance(kind, list):
        return "|".join(f"(?:{_value({**s, 'type': k}, field)})" for k in kind)
    if kind == "object":
        return _object(s, field)
    if kind == "array":
        return _array(s, field)
    if kind == "string":
        return _string(s, field)
    if kind in ("integer", "number"):
        if any(b in s for b in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
            return number_regex(s, integer=kind == "integer", field=field)
        return r"-?(?:0|[1-9][0-9]*)" + ("" if kind == "integer" else r"(?:\.[0-9]+)?")
    if kind == "boolean":
        return "true|false"
    if kind == "null":
        return "null"
    raise InvalidRequest(field, f"needs a type (got {kind!r})")


def _object(s: dict, field: str) -> str:
    """The listed properties in their order (no others), those not in `required` each optional, commas only
    between the present ones: the body is one alternative per property that may come first."""
    props = s.get("properties") or {}
    if not isinstance(props, dict):
        raise InvalidRequest(field, "properties must be an object")
    required = set(s.get("required", []))
    parts = [(f"{_key(k)}:(?:{_value(v, f'{field}.{k}')})", k in required) for k, v in props.items()]
    rest = [""] * (len(parts) + 1)  # rest[i]: properties i.. after one already written, each with its comma
    for i in range(len(parts) - 1, -1, -1):
        part, needed = parts[i]
        rest[i] = (f",{part}" if needed else f"(?:,{part})?") + rest[i + 1]
    firsts = []
    for i, (part, needed) in enumerate(parts):
        firsts.append(part + rest[i + 1])
        if needed:  # a required property: none after it may come first
            break
    else:
        firsts.append("")  # every property optional: {} too
    return r"\{(?:" + "|".join(firsts) + r")\}"


def _key(name: str) -> str:
    return re.escape(name) if KEY.fullmatch(name) else re.escape(Q + name + Q)


def _array(s: dict, field: str) -> str:
    item = f"(?:{_value(s.get('items', {'type': 'string'}), field + '.items')})"
    low, high = s.get("minItems", 0), s.get("maxItems")
    if max(low, high or 0) > MAX_REPEAT:
        raise InvalidRequest(field, f"allows more than {MAX_REPEAT} items")
    if high == 0:
        return r"\[\]"
    more = f"{{{max(low - 1, 0)},{'' if high is None else high - 1}}}"
    body = f"{item}(?:,{item}){more}"
    return r"\[" + (body if low >= 1 else f"(?:{body})?") + r"\]"


def _string(s: dict, field: str) -> str:
    if "pattern" in s:
        inner = s["pattern"].removeprefix("^").removesuffix("$")
    else:
        low, high = s.get("minLength", 0), s.get("maxLength")
        if max(low, high or 0) > MAX_REPEAT:
            raise InvalidRequest(field, f"allows strings longer than {MAX_REPEAT}")
        inner = f"[^{re.escape(OPEN + CLOSE + Q)}\\n]{{{low},{'' if high is None else high}}}"
    return re.escape(Q) + f"(?:{inner})" + re.escape(Q)


def _literal(v: Any, field: str) -> str:
    if isinstance(v, str):
        return re.escape(Q + v + Q)
    if v is None or isinstance(v, bool):
        return "null" if v is None else "true" if v else "false"
    if isinstance(v, (int, float)):
        return re.escape(str(v))
    raise InvalidRequest(field, "enum and const values must be strings, numbers, booleans or null")
