"""`serve run deploy/config.yaml` with Ray's token authentication on (what a shared machine should run): the
service answers on both protocols, Ray's control plane (the dashboard and its Serve and Jobs APIs) refuses a
caller without the token while the liveness path the Kubernetes manifest probes answers without one, and the
project's own Ray clients (Serve's CLI, deploy/drain.py) work with it."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import grpc
import httpx
import pytest
import yaml

from deploy.rayservice import MANIFEST
from loadtest.serve_run import ROOT, ServeRun, shipped_config
from protos.diffusiongemma.v1 import diffusion_pb2 as pb
from protos.diffusiongemma.v1 import diffusion_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


def test_token_mode_closes_the_control_plane_and_serves_both_protocols(tmp_path, served):
    # Ray's dashboard agent listens on 52365 unless told otherwise, and `serve run` cannot tell it: the suite's
    # shared cluster must not hold that port while this one starts, or the agent reports port -1
    served.stop()
    token = secrets.token_hex(32)
    token_file = tmp_path / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    with ServeRun(tmp_path, env=env) as runs:
        app = runs.get(shipped_config())
        # the data plane: Serve's proxies, as clients call them
        chat = httpx.post(f"{app.http}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "reverse: a b c"}], "seed": 0})  # fmt: skip
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"].split() == ["c", "b", "a"]
        with grpc.insecure_channel(app.grpc_target) as channel:
            reply = pb_grpc.DiffusionServiceStub(channel).Generate(
                pb.GenerateRequest(text="reverse: p q r", tier="fast", seed=2), timeout=60
            )
        assert reply.text.split() == ["r", "q", "p"]

        # the control plane: nothing without the token
        dashboard = app.dashboard()
        for path in ("/api/serve/applications/", "/api/jobs/"):
            anon = httpx.get(f"{dashboard}{path}", timeout=30)
            assert anon.status_code in (401, 403), (path, anon.status_code, anon.text[:200])
            wrong = httpx.get(f"{dashboard}{path}", headers={"authorization": f"Bearer {'0' * 64}"}, timeout=30)
            assert wrong.status_code in (401, 403), (path, wrong.status_code)
        ok = httpx.get(f"{dashboard}/api/serve/applications/", headers={"authorization": f"Bearer {token}"},
                       timeout=30)  # fmt: skip
        assert ok.status_code == 200 and "diffusiongemma" in ok.json()["applications"]

        # Kubernetes' probes carry no token: the liveness path deploy/kuberay/rayservice.yaml gives the kubelet (on
        # the dashboard agent) answers without one, and says the raylet and the GCS are alive
        cluster = yaml.safe_load(MANIFEST.read_text())["spec"]["rayClusterConfig"]
        liveness = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]
        agent_port = app.session_port("dashboard_agent_listen")
        assert agent_port > 0, "the dashboard agent could not bind its port (another Ray cluster holds 52365?)"
        alive = httpx.get(f"http://127.0.0.1:{agent_port}{liveness['path']}", timeout=30)
        assert alive.status_code == 200 and "raylet: success" in alive.text and "gcs: success" in alive.text

        # the project's Ray clients, given the token by the environment as the README says
        client_env = os.environ | env
        status = subprocess.run([sys.executable, "-m", "ray.serve.scripts", "status", "-a", dashboard],
                                env=client_env, capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
        assert status.returncode == 0 and "RUNNING" in status.stdout, status.stderr[-2000:]
        config = tmp_path / "config.yaml"
        config.write_text(json.dumps(app.config))
        resumed = subprocess.run([sys.executable, "-m", "deploy.drain", str(config), "--dashboard", dashboard,
                                  "--resume"], env=client_env, capture_output=True, text=True, timeout=120,
                                 cwd=ROOT)  # fmt: skip
        assert resumed.returncode == 0 and json.loads(resumed.stdout.splitlines()[-1]) == {"draining": False}
        refused = subprocess.run([sys.executable, "-m", "ray.serve.scripts", "status", "-a", dashboard],
                                 env=os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 64},
                                 capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
        assert refused.returncode != 0
