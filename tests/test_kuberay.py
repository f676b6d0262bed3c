"""deploy/kuberay/: the RayService against the RayService CRD of KubeRay v1.7.0 (vendored schema, strict: unknown
keys fail), its serveConfigV2 against Ray Serve's ServeDeploySchema and our AppConfig, and against
deploy/gpu.yaml (drift fails); the disruption budget against Kubernetes' strict schemas; the image pinned by
digest for a release; the documented commands run."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import yaml

from deploy.rayservice import (
    CRD_SCHEMA,
    GPU_CONFIG,
    KUBERAY,
    MANIFEST,
    build_metadata_ref,
    check,
    containers,
    kuberay_errors,
    pinned,
    rayservice_errors,
    schema_errors,
    serve_config_errors,
    synced,
)

ROOT = MANIFEST.parent.parent.parent
PDB = KUBERAY / "pdb.yaml"
DIGEST = "sha256:" + "0123456789abcdef" * 4


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
    assert any("differs from deploy/gpu.yaml" in e for e in rayservice_errors(path))
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
    non-root containers with read-only root filesystems and limits on every one, health watched where it acts."""
    spec = manifest["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}  # the Secret is KubeRay's (or secretName), never a literal
    gcs = cluster["gcsFaultToleranceOptions"]
    assert gcs["redisAddress"] and "secretKeyRef" in gcs["redisPassword"]["valueFrom"]
    assert spec["excludeHeadPodFromServeSvc"] is True
    # KubeRay 1.7 ignores the unhealthy thresholds: left out, and check refuses them (Serve's health checks act)
    assert "serviceUnhealthySecondThreshold" not in spec and "deploymentUnhealthySecondThreshold" not in spec
    ignored = copy.deepcopy(manifest)
    ignored["spec"]["serviceUnhealthySecondThreshold"] = 900
    assert schema_errors(ignored) == [] and any("ignored by KubeRay" in e for e in kuberay_errors(ignored))
    pools = yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"]["pools"].values()
    assert all(p["health_check_period_s"] and p["health_check_timeout_s"] >= 60 for p in pools)
    assert spec["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade")
    drains = [
        p["graceful_shutdown_timeout_s"]
        for p in yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"]["pools"].values()
    ]
    assert spec["rayClusterDeletionDelaySeconds"] > max(drains)  # the old cluster finishes its streams first
    assert "tlsOptions" not in cluster  # KubeRay 1.7 refuses any tlsOptions (even disabled) without its mTLS gate
    policy = cluster["networkPolicy"]
    assert policy["mode"] in ("DenyAll", "DenyAllIngress")
    opened = {
        (side, port["port"], peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
        for side in ("head", "worker")
        for rule in policy[side]["ingressRules"]
        for port in rule["ports"]
        for peer in rule["from"]
    }
    assert opened == {("head", 8265, "kuberay-system"), ("head", 8080, "monitoring"), ("worker", 8000, "ingress"),
                      ("worker", 9000, "ingress"), ("worker", 8080, "monitoring")}  # fmt: skip
    assert not {6379, 10001} & {port for _, port, _ in opened}
    # the dashboard (whose Jobs API runs any code) opens to the operator's pods alone, not its whole namespace
    (operator,) = [peer for rule in policy["head"]["ingressRules"] for peer in rule["from"]
                   if any(port["port"] == 8265 for port in rule["ports"])]  # fmt: skip
    assert operator["podSelector"]["matchLabels"] == {"app.kubernetes.io/component": "kuberay-operator"}
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    containers = [c for pod in pods for c in pod["containers"]] + [cluster["autoscalerOptions"]]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        for volume in pod["volumes"]:  # disk-backed scratch space is bounded (memory-backed counts in the limit)
            assert volume["emptyDir"].get("medium") == "Memory" or volume["emptyDir"]["sizeLimit"], volume
    assert all(pod["automountServiceAccountToken"] is False for pod in pods[1:])  # the head's autoscaler needs it
    for c in containers:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])  # Ray writes its session files there


