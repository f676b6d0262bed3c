"""Take one Ray node out of service without cutting an answer: the GPU worker pods' preStop hook.

    python -m deploy.node_drain                      # the node at $POD_IP, on the cluster at $RAY_ADDRESS
    python -m deploy.node_drain --address 10.0.0.5:6379 --node-id <hex> --deadline-s 150

When Kubernetes evicts a GPU worker (a node drain, within the disruption budget), its containers get SIGTERM
and the Ray node dies with whatever its replicas hold. Run first, this tells Ray's GCS that the node is being
preempted, with a deadline (`ray drain-node`, the call Ray's own autoscaler makes). Serve then migrates the
node's replicas: it starts each replacement on another node and stops the old replica only once the
replacement runs (or at the deadline), gracefully, so the answers it holds finish; the node's Serve proxy stops
taking requests, relays those it holds (at least 30 s, Serve's minimum draining period) and is removed. This waits
until no Serve replica or proxy is left alive on the node, or the deadline passes, and exits; then the kubelet
stops the container.

Without a spare GPU the replacement stays pending (until Ray's autoscaler adds a pod) while the old replica keeps
serving to the deadline. The pod's terminationGracePeriodSeconds must exceed the deadline.
The last line printed is a JSON object: node_id, drained (no Serve actor left), waited_s, serve_actors_left.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# Serve's actors that hold requests, by class name in Ray's state API: replicas, and the node's proxy, which Serve
# drains once the node is draining (it relays what it holds, takes nothing new, and is removed when done)
SERVE_ACTORS = ("ServeReplica:", "ProxyActor")


def node_at(address: str, ip: str) -> str:
    """The alive Ray node at `ip`: in Kubernetes every pod has an IP of its own, and Ray's node IP is the pod's."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE"), ("node_ip", "=", ip)], limit=1000)
    if len(nodes) != 1:
        raise LookupError(f"{len(nodes)} alive Ray nodes at {ip}, not one: pass --node-id")
    return nodes[0].node_id


def serve_actors_on(address: str, node_id: str) -> list[str]:
    """The class names of Serve's replicas and proxy alive on the node."""
    from ray.util.state import list_actors

    filters = [("node_id", "=", node_id), ("state", "=", "ALIVE")]
    actors = list_actors(address=address, filters=filters, limit=1000, raise_on_missing_output=False)
    return sorted(a.class_name for a in actors if a.class_name.startswith(SERVE_ACTORS))


def drain(address: str, node_id: str, deadline_s: float, poll_s: float = 1.0) -> dict:
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", address, "--node-id", node_id,
         "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "pod terminating (deploy/node_drain.py)",
         "--deadline-remaining-seconds", str(int(deadline_s))],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    left = serve_actors_on(address, node_id)
    while left and time.monotonic() - started < deadline_s:
        time.sleep(poll_s)
        left = serve_actors_on(address, node_id)
    return {"node_id": node_id, "drained": not left, "waited_s": round(time.monotonic() - started, 1),
            "serve_actors_left": left}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="the GCS (KubeRay sets RAY_ADDRESS)")
    ap.add_argument("--node-id", help="default: the alive node at --node-ip")
    ap.add_argument("--node-ip", default=os.environ.get("POD_IP"), help="this pod's IP (the manifest sets POD_IP)")
    ap.add_argument("--deadline-s", type=float, default=150.0, help="when Ray may kill the node's replicas")
    return ap


def main(argv: list[str] | None = None) -> dict:
    ap = parser()
    args = ap.parse_args(argv)
    if not args.address:
        ap.error("--address or RAY_ADDRESS is required")
    if not (args.node_id or args.node_ip):
        ap.error("--node-id, --node-ip or POD_IP is required")
    try:
        node_id = args.node_id or node_at(args.address, args.node_ip)
        result = drain(args.address, node_id, args.deadline_s)
    except Exception as exc:  # Ray gone (the whole cluster being deleted): never hold up the pod's stop
        result = {"node_id": args.node_id, "drained": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
