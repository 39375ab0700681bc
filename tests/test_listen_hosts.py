"""The hosts ``fermi serve`` / ``fermi grpc`` are given: the taken-port check with IPv6 in
brackets or not, names, addresses of other machines, port 0; serve refuses a name."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys

import click
import pytest

import fermi
from fermi.cli import refuse_taken_port
from fermi.rpc.cli import grpc_address
from fermi.rpc.server import GrpcServer
from tests.tiny import write_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("hosts") / "qwen3", {})


@pytest.fixture(scope="module")
def engine(folder):
    eng = fermi.load(folder, max_batch=4, max_seq_len=256)
    yield eng
    eng.close()


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")


@contextlib.contextmanager
def listening(family: int, address: str):
    with socket.socket(family) as sock:
        sock.bind((address, 0))
        sock.listen()
        yield sock.getsockname()[1]


@needs_ipv6
@pytest.mark.parametrize("host", ["::1", "[::1]", "::", "[::]"])
def test_an_ipv6_port_taken_is_refused_with_or_without_brackets(host):
    # gRPC needs the brackets (its address is host:port), so "[::1]" is the usual spelling.
    with listening(socket.AF_INET6, "::1") as port, pytest.raises(click.ClickException) as err:
        refuse_taken_port(host, port)
    assert f"port {port} on {host} is already in use" in err.value.message


@needs_ipv6
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_a_free_ipv6_port_passes(host):
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        port = sock.getsockname()[1]  # bound, not listening: nobody answers
        refuse_taken_port(host, port)


@pytest.mark.parametrize("host", ["192.0.2.1", "no-such-host.invalid"])
def test_a_host_that_is_not_this_machines_stops_at_once_with_one_line(host):
    """192.0.2.1 is a documentation address (TEST-NET-1), no machine's: the server could
    not bind it, and a connection to it reaches nobody (or waits out its timeout)."""
    with pytest.raises(click.ClickException, match=f"cannot listen on {host}"):
        refuse_taken_port(host, 8000)


def test_port_zero_and_a_free_port_pass_on_loopback_and_wildcards():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        for host in ("127.0.0.1", "0.0.0.0", "localhost"):
            refuse_taken_port(host, port)
            refuse_taken_port(host, 0)


def test_fermi_serve_with_a_host_name_stops_with_one_line(folder):
    """Granian takes an IP address only: a name or a bracketed address failed inside the
    server with a Python traceback."""
    for host in ("localhost", "[::1]"):
        cmd = [sys.executable, "-m", "fermi.cli", "serve", "--model", str(folder)]
        cmd += ["--host", host, "--port", "0"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert "is not an IP address" in done.stderr
        assert "Traceback" not in done.stderr


@needs_ipv6
def test_grpc_listens_on_an_ipv6_host_given_without_brackets(engine):
    assert grpc_address("::1", 50051) == "[::1]:50051"
    assert grpc_address("[::1]", 50051) == "[::1]:50051"
    assert grpc_address("127.0.0.1", 0) == "127.0.0.1:0"

    async def bind() -> int:
        server = GrpcServer(engine)
        port = await server.start(grpc_address("::1", 0))
        await server.stop(0)
        return port

    assert asyncio.run(bind()) > 0
