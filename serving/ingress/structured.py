"""Structured outputs: what a request asks its answer to be (a JSON schema, any JSON object, a regex, one of some
choices), as the one Constraint the replica enforces (serving/request.py; model/constraint.py walks it).

JSON schemas become regular expressions through outlines-core, cached per schema. Where outlines-core would
silently drop a keyword that the answer must keep (numeric bounds), the bounds are written here as a regex of
their own; keywords a regular language cannot hold (uniqueItems, multipleOf, not, ...) are refused, naming the
field, so an answer is never called valid that a validator would reject.
"""

from __future__ import annotations

import copy
import json
import math
import re
from functools import lru_cache
from typing import Any

from serving.request import Constraint, InvalidRequest

WHITESPACE = r"[ ]?"  # between JSON tokens: one optional space, as json.dumps writes, never a run of them
MAX_REGEX_CHARS = 200_000  # a schema whose regex is longer is refused as too complex
MAX_REGEX_GIVEN = 10_000  # a request's own regex, in characters
# A counted repetition unrolls into that many automaton states (`x{0,100000}`: a hundred thousand), built before
# any size check can stop it: counts past this are refused (maxLength, maxItems, `{m,n}`).
MAX_REPEAT = 512
REPEAT = re.compile(r"(?<!\\)\{(\d+)(?:,(\d*))?\}")
UNSUPPORTED = (
    "uniqueItems", "multipleOf", "not", "if", "then", "else", "contains", "minContains", "maxContains",
    "propertyNames", "minProperties", "maxProperties", "dependentRequired", "dependentSchemas",
    "unevaluatedProperties", "unevaluatedItems", "patternProperties", "prefixItems",
)  # fmt: skip
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def structured_outputs_constraint(kind: str, value: Any) -> Constraint:
    """vLLM's `structured_outputs` as a Constraint, whichever protocol carried it: one of json (a schema),
    json_object (true), regex or choice, the refusals naming `structured_outputs.<kind>`."""
    field = f"structured_outputs.{kind}"
    if kind == "json":
        return json_schema_constraint(value, field)
    if kind == "regex":
        return regex_constraint(value, field)
    if kind == "choice":
        return choice_constraint(value, field)
    if kind == "json_object" and value is True:
        return json_object_constraint(field)
    raise InvalidRequest("structured_outputs", "set one of json, json_object (true), regex or choice")


