"""`serve run` as users start it, for the benchmarks and tests that need the whole application: a real local Ray
started by the CLI, a config (deploy/config.yaml, or one derived from it) with free loopback ports in place of
8000 / 9000. One ServeRun holds at most one app (two Ray clusters on two cores would slow both): asking for
another config stops the running one first. Stopped by its PID (SIGINT: the CLI shuts Serve and its cluster
down), never by name."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent  # the CLI runs here, so the app's modules import
SHIPPED = ROOT / "deploy" / "config.yaml"


# Below the kernel's ephemeral range (32768 and up, where Ray's own servers and outgoing connections take ports
# while the cluster starts) and above Ray's worker ports (10002-19999): a port free now stays free until Serve
# binds it. One taken from the ephemeral range was once bound by a Ray process first.
PORT_RANGE = (20000, 32000)


def free_port() -> int:
    for _ in range(200):
        port = random.randint(*PORT_RANGE)
        try:
            with socket.socket(socket.AF_INET6) as s:  # [::] covers IPv4 too, as Serve's gRPC server binds
                s.bind(("::", port))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no free port in {PORT_RANGE}")


def shipped_config() -> dict:
    return yaml.safe_load(SHIPPED.read_text())


@dataclass
class App:
    http: str
    grpc_target: str
    log: Path
    config: dict
    ray_dir: Path  # the cluster's RAY_TMPDIR: its session files (ports, logs)

    def session_port(self, name: str) -> int:
        """A port the head node wrote to its session folder: gcs_server, metrics_export, dashboard_agent_listen."""
        (port_file,) = (self.ray_dir / "ray" / "session_latest").glob(f"{name}_port_*")
        return int(port_file.read_text().strip())

    def metrics(self) -> str:
        """One Prometheus scrape of the node's metrics port (Ray exports every process's metrics there)."""
        r = httpx.get(f"http://127.0.0.1:{self.session_port('metrics_export')}/metrics", timeout=30)
        r.raise_for_status()
        return r.text

    def gcs_address(self) -> str:
        """The cluster's GCS address, for Ray's state API (`ray.util.state.list_actors(address=...)`)."""
        return f"127.0.0.1:{self.session_port('gcs_server')}"

    def replica_pids(self, deployment: str) -> list[int]:
        """The PIDs of a deployment's live replica processes (`Pool-cpu`, `Ingress`), through Ray's state
        API: alive, which is not yet serving (a replica's process is alive while its model loads)."""
        from ray.util.state import list_actors

        actors = list_actors(address=self.gcs_address(), filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
        return sorted(a.pid for a in actors if a.class_name.endswith(f":{deployment}"))

    def dashboard(self) -> str:
        """The cluster's dashboard, where Serve's REST API answers (`serve deploy -a`, deploy/drain.py)."""
        log = (self.ray_dir / "ray" / "session_latest" / "logs" / "dashboard.log").read_text()
        return "http://" + re.search(r"Dashboard head http address: (\S+)", log).group(1)

    def running_replica_pids(self, deployment: str) -> list[int]:
        """The PIDs of a deployment's replicas that Serve reports RUNNING (serving requests), from Serve's REST
        API on the cluster's dashboard."""
        apps = httpx.get(f"{self.dashboard()}/api/serve/applications/", timeout=30).json()["applications"]
        replicas = [r for app in apps.values() for name, d in app["deployments"].items() if name == deployment
                    for r in d["replicas"]]  # fmt: skip
        return sorted(r["pid"] for r in replicas if r["state"] == "RUNNING")

    def load(self, pool: str = "cpu") -> dict:
        r = httpx.get(f"{self.http}/ready", timeout=30)
        r.raise_for_status()
        return r.json()["pools"][pool]


class ServeRun:
    def __init__(self, tmp: Path, env: dict[str, str] | None = None):
        self.tmp = tmp
        self.env = env or {}
        self.key: str | None = None
        self.proc: subprocess.Popen | None = None
        self.app: App | None = None

    def get(self, config: dict, ready_timeout_s: float = 240) -> App:
        key = json.dumps(config, sort_keys=True)
        if key == self.key and self.proc is not None and self.proc.poll() is None:
            return self.app
        self.stop()
        cfg = json.loads(key)
        http_port = free_port()
        grpc_port = free_port()
        while grpc_port == http_port:
            grpc_port = free_port()
        cfg["http_options"].update(host="127.0.0.1", port=http_port)
        cfg["grpc_options"]["port"] = grpc_port
        run = self.tmp / f"run{time.monotonic_ns()}"
        run.mkdir()
        path = run / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        log = run / "serve.log"
        # a short path of its own: Ray's socket paths must stay under 108 bytes
        ray_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        # RAY_ADDRESS=local: the CLI starts its own cluster even where another one runs on this machine
        env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local", "RAY_TMPDIR": str(ray_dir)}
        env |= self.env
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ray.serve.scripts", "run", str(path)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.key = key
        self.app = App(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log, cfg, ray_dir)
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve run exited with {self.proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.app.http}/ready", timeout=5).status_code == 200:
                    return self.app
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the app was not ready in {ready_timeout_s:.0f} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.app is not None:
            shutil.rmtree(self.app.ray_dir, ignore_errors=True)
        self.proc, self.key, self.app = None, None, None

    def __enter__(self) -> ServeRun:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
