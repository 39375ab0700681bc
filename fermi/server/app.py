"""Granian entry points: the RSGI app (the default) and an ASGI app over the same ``Api``.

Both adapters do the same four things: read the body within the size limit, run the
handler while watching for the client to leave (leaving cancels the generation), write
a whole body or a stream of server-sent events, and turn any unexpected exception into
a 500 (or, once a stream has started, an SSE error event) that carries no traceback.

``fermi serve`` starts Granian with ``create_rsgi_app`` (or ``create_asgi_app``) as a
factory; each worker process builds its own engines from ``FERMI_SERVER_CONFIG``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fermi.errors import FermiError
from fermi.server.config import ServerConfig
from fermi.server.errors import ApiError, internal_error
from fermi.server.handlers import Api, Reply, StreamEndedError, StreamReply, error_reply

log = logging.getLogger("fermi.server")

SSE_HEADERS = [
    ("content-type", "text/event-stream; charset=utf-8"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),  # tell reverse proxies not to hold events back
]


# A body over the limit is read and dropped, up to this many bytes, before the 413 goes
# out: most clients (urllib, requests, httpx) read no answer until they have sent the whole
# body, so a server that answers and closes mid-upload leaves them a broken pipe instead of
# the 413 (nginx's lingering close does the same). Past this, the connection is dropped.
DRAIN_BYTES = 64 * 1024 * 1024


async def _in_time(reading: Awaitable[bytes], seconds: float) -> bytes:
    """The body, or a 408 once ``seconds`` (``--body-timeout``) have passed since the
    headers. Granian times out headers that stop coming (30 s), not a body: a client that
    sent a Content-Length and then nothing (or a byte a minute) held its connection, and
    about a thousand such connections left the server accepting none (Granian's cap)."""
    try:
        return await asyncio.wait_for(reading, seconds)
    except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11)
        raise ApiError(
            408, f"the request body did not arrive within {seconds:g} s", code="request_timeout"
        ) from None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


def _with_headers(reply: Reply, api: Api, headers: Any) -> Reply:
    """A reply made outside ``Api.handle`` (body too large, an unexpected failure) with the
    headers ``handle`` gives every reply: a browser reads no error without its CORS
    headers."""
    return dataclasses.replace(reply, headers=reply.headers + api.reply_headers(headers))


def _reply_headers(reply: Reply) -> list[tuple[str, str]]:
    if reply.status == 204:  # no content to type (a HEAD reply keeps its GET's type)
        return list(reply.headers)
    return [("content-type", reply.content_type), *reply.headers]


async def _until_done_or_gone(work: Awaitable[None], gone: Awaitable[Any]) -> None:
    """Run ``work``; if the client disconnects first, cancel it (which cancels generation)."""
    work_task = asyncio.ensure_future(work)
    gone_task = asyncio.ensure_future(gone)
    try:
        await asyncio.wait((work_task, gone_task), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work_task, gone_task):
            if not task.done():
                task.cancel()
    if work_task.done() and not work_task.cancelled():
        work_task.result()  # re-raise what the work raised
    else:
        await asyncio.gather(work_task, return_exceptions=True)


async def _send_stream(reply: StreamReply, send: Callable[[bytes], Awaitable[None]]) -> None:
    """Pull the stream's events on the event loop and send them (ASGI)."""
    chunks = reply.chunks()
    try:
        async for piece in chunks:
            await send(piece)
    except StreamEndedError:
        pass
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if (event := _failure_event(reply, exc)) is not None:
            with contextlib.suppress(Exception):  # the client may be gone as well
                await send(event)
    finally:
        await chunks.aclose()


async def _push_stream(reply: StreamReply, write: Callable[[bytes], object]) -> None:
    """Let the engine thread write the stream's events as they arrive (RSGI)."""
    try:
        await reply.push(write)
    except StreamEndedError:
        pass
    except Exception as exc:
        if (event := _failure_event(reply, exc)) is not None:
            with contextlib.suppress(Exception):  # the client may be gone as well
                write(event)


def _failure_event(reply: StreamReply, exc: Exception) -> bytes | None:
    """The last events of a stream that failed part-way (logged and counted as a 500), or
    None when the failure is only the client having left."""
    if _client_gone(exc):
        return None
    log.exception("stream failed")
    reply.api.metrics.error(500)
    return reply.failed_event(internal_error())


def _client_gone(exc: Exception) -> bool:
    # Granian raises its own ProtocolClosed (RSGI) or OSError-like errors once the peer left.
    return type(exc).__name__ in ("RSGIProtocolClosed", "ClientDisconnected") or isinstance(
        exc, (ConnectionError, BrokenPipeError)
    )


