"""Which Denoiser replica of a pool gets a request: the one where it shares its forwards with the least work.

A DiffusionGemma request's cost is its canvases times its step cap, not one unit, and a replica's batcher
runs one row per live request in every denoising forward, so on a replica a request is slowed by each other
request for as many steps as they overlap. The number of requests a replica holds (what Serve's default
power-of-two router compares) cannot see that: one 16-canvas quality request outweighs ten 1-canvas fast ones.

Each replica publishes its engine's steps left per request through `record_routing_stats`, which Serve pulls
every `request_routing_stats_period_s`. A new request of `s` steps would share its forwards on that replica
with `sum(min(left, s))` row-steps of other work (its horizon cost): a short request looks at how many rows run
now, a long one at all the work ahead. Between two reports the router adds the requests it has sent to a
replica since, so a burst does not pile onto the replica that looked idle.

Order: replicas with a free slot first, then by horizon cost, then by queue depth. Serve tries the first rank,
and backs off to the next one when a replica is at max_ongoing_requests. Where a replica's stats are missing or
older than `stale_after_s`, the ranking falls back to one rank of all candidates (Serve then takes the shortest
request queue), and `dgs_route_stale_stats_total` counts it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from model.config import canvas_count
from serving.metrics import router_metrics


@dataclass(frozen=True)
class Standing:
    work: tuple[int, ...]  # steps left per request: reported by the replica, plus what was sent to it since
    free_slots: int
    queue_depth: int

    @property
    def outstanding_steps(self) -> int:
        return sum(self.work)


def horizon_cost(work: tuple[int, ...] | list[int], steps: int) -> int:
    """Row-steps of other work a request of `steps` steps would share its forwards with."""
    return sum(min(w, steps) for w in work)


def request_steps(payload: dict, canvas_length: int) -> int:
    """Denoising steps a request may take: canvases times its step cap (an upper bound: adaptive stop)."""
    return canvas_count(payload["max_new_tokens"], canvas_length) * int(payload["settings"]["max_denoising_steps"])


def rank(standings: dict[ReplicaID, Standing], steps: int) -> list[list[ReplicaID]]:
    """One replica per rank, best first, for a request of `steps` steps: a free slot first, then the least work
    it would share its forwards with, then the shorter queue."""
    key = lambda s: (s.free_slots == 0, horizon_cost(s.work, steps), s.queue_depth)
    return [[rid] for rid, _ in sorted(standings.items(), key=lambda kv: key(kv[1]))]


class StepAwareRouter(RequestRouter):
    def initialize_state(self, stale_after_s: float = 5.0) -> None:
        # replica -> [(time sent, steps)] of requests sent after that replica's last report
        self.sent: dict[ReplicaID, list[tuple[float, int]]] = defaultdict(list)
        self.stale_after_s = stale_after_s
        self.metrics = router_metrics()
        self.pool = self._deployment_id.name.removeprefix("Denoiser-")

    def standing(self, replica: RunningReplica, now: float) -> Standing | None:
        """The replica's work as of its last report plus what was sent since; None when it has no fresh report."""
        stats = replica.routing_stats or {}
        if "work" not in stats or now - float(stats.get("at", 0.0)) > self.stale_after_s:
            return None
        recent = [(t, s) for t, s in self.sent[replica.replica_id] if t > stats["at"]]
        self.sent[replica.replica_id] = recent
        return Standing(
            work=tuple(stats["work"]) + tuple(s for _, s in recent),
            free_slots=max(0, int(stats["free_slots"]) - len(recent)),
            queue_depth=int(stats["queue_depth"]),
        )

    def steps_of(self, pending_request: PendingRequest | None, replicas: list[RunningReplica]) -> int:
        payload = pending_request.args[0] if pending_request is not None and pending_request.args else None
        if not (isinstance(payload, dict) and "settings" in payload):
            return 1  # not a generate call (a load query): any replica will do; rank by rows now
        canvas = int((replicas[0].routing_stats or {}).get("canvas_length", 256))
        return request_steps(payload, canvas)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        now = self._get_curr_time_s()
        standings = {r.replica_id: self.standing(r, now) for r in candidate_replicas}
        if any(s is None for s in standings.values()):
            self.metrics.stale_stats.labels(self.pool).inc()
            return [candidate_replicas]  # Serve picks the shortest request queue among them
        by_id = {r.replica_id: r for r in candidate_replicas}
        order = rank(standings, self.steps_of(pending_request, candidate_replicas))
        return [[by_id[rid] for rid in tier] for tier in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        replica = self.curr_replicas.get(replica_id)
        payload = pending_request.args[0] if pending_request.args else None
        if replica is None or not (isinstance(payload, dict) and "settings" in payload):
            return
        now = self._get_curr_time_s()
        chosen = self.standing(replica, now)
        if chosen is not None:
            self.metrics.chosen_outstanding_steps.labels(self.pool).observe(chosen.outstanding_steps)
        self.sent[replica_id].append((now, self.steps_of(pending_request, [replica])))
