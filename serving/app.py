"""The application builder deploy/config.yaml names: one deployment per pool (Pool-<name>), one Ingress.

import_path: serving.app:build
args: {model: embedded, default_tier: balanced, tiers: {...}, pools: {...}}

The deployment classes are plain (serving/replica/deployment.py, serving/ingress/deployment.py); Serve's
decorators are applied here, so importing them starts nothing and the ingress can be run in-process.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from serving.config import AppConfig
from serving.ingress.deployment import Ingress
from serving.routing import StepAwareRouter

# Requests a replica takes at once before Serve backs off: well above slots + max_queue, so that the engine's
# own queue answers overload (429 / RESOURCE_EXHAUSTED with a retry hint) rather than Serve.
MAX_ONGOING = 1024


def build(args: dict) -> Application:
    from serving.replica.deployment import PoolReplica  # imports torch: only the builder and the replicas need it

    config = AppConfig(**args)
    denoiser = serve.deployment(PoolReplica, max_ongoing_requests=MAX_ONGOING)
    pools = {}
    for name, pool in config.pools.items():
        actor = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus}
        if pool.threads:
            actor["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(pool.threads)}}
        options = dict(
            name=f"Pool-{name}",
            ray_actor_options=actor,
            health_check_period_s=pool.health_check_period_s,
            health_check_timeout_s=pool.health_check_timeout_s,
            graceful_shutdown_timeout_s=pool.graceful_shutdown_timeout_s,
        )
        if pool.autoscaling is not None:
            options["autoscaling_config"] = pool.autoscaling.serve_config()
        else:
            options["num_replicas"] = pool.replicas or 1
        if pool.router == "step_aware":
            options["request_router_config"] = RequestRouterConfig(
                request_router_class=StepAwareRouter,
                request_routing_stats_period_s=1.0,
                request_router_kwargs={"prefix_routing": pool.prefix_routing},
            )
        pools[name] = denoiser.options(**options).bind(config.model, pool.model_dump(), name)
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress", max_ongoing_requests=MAX_ONGOING)
    # the ingress relays the pools' streams: it drains at least as long as the longest pool
    drain = max(p.graceful_shutdown_timeout_s for p in config.pools.values())
    # user_config: Serve applies a change of it to every ingress replica in place (Ingress.reconfigure), which is
    # how deploy/drain.py stops new requests before a shutdown
    options = dict(
        ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=drain, user_config={"draining": False}
    )
    return ingress.options(**options).bind(config.model_dump(), pools)
