"""The KubeRay manifest (deploy/kuberay/rayservice.yaml): keep its serveConfigV2 equal to deploy/gpu.yaml and
validate it against the RayService CRD of a named KubeRay release, offline.

    python -m deploy.rayservice sync            # rewrite serveConfigV2 from deploy/gpu.yaml
    python -m deploy.rayservice check           # exit 1 on drift or on any schema error (strict)
    python -m deploy.rayservice vendor-crd ray.io_rayservices.yaml --version v1.7.0 --commit <sha>

The CRD's v1 openAPIV3Schema is vendored as deploy/kuberay/rayservice-crd-<version>.json (descriptions
dropped: they are most of its megabyte and validate nothing). Strict mode closes every object schema that lists
its properties and does not preserve unknown fields (what `kubeconform -strict` does): a misspelt key, which the
API server would prune without a word, is an error here. serveConfigV2 is a string to Kubernetes; it is parsed
and checked against Ray Serve's ServeDeploySchema and our AppConfig, with unknown keys refused as well.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
MANIFEST = DEPLOY / "kuberay" / "rayservice.yaml"
GPU_CONFIG = DEPLOY / "gpu.yaml"
CRD_VERSION = "v1.7.0"
CRD_SCHEMA = DEPLOY / "kuberay" / f"rayservice-crd-{CRD_VERSION}.json"
SERVE_CONFIG_KEY = "  serveConfigV2: |\n"


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
    out = DEPLOY / "kuberay" / f"rayservice-crd-{version}.json"
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


def check(manifest_path: Path = MANIFEST) -> list[str]:
    text = manifest_path.read_text()
    errors = []
    if synced(text, GPU_CONFIG.read_text()) != text:
        errors.append("serveConfigV2 differs from deploy/gpu.yaml: run `python -m deploy.rayservice sync`")
    doc = yaml.safe_load(text)
    errors += schema_errors(doc)
    errors += serve_config_errors(doc["spec"]["serveConfigV2"])
    return errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("sync", help="rewrite serveConfigV2 from deploy/gpu.yaml")
    chk = sub.add_parser("check", help="drift and schema errors; exit 1 if any")
    chk.add_argument("manifest", nargs="?", type=Path, default=MANIFEST)
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
    errors = check(args.manifest)
    for e in errors:
        print(e, file=sys.stderr)
    print("ok" if not errors else f"{len(errors)} error(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
