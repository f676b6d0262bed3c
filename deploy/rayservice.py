"""The KubeRay manifests (deploy/kuberay/*.yaml): keep the RayService's serveConfigV2 equal to deploy/gpu.yaml,
validate every manifest offline, and pin the serving image by digest.

    python -m deploy.rayservice sync            # rewrite serveConfigV2 from deploy/gpu.yaml
    python -m deploy.rayservice check           # exit 1 on drift or on any schema error (strict)
    python -m deploy.rayservice check --release # ... and on an image not pinned by digest
    python -m deploy.rayservice pin --metadata build.json   # the digest `docker buildx build --metadata-file` wrote
    python -m deploy.rayservice pin REGISTRY/diffusiongemma-serve@sha256:<digest>
    python -m deploy.rayservice vendor-crd ray.io_rayservices.yaml --version v1.7.0 --commit <sha>

The RayService CRD's v1 openAPIV3Schema is vendored as deploy/kuberay/schema/rayservice-crd-<version>.json (descriptions
dropped: they are most of its megabyte and validate nothing). Strict mode closes every object schema that lists
its properties and does not preserve unknown fields (what `kubeconform -strict` does): a misspelt key, which the
API server would prune without a word, is an error here. serveConfigV2 is a string to Kubernetes; it is parsed
and checked against Ray Serve's ServeDeploySchema and our AppConfig, with unknown keys refused as well; the
feature gates and Ray version KubeRay's own validation asks for the fields used are checked too. Every
other manifest (the disruption budget) is checked against Kubernetes' own strict schemas, as kubernetes-validate
ships them, for the oldest and newest Kubernetes release named in KUBERNETES_VERSIONS.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
KUBERAY = DEPLOY / "kuberay"
MANIFEST = KUBERAY / "rayservice.yaml"
GPU_CONFIG = DEPLOY / "gpu.yaml"
CRD_VERSION = "v1.7.0"
SCHEMAS = KUBERAY / "schema"  # out of `kubectl apply -f deploy/kuberay/`, which reads only the folder itself
CRD_SCHEMA = SCHEMAS / f"rayservice-crd-{CRD_VERSION}.json"
SERVE_CONFIG_KEY = "  serveConfigV2: |\n"
# KubeRay v1.7 and a platform's clusters: the oldest Kubernetes still in support and the newest release schemas
# exist for. A manifest must be valid on both.
KUBERNETES_VERSIONS = ("1.31", "1.37")


# ---------------------------------------------------------------- serveConfigV2 <- gpu.yaml


def synced(manifest: str, serve_config: str) -> str:
    """The manifest text with its serveConfigV2 block replaced by `serve_config`, indented as a block scalar
    (comments and everything else kept)."""
    start = manifest.index(SERVE_CONFIG_KEY) + len(SERVE_CONFIG_KEY)
    end = start
    lines = manifest[start:].splitlines(keepends=True)
    for line in lines:  # the block runs while lines are blank or indented deeper than the key
        if line.strip() and not line.startswith("    "):
            break
        end += len(line)
    block = "".join(("    " + line if line.strip() else line) for line in serve_config.splitlines(keepends=True))
    return manifest[:start] + block + manifest[end:]


# ---------------------------------------------------------------- the CRD schema


def strip_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def vendor_crd(crd_path: Path, version: str, commit: str) -> Path:
    crd = yaml.safe_load(crd_path.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    out = SCHEMAS / f"rayservice-crd-{version}.json"
    data = {
        "source": "https://github.com/ray-project/kuberay/blob/"
        f"{version}/ray-operator/config/crd/bases/ray.io_rayservices.yaml",
        "kuberay_version": version,
        "commit": commit,
        "crd_version": "v1",
        "openAPIV3Schema": strip_descriptions(v1["schema"]["openAPIV3Schema"]),
    }
    out.write_text(json.dumps(data, separators=(",", ":"), sort_keys=True) + "\n")
    return out


def strict(schema: Any) -> Any:
    """Close every object schema that names its properties, unless it preserves unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def schema_errors(doc: dict, strict_mode: bool = True) -> list[str]:
    import jsonschema

    schema = json.loads(CRD_SCHEMA.read_text())["openAPIV3Schema"]
    validator = jsonschema.Draft7Validator(strict(schema) if strict_mode else schema)
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def unknown_keys(data: Any, model: Any, where: str) -> list[str]:
    """Keys a pydantic model of Ray Serve's schema would silently ignore."""
    from pydantic import BaseModel

    if not isinstance(data, dict) or not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    errors = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            errors.append(f"{where}.{key}: not a field of {model.__name__}")
            continue
        inner = getattr(field.annotation, "__args__", None) or (field.annotation,)
        for sub in inner:
            if isinstance(value, list):
                for i, item in enumerate(value):
                    for arg in getattr(sub, "__args__", ()) or ():
                        errors += unknown_keys(item, arg, f"{where}.{key}[{i}]")
            else:
                errors += unknown_keys(value, sub, f"{where}.{key}")
    return errors


