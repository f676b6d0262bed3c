"""Scale a pool on the denoising work its replicas hold, not on how many requests they hold.

Serve's default autoscaler compares ongoing requests with `target_ongoing_requests`, but one 16-canvas quality
request outweighs many 1-canvas fast ones. Each pool replica reports its engine's work through
`record_autoscaling_stats` (serving/replica/deployment.py): outstanding denoising steps and live canvases. This policy
sums the chosen one over the pool's replicas (each averaged over Serve's look-back window) and asks for as many
replicas as that sum over the per-replica target. Serve applies the pool's min/max bounds and its up/down
delays around it (a custom policy gets them from `_apply_autoscaling_config`), so the delays in the config keep
a burst from flapping the pool.

The deploy config's `autoscaling:` block of a pool (serving/config.py, Autoscaling) becomes Serve's
`autoscaling_config` with this class as `policy.policy_function` and the target as `policy_kwargs`.
"""

from __future__ import annotations

from typing import Any

POLICY = "serving.autoscaling:WorkPolicy"
METRICS = ("outstanding_steps", "live_canvases")


class WorkPolicy:
    """Replicas wanted = the pool's work / the work one replica should hold. Serve instantiates it once (with
    the config's policy_kwargs) and calls it every control-loop tick."""

    def __init__(self, target: float, metric: str = "outstanding_steps"):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, not {metric!r}")
        if target <= 0:
            raise ValueError("target must be positive")
        self.target, self.metric = target, metric

    def __call__(self, ctx: Any) -> tuple[float, dict]:
        reported = (ctx.aggregated_metrics or {}).get(self.metric) or {}
        if not reported:  # no replica has reported yet (starting up): keep the current target
            return ctx.target_num_replicas, {}
        work = sum(reported.values())
        return self.desired(work), {"work": work}

    def desired(self, work: float) -> float:
        return work / self.target
