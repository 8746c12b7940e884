"""Regenerates the Python gRPC stubs in protos/persona/v1/ from the .proto files next to them.

Run `python tools/gen_protos.py` after editing a .proto; tests/unit/test_stubs_fresh.py fails
when the committed stubs differ from what this produces (grpcio-tools is pinned in pyproject).
"""
from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"


def generate(out_dir: Path = PROTO_ROOT) -> list[Path]:
    """Runs protoc over every persona .proto, writing *_pb2.py, *_pb2.pyi and *_pb2_grpc.py."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("persona/v1/*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")  # google/protobuf/*.proto
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    return sorted(p for p in (out_dir / "persona" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(PROTO_ROOT.parent), file=sys.stderr)