def serve_config_errors(text: str) -> list[str]:
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from serving.config import AppConfig

    config = yaml.safe_load(text)
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        return [f"serveConfigV2: {e['loc']}: {e['msg']}" for e in exc.errors()]
    errors = unknown_keys(config, ServeDeploySchema, "serveConfigV2")
    for i, app in enumerate(config.get("applications", [])):
        try:
            AppConfig(**app.get("args", {}))  # our own args refuse unknown keys themselves
        except ValidationError as exc:
            errors += [f"serveConfigV2.applications[{i}].args: {e['loc']}: {e['msg']}" for e in exc.errors()]
    return errors


# ---------------------------------------------------------------- what KubeRay refuses beyond its schema

# The feature gates the operator must run with (deploy/kuberay/README.md says how). KubeRay 1.7's own validation
# (ray-operator/controllers/ray/utils/validation.go) refuses a cluster that uses a gated field while the gate is
# off, which no schema says: a field needing another gate is an error here.
FEATURE_GATES = {"RayClusterNetworkPolicy"}
TOKEN_AUTH_MIN_RAY = (2, 52)
# Fields the CRD still accepts but KubeRay no longer reads (`Deprecated:` in v1.7.0's rayservice_types.go; the
# generated CRD carries no description for them): setting one would look like a decision and be none.
IGNORED_FIELDS = ("serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold")


def kuberay_errors(doc: dict) -> list[str]:
    cluster = doc["spec"]["rayClusterConfig"]
    gated = {
        "RayClusterNetworkPolicy": "networkPolicy" in cluster,
        "RayClusterMTLS": "tlsOptions" in cluster,  # any tlsOptions, `enabled: false` included
        "GCSFaultToleranceEmbeddedStorage": cluster.get("gcsFaultToleranceOptions", {}).get("backend") == "rocksdb",
    }  # (RayServiceIncrementalUpgrade, for NewClusterWithIncrementalUpgrade, is beta and on by default)
    set_up = ", ".join(sorted(FEATURE_GATES))
    missing = [gate for gate, used in gated.items() if used and gate not in FEATURE_GATES]
    errors = [
        f"rayClusterConfig: needs KubeRay's {gate} feature gate; the operator is set up with {set_up}"
        for gate in missing
    ]
    errors += [f"spec.{field}: ignored by KubeRay since 1.1 (deprecated); remove it" for field in IGNORED_FIELDS
               if field in doc["spec"]]  # fmt: skip
    if cluster.get("authOptions", {}).get("mode") == "token":
        version = tuple(int(x) for x in str(cluster.get("rayVersion", "0")).split(".")[:2])
        if version < TOKEN_AUTH_MIN_RAY:
            errors.append(f"rayClusterConfig.rayVersion: token authentication needs Ray >= 2.52, not {version}")
    return errors


# ---------------------------------------------------------------- the image, pinned by digest

DIGEST_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*@sha256:[0-9a-f]{64}$")
IMAGE_LINE = re.compile(r"^(?P<key>\s*image:\s*)(?P<ref>\S+)(?P<rest>.*)$", re.MULTILINE)


def digest_ref(ref: str) -> str:
    """`ref` if it names an image by digest (repository@sha256:<64 hex>), else ValueError: a tag can move, so
    two pods started an hour apart could run different code."""
    if not DIGEST_REF.match(ref):
        raise ValueError(f"{ref!r} is not an image pinned by digest (repository@sha256:<64 hex digits>)")
    return ref


def build_metadata_ref(metadata: dict) -> str:
    """The digest reference of what `docker buildx build --push --metadata-file F` built: its first image name,
    without the tag, at `containerimage.digest`."""
    try:
        name, digest = metadata["image.name"].split(",")[0].strip(), metadata["containerimage.digest"]
    except KeyError as exc:
        raise ValueError(f"build metadata has no {exc.args[0]!r}: was the image built with --push?") from None
    repository = name.split("@")[0]
    if ":" in repository.rsplit("/", 1)[-1]:  # a tag, not a registry's port
        repository = repository.rsplit(":", 1)[0]
    return digest_ref(f"{repository}@{digest}")


def pinned(manifest: str, ref: str) -> str:
    """The manifest text with every container's `image:` set to `ref` (comments and layout kept)."""
    ref = digest_ref(ref)
    return IMAGE_LINE.sub(lambda m: f"{m['key']}{ref}{m['rest']}", manifest)


