"""The application's configuration: the model, the tiers and the pools of replicas behind them.

This is the `args:` block of deploy/config.yaml (validated here, so a typo fails `serve run` with a message
naming the field). A tier is a named point on the speed/quality curve: default sampler settings, the limits
a request may override them within, and the pool that serves it. A pool is one Serve deployment, Pool-<name>
(replica count, slots, context, devices); several tiers may share a pool, because a replica's batcher mixes requests
with different sampler settings in one forward.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.config import DtypeName, SamplerSettings
from serving.request import InvalidRequest
from serving.sampling import DEFAULT_CONFIDENCE, TierLimits, TierSampler


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Tier(Strict):
    pool: str
    sampler: TierSampler = TierSampler()
    limits: TierLimits = TierLimits()
    description: str = ""

    def resolve(self, name: str, overrides: dict[str, Any]) -> SamplerSettings:
        """The tier's settings with a request's overrides (None = not given) applied, or InvalidRequest
        naming the field and the limit it broke."""
        values = self.sampler.model_dump()
        for field, value in overrides.items():
            if value is None:
                continue
            if field == "adaptive_stop":
                adaptive = values["confidence_threshold"] is not None
                if bool(value) != adaptive and not self.limits.adaptive_stop:
                    raise InvalidRequest(field, f"tier {name!r} does not allow changing adaptive stopping")
                if not value:
                    values["confidence_threshold"] = None
                elif not adaptive:
                    values["confidence_threshold"] = DEFAULT_CONFIDENCE
                continue
            limit = getattr(self.limits, field, None)
            if field not in values:
                raise InvalidRequest(field, "is not a sampler setting")
            if limit is None:
                raise InvalidRequest(field, f"is fixed at {values[field]} in tier {name!r}")
            if not limit.min <= value <= limit.max:
                raise InvalidRequest(field, f"must be within [{limit.min:g}, {limit.max:g}] in tier {name!r}")
            values[field] = value
        try:
            return SamplerSettings(**values)
        except ValueError as exc:  # a combination that is invalid as a whole (t_min >= t_max)
            raise InvalidRequest(str(exc).split(" ", 1)[0], str(exc)) from exc


class Autoscaling(Strict):
    """A pool's replica count follows the denoising work it holds (serving/autoscaling.py). Unknown keys are
    refused here: Serve's own autoscaling_config ignores a misspelt one silently."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(..., ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    # the work one replica should hold: outstanding denoising steps (default) or live canvases
    metric: Literal["outstanding_steps", "live_canvases"] = "outstanding_steps"
    target: float = Field(..., gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    metrics_interval_s: float = Field(10.0, gt=0)  # how often replicas report
    look_back_period_s: float = Field(30.0, gt=0)  # the window their reports are averaged over

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie within [min_replicas, max_replicas]")
        return self

    def serve_config(self) -> dict:
        """Serve's autoscaling_config: the bounds and delays, and our policy with its target."""
        from serving.autoscaling import POLICY

        fields = self.model_dump(exclude={"metric", "target"}, exclude_none=True)
        kwargs = {"target": self.target, "metric": self.metric}
        return fields | {"policy": {"policy_function": POLICY, "policy_kwargs": kwargs}}


class Pool(Strict):
    """One pool: a Serve deployment, Pool-<name>."""

    replicas: int | None = Field(None, ge=1)  # a fixed count (1 when neither this nor autoscaling is given)
    slots: int = Field(16, ge=1)  # requests live at once per replica (KV-cache slots)
    max_context: int = Field(1024, ge=16)  # tokens per slot: prompt plus all canvases but the last
    max_queue: int = Field(64, ge=0)  # waiting requests per replica before 429 / RESOURCE_EXHAUSTED
    # the most of max_queue one tier may hold where tiers share the pool (the rest stays open to the others)
    tier_queue_share: float = Field(1.0, gt=0, le=1)
    # bound on admitted requests' latency under overload: a replica holds (live and queued) only as many
    # requests as keep each within this factor of its time alone, measured (serving/replica/latency_bound.py); more get
    # 429. None: slots and max_queue alone (the most throughput; under overload the latency grows with the batch)
    max_slowdown: float | None = Field(None, gt=1)
    max_batch_rows: int | None = Field(None, ge=1)
    # memory per replica for the K/V of prompt blocks kept across requests (model/prefix_cache.py): a prompt
    # that starts with a cached block chain (a shared system prompt, earlier turns) encodes only the rest. 0: off
    prefix_cache_mb: float = Field(64, ge=0)
    prefix_block_tokens: int = Field(64, ge=1, le=4096)  # tokens per cached block (prompts share whole blocks)
    # step_aware router: among replicas of close load, prefer the one whose prefix cache holds the request's
    # prompt start (serving/routing.py)
    prefix_routing: bool = True
    num_gpus: float = Field(0, ge=0)
    num_cpus: float = Field(1, ge=0)
    threads: int | None = Field(None, ge=1)  # torch threads on CPU (Ray sets OMP_NUM_THREADS=1 otherwise)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto"] | DtypeName = "auto"  # auto: the checkpoint's own
    # auto: the checkpoint's own (dense, or a compressed-tensors FP8 / INT4 checkpoint as stored); fp8 / int4:
    # a dense checkpoint quantized as it loads (model/quant.py, docs/quantization.md)
    weights: Literal["auto", "dense", "fp8", "int4"] = "auto"
    compile: bool = False  # torch.compile + CUDA graphs on GPU, with row buckets
    # each denoising step (forward, vocabulary pass, sampler) replayed as one CUDA graph per row bucket, compiled
    # or not (without compile: the eager kernels' launches saved at no compile time). None: with compile. GPU only
    cuda_graphs: bool | None = None
    # the GPU kernels: triton (model/kernels/: fused experts, the denoising attention), torch, or auto (triton on
    # a CUDA device with Triton installed, torch elsewhere)
    kernels: Literal["auto", "torch", "triton"] = "auto"
    # which replica takes a request: step_aware (serving/routing.py: least denoising work in the request's
    # horizon) or power_of_two (Serve's default: the shorter of two replicas' request queues)
    router: Literal["step_aware", "power_of_two"] = "step_aware"
    autoscaling: Autoscaling | None = None  # instead of a fixed `replicas`
    # Serve's replica health check (PoolReplica.check_health: the engine loop is alive) and drain: a replica
    # being stopped (scale-down, redeploy, shutdown) takes no new requests and has this long to finish the ones
    # it holds before it is killed; the longest answers a pool serves should fit in it.
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> Pool:
        if self.autoscaling is not None and self.replicas is not None:
            raise ValueError("replicas: give either a fixed count or an autoscaling block, not both")
        return self


class Auth(Strict):
    """API keys (serving/ingress/auth.py): where they are, never the keys themselves, and per-key limits."""

    keys_env: str | None = None  # an environment variable holding the keys, one per line (`id:key` or `key`)
    keys_file: str | None = None  # or a file holding them
    max_concurrent: int | None = Field(None, ge=1)  # requests in flight per key (per ingress replica)
    tokens_per_minute: int | None = Field(None, ge=1)  # prompt + generated tokens per key (per ingress replica)

    @model_validator(mode="after")
    def _one_source(self) -> Auth:
        if (self.keys_env is None) == (self.keys_file is None):
            raise ValueError("auth: give exactly one of keys_env or keys_file (keys are never written in the config)")
        return self


class AppConfig(Strict):
    model: str = "embedded"  # "embedded" (the shipped checkpoint), a checkpoint folder or a hub id
    default_tier: str = "balanced"
    tiers: dict[str, Tier]
    pools: dict[str, Pool]
    max_prompt_tokens: int = Field(1024, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)  # default length cap; None: the checkpoint's
    # the chat template's enable_thinking where a request does not set it (chat_template_kwargs): the model
    # reasons in a thought channel first, returned apart as reasoning_content
    thinking: bool = False
    auth: Auth | None = None  # None: no keys asked for
    max_body_bytes: int = Field(1 << 20, ge=1024)  # larger HTTP bodies get 413 before they are read whole

    @model_validator(mode="after")
    def _consistent(self) -> AppConfig:
        if not self.tiers:
            raise ValueError("tiers: at least one tier is needed")
        if self.default_tier not in self.tiers:
            raise ValueError(f"default_tier {self.default_tier!r} is not one of the tiers {sorted(self.tiers)}")
        for name, tier in self.tiers.items():
            if tier.pool not in self.pools:
                raise ValueError(f"tiers.{name}.pool {tier.pool!r} is not one of the pools {sorted(self.pools)}")
        unused = set(self.pools) - {t.pool for t in self.tiers.values()}
        if unused:
            raise ValueError(f"pools {sorted(unused)} serve no tier")
        return self
