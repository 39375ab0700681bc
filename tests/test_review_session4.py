"""Review of ``Engine.astream``'s per-loop wake-ups and of the taken-port check of
``fermi serve`` / ``fermi grpc``: event loops in several threads and loops closed mid-stream,
and the hosts the check is given (IPv6 in brackets, names, addresses of other machines)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import subprocess
import sys
import threading
import time
import weakref

import click
import pytest

import fermi
from fermi.cli import refuse_taken_port
from fermi.rpc.cli import grpc_address
from fermi.rpc.server import GrpcServer
from tests.tiny import write_checkpoint

PROMPT = [5, 77, 120, 33, 400, 9, 18]
DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("review4") / "qwen3", {})


@pytest.fixture(scope="module")
def engine(folder):
    eng = fermi.load(folder, max_batch=4, max_seq_len=256)
    yield eng
    eng.close()


def wait_idle(engine) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while engine.scheduler.load and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.scheduler.load == 0


def tokens(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


# -- astream: loops closed mid-stream, several loops at once ---------------------------


def test_a_loop_closed_while_its_stream_waits_is_not_kept_alive(engine):
    """A consumer still waiting when its loop is closed (its wake-up never runs, or the
    engine's next delta finds the loop closed) must not pin the loop, its task and its
    request for the life of the process through the per-loop waker."""
    loop = asyncio.new_event_loop()

    async def start() -> asyncio.Task:
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.astream(
                prompt_token_ids=PROMPT, max_tokens=60, temperature=0, ignore_eos=True
            ):
                first.set()

        task = asyncio.get_running_loop().create_task(consume())
        await asyncio.wait_for(first.wait(), DEADLINE_S)
        await asyncio.sleep(0.02)  # the consumer waits on the next delta
        return task

    task = loop.run_until_complete(start())
    loop.close()  # without cancelling the task: the engine goes on into a closed loop
    wait_idle(engine)
    # The engine thread keeps its last request until the next one: let two more through.
    for _ in range(2):
        engine.generate(prompt_token_ids=PROMPT, max_tokens=2, temperature=0)
    ref = weakref.ref(loop)
    del loop, task
    gc.collect()
    assert ref() is None


def test_streams_on_loops_in_several_threads_at_once_each_get_their_tokens(engine):
    """Three threads, each with its own loop and two streams on it, several rounds of
    loops created and closed: every stream gets exactly its own tokens, in order."""
    kwargs = [
        {"prompt_token_ids": PROMPT, "max_tokens": 20, "temperature": 0},
        {"prompt_token_ids": PROMPT[:4], "max_tokens": 16, "temperature": 0},
    ]
    want = [engine.generate(**k, ignore_eos=True).token_ids for k in kwargs]
    got: list[list[list[int]]] = []
    errors: list[BaseException] = []

    async def pair() -> list[list[int]]:
        async def one(k) -> list[int]:
            return tokens([d async for d in engine.astream(**k, ignore_eos=True)])

        return list(await asyncio.gather(*(one(k) for k in kwargs)))

    def worker() -> None:
        try:
            for _ in range(3):  # a fresh loop each round, closed after it
                got.append(asyncio.run(pair()))
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert len(got) == 9
    assert all(pair == want for pair in got)
    wait_idle(engine)


# -- the taken-port check ----------------------------------------------------------------


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
    started = time.monotonic()
    with pytest.raises(click.ClickException, match=f"cannot listen on {host}"):
        refuse_taken_port(host, 8000)
    assert time.monotonic() - started < 1.5


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
