"""The head may die: `python -m loadtest.drills.gcs_outage` kills the GCS by its PID under load on a local two-node Ray
cluster with GCS fault tolerance on a Redis server it starts (Debian's redis-server), then starts the GCS again.
The load goes through the worker node's proxy, and no replica runs on the head. Every request sent before, during
and after the outage is answered, and Serve's application is RUNNING after the restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loadtest.serve_run import ROOT

pytestmark = pytest.mark.slow


def test_requests_keep_succeeding_while_the_gcs_is_down_and_serve_state_survives():
    run = subprocess.run(
        [sys.executable, "-m", "loadtest.drills.gcs_outage", "--outage-s", "8", "--before-s", "2", "--after-s", "4"],
        cwd=ROOT, env=os.environ | {"RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(result)
    assert result["gcs_pid_killed"] > 0 and result["outage_s"] >= 8
    for phase in ("before", "during", "after"):
        assert result[phase]["failed"] == [] and result[phase]["answered"] == result[phase]["sent"] > 0, result
    assert result["during"]["sent"] >= 3  # the outage was served through, not waited out (one request at a time)
    # the head holds only its proxy; the ingress and the pool replica, and the proxy the client calls, are the worker's
    assert result["actors_by_node"] == {"head": ["ProxyActor"], "worker": ["Ingress", "Pool-cpu", "ProxyActor"]}
    assert result["app_status_after"] == "RUNNING"
