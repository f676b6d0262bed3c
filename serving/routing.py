"""Which replica of a pool gets a request: the one where it shares its forwards with the least work.

A DiffusionGemma request's cost is its canvases times its step cap, not one unit, and a replica's batcher
runs one row per live request in every denoising forward, so on a replica a request is slowed by each other
request for as many steps as they overlap. The number of requests a replica holds (what Serve's default
power-of-two router compares) cannot see that: one 16-canvas quality request outweighs ten 1-canvas fast ones.

Each replica publishes its engine's steps left per request through `record_routing_stats`, which Serve pulls
every `request_routing_stats_period_s`. A new request of `s` steps would share its forwards on that replica
with `sum(min(left, s))` row-steps of other work (its horizon cost): a short request looks at how many rows run
now, a long one at all the work ahead. Between two reports the router adds the requests it has sent to a
replica since, so a burst does not pile onto the replica that looked idle.

Prefix-aware: each replica also names the prompt blocks its prefix cache holds (model/prefix_keys.py). Among
the replicas whose load is close to the best one's (the same free-slot standing, and a horizon cost within the
request's own steps of the lowest), the one holding the longest start of the request's prompt goes first: its
prefill is a copy instead of a forward. The router counts the blocks of what it sent since a replica's last
report as held there, so a burst that shares a new system prompt follows its first request.

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
from model.prefix_keys import block_keys
from serving.metrics import router_metrics
from serving.request import GenerateRequest


@dataclass(frozen=True)
class Standing:
    work: tuple[int, ...]  # steps left per request: reported by the replica, plus what was sent to it since
    free_slots: int
    queue_depth: int
    prefix: frozenset[int] = frozenset()  # names of the prompt blocks it holds (and of those sent to it since)

    def held(self, keys: list[int]) -> int:
        """How many of a prompt's leading blocks it holds."""
        n = 0
        while n < len(keys) and keys[n] in self.prefix:
            n += 1
        return n

    @property
    def outstanding_steps(self) -> int:
        return sum(self.work)


def horizon_cost(work: tuple[int, ...] | list[int], steps: int) -> int:
    """Row-steps of other work a request of `steps` steps would share its forwards with."""
    return sum(min(w, steps) for w in work)


def request_steps(request: GenerateRequest, canvas_length: int) -> int:
    """Denoising steps a request may take: canvases times its step cap (an upper bound: adaptive stop)."""
    return canvas_count(request.max_new_tokens, canvas_length) * request.settings.max_denoising_steps


def generate_request(pending_request: PendingRequest | None) -> GenerateRequest | None:
    """The GenerateRequest a routed call carries (a replica's `generate(request)`), None for other calls."""
    args = pending_request.args if pending_request is not None else ()
    return args[0] if args and isinstance(args[0], GenerateRequest) else None


def rank(standings: dict[ReplicaID, Standing], steps: int, keys: list[int] | None = None) -> list[list[ReplicaID]]:
    """One replica per rank, best first, for a request of `steps` steps: a free slot first, then the least work
    it would share its forwards with, then the shorter queue. `keys`: the request's prompt blocks; among the
    replicas whose load is close to the best (module docstring), the longest held prefix goes first."""
    key = lambda s: (s.free_slots == 0, horizon_cost(s.work, steps), s.queue_depth)
    order = sorted(standings.items(), key=lambda kv: key(kv[1]))
    if keys:
        full, best = key(order[0][1])[:2]
        close = [rid for rid, s in order if (s.free_slots == 0) == full and horizon_cost(s.work, steps) <= best + steps]
        ahead = sorted(close, key=lambda rid: -standings[rid].held(keys))  # stable: load order among equals
        order = [(rid, standings[rid]) for rid in ahead] + [kv for kv in order if kv[0] not in close]
    return [[rid] for rid, _ in order]


class StepAwareRouter(RequestRouter):
    def initialize_state(self, stale_after_s: float = 5.0, prefix_routing: bool = True) -> None:
        # replica -> [(time sent, steps, prompt block names)] of requests sent after that replica's last report
        self.sent: dict[ReplicaID, list[tuple[float, int, tuple[int, ...]]]] = defaultdict(list)
        self.stale_after_s = stale_after_s
        self.prefix_routing = prefix_routing
        self.metrics = router_metrics()
        self.pool = self._deployment_id.name.removeprefix("Pool-")

    def standing(self, replica: RunningReplica, now: float) -> Standing | None:
        """The replica's work as of its last report plus what was sent since; None when it has no fresh report."""
        stats = replica.routing_stats or {}
        if "work" not in stats or now - float(stats.get("at", 0.0)) > self.stale_after_s:
            return None
        recent = [sent for sent in self.sent[replica.replica_id] if sent[0] > stats["at"]]
        self.sent[replica.replica_id] = recent
        prefix = frozenset(stats.get("prefix_keys", ())).union(*(keys for _, _, keys in recent))
        return Standing(
            work=tuple(stats["work"]) + tuple(s for _, s, _ in recent),
            free_slots=max(0, int(stats["free_slots"]) - len(recent)),
            queue_depth=int(stats["queue_depth"]),
            prefix=prefix,
        )

    def keys_of(self, pending_request: PendingRequest | None, replicas: list[RunningReplica]) -> list[int]:
        """The request's prompt block names, in the pool's block size (none: not a generate call, or off)."""
        request = generate_request(pending_request)
        block = (replicas[0].routing_stats or {}).get("prefix_block_tokens") if replicas else None
        if not (self.prefix_routing and block and request is not None):
            return []
        return block_keys(request.prompt, int(block))

    def steps_of(self, pending_request: PendingRequest | None, replicas: list[RunningReplica]) -> int:
        request = generate_request(pending_request)
        if request is None:
            return 1  # not a generate call (a load query): any replica will do; rank by rows now
        canvas = int((replicas[0].routing_stats or {}).get("canvas_length", 256))
        return request_steps(request, canvas)

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
        keys = self.keys_of(pending_request, candidate_replicas)
        order = rank(standings, self.steps_of(pending_request, candidate_replicas), keys)
        return [[by_id[rid] for rid in tier] for tier in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        replica = self.curr_replicas.get(replica_id)
        if replica is None or generate_request(pending_request) is None:
            return
        now = self._get_curr_time_s()
        chosen = self.standing(replica, now)
        keys = self.keys_of(pending_request, [replica])
        if chosen is not None:
            self.metrics.chosen_outstanding_steps.labels(self.pool).observe(chosen.outstanding_steps)
            if keys and chosen.held(keys):
                self.metrics.prefix_routed.labels(self.pool).inc()
        self.sent[replica_id].append((now, self.steps_of(pending_request, [replica]), tuple(keys)))
