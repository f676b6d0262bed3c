"""loadtest/locustfile.py run as documented (headless locust, bounded, loopback only): against `serve run
deploy/config.yaml` every user class answers without a failure; against a stub server, a 200 with an empty
answer fails the run and a 429 is counted as overload, not as an error."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
USERS = ("OpenAIChatUser", "OpenAICompletionUser", "NativeUser", "GrpcUser")


def locust(host: str, out: Path, *args: str, seconds: int = 15, users: int = 8) -> subprocess.CompletedProcess:
    """The README's headless command, with a small user count and run time; stops by itself."""
    cmd = [
        sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless",
        "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "30",
        "--host", host, "--csv", str(out), "--json-file", str(out), "--exit-code-on-error", "1", "--only-summary",
        *args,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120)


def rows(out: Path) -> dict[tuple[str, str], dict]:
    with open(f"{out}_stats.csv") as f:
        return {(r["Type"], r["Name"]): r for r in csv.DictReader(f) if r["Name"] != "Aggregated"}


@pytest.mark.slow
def test_every_user_class_runs_clean_against_serve_run(shipped_app, tmp_path):
    out = tmp_path / "locust"
    run = locust(shipped_app.http, out, "--grpc-host", shipped_app.grpc_target, *USERS, seconds=20)
    assert run.returncode == 0, run.stderr[-3000:] + Path(f"{out}_failures.csv").read_text()
    stats = rows(out)
    wanted = [
        ("POST", "/v1/chat/completions"), ("POST", "/v1/chat/completions stream"),
        ("POST", "/v1/completions"), ("POST", "/v1/completions stream"),
        ("POST", "/v1/generate"), ("POST", "/v1/generate stream"),
        ("grpc", "Generate"), ("grpc", "GenerateStream"),
        ("STREAM", "/v1/chat/completions first canvas"), ("STREAM", "GenerateStream first canvas"),
        ("STREAM", "/v1/generate total"),
    ]  # fmt: skip
    for key in wanted:
        assert key in stats and int(stats[key]["Request Count"]) > 0, (key, sorted(stats))
    assert all(int(r["Failure Count"]) == 0 for r in stats.values())
    # response_length is the answer's tokens: every answer had some
    assert float(stats[("grpc", "Generate")]["Average Content Size"]) > 0
    report = json.loads(Path(f"{out}.json").read_text())  # --json-file: the same rows, for dashboards and CI
    assert {(e["method"], e["name"]) for e in report} == set(stats)
    assert sum(e["num_failures"] for e in report) == 0


class Stub(BaseHTTPRequestHandler):
    """/v1/generate answering 429 to every other request and a 200 without text to the rest."""

    count = 0

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["content-length"]))
        Stub.count += 1
        if Stub.count % 2:
            status, body = 429, {"error": {"message": "overloaded", "type": "rate_limit_error", "code": 429}}
        else:
            usage = {"generated_tokens": 0}
            status, body = 200, {"id": "x", "text": "", "token_ids": [], "finish_reason": "eos", "usage": usage}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_empty_answers_fail_the_run_and_429_is_overload(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "stub"
        host = f"http://127.0.0.1:{server.server_address[1]}"
        run = locust(host, out, "NativeUser", seconds=3, users=2)
    finally:
        server.shutdown()
    assert run.returncode == 1, run.stderr[-2000:]
    stats = rows(out)
    overload = [r for (kind, _), r in stats.items() if kind == "OVERLOAD"]
    assert overload and all(int(r["Failure Count"]) == 0 for r in overload)
    failed = [r for (kind, _), r in stats.items() if kind == "POST"]
    assert failed and all(r["Failure Count"] == r["Request Count"] for r in failed)
    assert "no text" in Path(f"{out}_failures.csv").read_text()
