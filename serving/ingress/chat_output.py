"""The model's answer split the way OpenAI clients read it: reasoning, content and tool calls (Gemma 4's format).

In thinking mode the model writes its reasoning in a thought channel before the answer, and a tool call as a
call in Gemma 4's own notation (not JSON):

    <|channel>thought\\n...reasoning...<channel|>The answer
    <|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>

Strings are quoted with the `<|"|>` token, keys are bare, values nest as {...} and [...]. `ChatOutput` reads the
answer's text canvas by canvas (decoded with the special tokens kept) and says, each time, what is new:
reasoning text, content text, and the tool calls completed since (with their arguments as a JSON string).
A canvas is a whole block of text, so the parse is redone on the whole answer each time and diffed against
what was sent; a call is sent once, whole, when its closing marker has arrived. What cannot be parsed as a call
goes out as content at the end, never dropped.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
QUOTE = '<|"|>'
THOUGHT_LABEL = "thought\n"  # the channel's name, first in the channel


class Malformed(ValueError):
    """A tool call that does not parse."""


@dataclass(frozen=True)
class ParsedCall:
    id: str
    name: str
    arguments: str  # a JSON object

    def openai(self, index: int) -> dict:
        function = {"name": self.name, "arguments": self.arguments}
        return {"index": index, "id": self.id, "type": "function", "function": function}


@dataclass
class Delta:
    """What one canvas (or the end) adds to the answer."""

    reasoning: str = ""
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.reasoning or self.content or self.calls)


def parse_call(text: str) -> tuple[str, dict[str, Any]]:
    """`call:name{args}` (between the call markers) as (name, arguments)."""
    if not text.startswith("call:") or "{" not in text:
        raise Malformed(f"not a call: {text[:64]!r}")
    brace = text.index("{")
    name = text[5:brace].strip()
    if not name:
        raise Malformed("a call without a name")
    args, end = _object(text, brace)
    if text[end:].strip():
        raise Malformed(f"text after the call's arguments: {text[end:][:32]!r}")
    return name, args


def _skip(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \n\t\r":
        i += 1
    return i


def _object(s: str, i: int) -> tuple[dict[str, Any], int]:
    """The object opening at s[i] == '{' and the index after its '}'."""
    out: dict[str, Any] = {}
    i = _skip(s, i + 1)
    while True:
        if i >= len(s):
            raise Malformed("an object is not closed")
        if s[i] == "}":
            return out, i + 1
        if s.startswith(QUOTE, i):  # a quoted key
            end = s.find(QUOTE, i + len(QUOTE))
            if end < 0:
                raise Malformed("a key's quote is not closed")
            key, i = s[i + len(QUOTE) : end], end + len(QUOTE)
        else:
            colon = s.find(":", i)
            if colon < 0:
                raise Malformed("a key without a value")
            key, i = s[i:colon].strip(), colon
        i = _skip(s, i)
        if i >= len(s) or s[i] != ":":
            raise Malformed(f"no ':' after key {key!r}")
        out[key], i = _value(s, _skip(s, i + 1))
        i = _skip(s, i)
        if i < len(s) and s[i] == ",":
            i = _skip(s, i + 1)


def _array(s: str, i: int) -> tuple[list[Any], int]:
    out: list[Any] = []
    i = _skip(s, i + 1)
    while True:
        if i >= len(s):
            raise Malformed("an array is not closed")
        if s[i] == "]":
            return out, i + 1
        value, i = _value(s, i)
        out.append(value)
        i = _skip(s, i)
        if i < len(s) and s[i] == ",":
            i = _skip(s, i + 1)


def _value(s: str, i: int) -> tuple[Any, int]:
    if s.startswith(QUOTE, i):
        end = s.find(QUOTE, i + len(QUOTE))
        if end < 0:
            raise Malformed("a string's quote is not closed")
        return s[i + len(QUOTE) : end], end + len(QUOTE)
    if i < len(s) and s[i] == "{":
        return _object(s, i)
    if i < len(s) and s[i] == "[":
        return _array(s, i)
    end = i
    while end < len(s) and s[end] not in ",}]":
        end += 1
    bare = s[i:end].strip()
    if not bare:
        raise Malformed(f"a missing value at {i}")
    return _bare(bare), end


def _bare(word: str) -> Any:
    """An unquoted value: a literal, a number, or else the word itself as a string."""
    literals = {"true": True, "false": False, "null": None}
    if word in literals:
        return literals[word]
    try:
        return int(word)
    except ValueError:
        pass
    try:
        return float(word)
    except ValueError:
        return word


def special_strings(tokenizer: Any) -> list[str]:
    """Every special token's text (the chat markers are added special tokens, not always among
    `all_special_tokens`)."""
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


class ChatOutput:
    """One answer's reasoning, content and tool calls, fed canvas by canvas (see the module's docstring)."""

    def __init__(self, special_tokens: list[str], parse_tools: bool):
        """special_tokens: the tokenizer's (kept in the text, as the markers are special tokens, and dropped
        from reasoning and content); parse_tools: read tool calls (else their text is content)."""
        self.parse_tools = parse_tools and CALL_OPEN in special_tokens
        markers = {CHANNEL_OPEN, CHANNEL_CLOSE, CALL_OPEN, CALL_CLOSE, QUOTE}
        self.strip = sorted((t for t in special_tokens if t not in markers), key=len, reverse=True)
        self.text = ""
        self.sent_reasoning = ""
        self.sent_content = ""
        self.calls: list[ParsedCall] = []

    def feed(self, text: str) -> Delta:
        self.text += text
        return self._delta(final=False)

    def finish(self) -> Delta:
        return self._delta(final=True)

    def _delta(self, final: bool) -> Delta:
        reasoning, content, calls = self._split(self.text, final)
        delta = Delta()
        if reasoning.startswith(self.sent_reasoning):
            delta.reasoning = reasoning[len(self.sent_reasoning) :]
            self.sent_reasoning = reasoning
        if content.startswith(self.sent_content):
            delta.content = content[len(self.sent_content) :]
            self.sent_content = content
        for name, args in calls[len(self.calls) :]:
            call = ParsedCall("call_" + secrets.token_hex(12), name, json.dumps(args, ensure_ascii=False))
            self.calls.append(call)
            delta.calls.append(call)
        return delta

    def _split(self, text: str, final: bool) -> tuple[str, str, list[tuple[str, dict]]]:
        """(reasoning, content, complete calls) of the answer so far. An open call is held back until it closes
        (at the end, unclosed or unparsable, it is content)."""
        reasoning, content, calls = [], [], []
        i = 0
        while i < len(text):
            starts = [(text.find(m, i), m) for m in (CHANNEL_OPEN, CALL_OPEN) if m != CALL_OPEN or self.parse_tools]
            at, marker = min(((p, m) for p, m in starts if p >= 0), default=(-1, ""))
            if at < 0:
                rest = text[i:]
                if not final:  # what may yet become a marker waits for the next canvas
                    rest = rest[: len(rest) - self._partial_marker(rest)]
                content.append(rest)
                break
            content.append(text[i:at])
            close = CHANNEL_CLOSE if marker == CHANNEL_OPEN else CALL_CLOSE
            end = text.find(close, at + len(marker))
            inner = text[at + len(marker) : end if end >= 0 else len(text)]
            if marker == CHANNEL_OPEN:
                if end < 0 and not final:
                    if THOUGHT_LABEL.startswith(inner):
                        break  # the channel's name still being written
                    inner = inner[: len(inner) - self._partial_marker(inner)]
                reasoning.append(inner.removeprefix(THOUGHT_LABEL))
            elif end < 0 and not final:
                break  # a call still being written
            else:
                try:
                    calls.append(parse_call(inner))
                except Malformed:
                    content.append(text[at : end + len(close) if end >= 0 else len(text)])
            if end < 0:
                break
            i = end + len(close)
        return self._clean("".join(reasoning)), self._clean("".join(content)), calls

    def _partial_marker(self, text: str) -> int:
        """The length of the longest end of `text` that begins a marker or special token (0: none)."""
        tokens = (CHANNEL_OPEN, CHANNEL_CLOSE, CALL_OPEN, *self.strip)
        return max((n for t in tokens for n in range(1, len(t)) if text.endswith(t[:n])), default=0)

    def _clean(self, text: str) -> str:
        for token in self.strip:
            text = text.replace(token, "")
        return text
