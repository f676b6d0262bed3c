"""OpenAI's reply objects built from the front end's chunks: choices, deltas, log-probabilities and usage.

One request with `n` choices is n engine requests; each choice keeps its own state (`Choice`) while the route
(serving/ingress/http_server.py) merges their chunks. Chat answers are split into reasoning, content and tool calls by
serving/ingress/chat_output.py; completions are text as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serving.ingress.chat_output import ChatOutput, Delta
from serving.ingress.frontend import Opened
from serving.request import Usage

OPENAI_FINISH = {"eos": "stop"}  # the engine's "length", "stop" and "cancelled" keep their names


def openai_usage(u: Usage | None, tier: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> dict:
    """OpenAI's usage with the diffusion's own figures; u None: the usage so far (continuous usage stats)."""
    if u is None:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.generated_tokens,
        "total_tokens": u.prompt_tokens + u.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "canvases": u.canvases,
        "steps_per_canvas": u.steps_per_canvas,
        "tier": tier,
    }


def summed_usage(usages: list[Usage], tier: str) -> dict:
    """The usage of a request with several choices: one prompt, every choice's completion."""
    out = openai_usage(usages[0], tier)
    out["completion_tokens"] = sum(u.generated_tokens for u in usages)
    out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    out["canvases"] = sum(u.canvases for u in usages)
    out["steps_per_canvas"] = [s for u in usages for s in u.steps_per_canvas]
    return out


class TokenText:
    """Each token's own text, as OpenAI's log-probabilities name them."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer

    def __call__(self, token_id: int) -> str:
        return self.tok.decode([token_id])

    def chat(self, ids: list[int], logprobs: list[float], top: list | None) -> list[dict]:
        """logprobs.content entries of tokens (a canvas's, or a whole answer's) and their alternatives."""
        out = []
        for i, token_id in enumerate(ids):
            text = self(token_id)
            alternatives = [
                {"token": (t := self(a)), "logprob": lp, "bytes": list(t.encode())} for a, lp in (top[i] if top else [])
            ]
            out.append(
                {"token": text, "logprob": logprobs[i], "bytes": list(text.encode()), "top_logprobs": alternatives}
            )
        return out

    def completion(self, ids: list[int], logprobs: list[float], top: list | None, offset: int = 0) -> dict:
        """The completions API's logprobs object for tokens; `offset`: the length of the text before them."""
        tokens = [self(t) for t in ids]
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        tops = [dict((self(a), lp) for a, lp in alts) for alts in (top or [[] for _ in tokens])]
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


@dataclass
class Choice:
    """One choice of a request, as its chunks arrive."""

    index: int
    opened: Opened
    output: ChatOutput | None  # chat: reasoning, content and tool calls; None: completions (text as is)
    text_sent: int = 0  # completions: characters sent (the log-probabilities' text offsets)
    tokens: int = 0
    calls: int = 0
    usage: Usage | None = None

    def finish_reason(self, engine_reason: str) -> str:
        if self.calls and engine_reason in ("eos", "stop"):
            return "tool_calls"
        return OPENAI_FINISH.get(engine_reason, engine_reason)


def chat_delta(choice: Choice, delta: Delta) -> dict:
    """A streamed chat delta (or, put together, a whole message's fields)."""
    out: dict[str, Any] = {}
    if delta.reasoning:
        out["reasoning_content"] = delta.reasoning
    if delta.content:
        out["content"] = delta.content
    if delta.calls:
        out["tool_calls"] = [c.openai(choice.calls + i) for i, c in enumerate(delta.calls)]
        choice.calls += len(delta.calls)
    return out


def merge(first: Delta, second: Delta) -> Delta:
    return Delta(first.reasoning + second.reasoning, first.content + second.content, first.calls + second.calls)


def chat_message(choice: Choice, text: str) -> dict:
    """The non-streaming chat message of a choice's whole answer (its text with the special tokens kept)."""
    assert choice.output is not None
    delta = merge(choice.output.feed(text), choice.output.finish())
    message: dict[str, Any] = {"role": "assistant", "content": delta.content or (None if delta.calls else "")}
    message |= {k: v for k, v in chat_delta(choice, delta).items() if k != "content"}
    for call in message.get("tool_calls", ()):
        del call["index"]  # a position within a stream; a whole message lists its calls in order
    return message
