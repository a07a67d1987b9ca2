"""The committed gRPC stubs in outlierd/v1/ are exactly what proto/generate.py produces now.

Regenerates every stub from proto/outlierd/v1/*.proto into a temporary directory and compares it,
byte for byte, with the committed file. A difference means someone edited a .proto without
regenerating (or hand-edited a stub): run ``python proto/generate.py`` and commit the result.
"""

import difflib
import importlib.util
from importlib.metadata import PackageNotFoundError, version

import pytest
from conftest import ROOT

COMMITTED = ROOT / "outlierd" / "v1"
STUB_PATTERN = "*_pb2*.py*"  # scoring_pb2.py, scoring_pb2.pyi, scoring_pb2_grpc.py


def _generate_module():
    spec = importlib.util.spec_from_file_location("outlierd_proto_generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tools_version() -> str:
    try:
        return version("grpcio-tools")
    except PackageNotFoundError:
        return "unknown"


def test_committed_stubs_match_generated(tmp_path):
    pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools (a dev dependency) is needed to regenerate the stubs")
    generated = _generate_module().generate(tmp_path)
    assert generated, "proto/generate.py produced no stubs"
    fresh = {p.name: p for p in generated}
    committed = {p.name: p for p in COMMITTED.glob(STUB_PATTERN)}
    hint = (f"the committed stubs in outlierd/v1/ are stale: run `python proto/generate.py` (grpcio-tools "
            f"{_tools_version()} here; pyproject pins the one the stubs were generated with) and commit the result")

    missing = sorted(set(fresh) - set(committed))
    extra = sorted(set(committed) - set(fresh))
    assert not missing, f"{hint}; not committed: {missing}"
    assert not extra, f"{hint}; committed but no longer generated from any .proto: {extra}"

    stale = []
    for name, path in sorted(fresh.items()):
        new, old = path.read_bytes(), committed[name].read_bytes()
        if new != old:
            diff = difflib.unified_diff(old.decode(errors="replace").splitlines(), new.decode(errors="replace").splitlines(),
                                        f"committed/{name}", f"generated/{name}", lineterm="", n=1)
            stale.append(f"--- {name} ---\n" + "\n".join(list(diff)[:40]))
    assert not stale, hint + "\n" + "\n".join(stale)


def test_every_proto_has_committed_stubs():
    protos = sorted((ROOT / "proto" / "outlierd" / "v1").glob("*.proto"))
    assert protos, "no .proto files under proto/outlierd/v1"
    for proto in protos:
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert (COMMITTED / f"{proto.stem}{suffix}").is_file(), f"outlierd/v1/{proto.stem}{suffix} is missing: run `python proto/generate.py`"
