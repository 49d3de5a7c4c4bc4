"""Regenerate the protobuf and gRPC stubs from ``protos/``.

Run ``python -m apdispatch.common.protocol.generate`` (or ``make generate``).

The stubs are committed so that installing apdispatch needs no compiler; a test
regenerates them into a temporary folder and fails when they differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = ROOT / "protos"
PROTO_FILES = ("apdispatch/common/protocol/oip.proto", "apdispatch/common/protocol/dispatcher.proto")


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs under ``out_dir`` (mirroring the proto paths); return the files written."""
    from grpc_tools import protoc  # dev dependency: only needed here

    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(PROTO_ROOT / name) for name in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return sorted(p for p in (out_dir / "apdispatch" / "common" / "protocol").glob("*_pb2*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repo)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
