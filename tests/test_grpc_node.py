"""A gRPC client in another language against `serve run deploy/config.yaml`: Node's @grpc/grpc-js loading
protos/diffusiongemma/v1/diffusion.proto at run time (tests/node/client.mjs), with deadlines and `x-tier`
metadata, as services that are not Python call this one."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "tests" / "node"
NODE, NPM = shutil.which("node"), shutil.which("npm")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NODE is None or NPM is None, reason="Node.js or npm is not installed here"),
]


@pytest.fixture(scope="module")
def node_client() -> Path:
    if not (CLIENT / "node_modules" / "@grpc" / "grpc-js").exists():  # the locked versions, from the npm registry
        subprocess.run([NPM, "ci", "--no-audit", "--no-fund"], cwd=CLIENT, check=True, timeout=300)
    return CLIENT / "client.mjs"


def test_a_node_client_calls_generate_and_generate_stream(shipped_app, node_client):
    proto = ROOT / "protos" / "diffusiongemma" / "v1" / "diffusion.proto"
    run = subprocess.run(
        [NODE, str(node_client), shipped_app.grpc_target, str(proto)],
        cwd=CLIENT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])

    unary = out["unary"]
    assert unary["code"] == "OK", unary
    assert unary["reply"]["text"].split() == ["d", "c", "b", "a"]
    assert unary["reply"]["tier"] == "fast"  # from the x-tier metadata
    assert unary["reply"]["request_id"] and unary["reply"]["usage"]["generated_tokens"] > 0

    stream = out["stream"]
    assert stream["code"] == "OK" and stream["text"] == unary["reply"]["text"]  # same seed, same answer
    assert stream["final"]["tier"] == "fast" and stream["final"]["usage"]["generated_tokens"] > 0

    assert out["bad_tier"]["code"] == "INVALID_ARGUMENT" and "tier" in out["bad_tier"]["details"]
    assert out["deadline"]["code"] == "DEADLINE_EXCEEDED"
