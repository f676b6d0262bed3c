"""The transport-free front end: what HTTP and gRPC share between a decoded body and a replica's stream.

    frontend = Frontend(config, pools)                     # pools: pool name -> PoolClient
    ids = frontend.chat_prompt(messages)                    # or user_prompt(text), raw_prompt(text), token ids
    opened = await frontend.open(ids, Controls(tier="fast", seed=0), max_new_tokens=64)
    async for chunk in opened.chunks: ...                   # CanvasChunk / DraftChunk ..., then one DoneChunk
    answer = await opened.collect()                         # or the whole answer at once

It picks the tier (body, then header, then the default), resolves the sampler settings within the tier's
limits, names the request (the id the engine, the logs and the client all see), sends token ids to a replica
of the tier's pool and waits until the request is accepted, so that a refusal is an error before any reply
starts. Then it turns the engine's events into text once, for every protocol: a canvas's text is decoded
incrementally, so a character split across canvases comes out whole.

Errors: InvalidRequest (400 / INVALID_ARGUMENT), Overloaded (429 / RESOURCE_EXHAUSTED), Unavailable (the pool
did not answer: 503 / UNAVAILABLE) from `open`; EngineFailure from the chunks when the request failed in the
engine or its stream ended without a final event, ReplicaLost (retryable: 503 / UNAVAILABLE) when its replica
went away. A request is idempotent until the client has been sent a canvas or a draft: a replica lost before
that (before accepting, or after accepting and before its first canvas) is retried once on the pool, which
routes it to another replica, and the client sees nothing of it. This module imports neither torch nor Ray.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from jinja2 import TemplateError
from prometheus_client import CollectorRegistry

from model.chat import chat_ids, prompt_ids, text_ids
from model.checkpoint import read_checkpoint
from serving.config import AppConfig
from serving.ingress.auth import Grant, KeyGate
from serving.ingress.stop import StopStrings
from serving.metrics import frontend_metrics
from serving.request import (
    Accepted,
    CanvasEvent,
    DraftEvent,
    Draining,
    EngineFailure,
    ErrorEvent,
    FinalEvent,
    GenerateRequest,
    InvalidRequest,
    Overloaded,
    Refusal,
    ReplicaLost,
    Unauthenticated,
    Unavailable,
    Usage,
    reply_for,
)

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
log = logging.getLogger("ray.serve")


def new_request_id() -> str:
    """A request id of the form Serve's proxy gives HTTP requests (a UUID), so ids look alike in its logs."""
    return str(uuid.uuid4())


