"""Regenerate (or check) the Python modules of protos/diffusiongemma/v1/diffusion.proto.

    python -m protos.generate          # rewrite diffusion_pb2.py, diffusion_pb2_grpc.py, diffusion_pb2.pyi
    python -m protos.generate --check  # exit 1 if the checked-in modules differ from what protoc makes now

The import root is the repository, so the generated modules import each other as `protos.diffusiongemma.v1`,
which is where the package installs them (the Serve proxy and replicas import them from there).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("protos/diffusiongemma/v1/diffusion.proto")
OUTPUTS = ("diffusion_pb2.py", "diffusion_pb2_grpc.py", "diffusion_pb2.pyi")


def generate(out_root: Path) -> None:
    from grpc_tools import protoc

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
    if args.check:
        names = stale()
        if names:
            print(f"stale: {', '.join(names)}; run `python -m protos.generate`", file=sys.stderr)
            return 1
        return 0
    generate(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
