"""The checked-in gRPC stubs are what the .proto generates today, and import as a package."""

from __future__ import annotations

from fermi.rpc import codegen


def test_checked_in_stubs_match_the_proto(tmp_path):
    codegen.generate(tmp_path)
    stale = [
        name
        for name in codegen.FILES
        if (tmp_path / name).read_text() != (codegen.GENERATED / name).read_text()
    ]
    assert not stale, f"{stale} are stale: run `python -m fermi.rpc.codegen` and commit them"


def test_generated_grpc_module_imports_its_messages_relatively():
    from fermi.rpc.generated import fermi_pb2, fermi_pb2_grpc

    source = (codegen.GENERATED / "fermi_pb2_grpc.py").read_text()
    assert "from . import fermi_pb2" in source
    assert fermi_pb2.DESCRIPTOR.name == "fermi/v1/fermi.proto"
    assert hasattr(fermi_pb2_grpc, "FermiStub")


def _requirements():
    """pyproject's requirements (runtime and test extra) as {name: specifier}."""
    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    project = tomllib.loads((codegen.PROTO_ROOT.parent / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return {r.name: r.specifier for r in map(Requirement, reqs)}


def test_runtime_bounds_admit_only_versions_the_stubs_import_under():
    """The stubs raise at import under an older grpcio / protobuf than generated them, so the
    lower bounds users install from must be at least those versions (and the generator pinned,
    or every grpcio release stamps a new version and the stubs read as stale)."""
    import re

    grpc_src = (codegen.GENERATED / "fermi_pb2_grpc.py").read_text()
    grpc_stamp = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", grpc_src).group(1)
    pb2_src = (codegen.GENERATED / "fermi_pb2.py").read_text()
    pb2_stamp = re.search(r"# Protobuf Python Version: ([0-9.]+)", pb2_src).group(1)
    reqs = _requirements()
    assert str(reqs["grpcio-tools"]) == f"=={grpc_stamp}"
    for name in ("grpcio", "grpcio-health-checking", "grpcio-reflection"):
        lower = [s.version for s in reqs[name] if s.operator == ">="]
        assert lower == [grpc_stamp], (name, str(reqs[name]))
    lower = [s.version for s in reqs["protobuf"] if s.operator == ">="]
    assert lower == [pb2_stamp], str(reqs["protobuf"])
    major = int(pb2_stamp.split(".")[0])
    assert f"{major + 1}.0" not in reqs["protobuf"]  # the next major's runtime refuses them
