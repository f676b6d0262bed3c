"""The transport-free front end: what HTTP and gRPC share between a decoded body and a replica's stream.

    frontend = Frontend(config, pools)                     # pools: pool name -> PoolClient (serving/ingress/pools.py)
    ids = frontend.chat_prompt(messages)                    # or user_prompt(text), raw_prompt(text), token ids
    opened = await frontend.open(ClientRequest(ids, tier="fast", seed=0), protocol="http")
    async for chunk in opened.chunks: ...                   # CanvasChunk / DraftChunk ..., then one DoneChunk
    answer = await opened.collect()                         # or the whole answer at once

A handler turns its body into one ClientRequest; `open` picks the tier (the body's, then the header's, then the
default), resolves the sampler settings within the tier's limits, names the request (the id the engine, the logs
and the client all see), makes it the engine's GenerateRequest, sends it to a replica of the tier's pool and
waits until it is accepted, so that a refusal is an error before any reply starts. The replica's events come
back as text (serving/ingress/detokenize.py), counted in the metrics and against the caller's key.

Errors (serving/request.py's table maps each to its replies): InvalidRequest, Overloaded, Unavailable and
Draining from `open`; EngineFailure from the chunks when the request failed in the engine or its stream ended
without a final event, ReplicaLost (retryable) when its replica went away after the client was sent part of the
answer (before that it is sent again, unseen: serving/ingress/pools.py). Imports neither torch nor Ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError
from prometheus_client import CollectorRegistry

from model.chat import chat_ids, prompt_ids, text_ids
from model.checkpoint import read_checkpoint
from serving.config import AppConfig
from serving.ingress.auth import Grant, KeyGate
from serving.ingress.detokenize import CanvasChunk, Chunk, DoneChunk, TextStream
from serving.ingress.pools import PoolClient, resent_once, send
from serving.metrics import frontend_metrics
from serving.request import (
    Constraint,
    Draining,
    EngineFailure,
    GenerateRequest,
    InvalidRequest,
    Overloaded,
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


@dataclass
class ClientRequest:
    """A request as a client sent it, on any protocol, once its body is read: the prompt's ids and what it asks
    for. `open` resolves it (tier, settings, id, length) into the engine's GenerateRequest."""

    prompt: list[int]
    tier: str | None = None  # the body's tier; else `header_tier` (x-tier); else the deployment's default
    header_tier: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # sampler field -> value (None: the tier's)
    seed: int | None = None
    max_new_tokens: int | None = None  # None: the deployment's default
    constraint: Constraint | None = None  # structured outputs: what the answer must match
    stream_drafts: bool = False
    request_id: str | None = None  # None: a new one
    logprobs: int | None = None  # None: none; k: each committed token's and its top k alternatives'
    template: list[int] | None = None  # the answer's fixed tokens, -1 where the sampler fills
    stop: list[str] = field(default_factory=list)  # strings that end the answer (serving/ingress/stop.py)
    special_tokens: bool = False  # the text keeps them (a chat answer's channel and tool-call markers)

    @property
    def tier_name(self) -> str | None:
        return self.tier or self.header_tier


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
        # Set on every ingress replica at once through Serve's user_config (deploy/drain.py): new requests are
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
        kwargs = self._template_kwargs(template_kwargs)
        try:
            return chat_ids(self.tokenizer, messages, tools, kwargs)
        except TemplateError as exc:  # the template's own refusal (raise_exception), or a message it cannot read
            raise InvalidRequest("messages", f"the chat template refused them: {exc}") from exc

    def thinking(self, template_kwargs: dict | None) -> bool:
        """Whether a chat prompt with these template kwargs asks the model to think first."""
        return bool(self._template_kwargs(template_kwargs)["enable_thinking"])

    def _template_kwargs(self, given: dict | None) -> dict:
        return {"enable_thinking": self.config.thinking} | (given or {})

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

    async def open(self, asked: ClientRequest, protocol: str = "http", key_id: str | None = None) -> Opened:
        """Send the request to a replica of its tier's pool and wait until it is accepted (slot or queue
        place). Refusals raise here, before any reply is started; `protocol` labels the metrics; `key_id` (from
        `authenticate`) is charged against its key's limits."""
        started = time.perf_counter()
        name = asked.tier_name or self.config.default_tier
        try:
            if self.draining:
                raise Draining("the service is draining for a restart; send the request again")
            return await self._open(self.engine_request(asked, name), protocol, started, key_id, asked)
        except (InvalidRequest, Overloaded, Unavailable) as exc:
            self._refused(name, protocol, exc, key_id)
            raise

    def engine_request(self, asked: ClientRequest, name: str) -> GenerateRequest:
        """The engine's request for what a client asked, in tier `name`; InvalidRequest naming the field where it
        cannot be (an empty prompt or ids outside the vocabulary: the engine refuses them, field "prompt")."""
        tier = self.config.tiers.get(name)
        if tier is None:
            shown = name if len(name) <= 64 else name[:64] + "..."  # a client's string, not echoed whole
            raise InvalidRequest("tier", f"unknown tier {shown!r}; tiers: {sorted(self.config.tiers)}")
        if len(asked.prompt) > self.config.max_prompt_tokens:
            limit = self.config.max_prompt_tokens
            raise InvalidRequest("prompt", f"{len(asked.prompt)} tokens; the limit is {limit}")
        request_id = asked.request_id or new_request_id()
        if not REQUEST_ID.fullmatch(request_id):
            raise InvalidRequest("x-request-id", "must be 1-128 characters of letters, digits and . _ : -")
        return GenerateRequest(
            prompt=list(asked.prompt),
            max_new_tokens=asked.max_new_tokens or self.max_new_default,
            settings=tier.resolve(name, asked.overrides),
            seed=asked.seed,  # None: drawn now, so a resend is the same request
            stream_drafts=asked.stream_drafts,
            request_id=request_id,
            tier=name,
            logprobs=asked.logprobs,
            template=asked.template,
            constraint=asked.constraint,
        )

    def _refused(self, tier: str, protocol: str, exc: Exception, key_id: str | None) -> None:
        reply = reply_for(exc)
        outcome, reason = reply.outcome, exc.field if isinstance(exc, InvalidRequest) else reply.reason
        label = tier if tier in self.config.tiers else "unknown"  # a client's string is no metric label
        self.metrics.requests.labels(label, protocol, outcome).inc()
        self.metrics.refusals.labels(protocol, reason).inc()
        if key_id is not None:
            self.metrics.key_requests.labels(key_id, outcome).inc()

    async def _open(
        self, request: GenerateRequest, protocol: str, started: float, key_id: str | None, asked: ClientRequest
    ) -> Opened:
        pool_name = self.config.tiers[request.tier].pool
        pool = self.pools[pool_name]
        tokens = len(request.prompt) + request.max_new_tokens
        grant = None if key_id is None else self.gate.admit(key_id, tokens)
        try:
            events = await send(pool, pool_name, request)
        except Exception:
            if grant is not None:
                grant.release()
            raise
        if request.constraint is not None:
            self.metrics.structured.labels(request.tier, request.constraint.kind).inc()
        events = resent_once(events, lambda: send(pool, pool_name, request, tries=1))
        text = TextStream(self.tokenizer, asked.stop, asked.special_tokens, len(request.prompt), started)
        chunks = self._accounted(text.chunks(events), request.tier, protocol, started, grant)
        return Opened(request.request_id, request.tier, len(request.prompt), chunks)

    async def _accounted(
        self, chunks: AsyncIterator[Chunk], tier: str, protocol: str, started: float, grant: Grant | None
    ) -> AsyncIterator[Chunk]:
        """The chunks, counted: the first canvas's time, the outcome, the latency, the key's tokens (its grant
        given back when the stream ends, with the tokens used). Closing this (a client that went away) closes
        the replica's stream, which cancels the request in its engine."""
        m, outcome, first, used = self.metrics, "cancelled", True, None  # cancelled: closed before its end
        try:
            async for chunk in chunks:
                if first and isinstance(chunk, CanvasChunk):
                    m.time_to_first_canvas.labels(tier, protocol).observe(time.perf_counter() - started)
                    first = False
                if isinstance(chunk, DoneChunk):  # counted now: a caller may stop reading at the final chunk
                    outcome = None
                    done = "cancelled" if chunk.finish_reason == "cancelled" else "ok"
                    used = self._count_done(tier, protocol, started, grant, chunk.usage, done)
                yield chunk
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
            await chunks.aclose()

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
