"""The batcher's Prometheus metrics (prometheus_client), labelled by engine name.

Metrics live in one registry per process (the default one unless a test passes its own): every engine in
the process shares the metric objects and sets its own `engine` label, since prometheus_client refuses to
register a name twice. Names:

- dgs_steps_per_canvas (histogram): denoising steps a canvas took before it was committed
- dgs_tokens_per_forward (histogram): per finished canvas, its non-pad tokens over its denoising forwards
- dgs_batch_rows (histogram): rows in each denoising forward; dgs_batch_occupancy (gauge): live slots / slots
- dgs_queue_depth (gauge): requests waiting for a slot
- dgs_queue_time_seconds (histogram): arrival to admission
- dgs_time_to_first_canvas_seconds (histogram): arrival to the first committed canvas
- dgs_requests_total (counter, by outcome): eos, length, cancelled, error, rejected, overloaded
- dgs_busy_seconds_total (counter): time the loop spent in iterations (a plan's forwards, then its events); its
  rate is the engine's utilisation (near 1: the replica is saturated and more load only queues)
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class EngineMetrics:
    steps_per_canvas: Histogram
    tokens_per_forward: Histogram
    batch_rows: Histogram
    occupancy: Gauge
    queue_depth: Gauge
    queue_time: Histogram
    time_to_first_canvas: Histogram
    requests: Counter
    busy: Counter


_by_registry: dict[int, EngineMetrics] = {}


def engine_metrics(registry: CollectorRegistry = REGISTRY) -> EngineMetrics:
    """The process's metric objects for `registry`, created on first use."""
    key = id(registry)
    if key not in _by_registry:
        r = dict(registry=registry)
        _by_registry[key] = EngineMetrics(
            steps_per_canvas=Histogram(
                "dgs_steps_per_canvas",
                "Denoising steps per committed canvas",
                ["engine"],
                buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64),
                **r,
            ),
            tokens_per_forward=Histogram(
                "dgs_tokens_per_forward",
                "Non-pad tokens per denoising forward, per canvas",
                ["engine"],
                buckets=(0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256),
                **r,
            ),
            batch_rows=Histogram(
                "dgs_batch_rows",
                "Rows in each denoising forward",
                ["engine"],
                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                **r,
            ),
            occupancy=Gauge("dgs_batch_occupancy", "Live slots over all slots", ["engine"], **r),
            queue_depth=Gauge("dgs_queue_depth", "Requests waiting for a slot", ["engine"], **r),
            queue_time=Histogram("dgs_queue_time_seconds", "Arrival to admission", ["engine"], buckets=_LATENCY, **r),
            time_to_first_canvas=Histogram(
                "dgs_time_to_first_canvas_seconds",
                "Arrival to the first committed canvas",
                ["engine"],
                buckets=_LATENCY,
                **r,
            ),
            requests=Counter("dgs_requests", "Requests by outcome", ["engine", "outcome"], **r),
            busy=Counter("dgs_busy_seconds", "Time the engine loop spent in iterations", ["engine"], **r),
        )
    return _by_registry[key]
