"""Which Denoiser replica of a pool gets a request: the one with the least denoising work ahead of it.

A DiffusionGemma request's cost is its canvases times its step cap, not one unit, so the number of requests a
replica holds (what Serve's default power-of-two router compares) says little: one 16-canvas quality request
outweighs ten 1-canvas fast ones. Each replica publishes its engine's `Load` through `record_routing_stats`
(outstanding denoising steps, free slots, queue depth), which Serve pulls every
`request_routing_stats_period_s`. Between two pulls this router adds the steps of the requests it has sent
to a replica since that replica's last report, so a burst does not pile onto the replica that looked idle.

Order: replicas with a free slot first, then by outstanding steps (reported + sent since), then by queue
depth. Serve tries the first rank, and backs off to the next one when a replica is at max_ongoing_requests.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from model.config import canvas_count


@dataclass(frozen=True)
class Standing:
    outstanding_steps: float  # reported by the replica plus what was sent to it since
    free_slots: int
    queue_depth: int

    def key(self) -> tuple:
        return (self.free_slots == 0, self.outstanding_steps, self.queue_depth)


def request_steps(payload: dict, canvas_length: int) -> int:
    """Denoising steps a request may take: canvases times its step cap (an upper bound: adaptive stop)."""
    return canvas_count(payload["max_new_tokens"], canvas_length) * int(payload["settings"]["max_denoising_steps"])


def rank(standings: dict[ReplicaID, Standing]) -> list[list[ReplicaID]]:
    """One replica per rank, best first."""
    return [[rid] for rid, _ in sorted(standings.items(), key=lambda kv: kv[1].key())]


class StepAwareRouter(RequestRouter):
    def initialize_state(self) -> None:
        # replica -> [(time sent, steps)] of requests sent after that replica's last report
        self.sent: dict[ReplicaID, list[tuple[float, int]]] = defaultdict(list)

    def standing(self, replica: RunningReplica) -> Standing:
        stats = replica.routing_stats or {}
        reported_at = float(stats.get("at", 0.0))
        recent = [(t, s) for t, s in self.sent[replica.replica_id] if t > reported_at]
        self.sent[replica.replica_id] = recent
        return Standing(
            outstanding_steps=float(stats.get("outstanding_steps", 0)) + sum(s for _, s in recent),
            free_slots=int(stats.get("free_slots", 1)),
            queue_depth=int(stats.get("queue_depth", 0)),
        )

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id: r for r in candidate_replicas}
        order = rank({rid: self.standing(r) for rid, r in by_id.items()})
        return [[by_id[rid] for rid in tier] for tier in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        payload = pending_request.args[0] if pending_request.args else None
        replica = self.curr_replicas.get(replica_id)
        if isinstance(payload, dict) and "settings" in payload and replica is not None:
            canvas = int((replica.routing_stats or {}).get("canvas_length", 256))
            self.sent[replica_id].append((self._get_curr_time_s(), request_steps(payload, canvas)))