class RsgiApp:
    """Granian's native interface: no per-request dict scope, bytes in and out."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.limit = api.config.max_body_bytes
        self.body_seconds = api.config.body_timeout_s

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.api.close()

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.proto != "http":
            return
        try:
            body = await _in_time(self._body(scope, proto), self.body_seconds)
        except ApiError as exc:
            reply = error_reply(exc, scope.path)
            self.api.metrics.error(reply.status)
            self._reply(proto, _with_headers(reply, self.api, scope.headers))
            return
        except Exception as exc:
            if _client_gone(exc):  # the client left while sending its body
                return
            raise
        if scope.method in ("GET", "HEAD", "OPTIONS"):
            await self._respond(scope, proto, body)
        else:
            await _until_done_or_gone(self._respond(scope, proto, body), proto.client_disconnect())

    async def _body(self, scope: Any, proto: Any) -> bytes:
        length = scope.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) <= self.limit:
            return await proto()
        # Over the limit (or of unknown length): read in chunks, and past the limit read on
        # and drop, up to DRAIN_BYTES (see there). Granian's body iterator starts only once.
        too_large = length is not None
        chunks, size = [], 0
        async for chunk in proto:
            size += len(chunk)
            too_large = too_large or size > self.limit
            if not too_large:
                chunks.append(chunk)
            elif size > DRAIN_BYTES:
                break
        if too_large:
            raise _too_large(self.limit)
        return b"".join(chunks)

    @staticmethod
    def _reply(proto: Any, reply: Reply) -> None:
        proto.response_bytes(reply.status, _reply_headers(reply), reply.body)

    async def _respond(self, scope: Any, proto: Any, body: bytes) -> None:
        try:
            reply = await self.api.handle(scope.method, scope.path, scope.headers, body)
        except Exception:
            log.exception("request failed: %s %s", scope.method, scope.path)
            self.api.metrics.error(500)
            self._reply(
                proto,
                _with_headers(error_reply(internal_error(), scope.path), self.api, scope.headers),
            )
            return
        if isinstance(reply, Reply):
            self._reply(proto, reply)
            return
        try:
            # Granian's stream send_bytes queues the bytes on a channel and returns an
            # awaitable that is already done: it may be called from the engine thread.
            transport = proto.response_stream(200, [*SSE_HEADERS, *reply.headers])
            await _push_stream(reply, transport.send_bytes)
        finally:
            reply.cancel()  # a no-op once every choice finished


class AsgiApp:
    """The same endpoints over ASGI, for comparison and for ASGI-only hosts."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.limit = api.config.max_body_bytes
        self.body_seconds = api.config.body_timeout_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            body = await _in_time(self._body(headers, receive), self.body_seconds)
        except ApiError as exc:
            reply = error_reply(exc, scope["path"])
            self.api.metrics.error(reply.status)
            await self._reply(send, _with_headers(reply, self.api, headers))
            return
        work = self._respond(scope, headers, body, send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await work
        else:
            await _until_done_or_gone(work, _disconnected(receive))

    async def _lifespan(self, receive: Callable, send: Callable) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.api.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _body(self, headers: dict[str, str], receive: Callable) -> bytes:
        length = headers.get("content-length")
        too_large = length is not None and (not length.isdigit() or int(length) > self.limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit or too_large:
                too_large = True  # read on and drop, up to DRAIN_BYTES (see there)
                if size > DRAIN_BYTES:
                    raise _too_large(self.limit)
            else:
                chunks.append(chunk)
            if not message.get("more_body"):
                if too_large:
                    raise _too_large(self.limit)
                return b"".join(chunks)

    @staticmethod
    async def _reply(send: Callable, reply: Reply) -> None:
        headers = [(k.encode(), v.encode()) for k, v in _reply_headers(reply)]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})

    async def _respond(self, scope: dict, headers: dict[str, str], body: bytes, send) -> None:
        method, path = scope["method"], scope["path"]
        try:
            reply = await self.api.handle(method, path, headers, body)
        except Exception:
            log.exception("request failed: %s %s", method, path)
            self.api.metrics.error(500)
            error = error_reply(internal_error(), path)
            await self._reply(send, _with_headers(error, self.api, headers))
            return
        if isinstance(reply, Reply):
            await self._reply(send, reply)
            return
        start = {
            "type": "http.response.start",
            "status": 200,
            "headers": [(k.encode(), v.encode()) for k, v in (*SSE_HEADERS, *reply.headers)],
        }

        async def piece(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        try:
            await send(start)
            await _send_stream(reply, piece)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception as exc:
            if not _client_gone(exc):
                raise
        finally:
            reply.cancel()  # a no-op once every choice finished


async def _disconnected(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def build_api(config: ServerConfig) -> Api:
    from fermi.heap import settle
    from fermi.server.pool import load_pool

    pool = load_pool(
        config.model,
        config.devices,
        dtype=config.dtype,
        max_seq_len=config.max_seq_len,
        max_batch=config.max_batch,
        runner=config.runner,
        quantize=config.quantize,
        max_waiting=config.max_waiting,
        prefix_reuse=config.prefix_reuse,
    )
    api = Api(pool, config)
    settle()  # what loading left is never collected again (fermi.heap)
    return api


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(name)s: %(message)s")


def _start() -> Api:
    _configure_logging()
    try:
        return build_api(ServerConfig.from_env())
    except (FermiError, ValueError, OSError, RuntimeError) as exc:
        # A model that cannot load is the user's to fix: one line, no traceback.
        log.error("cannot start the server: %s", exc)
        raise SystemExit(1) from None


def create_rsgi_app() -> RsgiApp:
    """Granian factory (``--factory``): load the engines named by FERMI_SERVER_CONFIG."""
    return RsgiApp(_start())


def create_asgi_app() -> AsgiApp:
    return AsgiApp(_start())
