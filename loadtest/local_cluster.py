"""A Ray cluster of several nodes on one machine (Ray's own cluster_utils: one raylet per node), laid out as
deploy/kuberay/rayservice.yaml lays out pods: a head with no CPUs for replicas (the GCS, Serve's controller, the
dashboard) and worker nodes. The fault drills (loadtest/drills/: gcs_outage, eviction) run on it."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from loadtest.serve_run import free_port


@contextmanager
def local_cluster(workers: list[dict]) -> Iterator:
    """The head and one node per entry of `workers` (`Cluster.add_node` arguments), with this process connected
    as the driver; yields the `ray.cluster_utils.Cluster`. Its files go to a folder of their own (cluster_utils
    also writes the cluster's address there); Serve, the driver and every node are stopped at the end. Set what
    the nodes must inherit (RAY_REDIS_ADDRESS...) in os.environ before entering."""
    ray_dir = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 0, "gcs_server_port": free_port(), "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port()}  # fmt: skip
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for node in workers:
            cluster.add_node(**node)
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        yield cluster
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(ray_dir, ignore_errors=True)


def wait_ready(url: str, timeout_s: float = 240) -> None:
    """Until the app's /ready answers 200 at `url`, or RuntimeError."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the application did not become ready at {url} in {timeout_s:.0f} s")
        time.sleep(1)
