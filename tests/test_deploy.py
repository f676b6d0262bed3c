"""The shipped deploy files: Serve's own schema accepts them, our AppConfig accepts their args, the KubeRay
RayService carries deploy/gpu.yaml verbatim, and the checked-in gRPC modules match the proto."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from model.checkpoint import EMBEDDED
from model.config import SamplerSettings
from model.training.train import ENTROPY_BOUND
from model.weights import load_network
from protos.diffusiongemma.v1 import diffusion_pb2 as pb
from serving.config import AppConfig
from serving.ingress.protocol import ChatBody, CompletionBody, GenerateBody
from serving.sampling import OVERRIDE_NAMES, TierLimits, TierSampler

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.mark.parametrize("name", ["config.yaml", "gpu.yaml", "gpu-24gb.yaml"])
def test_serve_configs_validate(name):
    cfg = load(name)
    ServeDeploySchema(**cfg)
    (app,) = cfg["applications"]
    config = AppConfig(**app["args"])
    assert {"fast", "balanced", "quality"} <= set(config.tiers)


def test_cpu_config_serves_the_embedded_model_on_8000_and_9000():
    cfg = load("config.yaml")
    assert cfg["http_options"]["port"] == 8000 and cfg["grpc_options"]["port"] == 9000
    assert cfg["applications"][0]["args"]["model"] == "embedded"


def test_cpu_tiers_sample_with_the_embedded_checkpoints_entropy_bound():
    """A tier's settings are its own, not read from the checkpoint: they must repeat the bound it was tuned to."""
    _, ckpt = load_network(str(EMBEDDED))
    tiers = AppConfig(**load("config.yaml")["applications"][0]["args"]).tiers
    assert ckpt.generation.sampler.entropy_bound == ENTROPY_BOUND  # what model.training.train writes
    assert {t.sampler.entropy_bound for t in tiers.values()} == {ckpt.generation.sampler.entropy_bound}


@pytest.mark.parametrize("name, weights", [("gpu.yaml", "fp8"), ("gpu-24gb.yaml", "int4")])
def test_gpu_pools_take_one_gpu_per_replica(name, weights):
    pools = AppConfig(**load(name)["applications"][0]["args"]).pools
    assert all(p.num_gpus == 1 and p.device == "cuda" and p.weights == weights for p in pools.values())


def test_rayservice_carries_the_gpu_config():
    service = load("kuberay/rayservice.yaml")
    assert service["kind"] == "RayService"
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == load("gpu.yaml")


def test_every_sampler_knob_reaches_http_grpc_and_the_tier_config():
    """SamplerSettings is the one definition: the request bodies, the gRPC message, a tier's defaults and its
    limits all carry exactly its fields (plus the adaptive_stop switch), with its defaults and bounds."""
    knobs = {f.name for f in dataclasses.fields(SamplerSettings)}
    assert set(pb.SamplerOverrides.DESCRIPTOR.fields_by_name) == knobs | {"adaptive_stop"} == set(OVERRIDE_NAMES)
    for body in (GenerateBody, ChatBody, CompletionBody):
        assert knobs | {"adaptive_stop"} <= set(body.model_fields)
    assert set(TierLimits.model_fields) == knobs | {"adaptive_stop"}
    assert TierSampler().settings() == SamplerSettings()
    with pytest.raises(ValidationError, match="max_denoising_steps"):
        GenerateBody(text="hi", max_denoising_steps=0)  # SamplerSettings' bound ge=1
    with pytest.raises(ValidationError, match="entropy_bound"):
        TierSampler(entropy_bound=0)  # gt=0


@pytest.mark.parametrize("name", ["config.yaml", "gpu.yaml", "gpu-24gb.yaml"])
def test_health_checks_and_drains_are_set_on_purpose_and_reach_serve(name):
    """Every pool names its health check and drain; the ingress drains as long as its longest pool."""
    from ray.serve._private.build_app import build_app

    from serving.app import build

    args = load(name)["applications"][0]["args"]
    raw_pools = args["pools"].values()
    assert all({"health_check_period_s", "graceful_shutdown_timeout_s"} <= set(p) for p in raw_pools)
    deployments = {d.name: d._deployment_config for d in build_app(build(args), name="app").deployments}
    for pool_name, pool in args["pools"].items():
        built = deployments[f"Pool-{pool_name}"]
        assert built.graceful_shutdown_timeout_s == pool["graceful_shutdown_timeout_s"]
        assert built.health_check_period_s == pool["health_check_period_s"]
    longest = max(p["graceful_shutdown_timeout_s"] for p in raw_pools)
    assert deployments["Ingress"].graceful_shutdown_timeout_s == longest