def test_ray_internal_tls_switches_on_within_the_crd_and_needs_its_gate(manifest):
    tls = copy.deepcopy(manifest)
    tls["spec"]["rayClusterConfig"]["tlsOptions"] = {"enabled": True}
    assert schema_errors(tls) == []
    tls["spec"]["rayClusterConfig"]["tlsOptions"] = {"enabled": True, "issuer": "ca"}  # KubeRay brings its own
    assert any("issuer" in e for e in schema_errors(tls))
    # valid to the schema, refused by KubeRay 1.7's operator unless it runs with RayClusterMTLS, even when false
    assert kuberay_errors(manifest) == []
    for enabled in (True, False):
        tls["spec"]["rayClusterConfig"]["tlsOptions"] = {"enabled": enabled}
        assert any("RayClusterMTLS" in e for e in kuberay_errors(tls))


def test_token_auth_needs_a_ray_that_has_it(manifest):
    old = copy.deepcopy(manifest)
    old["spec"]["rayClusterConfig"]["rayVersion"] = "2.50.0"
    assert schema_errors(old) == [] and any("Ray >= 2.52" in e for e in kuberay_errors(old))


def test_probes_keep_ray_alive_without_the_token(manifest):
    """Liveness is Ray's /api/healthz on the dashboard agent (tests/test_token_auth.py shows it answers without
    the token in token mode), with a threshold long enough that a slow node is not killed."""
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        probe = container["livenessProbe"]
        agent_port = int(group["rayStartParams"].get("dashboard-agent-listen-port", 52365))
        assert probe["httpGet"] == {"path": "/api/healthz", "port": agent_port}
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 300


