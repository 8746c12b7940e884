"""The committed gRPC stubs must equal a fresh generation from the .proto files."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "tools" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_protos(tmp_path):
    fresh = _generator().generate(tmp_path)
    assert {p.name for p in fresh} >= {"common_pb2.py", "subjects_pb2.py", "caption_pb2.py", "caption_pb2_grpc.py"}
    committed_dir = REPO / "protos" / "persona" / "v1"
    stale = [p.name for p in fresh if not (committed_dir / p.name).exists()
             or (committed_dir / p.name).read_bytes() != p.read_bytes()]
    assert not stale, f"stubs are stale: run `python tools/gen_protos.py` and commit ({', '.join(stale)})"
    orphans = {p.name for p in committed_dir.glob("*_pb2*.py*")} - {p.name for p in fresh}
    assert not orphans, f"stubs without a .proto: delete {', '.join(sorted(orphans))}"
