"""`python -m loadtest.drills.reliability` as documented, shortened: its overload and hostile-input scenarios through
`serve run` (its own app: two replicas, a latency bound), and the one JSON line it ends with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_reliability_run_reports_overload_and_hostile_input_without_a_server_error():
    cmd = [sys.executable, "-m", "loadtest.drills.reliability", "--scenarios", "overload,fuzz",
           "--phase-s", "6", "--overload-s", "10", "--fuzz", "40"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["lost"] == 0 and report["server_errors"] == 0, report
    counted = report["answered"] + sum(report["refused"].values()) + sum(report["errors"].values()) + report["lost"]
    assert report["sent"] == counted
    overload = report["scenarios"]["overload"]
    assert overload["refused"] > 0 and report["refused"]["queue_full"] >= overload["refused"]  # it overloaded
    assert overload["admitted"] > 0 and overload["drained_s"] is not None  # and drained afterwards
    assert report["refused"]["invalid"] > 0 and report["scenarios"]["fuzz"]["still_answers"] is True
    assert report["machine"]["cpus"] >= 1