def test_the_disruption_budget_guards_the_gpu_workers_only(manifest):
    pdb = yaml.safe_load(PDB.read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    selector = pdb["spec"]["selector"]["matchLabels"]
    worker_labels = cluster["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
    head_labels = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
    assert selector.items() <= worker_labels.items()  # every GPU worker pod, of either cluster during an upgrade
    assert not selector.items() <= head_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"  # a wedged pod never blocks a node drain


def test_every_manifest_in_the_folder_is_checked_against_kubernetes_strictly(tmp_path):
    """check() reads every YAML file in deploy/kuberay/: a typo in the budget, a wrong type, or a kind with no
    schema fails; the shipped folder passes."""
    assert check(KUBERAY) == []
    pdb = yaml.safe_load(PDB.read_text())
    typo = copy.deepcopy(pdb)
    typo["spec"]["maxUnavailabe"] = typo["spec"].pop("maxUnavailable")
    (tmp_path / "pdb.yaml").write_text(yaml.safe_dump(typo))
    errors = check(tmp_path)
    assert errors and all("maxUnavailabe" in e for e in errors) and len(errors) == 2, errors  # both versions
    wrong = copy.deepcopy(pdb)
    wrong["spec"]["selector"]["matchLabels"] = ["gpu-worker"]
    (tmp_path / "pdb.yaml").write_text(yaml.safe_dump(wrong))
    assert any("spec.selector.matchLabels" in e for e in check(tmp_path))
    (tmp_path / "pdb.yaml").write_text(yaml.safe_dump({**pdb, "apiVersion": "policy/v1alpha9"}))
    assert any("Couldn't find schema" in e for e in check(tmp_path))


def test_a_release_needs_the_image_pinned_by_digest(tmp_path):
    """The documented build: `docker buildx build --push --metadata-file build.json`, then `pin --metadata`
    writes the pushed digest into every container; `check --release` refuses the manifest until then."""
    folder = tmp_path / "kuberay"
    shutil.copytree(KUBERAY, folder)
    run = lambda *args: subprocess.run([sys.executable, "-m", "deploy.rayservice", *args], cwd=ROOT,  # noqa: E731
                                       capture_output=True, text=True)  # fmt: skip
    refused = run("check", str(folder), "--release")
    assert refused.returncode == 1
    assert "headGroupSpec.ray-head.image" in refused.stderr and "workerGroupSpecs[h100].ray-worker" in refused.stderr
    metadata = tmp_path / "build.json"
    metadata.write_text(json.dumps({"image.name": "registry.example.com:5000/ml/diffusiongemma-serve:0.1.0",
                                    "containerimage.digest": DIGEST}))  # fmt: skip
    pin = run("pin", "--metadata", str(metadata), "--manifest", str(folder / "rayservice.yaml"))
    assert pin.returncode == 0, pin.stderr
    doc = yaml.safe_load((folder / "rayservice.yaml").read_text())
    assert {c["image"] for _, c in containers(doc)} == {f"registry.example.com:5000/ml/diffusiongemma-serve@{DIGEST}"}
    assert run("check", str(folder), "--release").returncode == 0
    assert (folder / "rayservice.yaml").read_text().count("#") == MANIFEST.read_text().count("#")  # comments kept


@pytest.mark.parametrize(
    "ref",
    ["registry/diffusiongemma-serve:0.1.0", "registry/diffusiongemma-serve@sha256:abc", f"@{DIGEST}", ""],
)
def test_only_a_digest_reference_can_be_pinned(ref):
    with pytest.raises(ValueError, match="pinned by digest"):
        pinned(MANIFEST.read_text(), ref)


def test_build_metadata_without_a_pushed_digest_is_refused():
    with pytest.raises(ValueError, match="containerimage.digest"):
        build_metadata_ref({"image.name": "registry/diffusiongemma-serve:0.1.0"})
    # several names: the first, its tag dropped; a registry's port is not a tag
    names = "localhost:5000/diffusiongemma-serve:0.1.0,localhost:5000/diffusiongemma-serve:latest"
    ref = build_metadata_ref({"image.name": names, "containerimage.digest": DIGEST})
    assert ref == f"localhost:5000/diffusiongemma-serve@{DIGEST}"


def test_an_evicted_gpu_worker_drains_its_ray_node_first(manifest):
    """The worker's preStop hook runs deploy/node_drain.py (tests/test_eviction.py shows what it does) with a
    deadline past the pools' graceful stop, and the pod's grace period outlasts the hook."""
    from deploy import node_drain

    pools = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"]["pools"]
    (group,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:3] == ["python", "-m", "deploy.node_drain"]
    args = node_drain.parser().parse_args(command[3:])
    assert args.node_id is None  # this pod's own node, found by its IP on the cluster at RAY_ADDRESS (KubeRay's)
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert args.deadline_s > max(p["graceful_shutdown_timeout_s"] for p in pools.values())
    assert pod["terminationGracePeriodSeconds"] >= args.deadline_s + 30


def test_no_replica_can_land_on_the_head(manifest):
    """The head's restart must take no replica with it: it offers no CPU or GPU, every pool replica asks for
    both, and the ingress (twice over) asks for a CPU through the serve config's override; a worker fits its
    pool replica and an ingress."""
    from deploy.drain import INGRESS

    cluster = manifest["spec"]["rayClusterConfig"]
    serve = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    app = serve["applications"][0]
    head = cluster["headGroupSpec"]["rayStartParams"]
    assert head["num-cpus"] == "0" and head["num-gpus"] == "0"
    (ingress,) = [d for d in app["deployments"] if d["name"] == INGRESS]
    assert ingress["ray_actor_options"]["num_cpus"] > 0 and ingress["num_replicas"] >= 2
    (worker,) = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    worker_cpus = float(worker["resources"]["limits"]["cpu"])
    for pool in app["args"]["pools"].values():
        assert pool["num_cpus"] > 0 and pool["num_gpus"] == 1
        assert pool["num_cpus"] + ingress["ray_actor_options"]["num_cpus"] <= worker_cpus
