"""HTTP over the front end: OpenAI-compatible /v1/completions and /v1/chat/completions, the native
/v1/generate, /v1/models, /health and /ready (docs/api.md has every field and status code).

`http_app(frontend)` builds the FastAPI app; under Serve the ingress builds it in its replica
(serving/ingress/deployment.py), and tests can call it in-process. A request's id is its `x-request-id` header: Serve's
proxy gives every HTTP request one (the client's, or a new UUID) and echoes it in the reply; outside Serve the
`RequestIds` middleware does the same, so the app itself never writes the header (under Serve it would then
appear twice). That id is the engine's. Errors are OpenAI-style JSON:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.ingress.auth import Unauthenticated
from serving.ingress.chat_output import CALL_OPEN, ChatOutput, special_strings
from serving.ingress.frontend import (
    Answer,
    CanvasChunk,
    Chunk,
    Controls,
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
from serving.ingress.openai_format import (
    Choice,
    TokenText,
    chat_delta,
    chat_message,
    merge,
    openai_usage,
    summed_usage,
)
from serving.ingress.protocol import ChatBody, CompletionBody, GenerateBody, OpenAIOptions, StreamOptions
from serving.request import InvalidRequest, Overloaded

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "service_unavailable",
}
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


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, Chunk]]:
    """The chunks of several choices as they come, each with its choice; closing this closes them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for c in choice.opened.chunks:
                await queue.put((choice, c))
        except Exception as exc:
            await queue.put((choice, exc))
        await queue.put((choice, None))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        left = len(choices)
        while left:
            choice, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield choice, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in choices:
            await c.opened.chunks.aclose()


