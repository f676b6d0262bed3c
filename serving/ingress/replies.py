"""What every HTTP route answers with: OpenAI-style errors (`{"error": {"message", "type", "param", "code"}}`,
the status from serving/request.py's table), server-sent events, and what a route reads of the request's
headers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from serving.request import EngineFailure, InvalidRequest, ReplicaLost, reply_for, retry_after

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    retry_after_s: float | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    headers = dict(headers or {})
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(retry_after_s)))
    kind = ERROR_TYPES.get(status, "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_reply(exc: Exception) -> JSONResponse:
    """An error as its reply: the table's status, the field a bad request names, when to retry (a lost replica:
    at once, elsewhere)."""
    param = exc.field if isinstance(exc, InvalidRequest) else None
    wait = 1.0 if isinstance(exc, ReplicaLost) else retry_after(exc)
    return error_response(reply_for(exc).http, str(exc), param, wait)


def asked_of(request: Request) -> dict[str, Any]:
    """What a ClientRequest takes from the HTTP request itself: the `x-tier` and `x-request-id` headers."""
    return {"header_tier": request.headers.get("x-tier"), "request_id": request.headers.get("x-request-id")}


def key_of(request: Request) -> str | None:
    """The caller's key id, which the gate put on the request (None when no keys are configured)."""
    return getattr(request.state, "key_id", None)


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


def streaming(lines: AsyncIterator[dict], on_error: Callable[[EngineFailure], dict]) -> StreamingResponse:
    return StreamingResponse(sse_stream(lines, on_error), media_type="text/event-stream")
