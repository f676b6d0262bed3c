"""What goes into the engine (a generation request in token ids) and what comes out (a stream of events).

The engine speaks token ids only: the ingress owns tokenization and chat templates, so gRPC clients can send
ids directly and replicas never load a tokenizer. A replica answers a request first with `Accepted` or a
`Refusal`, then with the engine's events. Nothing here imports torch or Ray: the ingress shares these types.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from model.config import SamplerSettings


class InvalidRequest(ValueError):
    """The request can never be served as asked (names the field); maps to HTTP 400 / INVALID_ARGUMENT."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class Overloaded(RuntimeError):
    """The bounded queue is full; maps to HTTP 429 / RESOURCE_EXHAUSTED with a retry hint."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class GenerateRequest:
    prompt: list[int]  # token ids, chat template already applied
    max_new_tokens: int
    settings: SamplerSettings = field(default_factory=SamplerSettings)
    seed: int | None = None  # None: a random one (the output is reproducible only with a fixed seed)
    stream_drafts: bool = False  # also emit the argmax canvas after every denoising step
    request_id: str = field(default_factory=lambda: secrets.token_hex(8))
    tier: str = ""  # the front end's tier: the scheduler shares queue places and slots between tiers
    # None: no log-probabilities; k: each committed token's and its top k alternatives' (from the final step)
    logprobs: int | None = None
    # a canvas template: the answer's first tokens, fixed, with -1 where the sampler fills (model/denoiser.py)
    template: list[int] | None = None

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = secrets.randbelow(2**62)


@dataclass(frozen=True)
class CanvasEvent:
    """One committed canvas: its tokens (the last canvas cut after its first EOS)."""

    index: int
    tokens: list[int]
    steps: int  # denoising steps this canvas took
    # with the request's `logprobs`: per token, its log-probability and its top alternatives' (id, log-prob)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass(frozen=True)
class DraftEvent:
    """The argmax canvas after one denoising step (only with `stream_drafts`)."""

    canvas_index: int
    step: int
    tokens: list[int]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    generated_tokens: int
    canvases: int
    steps_per_canvas: list[int]
    queue_time_s: float | None  # arrival to admission into a slot (None: a request ended by a stop string)
    time_to_first_canvas_s: float | None  # arrival to the first committed canvas (None if there was none)
    total_time_s: float
    cached_tokens: int = 0  # prompt tokens taken from the replica's prefix cache instead of encoded


@dataclass(frozen=True)
class FinalEvent:
    finish_reason: str  # "eos", "length" or "cancelled"
    usage: Usage


@dataclass(frozen=True)
class ErrorEvent:
    """This request failed inside the engine; the engine keeps serving the others."""

    message: str


Event = CanvasEvent | DraftEvent | FinalEvent | ErrorEvent


@dataclass(frozen=True)
class Accepted:
    """The engine took the request (a slot or a queue place); its events follow."""

    request_id: str


@dataclass(frozen=True)
class Refusal:
    """The engine refused the request at submit. Refusals travel as messages, not exceptions, so the ingress
    maps them to 400 / 429 and INVALID_ARGUMENT / RESOURCE_EXHAUSTED without unwrapping Ray's errors."""

    kind: str  # "invalid" or "overloaded"
    message: str
    field: str | None = None
    retry_after_s: float | None = None

    def error(self) -> InvalidRequest | Overloaded:
        if self.kind == "overloaded":
            return Overloaded(self.message, self.retry_after_s or 1.0)
        return InvalidRequest(self.field or "request", self.message.split(": ", 1)[-1])

    @classmethod
    def of(cls, exc: InvalidRequest | Overloaded) -> Refusal:
        if isinstance(exc, Overloaded):
            return cls("overloaded", str(exc), retry_after_s=exc.retry_after_s)
        return cls("invalid", str(exc), field=exc.field)
