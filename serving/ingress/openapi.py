"""The HTTP app's OpenAPI document: what FastAPI builds, with the refusals and streams it cannot know."""

from __future__ import annotations

from fastapi import FastAPI

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
