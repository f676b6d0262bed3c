"""Regenerate (or check) the Python modules of protos/diffusiongemma/v1/diffusion.proto.

    python -m protos.compile          # rewrite diffusion_pb2.py, diffusion_pb2_grpc.py, diffusion_pb2.pyi
    python -m protos.compile --check  # exit 1 if the checked-in modules differ from what protoc makes now

The import root is the repository, so the generated modules import each other as `protos.diffusiongemma.v1`,
which is where the package installs them (the Serve proxy and replicas import them from there).

protoc's output depends on its version, so both commands run only with the grpcio-tools that requirements/lock.txt
pins: then a module that differs means the .proto changed and was not regenerated, nothing else.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("protos/diffusiongemma/v1/diffusion.proto")
OUTPUTS = ("diffusion_pb2.py", "diffusion_pb2_grpc.py", "diffusion_pb2.pyi")
LOCK = ROOT / "requirements" / "lock.txt"


def locked_generator() -> str:
    """The grpcio-tools version the lock pins: the one the checked-in modules are written with."""
    found = re.search(r"^grpcio-tools==(\S+)", LOCK.read_text(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"{LOCK} pins no grpcio-tools")
    return found.group(1)


def check_generator() -> None:
    """Refuse to run protoc from any grpcio-tools but the locked one, whose output is what is checked in."""
    installed, locked = importlib.metadata.version("grpcio-tools"), locked_generator()
    if installed != locked:
        raise RuntimeError(
            f"grpcio-tools {installed} is installed, the lock pins {locked}: "
            "pip install -c requirements/lock.txt grpcio-tools (to move the generator, see docs/dependencies.md)"
        )


def generate(out_root: Path) -> None:
    from grpc_tools import protoc

    check_generator()
    args = [
        "protoc",
        f"-I{ROOT}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--pyi_out={out_root}",
        str(ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")


def stale() -> list[str]:
    """Names of the checked-in modules that differ from a fresh protoc run."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / PROTO.parent
        here = ROOT / PROTO.parent
        return [n for n in OUTPUTS if not (here / n).is_file() or (here / n).read_bytes() != (fresh / n).read_bytes()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    try:
        check_generator()
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 2
    if args.check:
        names = stale()
        if names:
            print(f"stale: {', '.join(names)}; run `python -m protos.compile`", file=sys.stderr)
            return 1
        return 0
    generate(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
