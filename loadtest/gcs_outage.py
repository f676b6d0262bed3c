"""The head may die: the GCS killed by its PID under load, on a local Ray cluster with GCS fault tolerance on Redis.

    python -m loadtest.gcs_outage [--outage-s 10] [--rate 5]     # needs redis-server (Debian's package)

What KubeRay's `gcsFaultToleranceOptions` gives a RayService (deploy/kuberay/README.md), shown on one machine: a
Redis server is started on a free loopback port, Ray is started with `RAY_REDIS_ADDRESS` pointing at it, and
deploy/config.yaml's application is deployed. A client sends `/v1/generate` requests at `--rate` per second
through Serve's HTTP proxy; the GCS process is killed with SIGKILL by its PID, left dead for `--outage-s`, and
started again (KubeRay restarts the head's container; here Ray's own node API starts the GCS). Serve's proxy and
replicas hold their actor handles and keep answering meanwhile; the restarted GCS reads its tables back from Redis,
and Serve's state (the application, RUNNING) is there again.

On one machine the proxy is the head node's: a second node's proxy would need the same HTTP port. In a cluster
the head is out of the serve Service (`excludeHeadPodFromServeSvc`) and the workers' proxies answer.

The last line printed is one JSON object: requests sent before, during and after the outage, answered and failed,
the GCS PID killed, and the application's status after the restart. Everything started is stopped at the end.
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

from loadtest.serve_run import ROOT, free_port


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outage-s", type=float, default=10.0)
    ap.add_argument("--before-s", type=float, default=3.0)
    ap.add_argument("--after-s", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=5.0, help="requests per second, one at a time")
    args = ap.parse_args(argv)

    redis_port, http_port = free_port(), free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ["RAY_REDIS_ADDRESS"] = f"127.0.0.1:{redis_port}"  # what KubeRay sets from gcsFaultToleranceOptions
    import ray
    from ray import serve
    from ray._private import ray_constants

    from serving.app import build

    result: dict = {}
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        config = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())["applications"][0]
        serve.run(build(config["args"]), name=config["name"], route_prefix="/")
        url = f"http://127.0.0.1:{http_port}"
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
        node = ray._private.worker._global_node
        (gcs,) = node.all_processes[ray_constants.PROCESS_TYPE_GCS_SERVER]
        killed_at = time.time()
        os.kill(gcs.process.pid, signal.SIGKILL)
        node.kill_gcs_server(check_alive=False)  # Ray's bookkeeping of a process now dead
        time.sleep(args.outage_s)
        restarted_at = time.time()
        node.start_gcs_server()
        time.sleep(args.after_s)
        status = serve.status().applications[config["name"]].status
        stop.set()
        client.join()

        def window(lo: float, hi: float) -> dict:
            rows = [(o, took) for t, o, took in sent if lo <= t < hi]
            failed = [o for o, _ in rows if o != "answered"]
            slowest = max((took for _, took in rows), default=0.0)
            return {"sent": len(rows), "answered": len(rows) - len(failed), "failed": failed[:10],
                    "slowest_s": round(slowest, 2)}  # fmt: skip

        result = {
            "gcs_pid_killed": gcs.process.pid,
            "outage_s": round(restarted_at - killed_at, 1),
            "before": window(0, killed_at),
            "during": window(killed_at, restarted_at),
            "after": window(restarted_at, float("inf")),
            "app_status_after": str(status.value if hasattr(status, "value") else status),
        }
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            redis.terminate()
            redis.wait(timeout=30)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
