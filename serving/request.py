"""The contract of both wings: what goes into the engine (a generation request in token ids), what comes out (a
stream of events), and every error with the reply it gets on each protocol (ERRORS).

The engine speaks token ids only: the ingress owns tokenization and chat templates, so gRPC clients can send
ids directly and replicas never load a tokenizer (a constraint is text, a regular expression: the replica reads
its checkpoint's token bytes to walk it in tokens). A replica answers a request first with `Accepted` or a
`Refusal`, then with the engine's events. Nothing here imports torch or Ray: the ingress shares these types.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from model.config import SamplerSettings

# ---------------------------------------------------------------- errors (ERRORS maps each to its replies)


class InvalidRequest(ValueError):
    """The request can never be served as asked (names the field)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class Overloaded(RuntimeError):
    """The bounded queue is full (or a tier's share of it, or the latency bound): come back later."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class KeyLimited(Overloaded):
    """An API key over its concurrency or tokens-per-minute limit."""


class Unauthenticated(RuntimeError):
    """No key, or a key that is not one of the configured ones."""


class Unavailable(RuntimeError):
    """The tier's pool could not be reached (no replica, a replica died before accepting)."""

    retry_after_s: float | None = None


class Draining(Unavailable):
    """The service is being stopped: it finishes what it holds and takes nothing new; a load balancer or client
    retries elsewhere or after the restart. `loads`: the pools' loads when known (readiness), so that a drain can
    watch the requests in flight fall to zero."""

    retry_after_s = 5.0

    def __init__(self, message: str, loads: dict[str, dict] | None = None):
        super().__init__(message)
        self.loads = loads


class EngineFailure(RuntimeError):
    """The request failed after it was accepted: an engine error, or a stream cut off before its end."""


class ReplicaLost(EngineFailure):
    """The replica serving the request went away (its process died, its node was lost) after the client had
    been sent part of the answer, or on the second try: retryable, the request may be sent again."""


@dataclass(frozen=True)
class Reply:
    """How an error reaches a client and the metrics: its HTTP status, gRPC status code (grpc.StatusCode's
    name), the request's outcome and, for a refusal, its reason."""

    http: int
    grpc: str
    outcome: str
    reason: str


ERRORS: dict[type[Exception], Reply] = {  # the first class in an error's MRO that is here decides
    InvalidRequest: Reply(400, "INVALID_ARGUMENT", "invalid", "invalid"),  # reason: the field it names
    Unauthenticated: Reply(401, "UNAUTHENTICATED", "unauthenticated", "unauthenticated"),
    KeyLimited: Reply(429, "RESOURCE_EXHAUSTED", "overloaded", "key_limit"),
    Overloaded: Reply(429, "RESOURCE_EXHAUSTED", "overloaded", "queue_full"),
    Draining: Reply(503, "UNAVAILABLE", "unavailable", "draining"),
    Unavailable: Reply(503, "UNAVAILABLE", "unavailable", "no_replica"),
    ReplicaLost: Reply(503, "UNAVAILABLE", "failed", "replica_lost"),  # retryable
    EngineFailure: Reply(500, "INTERNAL", "failed", "engine_error"),
}


def reply_for(exc: BaseException) -> Reply:
    """The table's row for an error; an error not in it is the server's own (500 / INTERNAL)."""
    for cls in type(exc).__mro__:
        if cls in ERRORS:
            return ERRORS[cls]
    return ERRORS[EngineFailure]


def retry_after(exc: BaseException) -> float | None:
    """The seconds a client should wait before trying again, where the error says (overload, draining)."""
    return getattr(exc, "retry_after_s", None)


# A special token has no text to match: a regex writes the k-th of its Constraint's `specials` as this character
# (Unicode's private use plane 15), and the replica lets that token, and no other special one, stand for it.
PLACEHOLDER_BASE = 0xF0000


def placeholder(k: int) -> str:
    return chr(PLACEHOLDER_BASE + k)


@dataclass(frozen=True)
class Constraint:
    """What the answer's text must match: a regular expression over the whole answer (the ingress turns JSON
    schemas, choices and tool calls into one). `field` is the request field it came from, named by a refusal;
    `kind` (json_schema, json_object, regex, choice, tool_call) labels metrics; `specials`, the special tokens'
    texts the regex writes as placeholder(0), placeholder(1), ...."""

    regex: str
    field: str = "structured_outputs"
    kind: str = "regex"
    specials: tuple[str, ...] = ()


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
    # the answer is written in this language, valid by construction (model/constraint.py)
    constraint: Constraint | None = None

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
