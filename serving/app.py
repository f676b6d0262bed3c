"""The application builder named by deploy/config.yaml: one Denoiser deployment per pool, one Router.

import_path: serving.app:build
args: {model: embedded, default_tier: balanced, tiers: {...}, pools: {...}}
"""

from __future__ import annotations

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from serving.config import AppConfig
from serving.replica import DenoiserServer
from serving.router import Router
from serving.routing import StepAwareRouter


def build(args: dict) -> Application:
    config = AppConfig(**args)
    routing = RequestRouterConfig(request_router_class=StepAwareRouter, request_routing_stats_period_s=1.0)
    pools = {}
    for name, pool in config.pools.items():
        actor = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus}
        if pool.threads:
            actor["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(pool.threads)}}
        pools[name] = DenoiserServer.options(
            name=f"Denoiser-{name}",
            num_replicas=pool.replicas,
            ray_actor_options=actor,
            request_router_config=routing,
        ).bind(config.model, pool.model_dump(), name)
    return Router.bind(config.model_dump(), pools)
