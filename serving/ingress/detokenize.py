"""A replica's events as text, once for every protocol: canvases decoded incrementally, drafts on their own, stop
strings cutting the answer.

A canvas's text is decoded with every canvas before it, so a character split across canvases comes out whole.
With stop strings the answer ends before the first one: the canvas that holds it is cut to the tokens whose text
comes before it, the answer ends with finish "stop", and the replica's stream is closed, which cancels the rest of
the request in its engine.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from serving.ingress.stop import StopStrings
from serving.request import CanvasEvent, DraftEvent, EngineFailure, ErrorEvent, FinalEvent, Usage


@dataclass(frozen=True)
class CanvasChunk:
    """One committed canvas: the text it adds to the answer, its tokens and the steps it took (with a stop
    string: up to it), and with `logprobs` asked for, each token's log-probability and top alternatives'."""

    index: int
    text: str
    token_ids: list[int]
    steps: int
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass(frozen=True)
class DraftChunk:
    """The argmax canvas after one denoising step (with stream_drafts), decoded on its own."""

    canvas_index: int
    step: int
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class DoneChunk:
    finish_reason: str  # "eos", "length", "stop" (a stop string) or "cancelled"
    usage: Usage
    text: str = ""  # the end of the answer held back in case it began a stop string (only with stop strings)


Chunk = CanvasChunk | DraftChunk | DoneChunk


class Detokenizer:
    """Text per canvas, decoded incrementally so that a character split across canvases comes out whole."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""

    def add(self, ids: list[int]) -> str:
        self.ids += ids
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the next canvas
            return ""
        new, self.text = text[len(self.text) :], text
        return new

    def covering(self, ids: list[int], chars: int, before: str) -> int:
        """How many of `ids` (the ids last added, after text `before`) write no more than their text's first
        `chars` characters: where a stop string cuts a canvas, the tokens kept (a token that holds the stop
        string's first characters is not)."""
        base = len(self.ids) - len(ids)
        lo, hi = 0, len(ids)
        while lo < hi:  # the text grows with the prefix: the longest prefix whose text stays within `chars`
            mid = (lo + hi + 1) // 2
            grown = len(self.tok.decode(self.ids[: base + mid], skip_special_tokens=self.skip)) - len(before)
            lo, hi = (mid, hi) if grown <= chars else (lo, mid - 1)
        return lo


class TextStream:
    """The chunks of one request's events. `started` is when the request arrived (perf_counter): a stop string's
    usage counts its time from there."""

    def __init__(self, tokenizer: Any, stop: list[str], special_tokens: bool, prompt_tokens: int, started: float):
        self.tokenizer = tokenizer
        self.detok = Detokenizer(tokenizer, skip_special_tokens=not special_tokens)
        self.stops = StopStrings(stop) if stop else None
        self.prompt_tokens = prompt_tokens
        self.started = started
        self.sent: list[CanvasChunk] = []  # what a stop string's usage counts
        self.first_at: float | None = None

    async def chunks(self, events: AsyncIterator[Any]) -> AsyncIterator[Chunk]:
        """Canvases (and drafts), then exactly one DoneChunk; EngineFailure where the engine failed the request or
        its stream ended without a final event. Closing this closes the replica's stream."""
        try:
            async for e in events:
                if isinstance(e, CanvasEvent):
                    for chunk in self._canvas(e):
                        yield chunk
                        if isinstance(chunk, DoneChunk):
                            return  # a stop string: closing the replica's stream cancels the rest
                elif isinstance(e, DraftEvent):
                    text = self.tokenizer.decode(e.tokens, skip_special_tokens=True)
                    yield DraftChunk(e.canvas_index, e.step, text, e.tokens)
                elif isinstance(e, FinalEvent):
                    yield DoneChunk(e.finish_reason, e.usage, self.stops.release() if self.stops is not None else "")
                    return
                elif isinstance(e, ErrorEvent):
                    raise EngineFailure(e.message)
        finally:
            await events.aclose()
        raise EngineFailure("the stream ended without a final event")

    def _canvas(self, e: CanvasEvent) -> list[Chunk]:
        if self.first_at is None:
            self.first_at = time.perf_counter() - self.started
        before = self.detok.text
        chunk = CanvasChunk(e.index, self.detok.add(e.tokens), e.tokens, e.steps, e.logprobs, e.top_logprobs)
        if self.stops is None:
            return [chunk]
        held = self.stops.held
        text, hit = self.stops.feed(chunk.text)
        if not hit:
            self.sent.append(replace(chunk, text=text))
            return [self.sent[-1]]
        n = self.detok.covering(e.tokens, len(text) - len(held), before)
        lp, top = e.logprobs, e.top_logprobs
        self.sent.append(CanvasChunk(e.index, text, e.tokens[:n], e.steps, lp and lp[:n], top and top[:n]))
        return [self.sent[-1], DoneChunk("stop", self._stopped_usage())]

    def _stopped_usage(self) -> Usage:
        """The usage of an answer a stop string ended: the tokens sent, the canvases they came from (the engine's
        own report never comes, as the request is cancelled; its queue time is not known here)."""
        return Usage(
            prompt_tokens=self.prompt_tokens,
            generated_tokens=sum(len(c.token_ids) for c in self.sent),
            canvases=len(self.sent),
            steps_per_canvas=[c.steps for c in self.sent],
            queue_time_s=None,
            time_to_first_canvas_s=self.first_at,
            total_time_s=time.perf_counter() - self.started,
        )
