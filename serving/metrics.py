"""Prometheus metrics of the engine (per replica), the request router and the front end (the ingress).

Where they go: in a Ray process (a Serve replica, the ingress, the request router inside it) through
`ray.util.metrics`, which each node's metrics agent exports on its metrics port with a `ray_` prefix (what
Prometheus scrapes in a fleet: deploy/grafana-dashboard.json reads them there); elsewhere (tests, in-process
benchmarks) through prometheus_client into a registry. Both take the same calls (`.labels(...).inc()`,
`.set()`, `.observe()`), so the code that records them does not know which.

Engine (label `engine` = the pool):
- dgs_steps_per_canvas (histogram): denoising steps a canvas took before it was committed
- dgs_tokens_per_forward (histogram): per finished canvas, its non-pad tokens over its denoising forwards
- dgs_batch_rows (histogram): rows in each denoising forward; dgs_batch_occupancy (gauge): live slots / slots
- dgs_queue_depth (gauge): requests waiting for a slot; dgs_outstanding_steps (gauge): denoising steps left
  in every live and queued request (what the request router and the autoscaler read)
- dgs_queue_time_seconds (histogram): arrival to admission
- dgs_time_to_first_canvas_seconds (histogram): arrival to the first committed canvas
- dgs_requests_total (counter, by outcome): eos, length, cancelled, error, rejected, overloaded
- dgs_generated_tokens_total (counter): tokens committed to answers (its rate is the pool's throughput)
- dgs_prefix_queried_tokens_total, dgs_prefix_hit_tokens_total (counters): prompt tokens looked up in the prefix
  cache, and those restored from it instead of encoded (hit rate: their ratio; tokens saved: the second)
- dgs_busy_seconds_total (counter): time the loop spent in iterations (a plan's forwards, then its events); its
  rate is the engine's utilisation (near 1: the replica is saturated and more load only queues)

Router (label `pool`):
- dgs_route_outstanding_steps (histogram): the chosen replica's outstanding steps when a request was routed
- dgs_route_stale_stats_total (counter): routings where no replica had fresh stats (ranked on what the request router
  sent since, or on Serve's queue lengths)
- dgs_route_prefix_held_total (counter): requests routed to a replica whose prefix cache holds the start of their
  prompt (prefix-aware routing)

Front end (labels `tier`, `protocol` = http / grpc):
- dgs_frontend_requests_total (counter, also by `outcome`): ok, invalid, overloaded, unavailable, failed,
  cancelled (the client went away)
- dgs_frontend_time_to_first_canvas_seconds, dgs_frontend_latency_seconds (histograms): as the client sees them
- dgs_frontend_refusals_total (counter, by `reason`): the field an invalid request broke, `queue_full`, or
  `no_replica`
- dgs_frontend_structured_total (counter, by `tier` and `kind`): accepted requests with structured outputs
  (json_schema, json_object, regex, choice, tool_call)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_STEPS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class Spec:
    kind: Literal["counter", "gauge", "histogram"]
    name: str  # without the `_total` a counter gets on export
    doc: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


class _RayChild:
    def __init__(self, metric: Any, tags: dict[str, str]):
        self.metric, self.tags = metric, tags

    def inc(self, amount: float = 1.0) -> None:
        self.metric.inc(amount, tags=self.tags)

    def set(self, value: float) -> None:
        self.metric.set(value, tags=self.tags)

    def observe(self, value: float) -> None:
        self.metric.observe(value, tags=self.tags)


class _RayMetric:
    """A ray.util.metrics metric behind prometheus_client's `.labels(...)` call."""

    def __init__(self, spec: Spec):
        from ray.util import metrics

        self.spec = spec
        if spec.kind == "counter":
            self.metric = metrics.Counter(spec.name, spec.doc, tag_keys=spec.labels)
        elif spec.kind == "gauge":
            self.metric = metrics.Gauge(spec.name, spec.doc, tag_keys=spec.labels)
        else:
            self.metric = metrics.Histogram(spec.name, spec.doc, boundaries=list(spec.buckets), tag_keys=spec.labels)

    def labels(self, *values: Any) -> _RayChild:
        return _RayChild(self.metric, {k: str(v) for k, v in zip(self.spec.labels, values)})


def _prometheus(spec: Spec, registry: CollectorRegistry) -> Any:
    if spec.kind == "counter":
        return Counter(spec.name, spec.doc, list(spec.labels), registry=registry)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.doc, list(spec.labels), registry=registry)
    return Histogram(spec.name, spec.doc, list(spec.labels), buckets=spec.buckets, registry=registry)


def _in_ray() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


_made: dict[tuple[str, int], Any] = {}


def _metrics(cls: type, registry: CollectorRegistry | None) -> Any:
    """One `cls` of metric objects per process and destination: prometheus_client refuses to register a name
    twice, so every engine (or front end) in a process shares them and sets its own label. registry None: Ray's
    metrics inside a Ray process, prometheus_client's default registry elsewhere."""
    ray = registry is None and _in_ray()
    key = (cls.__name__, 0 if ray else id(registry or REGISTRY))
    if key not in _made:
        build = _RayMetric if ray else (lambda s: _prometheus(s, registry or REGISTRY))
        _made[key] = cls(**{f.name: build(f.default) for f in fields(cls)})
    return _made[key]


