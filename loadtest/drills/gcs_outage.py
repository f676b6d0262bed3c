"""The head may die: the GCS killed by its PID under load, on a local Ray cluster with GCS fault tolerance on Redis.

    python -m loadtest.drills.gcs_outage [--outage-s 10] [--rate 5]     # needs redis-server (Debian's package)

What KubeRay's `gcsFaultToleranceOptions` gives a RayService (deploy/kuberay/README.md), shown on one machine. A
Redis server is started on a free loopback port and a two-node Ray cluster (Ray's own cluster_utils: two raylets)
with `RAY_REDIS_ADDRESS` pointing at it, laid out as rayservice.yaml lays out pods: a head with no CPUs for
replicas (the GCS, Serve's controller, the dashboard) and a worker node. deploy/config.yaml's application is
deployed as KubeRay deploys serveConfigV2, through the dashboard's REST API, with the ingress overridden as
deploy/gpu.yaml overrides it (one CPU, so never on the head). A client sends `/v1/generate` requests at `--rate`
per second through the worker node's Serve proxy (its own port: Serve's RAY_SERVE_WORKER_PROXY_HTTP_PORT, since
two proxies on one machine cannot share one); the GCS process is killed with SIGKILL by its PID, left dead for
`--outage-s`, and started again (KubeRay restarts the head's container; here Ray's node API starts the GCS).
The worker's proxy and replicas hold their actor handles and keep answering meanwhile; the restarted GCS reads
its tables back from Redis, and Serve's state (the application, RUNNING) is there again.

The last line printed is one JSON object: requests sent before, during and after the outage, answered and failed,
the GCS PID killed, where the proxy and replicas ran, and the application's status after the restart. Everything
started is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import threading
import time

import httpx
import yaml

from deploy.drain import INGRESS
from loadtest.local_cluster import local_cluster, wait_ready
from loadtest.serve_run import ROOT, free_port


def deploy_config(http_port: int) -> dict:
    """deploy/config.yaml as KubeRay would submit it: the ingress overridden as deploy/gpu.yaml overrides it."""
    config = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())
    config["proxy_location"] = "EveryNode"
    config["http_options"].update(host="127.0.0.1", port=http_port)
    config.pop("grpc_options")  # HTTP is enough to show it; one port less to keep apart
    app = config["applications"][0]
    app["deployments"] = [{"name": INGRESS, "num_replicas": 1, "ray_actor_options": {"num_cpus": 1}}]
    app["args"]["pools"]["cpu"].update(threads=1)
    return config


def placement(address: str, head_id: str) -> dict:
    """Where Serve's proxies and the app's replicas run: {"head": [...], "worker": [...]}."""
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000)
    where: dict[str, list[str]] = {"head": [], "worker": []}
    for a in actors:
        if a.class_name.startswith(("ServeReplica:", "ProxyActor")):
            where["head" if a.node_id == head_id else "worker"].append(a.class_name.split(":")[-1])
    return {k: sorted(v) for k, v in where.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outage-s", type=float, default=10.0)
    ap.add_argument("--before-s", type=float, default=3.0)
    ap.add_argument("--after-s", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=5.0, help="requests per second, one at a time")
    args = ap.parse_args(argv)

    redis_port, head_http, worker_http = free_port(), free_port(), free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ["RAY_REDIS_ADDRESS"] = f"127.0.0.1:{redis_port}"  # what KubeRay sets from gcsFaultToleranceOptions
    os.environ["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(worker_http)  # the head's proxy keeps head_http
    result: dict = {}
    try:
        with local_cluster([{"num_cpus": 2}]) as cluster:
            result = outage(cluster, args, head_http, worker_http)
    finally:
        redis.terminate()
        redis.wait(timeout=30)
    print(json.dumps(result))
    return result


def outage(cluster, args: argparse.Namespace, head_http: int, worker_http: int) -> dict:
    """Load through the worker's proxy; the GCS killed, left dead for --outage-s, started again: the result."""
    from ray import serve
    from ray._private import ray_constants

    config = deploy_config(head_http)
    name = config["applications"][0]["name"]
    dashboard = f"http://{cluster.webui_url}"
    httpx.put(f"{dashboard}/api/serve/applications/", json=config, timeout=60).raise_for_status()
    url = f"http://127.0.0.1:{worker_http}"  # the worker node's proxy
    wait_ready(url)
    where = placement(cluster.address, cluster.head_node.node_id)
    sent: list[tuple[float, str, float]] = []  # (time, outcome, seconds it took)
    stop = threading.Event()

    def load() -> None:
        body = {"text": "reverse: a b c", "tier": "fast", "seed": 0}
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                at = time.time()
                try:
                    r = client.post(f"{url}/v1/generate", json=body)
                    ok = r.status_code == 200 and r.json()["text"].split() == ["c", "b", "a"]
                    sent.append((at, "answered" if ok else f"http {r.status_code}", time.time() - at))
                except httpx.HTTPError as exc:
                    sent.append((at, type(exc).__name__, time.time() - at))
                stop.wait(max(0.0, 1 / args.rate - (time.time() - at)))

    client = threading.Thread(target=load)
    client.start()
    time.sleep(args.before_s)
    head = cluster.head_node
    (gcs,) = head.all_processes[ray_constants.PROCESS_TYPE_GCS_SERVER]
    killed_at = time.time()
    os.kill(gcs.process.pid, signal.SIGKILL)
    head.kill_gcs_server(check_alive=False)  # Ray's bookkeeping of a process now dead
    time.sleep(args.outage_s)
    restarted_at = time.time()
    head.start_gcs_server()
    time.sleep(args.after_s)
    status = serve.status().applications[name].status
    stop.set()
    client.join()

    def window(lo: float, hi: float) -> dict:
        rows = [(o, took) for t, o, took in sent if lo <= t < hi]
        failed = [o for o, _ in rows if o != "answered"]
        slowest = max((took for _, took in rows), default=0.0)
        return {"sent": len(rows), "answered": len(rows) - len(failed), "failed": failed[:10],
                "slowest_s": round(slowest, 2)}  # fmt: skip

    return {
        "gcs_pid_killed": gcs.process.pid,
        "proxy": url,
        "actors_by_node": where,
        "outage_s": round(restarted_at - killed_at, 1),
        "before": window(0, killed_at),
        "during": window(killed_at, restarted_at),
        "after": window(restarted_at, float("inf")),
        "app_status_after": str(status.value if hasattr(status, "value") else status),
    }


if __name__ == "__main__":
    main()
