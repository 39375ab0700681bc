"""``fermi grpc``: the fermi.v1.Fermi gRPC server with sessions, health and reflection."""

from __future__ import annotations

import logging

import click

from fermi.cli import load_engine, model_options, refuse_taken_port
from fermi.rpc.sessions import DEFAULT_SESSION_MAX, SessionConfig


@click.command("grpc")
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=50051, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--session-ttl-ms",
    envvar="FERMI_SESSION_TTL_MS",
    show_envvar=True,
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="End a chat session idle this long; 0 = never.",
)
@click.option(
    "--session-max",
    envvar="FERMI_SESSION_MAX",
    show_envvar=True,
    type=click.IntRange(min=1),
    default=DEFAULT_SESSION_MAX,
    show_default=True,
    help="Most sessions kept; beyond it the least recently used one ends.",
)
@click.option(
    "--prefix-reuse/--no-prefix-reuse",
    default=True,
    show_default=True,
    help="Keep a finished request's KV cache so a later prompt sharing its start prefills "
    "only the rest (sessions keep theirs either way).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def grpc_command(
    model: str,
    device: str | None,
    dtype: str,
    max_seq_len: int | None,
    max_batch: int | None,
    runner: str | None,
    quantize: str | None,
    host: str,
    port: int,
    session_ttl_ms: int,
    session_max: int,
    prefix_reuse: bool,
    log_level: str,
) -> None:
    """Serve MODEL over gRPC (fermi.v1.Fermi, grpc.health.v1, reflection)."""
    from fermi.heap import settle
    from fermi.rpc.server import serve

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    refuse_taken_port(host, port)
    engine = load_engine(
        model, device, dtype, max_seq_len, max_batch, runner, prefix_reuse, quantize
    )
    settle()  # what loading left is never collected again (fermi.heap)
    try:
        serve(engine, grpc_address(host, port), SessionConfig(session_ttl_ms, session_max))
    except OSError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        engine.close()


def grpc_address(host: str, port: int) -> str:
    """``host:port`` as gRPC reads it: an IPv6 address in brackets (``[::1]:50051``)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"