@dataclass
class EngineMetrics:
    steps_per_canvas: Any = Spec(
        "histogram", "dgs_steps_per_canvas", "Denoising steps per committed canvas", ("engine",),
        (1, 2, 4, 8, 12, 16, 24, 32, 48, 64),
    )  # fmt: skip
    tokens_per_forward: Any = Spec(
        "histogram", "dgs_tokens_per_forward", "Non-pad tokens per denoising forward, per canvas", ("engine",),
        (0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256),
    )  # fmt: skip
    batch_rows: Any = Spec(
        "histogram", "dgs_batch_rows", "Rows in each denoising forward", ("engine",), (1, 2, 4, 8, 16, 32, 64, 128, 256)
    )
    occupancy: Any = Spec("gauge", "dgs_batch_occupancy", "Live slots over all slots", ("engine",))
    queue_depth: Any = Spec("gauge", "dgs_queue_depth", "Requests waiting for a slot", ("engine",))
    outstanding_steps: Any = Spec(
        "gauge", "dgs_outstanding_steps", "Denoising steps left in live and queued requests", ("engine",)
    )
    queue_time: Any = Spec("histogram", "dgs_queue_time_seconds", "Arrival to admission", ("engine",), _LATENCY)
    time_to_first_canvas: Any = Spec(
        "histogram", "dgs_time_to_first_canvas_seconds", "Arrival to the first committed canvas", ("engine",), _LATENCY
    )
    requests: Any = Spec("counter", "dgs_requests", "Requests by outcome", ("engine", "outcome"))
    generated_tokens: Any = Spec("counter", "dgs_generated_tokens", "Tokens committed to answers", ("engine",))
    busy: Any = Spec("counter", "dgs_busy_seconds", "Time the engine loop spent in iterations", ("engine",))
    out_of_memory: Any = Spec(
        "counter", "dgs_out_of_memory", "Forwards out of device memory (rows per forward lowered)", ("engine",)
    )
    prefix_queried_tokens: Any = Spec(
        "counter", "dgs_prefix_queried_tokens", "Prompt tokens looked up in the prefix cache", ("engine",)
    )
    prefix_hit_tokens: Any = Spec(
        "counter", "dgs_prefix_hit_tokens", "Prompt tokens restored from the prefix cache, not encoded", ("engine",)
    )


@dataclass
class RouterMetrics:
    chosen_outstanding_steps: Any = Spec(
        "histogram", "dgs_route_outstanding_steps", "Outstanding steps of the replica a request was routed to",
        ("pool",), _STEPS,
    )  # fmt: skip
    stale_stats: Any = Spec(
        "counter", "dgs_route_stale_stats", "Routings without fresh replica stats (fallback ranking)", ("pool",)
    )
    prefix_routed: Any = Spec(
        "counter", "dgs_route_prefix_held", "Requests routed to a replica holding the start of their prompt", ("pool",)
    )


@dataclass
class FrontendMetrics:
    requests: Any = Spec(
        "counter", "dgs_frontend_requests", "Requests by tier, protocol and outcome", ("tier", "protocol", "outcome")
    )
    time_to_first_canvas: Any = Spec(
        "histogram", "dgs_frontend_time_to_first_canvas_seconds", "Request to first canvas, at the front end",
        ("tier", "protocol"), _LATENCY,
    )  # fmt: skip
    latency: Any = Spec(
        "histogram", "dgs_frontend_latency_seconds", "Request to final event, at the front end", ("tier", "protocol"),
        _LATENCY,
    )  # fmt: skip
    refusals: Any = Spec("counter", "dgs_frontend_refusals", "Refused requests by reason", ("protocol", "reason"))
    key_requests: Any = Spec(
        "counter", "dgs_frontend_key_requests", "Requests by API key id and outcome", ("key_id", "outcome")
    )
    key_tokens: Any = Spec(
        "counter", "dgs_frontend_key_tokens", "Prompt and generated tokens by API key id", ("key_id",)
    )
    structured: Any = Spec(
        "counter", "dgs_frontend_structured", "Accepted requests with structured outputs, by kind", ("tier", "kind")
    )


def engine_metrics(registry: CollectorRegistry | None = None) -> EngineMetrics:
    return _metrics(EngineMetrics, registry)


def router_metrics(registry: CollectorRegistry | None = None) -> RouterMetrics:
    return _metrics(RouterMetrics, registry)


def frontend_metrics(registry: CollectorRegistry | None = None) -> FrontendMetrics:
    return _metrics(FrontendMetrics, registry)


def exported_names() -> set[str]:
    """Every series name a Prometheus scrape of a fleet shows for these metrics (Ray's `ray_` prefix, `_total`
    on counters, `_bucket`/`_sum`/`_count` on histograms): what dashboards may query."""
    names = set()
    for cls in (EngineMetrics, RouterMetrics, FrontendMetrics):
        for f in fields(cls):
            spec: Spec = f.default
            base = f"ray_{spec.name}"
            if spec.kind == "counter":
                names.add(base + "_total")
            elif spec.kind == "gauge":
                names.add(base)
            else:
                names |= {base + "_bucket", base + "_sum", base + "_count"}
    return names
