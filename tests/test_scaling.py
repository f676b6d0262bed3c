"""Autoscaling a pool on its denoising work (serving/autoscaling.py): the config block, the policy, and a pool
of min 1 / max 2 replicas under `serve run` that scales up under a bounded burst and back down after it,
without a failed request during either transition."""

from __future__ import annotations

import asyncio
import copy
import re
import time
from types import SimpleNamespace

import httpx
import pytest
from pydantic import ValidationError
from ray.serve.config import AutoscalingConfig

from loadtest.serve_run import shipped_config
from serving.autoscaling import WorkPolicy
from serving.config import Pool


def test_the_block_becomes_serves_autoscaling_config_with_our_policy():
    pool = Pool(autoscaling={"min_replicas": 1, "max_replicas": 4, "target": 512, "upscale_delay_s": 5})
    config = AutoscalingConfig(**pool.autoscaling.serve_config())  # Serve's own schema takes it
    assert (config.min_replicas, config.max_replicas, config.upscale_delay_s) == (1, 4, 5)
    assert config.policy.policy_function == "serving.autoscaling:WorkPolicy"
    assert config.policy.policy_kwargs == {"target": 512, "metric": "outstanding_steps"}


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"max_replicas": 2, "target": 1, "upscale_delay": 5}, "upscale_delay"),  # a typo Serve would ignore
        ({"max_replicas": 2}, "target"),
        ({"min_replicas": 3, "max_replicas": 2, "target": 1}, "above max_replicas"),
        ({"max_replicas": 2, "target": 1, "metric": "requests"}, "metric"),
    ],
)
def test_a_bad_block_is_refused_naming_the_key(block, message):
    with pytest.raises(ValidationError, match=message):
        Pool(autoscaling=block)


def test_a_fixed_count_and_autoscaling_do_not_mix():
    with pytest.raises(ValidationError, match="either a fixed count or an autoscaling block"):
        Pool(replicas=2, autoscaling={"max_replicas": 2, "target": 1})


def test_the_policy_asks_for_the_pools_work_over_the_target():
    policy = WorkPolicy(target=100)
    ctx = lambda metrics: SimpleNamespace(aggregated_metrics=metrics, target_num_replicas=3)
    assert policy(ctx({"outstanding_steps": {"a": 150.0, "b": 90.0}}))[0] == pytest.approx(2.4)
    assert policy(ctx({"outstanding_steps": {"a": 0.0}}))[0] == 0  # Serve clamps to min_replicas
    assert policy(ctx({}))[0] == 3  # nothing reported yet: keep the target
    by_canvases = WorkPolicy(target=4, metric="live_canvases")
    assert by_canvases(ctx({"live_canvases": {"a": 6.0, "b": 6.0}}))[0] == 3


# ---------------------------------------------------------------- under serve run

ADDED = re.compile(r"Adding (\d+) replicas? to Deployment\(name='Pool-cpu'")
REMOVED = re.compile(r"Removing (\d+) replicas? from Deployment\(name='Pool-cpu'")
HEAVY = {"text": "Tell me about the sea.", "tier": "quality", "max_new_tokens": 64, "adaptive_stop": False}
HEAVY |= {"max_denoising_steps": 48}
LIGHT = {"text": "reverse: a b c", "tier": "fast", "max_new_tokens": 16}


def autoscaled_config() -> dict:
    config = copy.deepcopy(shipped_config())
    pool = config["applications"][0]["args"]["pools"]["cpu"]
    pool.pop("replicas")
    pool.update(slots=8, threads=1)  # two replicas of one thread each on two cores
    pool["autoscaling"] = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target": 200,  # outstanding steps per replica: four 48-step canvases of a heavy request
        "upscale_delay_s": 0,
        "downscale_delay_s": 5,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2,
    }
    return config


def count(pattern: re.Pattern, log: str) -> int:
    return sum(int(m.group(1)) for m in pattern.finditer(log))


@pytest.mark.slow
def test_a_pool_scales_up_under_a_burst_and_down_after_it_without_a_failed_request(served):
    app = served.get(autoscaled_config())
    start_adds = count(ADDED, app.log.read_text())
    assert start_adds == 1  # the first replica

    async def scenario() -> dict:
        outcomes: list[str] = []
        phase = {"burst": True, "trickle": True}
        seen: dict[str, float] = {}

        async def call(client: httpx.AsyncClient, body: dict) -> None:
            r = await client.post("/v1/generate", json=body)
            ok = r.status_code == 200 and r.json()["finish_reason"] in ("eos", "length") and r.json()["text"]
            outcomes.append("ok" if ok else f"{r.status_code}: {r.text[:200]}")

        async def heavy(client: httpx.AsyncClient) -> None:
            while phase["burst"]:
                await call(client, HEAVY)

        async def light(client: httpx.AsyncClient) -> None:
            while phase["trickle"]:
                await call(client, LIGHT)
                await asyncio.sleep(0.5)

        async def watch() -> None:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                log = app.log.read_text()
                if "up" not in seen and count(ADDED, log) > start_adds:
                    seen["up"] = time.monotonic()
                    await asyncio.sleep(10)  # the new replica serves part of the burst
                    phase["burst"] = False
                if "up" in seen and count(REMOVED, log) >= 1:
                    seen["down"] = time.monotonic()
                    await asyncio.sleep(3)  # requests keep coming while the removed replica drains
                    break
                await asyncio.sleep(0.5)
            phase["burst"] = phase["trickle"] = False

        async with httpx.AsyncClient(base_url=app.http, timeout=120) as client:
            await asyncio.gather(watch(), light(client), *(heavy(client) for _ in range(12)))
        return {"outcomes": outcomes, "seen": seen}

    result = asyncio.run(scenario())
    assert "up" in result["seen"], f"no scale-up:\n{app.log.read_text()[-3000:]}"
    assert "down" in result["seen"], f"no scale-down after the burst:\n{app.log.read_text()[-3000:]}"
    failed = [o for o in result["outcomes"] if o != "ok"]
    assert not failed and len(result["outcomes"]) > 20, failed[:5]


def test_an_autoscaled_config_survives_the_round_trip_to_its_replicas():
    """The builder hands each replica and the ingress the validated config as a dict; it must validate again."""
    from serving.config import AppConfig

    args = autoscaled_config()["applications"][0]["args"]
    config = AppConfig(**args)
    assert AppConfig(**config.model_dump()) == config
    assert Pool(**config.pools["cpu"].model_dump()).autoscaling.max_replicas == 2