def containers(doc: dict) -> list[tuple[str, dict]]:
    """(where, container) for every container a RayService starts (the autoscaler sidecar uses the head's image
    unless autoscalerOptions names one)."""
    cluster = doc["spec"]["rayClusterConfig"]
    groups = [("headGroupSpec", cluster["headGroupSpec"])]
    groups += [(f"workerGroupSpecs[{g['groupName']}]", g) for g in cluster.get("workerGroupSpecs", [])]
    found = [(f"{where}.{c['name']}", c) for where, group in groups for c in group["template"]["spec"]["containers"]]
    if "image" in cluster.get("autoscalerOptions", {}):
        found.append(("autoscalerOptions", cluster["autoscalerOptions"]))
    return found


def unpinned_images(doc: dict) -> list[str]:
    errors = []
    for where, container in containers(doc):
        try:
            digest_ref(container.get("image", ""))
        except ValueError as exc:
            errors.append(f"{where}.image: {exc}; build, push and run `python -m deploy.rayservice pin`")
    return errors


# ---------------------------------------------------------------- every manifest


def kubernetes_errors(doc: dict, where: str) -> list[str]:
    """A plain Kubernetes object against Kubernetes' strict schemas (unknown keys fail), on every version."""
    import kubernetes_validate

    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            at = ".".join(str(p) for p in exc.absolute_path) or "<root>"
            errors.append(f"{where}: Kubernetes {version}: {at}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{where}: {exc.message}")
    return errors


def rayservice_errors(manifest_path: Path, release: bool = False) -> list[str]:
    text = manifest_path.read_text()
    errors = []
    if synced(text, GPU_CONFIG.read_text()) != text:
        errors.append("serveConfigV2 differs from deploy/gpu.yaml: run `python -m deploy.rayservice sync`")
    doc = yaml.safe_load(text)
    errors += schema_errors(doc)
    errors += kuberay_errors(doc)
    errors += serve_config_errors(doc["spec"]["serveConfigV2"])
    if release:
        errors += unpinned_images(doc)
    return errors


def check(directory: Path = KUBERAY, release: bool = False) -> list[str]:
    """Every YAML manifest in `directory`: the RayService against KubeRay's CRD and Serve's schema, anything else
    against Kubernetes' own; with `release`, images must be pinned by digest as well."""
    errors = []
    for path in sorted(directory.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        if any(d.get("kind") == "RayService" for d in docs):
            if len(docs) != 1:
                errors.append(f"{path.name}: the RayService must be the file's only document (sync rewrites it)")
                continue
            errors += [f"{path.name}: {e}" for e in rayservice_errors(path, release)]
            continue
        for doc in docs:
            errors += kubernetes_errors(doc, f"{path.name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}")
    return errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("sync", help="rewrite serveConfigV2 from deploy/gpu.yaml")
    chk = sub.add_parser("check", help="drift and schema errors in every manifest; exit 1 if any")
    chk.add_argument("directory", nargs="?", type=Path, default=KUBERAY)
    chk.add_argument("--release", action="store_true", help="also require every image pinned by digest")
    pin = sub.add_parser("pin", help="set the RayService's images to one reference by digest")
    source = pin.add_mutually_exclusive_group(required=True)
    source.add_argument("ref", nargs="?", help="repository@sha256:<digest>")
    source.add_argument("--metadata", type=Path, help="the file `docker buildx build --metadata-file` wrote")
    pin.add_argument("--manifest", type=Path, default=MANIFEST)
    vendor = sub.add_parser("vendor-crd", help="vendor a KubeRay release's RayService CRD schema")
    vendor.add_argument("crd", type=Path)
    vendor.add_argument("--version", required=True)
    vendor.add_argument("--commit", required=True)
    args = ap.parse_args(argv)
    if args.command == "sync":
        MANIFEST.write_text(synced(MANIFEST.read_text(), GPU_CONFIG.read_text()))
        print(f"wrote {MANIFEST}")
        return 0
    if args.command == "vendor-crd":
        print(f"wrote {vendor_crd(args.crd, args.version, args.commit)}")
        return 0
    if args.command == "pin":
        try:
            ref = build_metadata_ref(json.loads(args.metadata.read_text())) if args.metadata else digest_ref(args.ref)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        args.manifest.write_text(pinned(args.manifest.read_text(), ref))
        print(f"wrote {args.manifest}: image {ref}")
        return 0
    errors = check(args.directory, release=args.release)
    for e in errors:
        print(e, file=sys.stderr)
    print("ok" if not errors else f"{len(errors)} error(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
