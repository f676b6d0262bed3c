"""deploy/grafana-dashboard.json loads as a Grafana dashboard, and every query names only metrics the code
exports (serving/metrics.py, as Ray's metrics export spells them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from serving.metrics import exported_names

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana-dashboard.json"
METRIC = re.compile(r"\bray_[a-z_]+\b")


def queries(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


def test_the_dashboard_is_a_loadable_grafana_model():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [p for p in dash["panels"] if p["type"] != "row"]
    assert graphs and all(p["targets"] and p["datasource"]["uid"] == "${datasource}" for p in graphs)
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "pool", "tier"} <= names


def test_every_query_names_a_metric_the_code_exports():
    dash = json.loads(DASHBOARD.read_text())
    used = {m for q in queries(dash) for m in METRIC.findall(q)}
    assert used and used <= exported_names(), sorted(used - exported_names())
    # per pool: throughput, occupancy, queue depth, steps per canvas; latency by tier
    for metric in (
        "ray_dgs_generated_tokens_total",
        "ray_dgs_batch_occupancy",
        "ray_dgs_queue_depth",
        "ray_dgs_steps_per_canvas_bucket",
        "ray_dgs_frontend_latency_seconds_bucket",
    ):
        assert metric in used
