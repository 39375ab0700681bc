"""Stubs generated from proto/fermi/v1/fermi.proto by ``python -m fermi.rpc.codegen``.

Checked in so that serving needs no grpcio-tools; tests/test_grpc_stubs.py fails when they
no longer match the .proto.
"""
