"""How the ingress reaches a pool's replicas, and the once-only resend.

A pool client sends a GenerateRequest and gives back the replica's stream: `Accepted` or a `Refusal` first,
then the engine's events. `send` waits for the acceptance, so that a refusal is an error before any reply starts,
and tries a second time where the pool lost the request before accepting it (no replica, one that died).
`resent_once`: a request is idempotent until the client has been sent a canvas or a draft, so a replica lost
before that (after accepting, before its first canvas) is sent the request again, once, and the client sees
nothing of it. Nothing here imports torch, and Ray only through the handle a ServePool is given.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from serving.request import Accepted, CanvasEvent, DraftEvent, GenerateRequest, Refusal, Unavailable

log = logging.getLogger("ray.serve")


class PoolClient(Protocol):
    """The replicas of one pool: a ServePool (through Serve) or a LocalPool (one replica object in this process)."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[Any]: ...

    async def load(self) -> dict: ...


class ServePool:
    """A pool's deployment, reached through its handle (streaming); the step-aware request router
    (serving/routing.py) picks the replica."""

    def __init__(self, handle: Any):  # a ray.serve DeploymentHandle
        self.handle = handle

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Any]:
        gen = self.handle.options(stream=True).generate.remote(request)
        try:
            async for item in gen:
                yield item
        finally:
            gen.cancel()  # a no-op when finished; a disconnect or deadline frees the slot in the engine

    async def load(self) -> dict:
        return await self.handle.load.remote()


class LocalPool:
    """One PoolReplica in this process, as a pool: for tests and in-process benchmarks (no Ray)."""

    def __init__(self, server: Any):
        self.server = server

    def generate(self, request: GenerateRequest) -> AsyncIterator[Any]:
        return self.server.generate(copy.deepcopy(request))  # as Ray would send it: the engine's own copy

    async def load(self) -> dict:
        return self.server.load()


async def send(pool: PoolClient, name: str, request: GenerateRequest, tries: int = 2) -> AsyncIterator[Any]:
    """The replica's event stream once it has accepted the request (its Accepted consumed). A replica that fails
    before accepting is tried again, up to `tries` times in all; a refusal raises its error."""
    for attempt in range(tries):
        events = pool.generate(request)
        try:
            first = await anext(events)
        except Exception as exc:  # no replica, or one that died before answering
            await events.aclose()
            if attempt + 1 < tries:
                log.warning("request %s: pool %s lost it before accepting (%s); retrying once",
                            request.request_id, name, type(exc).__name__)  # fmt: skip
                continue
            raise Unavailable(f"pool {name!r} did not take the request: {exc}") from exc
        if not isinstance(first, Accepted):
            await events.aclose()
            if isinstance(first, Refusal):
                raise first.error()
            raise Unavailable(f"pool {name!r} answered {type(first).__name__} instead of accepting")
        return events
    raise AssertionError("unreachable")


async def resent_once(
    events: AsyncIterator[Any], resend: Callable[[], Awaitable[AsyncIterator[Any]]]
) -> AsyncIterator[Any]:
    """The replica's events; if its stream breaks before a canvas or draft came out of it (so before the client
    was sent any), the request's events from a second sending, once."""
    sent = False
    try:
        async for e in events:
            sent = sent or isinstance(e, (CanvasEvent, DraftEvent))
            yield e
        return
    except Exception as exc:
        if sent:
            raise
        log.warning("a replica was lost before the request's first canvas (%s); sending it again", type(exc).__name__)
    finally:
        await events.aclose()
    again = await resend()
    try:
        async for e in again:
            yield e
    finally:
        await again.aclose()
