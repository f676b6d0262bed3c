"""HTTP over the front end: OpenAI-compatible /v1/completions and /v1/chat/completions, the native
/v1/generate, /v1/models, /health and /ready (docs/api.md has every field and status code).

`http_app(frontend)` builds the FastAPI app; under Serve the ingress builds it in its replica
(serving/ingress.py), and tests can call it in-process. A request's id is its `x-request-id` header: Serve's
proxy gives every HTTP request one (the client's, or a new UUID) and echoes it in the reply; outside Serve the
`RequestIds` middleware does the same, so the app itself never writes the header (under Serve it would then
appear twice). That id is the engine's. Errors are OpenAI-style JSON:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.auth import Unauthenticated
from serving.frontend import (
    Answer,
    CanvasChunk,
    DoneChunk,
    DraftChunk,
    Draining,
    EngineFailure,
    Frontend,
    Opened,
    ReplicaLost,
    Unavailable,
    new_request_id,
)
from serving.protocol import ChatBody, CompletionBody, Diffusion, GenerateBody, OpenAIOptions
from serving.request import InvalidRequest, Overloaded, Usage

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "service_unavailable",
}
OPENAI_FINISH = {"eos": "stop"}  # the engine's "length" and "cancelled" keep their names
log = logging.getLogger("ray.serve")


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


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    retry_after: float | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    headers = dict(headers or {})
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    kind = _ERROR_TYPES.get(status, "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def retryable(exc: EngineFailure) -> bool:
    """A lost replica (the request may be sent again), not an engine error."""
    return isinstance(exc, ReplicaLost)


def failure_type(exc: EngineFailure) -> str:
    return "service_unavailable" if retryable(exc) else "server_error"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def sse_stream(lines: AsyncIterator[dict], on_error: Callable[[EngineFailure], dict]) -> AsyncIterator[str]:
    """Server-sent events, then `[DONE]`; a failure after the headers went out is reported in-band."""
    try:
        async for obj in lines:
            yield sse(obj)
    except EngineFailure as exc:
        yield sse(on_error(exc))
    yield "data: [DONE]\n\n"


def openai_usage(u: Usage, tier: str) -> dict:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.generated_tokens,
        "total_tokens": u.prompt_tokens + u.generated_tokens,
        "canvases": u.canvases,
        "steps_per_canvas": u.steps_per_canvas,
        "tier": tier,
    }


def http_app(frontend: Frontend, assign_request_ids: bool = True) -> FastAPI:
    """assign_request_ids: False under Serve, whose proxy already gives requests their ids and echoes them."""
    app = FastAPI(title="diffusiongemma-serve")
    app.add_middleware(Gate, frontend=frontend, max_body_bytes=frontend.config.max_body_bytes)
    if assign_request_ids:
        app.add_middleware(RequestIds)  # added last: outermost, so refusals by the gate carry an id too

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (a body that is not JSON or not UTF-8, an unknown route or method) in the
        same error format as ours."""
        return error_response(exc.status_code, str(exc.detail), "body" if exc.status_code == 400 else None)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return error_response(400, f"{where}: {first.get('msg', 'invalid request')}", where)

    async def open_request(
        prompt: Callable[[], list[int]],
        body: Diffusion,
        request: Request,
        max_new_tokens: int | None,
        stream_drafts: bool,
    ) -> Opened | JSONResponse:
        """Tokenize and open; a refusal becomes its 400 / 429 / 503 before any byte is sent."""
        try:
            return await frontend.open(
                prompt(),
                body.controls(),
                header_tier=request.headers.get("x-tier"),
                max_new_tokens=max_new_tokens,
                stream_drafts=stream_drafts,
                request_id=request.headers.get("x-request-id"),
                protocol="http",
                key_id=getattr(request.state, "key_id", None),
            )
        except InvalidRequest as exc:
            return error_response(400, str(exc), exc.field)
        except Overloaded as exc:
            return error_response(429, str(exc), retry_after=exc.retry_after_s)
        except Unavailable as exc:
            return error_response(503, str(exc), retry_after=exc.retry_after_s)

    async def answer_or_error(opened: Opened) -> Answer | JSONResponse:
        try:
            return await opened.collect()
        except ReplicaLost as exc:  # retryable: the request may be sent again
            return error_response(503, str(exc), retry_after=1)
        except EngineFailure as exc:
            return error_response(500, str(exc))

    def streaming(lines: AsyncIterator[dict], on_error: Callable[[EngineFailure], dict]) -> StreamingResponse:
        return StreamingResponse(sse_stream(lines, on_error), media_type="text/event-stream")

    # ---------------------------------------------------------------- OpenAI

    async def openai(body: OpenAIOptions, prompt: Callable[[], list[int]], request: Request, chat: bool):
        field = body.unsupported()
        if field is not None:
            return error_response(400, f"{field}: not supported by this server", field)
        if body.model is not None and body.model != frontend.model_id:
            return error_response(
                400, f"model: unknown model {body.model!r}; this server has {frontend.model_id!r}", "model"
            )
        opened = await open_request(prompt, body, request, body.length(), False)
        if isinstance(opened, JSONResponse):
            return opened
        kind = "chat.completion" if chat else "text_completion"
        created = int(time.time())

        def choice(text: str, finish: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            content = {"role": "assistant", "content": text}
            return {"index": 0, ("delta" if delta else "message"): content, "finish_reason": finish}

        def reply(obj: str, text: str, finish: str | None, delta: bool) -> dict:
            return {
                "id": opened.request_id,
                "object": obj,
                "created": created,
                "model": frontend.model_id,
                "choices": [choice(text, finish, delta)],
            }

        if not body.stream:
            answer = await answer_or_error(opened)
            if isinstance(answer, JSONResponse):
                return answer
            finish = OPENAI_FINISH.get(answer.finish_reason, answer.finish_reason)
            full = reply(kind, answer.text, finish, delta=False) | {"usage": openai_usage(answer.usage, opened.tier)}
            return JSONResponse(full)

        chunk_kind = kind + ".chunk" if chat else kind

        async def lines() -> AsyncIterator[dict]:
            async for c in opened.chunks:
                if isinstance(c, CanvasChunk):
                    yield reply(chunk_kind, c.text, None, delta=True)
                elif isinstance(c, DoneChunk):
                    finish = OPENAI_FINISH.get(c.finish_reason, c.finish_reason)
                    yield reply(chunk_kind, "", finish, delta=True) | {"usage": openai_usage(c.usage, opened.tier)}

        return streaming(lines(), lambda exc: {"error": {"message": str(exc), "type": failure_type(exc)}})

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        def prompt() -> list[int]:  # token ids as they are, text without a chat template
            return body.prompt if isinstance(body.prompt, list) else frontend.raw_prompt(body.prompt)

        return await openai(body, prompt, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        messages = [m.model_dump() for m in body.messages]
        return await openai(body, lambda: frontend.chat_prompt(messages), request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict:
        return frontend.models()

    # ---------------------------------------------------------------- native

    @app.post("/v1/generate")
    async def generate(body: GenerateBody, request: Request):
        given = [k for k in ("text", "prompt", "token_ids") if getattr(body, k) is not None]
        if len(given) != 1:
            return error_response(400, "exactly one of text, prompt or token_ids is required", "text")
        if body.text is not None:
            prompt = lambda: frontend.user_prompt(body.text)
        elif body.prompt is not None:
            prompt = lambda: frontend.raw_prompt(body.prompt)
        else:
            prompt = lambda: body.token_ids
        opened = await open_request(prompt, body, request, body.max_new_tokens, body.stream_drafts)
        if isinstance(opened, JSONResponse):
            return opened
        if not body.stream:
            answer = await answer_or_error(opened)
            if isinstance(answer, JSONResponse):
                return answer
            reply = {
                "id": opened.request_id,
                "text": answer.text,
                "token_ids": answer.token_ids,
                "finish_reason": answer.finish_reason,
                "tier": opened.tier,
                "usage": asdict(answer.usage),
            }
            return reply

        async def lines() -> AsyncIterator[dict]:
            async for c in opened.chunks:
                if isinstance(c, CanvasChunk):
                    yield {"type": "canvas", **asdict(c)}
                elif isinstance(c, DraftChunk):
                    yield {"type": "draft", **asdict(c)}
                else:
                    yield {
                        "type": "final",
                        "id": opened.request_id,
                        "finish_reason": c.finish_reason,
                        "tier": opened.tier,
                        "usage": asdict(c.usage),
                    }

        return streaming(lines(), lambda exc: {"type": "error", "message": str(exc), "retryable": retryable(exc)})

    # ---------------------------------------------------------------- health

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


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "integer"},
            },
        }
    },
}
# one server-sent event: `data:` a JSON chunk (or `[DONE]`)
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
REFUSALS = {
    400: "invalid request: a bad body, field or value (`param` names it)",
    401: "API keys are configured and the request has no valid `Authorization: Bearer` key",
    413: "the body is over `max_body_bytes`",
    429: "overloaded (a full queue, a tier's share, the latency bound, a key's limits); `Retry-After` says when",
    500: "the request failed in the engine after it was accepted",
    503: "the pool cannot be reached, the request's replica was lost, or the service is draining; `Retry-After`",
}


def document(app: FastAPI) -> dict:
    """The OpenAPI document as FastAPI builds it, with what FastAPI cannot know: the /v1/ routes answer refusals
    in OpenAI's error format (400 for every invalid body, never FastAPI's 422; 401, 413; and on the generation
    routes 429, 500, 503), a generation route's 200 is JSON or, with `stream`, server-sent events, and /ready
    answers 503 when not ready or draining."""
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            responses = op["responses"]
            responses.pop("422", None)
            if path.startswith("/v1/"):
                codes = (400, 401, 413, 429, 500, 503) if method == "post" else (401, 413)
                responses |= {str(c): {"description": REFUSALS[c], "content": error} for c in codes}
                if method == "post":
                    responses["200"]["content"]["text/event-stream"] = {"schema": SSE_EVENT}
            elif path == "/ready":
                responses["503"] = {"description": "a pool does not answer, or the service is draining"}
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas["Error"] = ERROR_SCHEMA
    app.openapi_schema = doc
    return doc