class PoolClient(Protocol):
    """How the front end reaches the replicas of one pool (serving/ingress/deployment.py: through Serve; LocalPool: one
    replica object in this process)."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[Any]: ...

    async def load(self) -> dict: ...


class LocalPool:
    """One DenoiserServer in this process, as a pool: for tests and in-process benchmarks (no Ray)."""

    def __init__(self, server: Any):
        self.server = server

    def generate(self, request: GenerateRequest) -> AsyncIterator[Any]:
        return self.server.generate(copy.deepcopy(request))  # as Ray would send it: the engine's own copy

    async def load(self) -> dict:
        return self.server.load()


@dataclass(frozen=True)
class Requested:
    """What a request asks for beyond its prompt and sampler controls."""

    request_id: str | None
    max_new_tokens: int | None
    stream_drafts: bool
    logprobs: int | None
    stop: list[str]
    special_tokens: bool = False
    template: list[int] | None = None


@dataclass
class Controls:
    """The diffusion controls of a request, whatever its protocol: tier, seed and sampler overrides."""

    tier: str | None = None
    seed: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # sampler field -> value (None: the tier's)


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


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[float] | None = None  # when asked for: per token (CanvasChunk)
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class Opened:
    """A request a replica accepted."""

    request_id: str
    tier: str
    prompt_tokens: int
    chunks: AsyncIterator[Chunk]  # canvases (and drafts), then exactly one DoneChunk; or EngineFailure

    async def collect(self) -> Answer:
        text, tokens, lp, top = "", [], [], []
        async for chunk in self.chunks:
            if isinstance(chunk, CanvasChunk):
                text += chunk.text
                tokens += chunk.token_ids
                lp += chunk.logprobs or []
                top += chunk.top_logprobs or []
            elif isinstance(chunk, DoneChunk):
                asked = bool(lp)
                return Answer(
                    text + chunk.text, tokens, chunk.finish_reason, chunk.usage, lp if asked else None,
                    top if asked else None,
                )  # fmt: skip
        raise EngineFailure("the stream ended without a final event")


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


class Frontend:
    def __init__(
        self,
        config: AppConfig,
        pools: Mapping[str, PoolClient],
        tokenizer: Any = None,
        registry: CollectorRegistry | None = None,  # None: Ray's metrics in a Ray process, else the default
    ):
        # The checkpoint's tokenizer.json through the tokenizers backend: AutoTokenizer would import torch.
        from transformers import PreTrainedTokenizerFast

        self.config = config
        self.pools = dict(pools)
        ckpt = read_checkpoint(config.model)
        self.tokenizer = tokenizer or PreTrainedTokenizerFast.from_pretrained(ckpt.path)
        self.model_id = "diffusiongemma-embedded" if config.model == "embedded" else config.model
        self.max_new_default = config.max_new_tokens or ckpt.generation.max_new_tokens
        self.metrics = frontend_metrics(registry)
        self.started = int(time.time())
        # OpenAI's system_fingerprint: changes when the model or the serving configuration (tiers, pools) does
        blob = json.dumps([self.model_id, config.model_dump(mode="json", exclude={"auth"})], sort_keys=True)
        self.fingerprint = "fp_" + hashlib.sha256(blob.encode()).hexdigest()[:12]
        self.gate = KeyGate(config.auth) if config.auth is not None else None
        # Set on every router replica at once through Serve's user_config (deploy/drain.py): new requests are
        # refused, /ready and the gRPC readiness check say NOT ready, requests in flight run to their end.
        self.draining = False

    # ---------------------------------------------------------------- callers

    def authenticate(self, authorization: str | None, protocol: str) -> str | None:
        """The caller's key id from its `Bearer` authorization (None when no keys are configured); raises
        Unauthenticated otherwise."""
        if self.gate is None:
            return None
        try:
            return self.gate.identify(authorization)
        except Unauthenticated:
            self.metrics.refusals.labels(protocol, "unauthenticated").inc()
            raise

    # ---------------------------------------------------------------- prompts

    def chat_prompt(
        self, messages: list[dict], tools: list[dict] | None = None, template_kwargs: dict | None = None
    ) -> list[int]:
        """The checkpoint's chat template over the messages (and tools), with `enable_thinking` from the
        request's template kwargs or else the deployment's default."""
        template = self.tokenizer.chat_template
        if not template:
            raise InvalidRequest("messages", "this model has no chat template; send a plain prompt instead")
        if tools and "tools" not in template:
            raise InvalidRequest("tools", "this model's chat template does not render tools")
        kwargs = {"enable_thinking": self.config.thinking} | (template_kwargs or {})
        try:
            return chat_ids(self.tokenizer, messages, tools, kwargs)
        except TemplateError as exc:  # the template's own refusal (raise_exception), or a message it cannot read
            raise InvalidRequest("messages", f"the chat template refused them: {exc}") from exc

    def user_prompt(self, text: str) -> list[int]:
        """One user turn through the chat template (the plain text where the model has none)."""
        return prompt_ids(self.tokenizer, text)

    def raw_prompt(self, text: str) -> list[int]:
        return text_ids(self.tokenizer, text)

    def template_ids(self, parts: list[str | int]) -> list[int]:
        """A canvas template from its parts: text, fixed (tokenized on its own, no BOS), and counts of free
        positions (-1 each), in answer order."""
        ids: list[int] = []
        for part in parts:
            if isinstance(part, str):
                ids += self.tokenizer.encode(part, add_special_tokens=False)
            else:
                ids += [-1] * part
        if not ids:
            raise InvalidRequest("template", "holds no position")
        return ids

    # ---------------------------------------------------------------- one request

    async def open(
        self,
        ids: list[int],
        controls: Controls,
        *,
        header_tier: str | None = None,
        max_new_tokens: int | None = None,
        stream_drafts: bool = False,
        request_id: str | None = None,
        protocol: str = "http",
        key_id: str | None = None,
        logprobs: int | None = None,
        stop: list[str] | None = None,
        special_tokens: bool = False,
        template: list[int] | None = None,
    ) -> Opened:
        """Send the request to a replica of its tier's pool and wait until it is accepted (slot or queue
        place). Refusals raise here, before any reply is started; `protocol` labels the metrics; `key_id` (from
        `authenticate`) is charged against its key's limits. `logprobs`: None, or k for each committed token's
        log-probability and its top k alternatives'; `stop`: strings that end the answer (serving/ingress/stop.py);
        `special_tokens`: the text keeps them (a chat answer's channel and tool-call markers,
        serving/ingress/chat_output.py); `template`: the answer's fixed tokens, -1 where the sampler fills."""
        started = time.perf_counter()
        name = controls.tier or header_tier or self.config.default_tier
        try:
            if self.draining:
                raise Draining("the service is draining for a restart; send the request again")
            request = Requested(
                request_id, max_new_tokens, stream_drafts, logprobs, stop or [], special_tokens, template
            )
            return await self._open(ids, controls, name, request, protocol, started, key_id)
        except (InvalidRequest, Overloaded, Unavailable) as exc:
            self._refused(name, protocol, exc, key_id)
            raise

    def _refused(self, tier: str, protocol: str, exc: Exception, key_id: str | None) -> None:
        reply = reply_for(exc)
        outcome, reason = reply.outcome, exc.field if isinstance(exc, InvalidRequest) else reply.reason
        label = tier if tier in self.config.tiers else "unknown"  # a client's string is no metric label
        self.metrics.requests.labels(label, protocol, outcome).inc()
        self.metrics.refusals.labels(protocol, reason).inc()
        if key_id is not None:
            self.metrics.key_requests.labels(key_id, outcome).inc()

    async def _open(
        self,
        ids: list[int],
        controls: Controls,
        name: str,
        asked: Requested,
        protocol: str,
        started: float,
        key_id: str | None,
    ) -> Opened:
        tier = self.config.tiers.get(name)
        if tier is None:
            shown = name if len(name) <= 64 else name[:64] + "..."  # a client's string, not echoed whole
            raise InvalidRequest("tier", f"unknown tier {shown!r}; tiers: {sorted(self.config.tiers)}")
        if len(ids) > self.config.max_prompt_tokens:
            raise InvalidRequest("prompt", f"{len(ids)} tokens; the limit is {self.config.max_prompt_tokens}")
        request_id = asked.request_id
        if request_id is None:
            request_id = new_request_id()
        elif not REQUEST_ID.fullmatch(request_id):
            raise InvalidRequest("x-request-id", "must be 1-128 characters of letters, digits and . _ : -")
        # an empty prompt or ids outside the model's vocabulary: the engine refuses them (field "prompt")
        request = GenerateRequest(
            prompt=list(ids),
            max_new_tokens=asked.max_new_tokens or self.max_new_default,
            settings=tier.resolve(name, controls.overrides),
            seed=controls.seed,  # None: drawn now, so a resend is the same request
            stream_drafts=asked.stream_drafts,
            request_id=request_id,
            tier=name,
            logprobs=asked.logprobs,
            template=asked.template,
        )
        grant = None if key_id is None else self.gate.admit(key_id, len(ids) + request.max_new_tokens)
        try:
            events = await self._accepted(tier.pool, request)
        except Exception:
            if grant is not None:
                grant.release()
            raise
        send = lambda: self._accepted(tier.pool, request, tries=1)  # noqa: E731  (the one retry, when idempotent)
        chunks = self._chunks(events, name, protocol, started, grant, send, len(ids), asked)
        return Opened(request_id, name, len(ids), chunks)

    async def _accepted(self, pool: str, request: GenerateRequest, tries: int = 2) -> AsyncIterator[Any]:
        """The replica's event stream once it has accepted the request (its Accepted consumed). A replica that
        fails before accepting (no replica, a dead one) is tried again, up to `tries` times in all."""
        for attempt in range(tries):
            events = self.pools[pool].generate(request)
            try:
                first = await anext(events)
            except Exception as exc:  # no replica, or one that died before answering
                await events.aclose()
                if attempt + 1 < tries:
                    log.warning("request %s: pool %s lost it before accepting (%s); retrying once",
                                request.request_id, pool, type(exc).__name__)  # fmt: skip
                    continue
                raise Unavailable(f"pool {pool!r} did not take the request: {exc}") from exc
            if not isinstance(first, Accepted):
                await events.aclose()
                if isinstance(first, Refusal):
                    raise first.error()
                raise Unavailable(f"pool {pool!r} answered {type(first).__name__} instead of accepting")
            return events
        raise AssertionError("unreachable")

    async def _chunks(
        self,
        events: AsyncIterator[Any],
        tier: str,
        protocol: str,
        started: float,
        grant: Grant | None = None,
        resend: Callable[[], Awaitable[AsyncIterator[Any]]] | None = None,
        prompt_tokens: int = 0,
        asked: Requested | None = None,
    ) -> AsyncIterator[Chunk]:
        """The engine's events as text, once for every protocol. Closing this (a client that went away)
        closes the replica's stream, which cancels the request in its engine. A key's grant is given back
        when the stream ends, with the tokens the request used. `resend`: where the replica is lost before
        anything was sent on, the request is sent again once (the client sees nothing of it). With stop strings
        asked for, the answer ends before the first one (finish "stop") and the request is cancelled in its
        engine."""
        detok = Detokenizer(self.tokenizer, skip_special_tokens=not (asked and asked.special_tokens))
        stops = StopStrings(asked.stop) if asked and asked.stop else None
        m, outcome, first = self.metrics, "cancelled", True  # cancelled: closed before its end (client gone)
        used = None
        sent: list[CanvasChunk] = []  # what a stop string's usage counts
        first_at: float | None = None
        try:
            async for e in self._resent_once(events, resend):
                if isinstance(e, CanvasEvent):
                    if first:
                        first_at = time.perf_counter() - started
                        m.time_to_first_canvas.labels(tier, protocol).observe(first_at)
                        first = False
                    before = detok.text
                    chunk = CanvasChunk(e.index, detok.add(e.tokens), e.tokens, e.steps, e.logprobs, e.top_logprobs)
                    if stops is None:
                        yield chunk
                        continue
                    held = stops.held
                    text, hit = stops.feed(chunk.text)
                    if not hit:
                        sent.append(replace(chunk, text=text))
                        yield sent[-1]
                        continue
                    n = detok.covering(e.tokens, len(text) - len(held), before)
                    lp, top = e.logprobs, e.top_logprobs
                    cut = CanvasChunk(e.index, text, e.tokens[:n], e.steps, lp and lp[:n], top and top[:n])
                    sent.append(cut)
                    yield cut
                    outcome = None
                    usage = self._stopped_usage(prompt_tokens, sent, first_at, time.perf_counter() - started)
                    used = self._count_done(tier, protocol, started, grant, usage, "ok")
                    yield DoneChunk("stop", usage)
                    return  # closing the replica's stream cancels the rest of the request
                elif isinstance(e, DraftEvent):
                    text = self.tokenizer.decode(e.tokens, skip_special_tokens=True)
                    yield DraftChunk(e.canvas_index, e.step, text, e.tokens)
                elif isinstance(e, FinalEvent):
                    outcome = None  # counted now: a caller may stop reading at the final chunk
                    done = "cancelled" if e.finish_reason == "cancelled" else "ok"
                    used = self._count_done(tier, protocol, started, grant, e.usage, done)
                    yield DoneChunk(e.finish_reason, e.usage, stops.release() if stops is not None else "")
                    return
                elif isinstance(e, ErrorEvent):
                    outcome = "failed"
                    raise EngineFailure(e.message)
            outcome = "failed"
        except EngineFailure:
            outcome = "failed"
            raise
        except Exception as exc:  # the replica died mid-stream, or the pool's transport failed
            outcome = "failed"
            raise ReplicaLost(f"the request's replica was lost: {type(exc).__name__}: {exc}") from exc
        finally:
            if outcome is not None:
                m.requests.labels(tier, protocol, outcome).inc()
                if grant is not None:
                    m.key_requests.labels(grant.key_id, outcome).inc()
            if grant is not None:
                grant.release(used)  # a no-op after the final event; else the whole reservation comes back
            await events.aclose()
        raise EngineFailure("the stream ended without a final event")

    def _count_done(
        self, tier: str, protocol: str, started: float, grant: Grant | None, usage: Usage, outcome: str
    ) -> int:
        """A request that reached its end: its outcome and latency counted, its key's grant given back with the
        tokens it used (returned)."""
        m = self.metrics
        m.requests.labels(tier, protocol, outcome).inc()
        m.latency.labels(tier, protocol).observe(time.perf_counter() - started)
        used = usage.prompt_tokens + usage.generated_tokens
        if grant is not None:
            grant.release(used)
            m.key_requests.labels(grant.key_id, outcome).inc()
            m.key_tokens.labels(grant.key_id).inc(used)
        return used

    @staticmethod
    def _stopped_usage(prompt_tokens: int, sent: list[CanvasChunk], first_at: float | None, total: float) -> Usage:
        """The usage of an answer a stop string ended: the tokens sent, the canvases they came from (the engine's
        own report never comes, as the request is cancelled; its queue time is not known here)."""
        return Usage(
            prompt_tokens=prompt_tokens,
            generated_tokens=sum(len(c.token_ids) for c in sent),
            canvases=len(sent),
            steps_per_canvas=[c.steps for c in sent],
            queue_time_s=None,
            time_to_first_canvas_s=first_at,
            total_time_s=total,
        )

    @staticmethod
    async def _resent_once(
        events: AsyncIterator[Any], resend: Callable[[], Awaitable[AsyncIterator[Any]]] | None
    ) -> AsyncIterator[Any]:
        """The replica's events; if its stream breaks before a canvas or draft came out of it (so before the
        client was sent any), the request's events from a second sending, once."""
        sent = False
        try:
            async for e in events:
                sent = sent or isinstance(e, (CanvasEvent, DraftEvent))
                yield e
            return
        except Exception as exc:
            if sent or resend is None:
                raise
            lost = type(exc).__name__
            log.warning("a replica was lost before the request's first canvas (%s); sending it again", lost)
        finally:
            await events.aclose()
        again = await resend()
        try:
            async for e in again:
                yield e
        finally:
            await again.aclose()

    # ---------------------------------------------------------------- the service

    def models(self) -> dict:
        """The model card of /v1/models, with the tiers."""
        tiers = {
            name: {"description": t.description, "pool": t.pool, **t.sampler.model_dump()}
            for name, t in self.config.tiers.items()
        }
        card = {"id": self.model_id, "object": "model", "created": self.started, "owned_by": "diffusiongemma-serve"}
        return {"object": "list", "data": [card | {"tiers": tiers, "default_tier": self.config.default_tier}]}

    async def ready(self) -> dict[str, dict]:
        """Every pool's batcher load; Unavailable when a pool does not answer, Draining (with the loads, so that a
        drain can watch them fall to zero) while draining."""
        loads = {}
        for name, pool in self.pools.items():
            try:
                loads[name] = await pool.load()
            except Exception as exc:
                raise Unavailable(f"pool {name!r} is not ready: {exc}") from exc
        if self.draining:
            raise Draining("draining", loads)
        return loads
