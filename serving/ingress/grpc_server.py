"""gRPC over the front end: `diffusiongemma.v1.DiffusionService` (protos/diffusiongemma/v1/diffusion.proto).

`DiffusionServicer(frontend)` serves a plain `grpc.aio` server as it is (tests run it so) and, through the
ingress, Serve's gRPC proxy (serving/ingress/deployment.py). Serve turns any exception into INTERNAL, so errors are set
on the context (code, details, trailers) and an empty message returned. `x-tier` and `x-request-id` may come
as metadata, and `authorization: Bearer <key>` where the app asks for API keys (serving/ingress/auth.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from pydantic import ValidationError

from protos.diffusiongemma.v1 import diffusion_pb2 as pb
from serving.ingress import structured
from serving.ingress.detokenize import CanvasChunk, DoneChunk, DraftChunk
from serving.ingress.frontend import ClientRequest, Frontend, Opened
from serving.ingress.protocol import MAX_FREE
from serving.ingress.stop import check_stops
from serving.request import Constraint, InvalidRequest, Unavailable, Usage, reply_for, retry_after
from serving.sampling import OVERRIDE_NAMES, SamplerOverrides


def usage_pb(u: Usage) -> pb.Usage:
    """The proto's Usage has the engine's fields; a time not known (no first canvas: a cancelled request; no
    queue time: one a stop string ended in the ingress) is 0 there."""
    unknown = {k: v or 0.0 for k, v in asdict(u).items() if k in ("time_to_first_canvas_s", "queue_time_s")}
    return pb.Usage(**(asdict(u) | unknown))


def overrides(req: pb.GenerateRequest) -> dict:
    """The request's sampler overrides, checked as the HTTP bodies are."""
    given = {f: getattr(req.sampler, f) for f in OVERRIDE_NAMES if req.sampler.HasField(f)}
    try:
        SamplerOverrides(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(name, first["msg"]) from exc
    return given


def constraint(req: pb.GenerateRequest) -> Constraint | None:
    """The message's structured outputs, converted as the HTTP bodies' are."""
    if not req.HasField("structured_outputs"):
        return None
    so = req.structured_outputs
    kind = so.WhichOneof("kind") or ""
    value = list(so.choice.values) if kind == "choice" else getattr(so, kind, None)
    return structured.structured_outputs_constraint(kind, value)


def set_error(context: Any, exc: Exception) -> None:
    """The error's code (serving/request.py's table) and message on the call, and when to retry where it says."""
    context.set_code(getattr(grpc.StatusCode, reply_for(exc).grpc))
    wait = retry_after(exc)
    if wait is not None:
        context.set_trailing_metadata([("retry-after-s", str(round(wait, 1)))])
    context.set_details(str(exc))


class DiffusionServicer:
    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    async def _open(self, req: pb.GenerateRequest, context: Any) -> Opened:
        metadata = dict(context.invocation_metadata() or ()) if context is not None else {}
        key_id = self.frontend.authenticate(metadata.get("authorization"), "grpc")  # before reading anything else
        return await self.frontend.open(self.client_request(req, metadata), protocol="grpc", key_id=key_id)

    def client_request(self, req: pb.GenerateRequest, metadata: dict) -> ClientRequest:
        """The message as the front end's request, once; `x-tier` and `x-request-id` may come as metadata."""
        kind = req.WhichOneof("input")
        if kind == "text":
            ids = self.frontend.user_prompt(req.text)
        elif kind == "raw_prompt":
            ids = self.frontend.raw_prompt(req.raw_prompt)
        elif kind == "token_ids":
            ids = list(req.token_ids.ids)
        else:
            raise InvalidRequest("input", "one of text, raw_prompt or token_ids is required")
        if req.max_new_tokens < 0:
            raise InvalidRequest("max_new_tokens", "must be >= 0 (0: the model's default)")
        seed = req.seed if req.HasField("seed") else None
        if seed is not None and seed >= 2**62:
            raise InvalidRequest("seed", "must be < 2**62")
        try:
            stops = check_stops(list(req.stop))
        except ValueError as exc:
            raise InvalidRequest("stop", str(exc)) from exc
        return ClientRequest(
            ids, tier=req.tier or None, header_tier=metadata.get("x-tier"), overrides=overrides(req), seed=seed,
            max_new_tokens=req.max_new_tokens or None, stream_drafts=req.stream_drafts,
            request_id=metadata.get("x-request-id"), template=self._template(req), stop=stops or [],
            constraint=constraint(req),
        )  # fmt: skip

    def _template(self, req: pb.GenerateRequest) -> list[int] | None:
        if not req.template:
            return None
        parts: list[str | int] = []
        for part in req.template:
            kind = part.WhichOneof("part")
            if kind == "text" and part.text:
                parts.append(part.text)
            elif kind == "free" and 1 <= part.free <= MAX_FREE:
                parts.append(part.free)
            else:
                raise InvalidRequest("template", f"each part is non-empty text or 1 to {MAX_FREE} free positions")
        return self.frontend.template_ids(parts)

    async def Generate(self, req: pb.GenerateRequest, context: Any = None) -> pb.GenerateResponse:
        try:
            opened = await self._open(req, context)
            answer = await opened.collect()
        except Exception as exc:
            set_error(context, exc)
            return pb.GenerateResponse()
        return pb.GenerateResponse(
            request_id=opened.request_id,
            tier=opened.tier,
            text=answer.text,
            token_ids=answer.token_ids,
            finish_reason=answer.finish_reason,
            usage=usage_pb(answer.usage),
        )

    async def GenerateStream(self, req: pb.GenerateRequest, context: Any = None) -> AsyncIterator[pb.GenerateChunk]:
        try:
            opened = await self._open(req, context)
            async for c in opened.chunks:
                if isinstance(c, CanvasChunk):
                    canvas = pb.Canvas(index=c.index, text=c.text, token_ids=c.token_ids, steps=c.steps)
                    yield pb.GenerateChunk(canvas=canvas)
                elif isinstance(c, DraftChunk):
                    draft = pb.Draft(canvas_index=c.canvas_index, step=c.step, text=c.text, token_ids=c.token_ids)
                    yield pb.GenerateChunk(draft=draft)
                elif isinstance(c, DoneChunk):
                    final = pb.Final(
                        request_id=opened.request_id,
                        tier=opened.tier,
                        finish_reason=c.finish_reason,
                        usage=usage_pb(c.usage),
                        text=c.text,
                    )
                    yield pb.GenerateChunk(final=final)
        except Exception as exc:
            set_error(context, exc)


class HealthService:
    """The standard `grpc.health.v1.Health/Check`, what Kubernetes gRPC probes, grpc_health_probe and load
    balancers call (they cannot call DiffusionService itself). service "" is the server: SERVING while the
    ingress answers (a liveness probe); service "diffusiongemma.v1.DiffusionService" is SERVING only when every
    pool answers a load query (a readiness probe), else NOT_SERVING; any other name is NOT_FOUND. Watch is not
    offered (UNIMPLEMENTED): probes only Check."""

    SERVICE = pb.DESCRIPTOR.services_by_name["DiffusionService"].full_name

    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    async def Check(self, req: health_pb2.HealthCheckRequest, context: Any = None) -> health_pb2.HealthCheckResponse:
        status = health_pb2.HealthCheckResponse
        if req.service == "":
            return status(status=status.SERVING)
        if req.service != self.SERVICE:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details(f"unknown service {req.service!r}; this server has {self.SERVICE!r}")
            return status()
        try:
            await self.frontend.ready()
        except Unavailable:
            return status(status=status.NOT_SERVING)
        return status(status=status.SERVING)

    async def Watch(self, req: health_pb2.HealthCheckRequest, context: Any = None):
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("Watch is not offered; call Check")
        return
        yield  # an async generator, as the streaming RPC expects
