"""HTTP over the front end: OpenAI-compatible /v1/completions and /v1/chat/completions, the native
/v1/generate, /v1/models, /health and /ready (docs/api.md has every field and status code).

`http_app(frontend)` builds the FastAPI app: the gate (keys, body size), then routes of a few lines over the
OpenAI handler (serving/ingress/openai.py) and the native one (native.py). Under Serve the ingress builds it in
its replica (serving/ingress/deployment.py), and tests can call it in-process. A request's id is its
`x-request-id` header: Serve's proxy gives every HTTP request one (the client's, or a new UUID) and echoes it
in the reply; outside Serve the `RequestIds` middleware does the same, so the app itself never writes the
header (under Serve it would then appear twice). That id is the engine's. Errors are OpenAI-style JSON
(serving/ingress/replies.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.ingress.frontend import Frontend, new_request_id
from serving.ingress.native import NativeHandler
from serving.ingress.openai import OpenAIHandler
from serving.ingress.openapi import document
from serving.ingress.protocol import ChatBody, CompletionBody, GenerateBody
from serving.ingress.replies import error_response
from serving.request import Draining, Unauthenticated, Unavailable

log = logging.getLogger("ray.serve")
PLAYGROUND = Path(__file__).resolve().parent / "playground" / "index.html"


class RequestIds:
    """Outside Serve, what its proxy does for every HTTP request: one without an `x-request-id` gets a new one,
    and the reply carries it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = MutableHeaders(scope=scope)
        request_id = headers.get("x-request-id") or new_request_id()
        headers["x-request-id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


class Gate:
    """Before any route reads a body: an API key for every /v1/ route where the app asks for keys (401 with
    `WWW-Authenticate: Bearer` otherwise; the key id goes to the route in `request.state.key_id`), and a body
    size limit (413), read at most that far. /health, /ready and the API documents stay open."""

    def __init__(self, app: ASGIApp, frontend: Frontend, max_body_bytes: int):
        self.app = app
        self.frontend = frontend
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        try:
            key_id = self.frontend.authenticate(headers.get("authorization"), "http")
        except Unauthenticated as exc:
            reply = error_response(401, str(exc), "authorization", headers={"WWW-Authenticate": "Bearer"})
            return await reply(scope, receive, send)
        scope.setdefault("state", {})["key_id"] = key_id

        async def too_large() -> None:
            self.frontend.metrics.refusals.labels("http", "body_too_large").inc()
            reply = error_response(413, f"the request body is over {self.max_body_bytes} bytes", "body")
            await reply(scope, receive, send)

        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await too_large()
        body, more = b"", True
        while more:  # the body, whole, up to the limit (bodies here are prompts: kilobytes)
            message = await received(receive)
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await too_large()
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await received(receive)  # after the body: the client's disconnect, when it comes

        await self.app(scope, replay, send)


async def received(receive: Receive) -> Message:
    """The next ASGI message; a receive that fails is the client gone. Under Serve the replica's receive raises
    where the client left (TaskCancelledError: the proxy cancelled its call; ActorDiedError: the proxy itself
    went away) instead of giving `http.disconnect`, and left unhandled that became a traceback in the log for
    every ordinary disconnect. As a disconnect, the response stops and the request is cancelled; Serve's proxy
    logs the one line ("Client for request ... disconnected")."""
    try:
        return await receive()
    except Exception as exc:
        log.debug("receive failed (%s): the client is gone", type(exc).__name__)
        return {"type": "http.disconnect"}


def http_app(frontend: Frontend, assign_request_ids: bool = True) -> FastAPI:
    """assign_request_ids: False under Serve, whose proxy already gives requests their ids and echoes them."""
    app = FastAPI(title="diffusiongemma-serve")
    app.add_middleware(Gate, frontend=frontend, max_body_bytes=frontend.config.max_body_bytes)
    if assign_request_ids:
        app.add_middleware(RequestIds)  # added last: outermost, so refusals by the gate carry an id too
    app.add_exception_handler(StarletteHTTPException, starlette_refusal)
    app.add_exception_handler(RequestValidationError, bad_body)
    openai, native = OpenAIHandler(frontend), NativeHandler(frontend)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        return await openai.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        return await openai.chat(body, request)

    @app.post("/v1/generate")
    async def generate(body: GenerateBody, request: Request):
        return await native.generate(body, request)

    @app.get("/v1/models")
    async def models() -> dict:
        return frontend.models()

    @app.get("/playground", include_in_schema=False)
    async def playground() -> HTMLResponse:
        """A page that streams one request's drafts: the canvas denoising live (serving/ingress/playground/)."""
        return HTMLResponse(PLAYGROUND.read_text())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Ready when every pool answers a load query; shows each pool's batcher load (also while draining)."""
        try:
            return {"status": "ready", "pools": await frontend.ready()}
        except Draining as exc:
            return JSONResponse({"status": "draining", "pools": exc.loads}, status_code=503)
        except Unavailable as exc:
            return error_response(503, str(exc))

    app.openapi = lambda: app.openapi_schema or document(app)
    return app


async def starlette_refusal(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (a body that is not JSON or not UTF-8, an unknown route or method) in the same
    error format as ours."""
    return error_response(exc.status_code, str(exc.detail), "body" if exc.status_code == 400 else None)


async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body its model refuses: 400 naming the field (never FastAPI's 422)."""
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return error_response(400, f"{where}: {first.get('msg', 'invalid request')}", where)