def http_app(frontend: Frontend, assign_request_ids: bool = True) -> FastAPI:
    """assign_request_ids: False under Serve, whose proxy already gives requests their ids and echoes them."""
    app = FastAPI(title="diffusiongemma-serve")
    specials = special_strings(frontend.tokenizer)
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
        controls: Controls,
        request: Request,
        max_new_tokens: int | None,
        stream_drafts: bool,
        *,
        request_id: str | None = None,
        logprobs: int | None = None,
        stop: list[str] | None = None,
        special_tokens: bool = False,
        template: list[int] | None = None,
    ) -> Opened | JSONResponse:
        """Tokenize and open; a refusal becomes its 400 / 429 / 503 before any byte is sent."""
        try:
            return await frontend.open(
                prompt(),
                controls,
                header_tier=request.headers.get("x-tier"),
                max_new_tokens=max_new_tokens,
                stream_drafts=stream_drafts,
                request_id=request_id or request.headers.get("x-request-id"),
                protocol="http",
                key_id=getattr(request.state, "key_id", None),
                logprobs=logprobs,
                stop=stop,
                special_tokens=special_tokens,
                template=template,
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
        """Both OpenAI routes: `n` choices, each its own engine request (seeds seed, seed+1, ... when a seed is
        given), opened together so that they share the batch; chat answers split into reasoning, content and
        tool calls."""
        field = body.unsupported()
        if field is not None:
            return error_response(400, f"{field}: not supported by this server", field)
        if body.model is not None and body.model != frontend.model_id:
            return error_response(
                400, f"model: unknown model {body.model!r}; this server has {frontend.model_id!r}", "model"
            )
        tools_on = chat and bool(body.tools) and body.tool_choice != "none"
        template = None
        if chat and body.tool_choice not in (None, "none", "auto"):
            forced = forced_call(body)
            if isinstance(forced, JSONResponse):
                return forced
            template = frontend.template_ids([forced])
        try:
            ids = prompt()
        except InvalidRequest as exc:
            return error_response(400, str(exc), exc.field)
        base_id = request.headers.get("x-request-id") or new_request_id()
        choices: list[Choice] = []
        for i in range(body.n):
            controls = body.controls()
            if controls.seed is not None:
                controls.seed = (controls.seed + i) % 2**62
            opened = await open_request(
                lambda: ids, controls, request, body.length(), False,
                request_id=base_id if i == 0 else f"{base_id}.{i}",
                logprobs=body.top_logprobs_asked(), stop=body.stop, special_tokens=chat, template=template,
            )  # fmt: skip
            if isinstance(opened, JSONResponse):
                for c in choices:
                    await c.opened.chunks.aclose()  # the choices already accepted are cancelled
                return opened
            output = ChatOutput(specials, tools_on) if chat else None
            choices.append(Choice(i, opened, output))
        tier = choices[0].opened.tier
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + base_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": frontend.model_id,
            "system_fingerprint": frontend.fingerprint,
        }
        words = TokenText(frontend.tokenizer)
        if not body.stream:
            return await whole_answer(choices, head, chat, words, tier)

        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        options = body.stream_options or StreamOptions()

        def chunk(choice: Choice, delta: dict, c: CanvasChunk | None, finish: str | None) -> dict:
            if chat:
                entry = {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": finish}
                if c is not None and c.logprobs is not None:
                    entry["logprobs"] = {"content": words.chat(c.token_ids, c.logprobs, c.top_logprobs)}
            else:
                entry = {"index": choice.index, "text": delta.get("content", ""), "logprobs": None}
                entry["finish_reason"] = finish
                if c is not None and c.logprobs is not None:
                    entry["logprobs"] = words.completion(c.token_ids, c.logprobs, c.top_logprobs, choice.text_sent)
                choice.text_sent += len(entry["text"])
            out = head | {"choices": [entry]}
            if options.include_usage:
                out["usage"] = None
                if options.continuous_usage_stats:
                    done = sum(x.tokens for x in choices)
                    out["usage"] = openai_usage(None, tier, len(ids), done)
            return out

        async def lines() -> AsyncIterator[dict]:
            if chat:  # the role first, once per choice, as OpenAI streams it
                for choice in choices:
                    yield chunk(choice, {"role": "assistant", "content": ""}, None, None)
            stream = merged(choices)
            try:
                async for choice, c in stream:
                    if isinstance(c, CanvasChunk):
                        choice.tokens += len(c.token_ids)
                        delta = chat_delta(choice, choice.output.feed(c.text)) if chat else {"content": c.text}
                        if delta or c.logprobs:
                            yield chunk(choice, delta, c, None)
                    elif isinstance(c, DoneChunk):
                        choice.usage = c.usage
                        if chat:
                            rest = merge(choice.output.feed(c.text), choice.output.finish())
                            delta = chat_delta(choice, rest)
                        else:
                            delta = {"content": c.text} if c.text else {}
                        yield chunk(choice, delta, None, choice.finish_reason(c.finish_reason))
            finally:
                await stream.aclose()  # a client gone: every choice's request is cancelled
            if options.include_usage:
                yield head | {"choices": [], "usage": summed_usage([c.usage for c in choices], tier)}

        return streaming(lines(), lambda exc: {"error": {"message": str(exc), "type": failure_type(exc)}})

    def forced_call(body: ChatBody) -> str | JSONResponse:
        """tool_choice "required" or a named function: the answer's canvas starts with the call's fixed opening
        (a canvas template), `<|tool_call>call:` and, for a named one, its name and brace; the model writes the
        rest."""
        if CALL_OPEN not in specials:
            return error_response(400, "tool_choice: this model has no tool-call token", "tool_choice")
        names = [t.function.name for t in body.tools or ()]
        if not names:
            return error_response(400, "tool_choice: a call is required but no tools are given", "tool_choice")
        if body.tool_choice == "required":
            return CALL_OPEN + "call:" + (names[0] + "{" if len(names) == 1 else "")
        name = body.tool_choice.function["name"]
        if name not in names:
            return error_response(400, f"tool_choice: no tool named {name[:64]!r} in tools", "tool_choice")
        return CALL_OPEN + "call:" + name + "{"

    async def whole_answer(choices: list[Choice], head: dict, chat: bool, words: TokenText, tier: str):
        """The non-streaming reply: every choice's whole answer (the first failure is the reply instead)."""
        answers = await asyncio.gather(*(answer_or_error(c.opened) for c in choices))
        failed = next((a for a in answers if isinstance(a, JSONResponse)), None)
        if failed is not None:
            return failed
        entries = []
        for choice, answer in zip(choices, answers):
            entry: dict[str, Any] = {"index": choice.index}
            lp = (answer.token_ids, answer.logprobs, answer.top_logprobs) if answer.logprobs is not None else None
            if chat:
                entry["message"] = chat_message(choice, answer.text)
                entry["logprobs"] = {"content": words.chat(*lp)} if lp else None
            else:
                entry["text"] = answer.text
                entry["logprobs"] = words.completion(*lp) if lp else None
            entry["finish_reason"] = choice.finish_reason(answer.finish_reason)
            entries.append(entry)
        usage = summed_usage([a.usage for a in answers], tier)
        return JSONResponse(head | {"choices": entries, "usage": usage})

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        def prompt() -> list[int]:  # token ids as they are, text without a chat template
            return body.prompt if isinstance(body.prompt, list) else frontend.raw_prompt(body.prompt)

        return await openai(body, prompt, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        messages = [m.template_message() for m in body.messages]
        called = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls", ())}
        for m in messages:  # a tool message names the function it answers, as chat templates read it
            if m["role"] == "tool" and "name" not in m and m["tool_call_id"] in called:
                m["name"] = called[m["tool_call_id"]]
        tools = [t.model_dump(exclude_none=True) for t in body.tools or ()] if body.tool_choice != "none" else None

        def prompt() -> list[int]:
            return frontend.chat_prompt(messages, tools, body.chat_template_kwargs)

        return await openai(body, prompt, request, chat=True)

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
        try:
            template = frontend.template_ids(body.template) if body.template else None
        except InvalidRequest as exc:
            return error_response(400, str(exc), exc.field)
        opened = await open_request(
            prompt, body.controls(), request, body.max_new_tokens, body.stream_drafts,
            logprobs=body.top_logprobs, stop=body.stop, template=template,
        )  # fmt: skip
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
            if body.top_logprobs is not None:
                reply |= {"logprobs": answer.logprobs, "top_logprobs": answer.top_logprobs}
            return reply

        async def lines() -> AsyncIterator[dict]:
            async for c in opened.chunks:
                if isinstance(c, CanvasChunk):
                    fields = asdict(c)
                    if body.top_logprobs is None:
                        del fields["logprobs"], fields["top_logprobs"]
                    yield {"type": "canvas", **fields}
                elif isinstance(c, DraftChunk):
                    yield {"type": "draft", **asdict(c)}
                else:
                    yield {
                        "type": "final",
                        "id": opened.request_id,
                        "finish_reason": c.finish_reason,
                        "tier": opened.tier,
                        "usage": asdict(c.usage),
                        "text": c.text,  # with stop strings: the end of the text, held back in case it began one
                    }

        return streaming(lines(), lambda exc: {"type": "error", "message": str(exc), "retryable": retryable(exc)})

    # ---------------------------------------------------------------- health

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
