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