def json_schema_constraint(schema: Any, field: str) -> Constraint:
    """A Constraint for answers that are JSON documents valid under `schema` (a dict, or its JSON text)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(field, f"is not JSON: {exc.msg}") from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequest(field, "must be a JSON schema (an object)")
    text = json.dumps(schema)  # properties keep the schema's order: the answer writes them in it
    return Constraint(_schema_regex(text, field), field, "json_schema")


def json_object_constraint(field: str) -> Constraint:
    return Constraint(_schema_regex('{"type": "object"}', field), field, "json_object")


def regex_constraint(regex: Any, field: str) -> Constraint:
    if not isinstance(regex, str) or not regex:
        raise InvalidRequest(field, "must be a non-empty regular expression")
    if len(regex) > MAX_REGEX_GIVEN:
        raise InvalidRequest(field, f"is {len(regex)} characters; at most {MAX_REGEX_GIVEN}")
    try:
        re.compile(regex)
    except re.error as exc:
        raise InvalidRequest(field, f"is not a regular expression: {exc}") from None
    _check_repeats(regex, field)
    return Constraint(regex, field, "regex")


def _check_repeats(regex: str, field: str) -> None:
    for m in REPEAT.finditer(regex):
        count = max(int(m.group(1)), int(m.group(2) or 0))
        if count > MAX_REPEAT:
            raise InvalidRequest(field, f"repeats something {count} times; at most {MAX_REPEAT}")


def choice_constraint(choices: Any, field: str) -> Constraint:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise InvalidRequest(field, "must be a non-empty list of non-empty strings")
    return Constraint("|".join(f"(?:{re.escape(c)})" for c in choices), field, "choice")


@lru_cache(maxsize=512)
def _schema_regex(text: str, field: str) -> str:
    from jsonschema import Draft202012Validator, SchemaError
    from outlines_core.json_schema import build_regex_from_schema

    schema = json.loads(text)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise InvalidRequest(field, f"is not a valid JSON schema: {exc.message}") from None
    ranges: dict[str, str] = {}
    schema = _with_ranges(copy.deepcopy(schema), ranges, field)
    try:
        regex = build_regex_from_schema(json.dumps(schema), WHITESPACE)
    except (ValueError, TypeError, RecursionError) as exc:
        raise InvalidRequest(field, f"cannot be compiled: {str(exc)[:200]}") from None
    for marker, pattern in ranges.items():  # each bounded number stood in as a const string
        regex = regex.replace(f'"{marker}"', f"(?:{pattern})")
    if len(regex) > MAX_REGEX_CHARS:
        raise InvalidRequest(field, f"is too complex (its expression has {len(regex)} characters)")
    _check_repeats(regex, field)
    return regex


def _with_ranges(node: Any, ranges: dict[str, str], field: str) -> Any:
    """The schema with each bounded integer or number replaced by a marker const (recorded in `ranges` with its
    regex), after refusing the keywords no regular language holds."""
    if isinstance(node, list):
        return [_with_ranges(n, ranges, field) for n in node]
    if not isinstance(node, dict):
        return node
    for key in UNSUPPORTED:
        if key in node:
            raise InvalidRequest(field, f"uses {key!r}, which structured outputs do not support")
    if (
        isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1
    ):  # outlines-core would write them one after another
        raise InvalidRequest(field, "uses allOf of several schemas, which structured outputs do not support")
    if node.get("enum") == []:
        raise InvalidRequest(field, "has an empty enum: no answer can match it")
    if node.get("type") in ("integer", "number") and any(b in node for b in BOUNDS):
        marker = f"dgsbound{len(ranges)}x"
        ranges[marker] = number_regex(node, integer=node["type"] == "integer", field=field)
        rest = {k: v for k, v in node.items() if k not in (*BOUNDS, "type", "format")}
        return {**rest, "const": marker}
    if any(b in node for b in BOUNDS) and isinstance(node.get("type"), list):
        raise InvalidRequest(field, "numeric bounds with a list of types: use anyOf of single types")
    return {
        k: (v if k in ("enum", "const", "default", "examples") else _with_ranges(v, ranges, field))
        for k, v in node.items()
    }


def number_regex(node: dict, integer: bool, field: str) -> str:
    """The JSON numbers within a schema's bounds. Integers: exactly those. Numbers: the integers in range,
    with a fraction wherever every fraction stays in range (a bound's own neighbourhood keeps only .0), no
    exponent: every answer it allows is valid, a few valid spellings are left out."""
    lo, lo_open = _bound(node, "minimum", "exclusiveMinimum")
    hi, hi_open = _bound(node, "maximum", "exclusiveMaximum")
    first = None if lo is None else (math.floor(lo) + 1 if lo_open and lo == math.floor(lo) else math.ceil(lo))
    last = None if hi is None else (math.ceil(hi) - 1 if hi_open and hi == math.ceil(hi) else math.floor(hi))
    if first is not None and last is not None and first > last:
        raise InvalidRequest(field, f"no {'integer' if integer else 'number'} lies within its bounds")
    whole = integer_regex(first, last)
    if integer:
        return whole
    # k.f lies in (k, k + 1) for k >= 0 and -k.f in (-k - 1, -k): free where that whole unit is in range
    free = []
    pos_lo, pos_hi = max(first or 0, 0), None if hi is None else math.floor(hi) - 1
    if pos_hi is None or pos_lo <= pos_hi:
        free.append(integer_regex(pos_lo, pos_hi))
    neg_lo, neg_hi = None if lo is None else 1 - math.floor(-lo), -1 if last is None else min(last, -1)
    if neg_lo is None or neg_lo <= neg_hi:
        free.append(integer_regex(neg_lo, neg_hi))
    fraction = f"(?:{'|'.join(free)})\\.[0-9]+|" if free else ""
    return f"{fraction}(?:{whole})(?:\\.0+)?"


def _bound(node: dict, inclusive: str, exclusive: str) -> tuple[float | None, bool]:
    """(the bound, whether it is exclusive), the tighter where both keywords are given."""
    a, b = node.get(inclusive), node.get(exclusive)
    if isinstance(b, bool):  # draft 4's boolean exclusive flags
        return a, b
    if a is None or b is None:
        return (b, True) if a is None and b is not None else (a, False)
    tighter_open = b >= a if inclusive == "minimum" else b <= a
    return (b, True) if tighter_open else (a, False)


def integer_regex(lo: int | None, hi: int | None) -> str:
    """The decimal integers (JSON spelling: no leading zeros, no -0) within [lo, hi], None for no bound."""
    parts = []
    if lo is None or lo <= -1:  # the negatives: magnitudes from the smallest in range up to -lo
        smallest = 1 if hi is None or hi >= -1 else -hi
        if lo is None or smallest <= -lo:
            parts += [f"-(?:{p})" for p in _naturals(smallest, None if lo is None else -lo)]
    if hi is None or hi >= 0:
        parts += _naturals(max(lo or 0, 0), hi)
    return "|".join(f"(?:{p})" for p in parts) or "(?!)"


def _naturals(a: int, b: int | None) -> list[str]:
    """Patterns for the naturals in [a, b] (b None: no end)."""
    out = []
    while b is None or a <= b:
        n = len(str(a))
        top = 10**n - 1
        if b is None and a == 10 ** (n - 1) and n > 1:
            out.append(f"[1-9][0-9]{{{n - 1},}}")  # every number of n or more digits
            break
        end = top if b is None else min(b, top)
        out += _same_length(str(a), str(end))
        a = end + 1
    return out


def _same_length(lo: str, hi: str) -> list[str]:
    """Patterns for the numbers from lo to hi, both of one length: at most two per digit position (a full range
    of trailing digits is one class, never split further)."""
    if lo == hi:
        return [lo]
    rest = len(lo) - 1
    tail = "" if rest == 0 else "[0-9]" if rest == 1 else f"[0-9]{{{rest}}}"
    if lo[1:] == "0" * rest and hi[1:] == "9" * rest:
        return [_digit_range(int(lo[0]), int(hi[0])) + tail]
    if lo[0] == hi[0]:
        return [lo[0] + p for p in _same_length(lo[1:], hi[1:])]
    first, last, out, after = int(lo[0]), int(hi[0]), [], []
    if lo[1:] != "0" * rest:  # lo's own leading digit, from lo's tail up
        out = [lo[0] + p for p in _same_length(lo[1:], "9" * rest)]
        first += 1
    if hi[1:] != "9" * rest:  # hi's own leading digit, up to hi's tail
        after = [hi[0] + p for p in _same_length("0" * rest, hi[1:])]
        last -= 1
    if first <= last:
        out.append(_digit_range(first, last) + tail)
    return out + after


def _digit_range(a: int, b: int) -> str:
    return str(a) if a == b else f"[{a}-{b}]"
