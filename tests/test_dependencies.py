"""The test environment is requirements/lock.txt, and the generated gRPC modules are what its generator writes.

pyproject.toml keeps ranges for users; the lock pins one version of everything the dev extras pull in, and
.ci/run and the README's test command install with it. These tests fail when the environment is not the lock,
when the lock no longer fits pyproject.toml or requirements/pins.txt, when the .proto changed without a
regeneration, and when a range would let users install a grpcio or protobuf the generated modules refuse.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

import protos.compile
from protos.compile import LOCK, check_generator, locked_generator, stale

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
V1 = ROOT / "protos" / "diffusiongemma" / "v1"


def generated_versions() -> tuple[Version, Version]:
    """What the generated modules check at import: (the grpcio-tools that wrote them, the protoc's protobuf)."""
    grpc_module, pb_module = (V1 / "diffusion_pb2_grpc.py").read_text(), (V1 / "diffusion_pb2.py").read_text()
    grpc = re.search(r"GRPC_GENERATED_VERSION = '(.+)'", grpc_module).group(1)
    protobuf = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", pb_module).groups()
    return Version(grpc), Version(".".join(protobuf))


def requirement_lines(path: Path) -> list[Requirement]:
    """The requirements of a requirements-format file: comments, `# via` notes and blank lines dropped."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def locked() -> dict[str, Version]:
    """Package name -> the version the lock pins for this interpreter and platform (a universal lock may hold a
    package twice, under markers for different platforms)."""
    pins = {}
    for req in requirement_lines(LOCK):
        if req.marker is None or req.marker.evaluate():
            (spec,) = req.specifier
            assert spec.operator == "==", f"the lock pins {req}, not one version"
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def floor(specifier: SpecifierSet) -> Version | None:
    """The lowest version a range admits by its lower bounds (None when it has none)."""
    bounds = [Version(s.version) for s in specifier if s.operator in (">=", "==", "~=")]
    return max(bounds, default=None)


def applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": extra}) for extra in extras | {""})


def project_requirements() -> list[Requirement]:
    reqs = PROJECT["dependencies"] + PROJECT["optional-dependencies"]["dev"]
    return [Requirement(r) for r in reqs]


def test_every_package_the_project_needs_is_installed_at_its_locked_version():
    """Walks the installed project's requirements with the dev extras, and theirs, as pip resolved them: each
    must be in the lock, and installed at exactly the lock's version."""
    pins, seen, missing, off = locked(), set(), [], []
    todo = [("diffusiongemma-serve", frozenset({"dev"}))]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        for text in importlib.metadata.distribution(name).requires or []:
            req = Requirement(text)
            if not applies(req, set(extras)):
                continue
            dep = canonicalize_name(req.name)
            installed = Version(importlib.metadata.version(dep))
            if dep not in pins:
                missing.append(dep)
            elif installed.public != str(pins[dep]):  # torch's local CPU wheel is 2.13.0+cpu
                off.append(f"{dep} {installed} (lock: {pins[dep]})")
            todo.append((dep, frozenset(req.extras)))
    assert len(seen) > 100, f"only {len(seen)} packages walked: the walk is not following requirements"
    assert not missing, f"not in the lock, run sh requirements/update.sh: {sorted(set(missing))}"
    assert not off, f"installed off the lock, pip install -c requirements/lock.txt: {sorted(set(off))}"


def test_pyproject_ranges_and_the_hand_pins_admit_the_locked_versions():
    """A range edited in pyproject.toml, or a pin in requirements/pins.txt, without a new lock fails here."""
    pins = locked()
    wanted = project_requirements() + requirement_lines(ROOT / "requirements" / "pins.txt")
    outside = []
    for req in wanted:
        pin = pins.get(canonicalize_name(req.name))
        if pin is None or pin not in req.specifier:
            outside.append(f"{req} (lock: {pin})")
    assert not outside, f"the lock is older than what it is made from, run sh requirements/update.sh: {outside}"


def test_generated_grpc_modules_come_from_the_locked_generator_and_are_fresh():
    """With the locked grpcio-tools installed, a module that differs from protoc's output means the .proto
    changed and `python -m protos.compile` was not run."""
    written_by, _ = generated_versions()
    assert written_by == Version(locked_generator()), "regenerate: python -m protos.compile"
    assert stale() == [], "run `python -m protos.compile`"


def test_protoc_refuses_a_generator_other_than_the_locked_one(tmp_path, monkeypatch):
    installed = importlib.metadata.version("grpcio-tools")
    other = tmp_path / "lock.txt"
    other.write_text(f"grpcio==1.85.4\ngrpcio-tools=={installed}.1\n    # via -r requirements/pins.txt\n")
    monkeypatch.setattr(protos.compile, "LOCK", other)
    assert locked_generator() == f"{installed}.1"
    with pytest.raises(RuntimeError, match=rf"grpcio-tools {re.escape(installed)} is installed, the lock pins"):
        check_generator()
    assert protos.compile.main(["--check"]) == 2
    other.write_text("grpcio==1.85.4\n")
    with pytest.raises(RuntimeError, match="pins no grpcio-tools"):
        locked_generator()


def test_the_runtime_ranges_admit_no_grpcio_or_protobuf_the_generated_modules_refuse():
    """The generated modules raise at import under a grpcio older than the grpcio-tools that wrote them and a
    protobuf older than its protoc; a user's range must not allow either."""
    grpc_needs, protobuf_needs = generated_versions()
    ranges = {canonicalize_name(r.name): r.specifier for r in project_requirements()}
    for name, needs in (("grpcio", grpc_needs), ("grpcio-health-checking", grpc_needs), ("protobuf", protobuf_needs)):
        lowest = floor(ranges[name])
        assert lowest is not None and lowest >= needs, f"pyproject.toml admits {name} {lowest}, under {needs}"
