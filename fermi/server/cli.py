"""``fermi serve``: the OpenAI-compatible HTTP server on Granian."""

from __future__ import annotations

import ipaddress
import multiprocessing
import os
import re

import click

from fermi.cli import model_options, refuse_taken_port
from fermi.server.config import ENV_VAR, ServerConfig

# scheme://host[:port]: what a browser sends as Origin.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:]+(:[0-9]{1,5})?")

INTERFACES = {
    "rsgi": "fermi.server.app:create_rsgi_app",
    "asgi": "fermi.server.app:create_asgi_app",
}


def parse_origins(text: str | None) -> list[str]:
    """``--cors-origins``: '*' or full origins (scheme://host[:port], no path)."""
    origins = [o.strip().rstrip("/") for o in (text or "").split(",") if o.strip()]
    for origin in origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise click.BadParameter(
                f"{origin!r} is not an origin such as https://chat.example.com or "
                "http://localhost:3000 (scheme, host and port only), nor '*'",
                param_hint="'--cors-origins'",
            )
    return origins


# How long a stopping server lets its in-flight replies run (see serve_command).
SHUTDOWN_SECONDS = 25


@click.command("serve")
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--api-key",
    envvar="FERMI_API_KEY",
    show_envvar=True,
    default=None,
    help="Require 'Authorization: Bearer KEY' (or 'x-api-key: KEY') on /v1/*. [default: no key]",
)
@click.option(
    "--cors-origins",
    envvar="FERMI_CORS_ORIGINS",
    show_envvar=True,
    default=None,
    help="Origins whose web pages may call the API, comma-separated "
    "(e.g. http://localhost:5173), or '*' for any. [default: none]",
)
@click.option(
    "--pool",
    envvar="FERMI_ENGINE_POOL",
    show_envvar=True,
    type=click.IntRange(min=1),
    default=None,
    help="Engine replicas; on CUDA one per GPU. [default: 1, or one per --devices entry]",
)
@click.option(
    "--devices",
    default=None,
    help="One replica per listed device, e.g. 0,1 or cuda:0,cuda:1 (repeat one to share it).",
)
@click.option(
    "--served-model-name", default=None, help="Model id in responses. [default: --model's name]"
)
@click.option(
    "--max-body-bytes",
    default=8 * 1024 * 1024,
    show_default=True,
    type=int,
    help="Larger request bodies get 413.",
)
@click.option(
    "--body-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a request body may take to arrive after its headers; then 408.",
)
@click.option(
    "--max-waiting",
    type=click.IntRange(min=0),
    default=None,
    help="Requests queued per replica beyond its batch before 429. [default: 1024]",
)
@click.option(
    "--prefix-reuse/--no-prefix-reuse",
    default=True,
    show_default=True,
    help="Keep a finished request's KV cache so a later prompt sharing its start prefills "
    "only the rest.",
)
@click.option(
    "--interface",
    type=click.Choice(sorted(INTERFACES)),
    default="rsgi",
    show_default=True,
    help="Granian interface (RSGI measured faster; see the README).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def serve_command(
    model: str,
    device: str | None,
    dtype: str,
    max_seq_len: int | None,
    max_batch: int | None,
    runner: str | None,
    quantize: str | None,
    host: str,
    port: int,
    api_key: str | None,
    cors_origins: str | None,
    pool: int | None,
    devices: str | None,
    served_model_name: str | None,
    max_body_bytes: int,
    body_timeout: float,
    max_waiting: int | None,
    prefix_reuse: bool,
    interface: str,
    log_level: str,
) -> None:
    """Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/responses,
    /v1/embeddings, /v1/models), Anthropic's /v1/messages, /health and /metrics."""
    from granian.constants import Interfaces
    from granian.log import LogLevels
    from granian.server import Server

    from fermi.server.pool import PoolConfigError, gpu_count, parse_devices, plan_devices

    try:
        ipaddress.ip_address(host)  # Granian takes an address only, not a name or [::1]
    except ValueError:
        raise click.BadParameter(
            f"{host!r} is not an IP address (such as 127.0.0.1, 0.0.0.0, ::1 or ::)",
            param_hint="'--host'",
        ) from None
    refuse_taken_port(host, port)
    try:
        listed = parse_devices(devices)
        needs_gpus = bool(listed) or (pool or 1) > 1
        placed = plan_devices(pool, listed, device, gpu_count() if needs_gpus else 0)
    except PoolConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if max_body_bytes < 1:
        raise click.UsageError("--max-body-bytes must be positive")
    from fermi.errors import ModelLoadError
    from fermi.hub import resolve

    try:
        resolve(model)  # fail here, not in the worker; a Hub model downloads once, here
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from exc
    config = ServerConfig(
        model=model,
        devices=placed,
        dtype=None if dtype == "auto" else dtype,
        max_seq_len=max_seq_len,
        max_batch=max_batch,
        runner=runner,
        quantize=quantize,
        served_model_name=served_model_name,
        api_key=api_key or None,
        cors_origins=parse_origins(cors_origins),
        max_body_bytes=max_body_bytes,
        body_timeout_s=body_timeout,
        max_waiting=max_waiting,
        prefix_reuse=prefix_reuse,
    )
    os.environ[ENV_VAR] = config.to_env()
    # A fresh interpreter per worker: the parent may have touched CUDA (counting GPUs),
    # and a forked child cannot use a CUDA context it inherited.
    multiprocessing.set_start_method("spawn", force=True)
    server = Server(
        INTERFACES[interface],
        address=host,
        port=port,
        interface=Interfaces(interface),
        workers=1,
        factory=True,
        websockets=False,
        log_level=LogLevels(log_level),
        # On SIGTERM / SIGINT the worker finishes what is in flight for at most this long,
        # then is killed: a reply running to the end of the context, or one slow client,
        # held the shutdown without limit (container runtimes send SIGKILL at 30 s).
        workers_kill_timeout=SHUTDOWN_SECONDS,
    )
    server.serve()
