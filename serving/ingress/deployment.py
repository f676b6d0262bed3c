"""The ingress: HTTP and gRPC over one Frontend, as a plain class that serving/app.py makes a Serve deployment.

Serve builds the FastAPI app in the replica (`__serve_build_asgi_app__`, after `__init__`), and its gRPC
proxy calls the methods named like the RPCs. Pools are reached through DeploymentHandles; the step-aware
request router (serving/routing.py) picks the replica. Nothing here imports torch.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from fastapi import FastAPI
from ray.serve.handle import DeploymentHandle

from protos.diffusiongemma.v1 import diffusion_pb2 as pb
from serving.config import AppConfig
from serving.ingress.frontend import Frontend
from serving.ingress.grpc_server import DiffusionServicer, HealthService
from serving.ingress.http_server import http_app
from serving.ingress.pools import ServePool


class StreamFailed(RuntimeError):
    """A gRPC stream ended with an error code set on its context."""


class QuietStreamFailed(logging.Filter):
    """Serve logs every exception a replica method raises as "Request failed." with its traceback. StreamFailed
    is no failure of ours: it is how a stream's refusal (429, 400, 503 ...) reaches the client as a status code,
    and the access log line already shows the request. Without this, every refused gRPC stream wrote a
    traceback (and under overload formatting them cost the ingress CPU)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and (isinstance(exc, StreamFailed) or isinstance(exc.__cause__, StreamFailed)))


QUIET_STREAM_FAILED = QuietStreamFailed()  # one instance: adding it again is a no-op


class Ingress:
    def __init__(self, config: dict, pools: dict[str, DeploymentHandle]):
        logging.getLogger("ray.serve").addFilter(QUIET_STREAM_FAILED)
        self.frontend = Frontend(AppConfig(**config), {name: ServePool(h) for name, h in pools.items()})
        self.servicer = DiffusionServicer(self.frontend)
        self.health = HealthService(self.frontend)

    def reconfigure(self, user_config: dict) -> None:
        """Serve calls this on every ingress replica, in place, when the deployment's user_config changes:
        `{draining: true}` refuses new requests with 503 / UNAVAILABLE and lets those in flight finish
        (deploy/drain.py sets it before a shutdown)."""
        self.frontend.draining = bool(user_config.get("draining", False))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return http_app(self.frontend, assign_request_ids=False)  # Serve's proxy gives and echoes request ids

    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any = None) -> pb.GenerateResponse:
        return await self.servicer.Generate(request, grpc_context)

    async def Check(self, request: Any, grpc_context: Any = None) -> Any:
        """grpc.health.v1.Health/Check (Serve's proxy routes it here when deploy/*.yaml registers the service)."""
        return await self.health.Check(request, grpc_context)

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context: Any = None):
        async for chunk in self.servicer.GenerateStream(request, grpc_context):
            yield chunk
        # Serve's proxy copies the context's code onto the call only when a message is yielded: a stream that
        # failed before its first chunk (or after its last) would end OK and empty (or silently short). Raising
        # with the code set makes the proxy answer that code (the replica wraps it in gRPCStatusError).
        if grpc_context is not None and grpc_context.code() not in (None, grpc.StatusCode.OK):
            raise StreamFailed(grpc_context.details() or "the stream failed")
