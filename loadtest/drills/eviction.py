"""A GPU worker evicted under load, shown on one machine: the preStop hook (deploy/node_drain.py) drains its Ray node,
Serve moves the replica, and only then is the node killed.

    python -m loadtest.drills.eviction [--workers 6] [--before-s 3] [--after-s 5]

A local Ray cluster of three nodes (Ray's own cluster_utils: separate raylets on one machine) stands in for a
KubeRay cluster: a head with no CPUs for replicas (it runs Serve's controller and the HTTP proxy, as the head pod
does) and two worker nodes. deploy/config.yaml's application is deployed; clients stream and send unary
`/v1/generate` requests through the proxy, several at a time. Then the node holding the pool replica is drained
by `python -m deploy.node_drain` (the worker pod's preStop hook, run as the kubelet runs it before it stops the
container: it finds its node by the pod's IP, so each worker node here has a loopback address of its own), and once
it returns the node's processes are killed (what the kubelet does next). Every request must be answered: the stream
or call under way on the drained replica finishes there, new ones go to its replacement. `--no-drain` is the
control: the node is killed as it is, as happens without the hook.

The last line printed is one JSON object: requests by outcome before, during and after the drain, the drain's own
result, and the nodes the replica ran on before and after. Everything started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import yaml

from loadtest.drills.reliability import DEADLINE_S, http_stream, http_unary
from loadtest.local_cluster import local_cluster
from loadtest.serve_run import ROOT, free_port

POOL_REPLICA = "ServeReplica:diffusiongemma:Pool-cpu"


def replica_nodes(address: str) -> list[str]:
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000)
    return sorted(a.node_id for a in actors if a.class_name == POOL_REPLICA)


async def clients(url: str, workers: int, stop: threading.Event, first_canvas: asyncio.Event) -> list:
    """`workers` clients, each sending a stream then a unary request, over and over until `stop`:
    [(start time, kind, outcome)]."""
    seen: list[tuple[float, str, str]] = []

    async def client(w: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=DEADLINE_S) as http:
            i = 0
            while not stop.is_set():
                at = time.time()
                if i % 2 == 0:
                    seen.append((at, "stream", await http_stream(http, w * 1000 + i, first_canvas)))
                else:
                    seen.append((at, "unary", await http_unary(http, w * 1000 + i)))
                i += 1

    await asyncio.gather(*(client(w) for w in range(workers)))
    return seen


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=6, help="clients, each with one request at a time")
    ap.add_argument("--before-s", type=float, default=3.0)
    ap.add_argument("--after-s", type=float, default=5.0)
    ap.add_argument("--deadline-s", type=float, default=90.0, help="the drain's deadline")
    ap.add_argument("--no-drain", action="store_true", help="the control: kill the node without draining it first")
    args = ap.parse_args(argv)

    from ray import serve

    from serving.app import build

    http_port = free_port()
    # each worker node at an address of its own, as pods have: the hook finds its node by that IP
    workers = [{"num_cpus": 2, "node_ip_address": f"127.0.0.{i}"} for i in (2, 3)]
    result: dict = {}
    with local_cluster(workers) as cluster:
        nodes = {node.node_id: node for node in cluster.worker_nodes}
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port})
        config = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())["applications"][0]
        config["args"]["pools"]["cpu"].update(threads=1)  # two replicas share 2 cores while the replica moves
        serve.run(build(config["args"]), name=config["name"], route_prefix="/")
        before_nodes = replica_nodes(cluster.address)
        (victim,) = before_nodes
        assert victim in nodes, "the pool replica runs on the head"

        stop, timeline = threading.Event(), {}
        seen: list = []

        def load() -> None:
            async def run() -> None:
                first_canvas = asyncio.Event()
                task = asyncio.ensure_future(clients(f"http://127.0.0.1:{http_port}", args.workers, stop, first_canvas))
                await asyncio.wait_for(first_canvas.wait(), 120)
                timeline["loaded"] = time.time()
                seen.extend(await task)

            asyncio.run(run())

        thread = threading.Thread(target=load)
        thread.start()
        while "loaded" not in timeline:
            time.sleep(0.2)
        time.sleep(args.before_s)
        timeline["drain"] = time.time()
        if args.no_drain:
            drained = None
        else:  # the preStop hook's command, as the kubelet runs it in the pod (POD_IP set by the manifest)
            hook = [sys.executable, "-m", "deploy.node_drain", "--deadline-s", str(args.deadline_s)]
            env = os.environ | {"RAY_ADDRESS": cluster.address, "POD_IP": nodes[victim].node_ip_address}
            run = subprocess.run(hook, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.deadline_s + 60)
            drained = json.loads(run.stdout.strip().splitlines()[-1])
        cluster.remove_node(nodes[victim], allow_graceful=False)  # the kubelet stops the container
        timeline["killed"] = time.time()
        time.sleep(args.after_s)
        stop.set()
        thread.join(DEADLINE_S + 30)
        after_nodes = replica_nodes(cluster.address)

        def window(lo: float, hi: float) -> dict:
            return dict(Counter(f"{kind} {outcome}" for at, kind, outcome in seen if lo <= at < hi))

        result = {
            "before": window(0, timeline["drain"]),
            "during": window(timeline["drain"], timeline["killed"]),
            "after": window(timeline["killed"], float("inf")),
            "drain": drained,
            "replica_nodes_before": before_nodes,
            "replica_nodes_after": after_nodes,
            "drained_node": victim,
        }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
