"""Schemathesis against the app's own OpenAPI document: requests generated from it (valid ones and, from its
negative mode, ones that break it) for every route, sent over loopback to the HTTP app served by uvicorn over a
real engine on the embedded model. No answer is a 5xx, and every answer conforms to the document (status
codes, content types, bodies) where the document says."""

from __future__ import annotations

import live
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from test_frontend import ARGS

from serving.config import AppConfig

pytestmark = pytest.mark.slow

EXAMPLES = 100  # per route and mode
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def live_http():
    with live.live_http(AppConfig(**(ARGS | {"max_body_bytes": 64 * 1024}))) as (url, _):
        yield url


@pytest.fixture(scope="module")
def api(live_http):
    return schemathesis.openapi.from_url(f"{live_http}/openapi.json")


def operations(api) -> list:
    return [result.ok() for result in api.get_all_operations()]


def run_operation(op, mode: GenerationMode, seen: dict[str, set[int]]) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=op.as_strategy(generation_mode=mode))
    def check(case):
        response = case.call(timeout=60)
        seen.setdefault(op.label, set()).add(response.status_code)
        extra = [negative_data_rejection] if mode is GenerationMode.NEGATIVE else []
        case.validate_response(response, checks=CHECKS + extra)

    check()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_route_answers_as_its_openapi_document_says(api, mode):
    """Each operation's cases, generated from the document (negative: bodies that break it, for the routes that
    take one), called over loopback: no 5xx, and the status code, content type and body are ones the document
    gives for that route."""
    ops = operations(api)
    if mode is GenerationMode.NEGATIVE:
        ops = [op for op in ops if op.method.upper() == "POST"]  # a GET here takes nothing that could be broken
    assert len(ops) >= 3
    seen: dict[str, set[int]] = {}
    for op in ops:
        run_operation(op, mode, seen)
    print({label: sorted(codes) for label, codes in seen.items()})
    assert len(seen) == len(ops)
    if mode is GenerationMode.NEGATIVE:
        assert all(400 in codes for codes in seen.values()), seen  # broken bodies were refused, not answered


def test_the_document_names_every_route(live_http):
    import httpx

    doc = httpx.get(f"{live_http}/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/generate", "/v1/models", "/health", "/ready"} <= set(
        doc["paths"]
    )
    assert yaml.safe_dump(doc)  # a plain document, nothing unserializable
