"""The metric definitions (serving/metrics.py) are valid for both destinations: Ray's metrics (bucket bounds,
tag keys), which a fleet scrapes, and prometheus_client, which in-process runs use."""

from __future__ import annotations

from dataclasses import fields

from prometheus_client import CollectorRegistry

from serving.metrics import (
    EngineMetrics,
    FrontendMetrics,
    RouterMetrics,
    _RayMetric,
    engine_metrics,
    exported_names,
)

GROUPS = (EngineMetrics, RouterMetrics, FrontendMetrics)


def test_every_metric_builds_as_a_ray_metric_and_takes_its_labels():
    for group in GROUPS:
        for f in fields(group):
            metric = _RayMetric(f.default)  # Ray validates names, tag keys and bucket bounds here
            child = metric.labels(*["x"] * len(f.default.labels))
            assert set(child.tags) == set(f.default.labels)


def test_a_registry_gets_its_own_metric_objects_and_the_exported_names_match_them():
    a, b = CollectorRegistry(), CollectorRegistry()
    assert engine_metrics(a) is engine_metrics(a) and engine_metrics(a) is not engine_metrics(b)
    engine_metrics(a).requests.labels("pool", "eos").inc()
    engine_metrics(a).queue_time.labels("pool").observe(0.2)
    sampled = {s.name for m in a.collect() for s in m.samples}
    assert {"dgs_requests_total", "dgs_queue_time_seconds_bucket"} <= sampled
    assert {"ray_" + n for n in sampled if not n.endswith("_created")} <= exported_names()  # Ray has no _created
