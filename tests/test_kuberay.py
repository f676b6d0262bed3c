"""deploy/kuberay/rayservice.yaml against the RayService CRD of KubeRay v1.7.0 (vendored schema, strict: unknown
keys fail), its serveConfigV2 against Ray Serve's ServeDeploySchema and our AppConfig, and against
deploy/gpu.yaml (drift fails); the documented commands run."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import yaml

from deploy.rayservice import CRD_SCHEMA, GPU_CONFIG, MANIFEST, check, schema_errors, serve_config_errors, synced

ROOT = MANIFEST.parent.parent.parent


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def test_the_vendored_schema_names_its_release():
    data = json.loads(CRD_SCHEMA.read_text())
    assert data["kuberay_version"] == "v1.7.0" and len(data["commit"]) == 40
    assert "spec" in data["openAPIV3Schema"]["properties"]


def test_the_shipped_manifest_passes_strict_validation_and_has_no_drift():
    assert check() == []
    run = subprocess.run([sys.executable, "-m", "deploy.rayservice", "check"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_a_misspelt_key_fails_only_in_strict_mode(manifest):
    bad = copy.deepcopy(manifest)
    group = bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["rayStartParam"] = group.pop("rayStartParams")
    assert schema_errors(bad, strict_mode=False) == []  # the API server would prune it silently
    errors = schema_errors(bad)
    assert any("workerGroupSpecs.0" in e and "rayStartParam" in e for e in errors), errors


def test_a_wrong_type_fails_in_both_modes(manifest):
    bad = copy.deepcopy(manifest)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert schema_errors(bad, strict_mode=False) and schema_errors(bad)


def test_serve_config_typos_are_refused():
    config = yaml.safe_load(GPU_CONFIG.read_text())
    config["grpc_options"]["grpc_servicer_function"] = config["grpc_options"].pop("grpc_servicer_functions")
    assert any("grpc_servicer_function" in e for e in serve_config_errors(yaml.safe_dump(config)))
    config = yaml.safe_load(GPU_CONFIG.read_text())
    config["applications"][0]["args"]["pools"]["main"]["autoscaling"]["max_replica"] = 9
    assert any("max_replica" in e for e in serve_config_errors(yaml.safe_dump(config)))


def test_drift_from_gpu_yaml_is_reported(tmp_path):
    text = MANIFEST.read_text().replace("max_queue: 256", "max_queue: 128", 1)
    path = tmp_path / "rayservice.yaml"
    path.write_text(text)
    assert any("differs from deploy/gpu.yaml" in e for e in check(path))
    assert synced(text, GPU_CONFIG.read_text()) == MANIFEST.read_text()  # sync restores it


def test_gpu_worker_pods_follow_the_pools_autoscaling_bounds(manifest):
    from serving.config import AppConfig

    pools = AppConfig(**yaml.safe_load(GPU_CONFIG.read_text())["applications"][0]["args"]).pools
    cluster = manifest["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert group["minReplicas"] == sum(p.autoscaling.min_replicas for p in pools.values()) == group["replicas"]
    assert group["maxReplicas"] == sum(p.autoscaling.max_replicas for p in pools.values())
    assert group["rayStartParams"]["num-gpus"] == "1" and all(p.num_gpus == 1 for p in pools.values())


def test_probes_reach_the_apps_health_endpoints_on_the_serve_ports(manifest):
    cluster = manifest["spec"]["rayClusterConfig"]
    serve = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    (worker,) = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    assert head["readinessProbe"]["httpGet"] == {"path": "/health", "port": serve["http_options"]["port"]}
    assert worker["readinessProbe"]["grpc"]["port"] == serve["grpc_options"]["port"]
    servicers = serve["grpc_options"]["grpc_servicer_functions"]
    assert "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server" in servicers
    for container in (head, worker):  # KubeRay >= 1.6 puts ports named serve-* on the serve Service
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == 8000 and ports["serve-grpc"] == serve["grpc_options"]["port"]


def test_the_control_plane_is_closed_and_the_head_may_fail(manifest):
    """What a platform team asks of the manifest before it runs: token auth with a Secret (no token in the file),
    Redis-backed GCS fault tolerance with its password from a Secret, the head out of the serve Service, the
    network policy admitting only the serve ports (from the ingress namespace) and metrics (from monitoring),
    non-root containers with read-only root filesystems and limits on every one, thresholds set on purpose."""
    spec = manifest["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}  # the Secret is KubeRay's (or secretName), never a literal
    gcs = cluster["gcsFaultToleranceOptions"]
    assert gcs["redisAddress"] and "secretKeyRef" in gcs["redisPassword"]["valueFrom"]
    assert spec["excludeHeadPodFromServeSvc"] is True
    assert spec["serviceUnhealthySecondThreshold"] >= 600 and spec["deploymentUnhealthySecondThreshold"] >= 600
    assert spec["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade")
    policy = cluster["networkPolicy"]
    assert policy["mode"] in ("DenyAll", "DenyAllIngress")
    opened = {
        (side, port["port"], peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
        for side in ("head", "worker")
        for rule in policy[side]["ingressRules"]
        for port in rule["ports"]
        for peer in rule["from"]
    }
    assert opened == {("head", 8080, "monitoring"), ("worker", 8000, "ingress"), ("worker", 9000, "ingress"),
                      ("worker", 8080, "monitoring")}  # fmt: skip
    assert not {8265, 6379, 10001} & {port for _, port, _ in opened}
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    containers = [c for pod in pods for c in pod["containers"]] + [cluster["autoscalerOptions"]]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
    for c in containers:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])  # Ray writes its session files there
