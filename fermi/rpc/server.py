"""The fermi.v1.Fermi service on a grpc.aio server, with health checking and reflection.

Each call streams deltas from ``Engine.astream_request``. When a client cancels, grpc
cancels the handler's task; that closes the engine stream, which cancels the request, and
the scheduler drops it before its next step. ``CloseSession`` cancels a turn the session is
running the same way, and that turn's stream ends with finish_reason ``cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, NamedTuple

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from fermi.engine.api import STALL_SECONDS, Engine, RequestHandle
from fermi.engine.requests import check_room
from fermi.engine.types import Delta, GenerationRequest
from fermi.errors import RequestError
from fermi.heap import off_loop
from fermi.rpc import convert
from fermi.rpc.generated import fermi_pb2 as pb
from fermi.rpc.generated import fermi_pb2_grpc as pb_grpc
from fermi.rpc.sessions import SessionConfig, SessionStore
from fermi.text.tools import ToolCall, merge_calls

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Fermi"].full_name
# With work queued and no engine step for this long, health reports NOT_SERVING.
_HOUSEKEEPING_SECONDS = 1.0


class FermiService(pb_grpc.FermiServicer):
    def __init__(self, engine: Engine, sessions: SessionStore) -> None:
        self.engine = engine
        self.sessions = sessions

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator:  # noqa: N802
        try:
            try:
                built = await self._build(**convert.generate_kwargs(request))
            except RequestError as exc:
                raise convert.generate_error(exc, request.WhichOneof("input")) from None
            async for delta in self._run(built):
                yield convert.response(delta)
        except Exception as exc:
            await _abort(context, exc)

    async def Chat(self, request: pb.ChatRequest, context) -> AsyncIterator:  # noqa: N802
        try:
            async for out in self._chat(request):
                yield out
        except Exception as exc:
            await _abort(context, exc)

    async def CloseSession(self, request: pb.CloseSessionRequest, context):  # noqa: N802
        try:
            if not request.session_id:  # bad input, not an unknown session
                raise RequestError("session_id is empty: name the session to close", "session_id")
            self.sessions.close(request.session_id)
        except Exception as exc:
            await _abort(context, exc)
        return pb.CloseSessionResponse()

    async def ListModels(  # noqa: N802
        self, request: pb.ListModelsRequest, context
    ) -> pb.ListModelsResponse:
        engine = self.engine
        model = pb.Model(
            id=engine.model_name,
            max_seq_len=engine.max_seq_len,
            max_batch=engine.max_batch,
            runner=engine.capabilities.name,
            supports_thinking=engine.supports_thinking,
        )
        return pb.ListModelsResponse(models=[model])

    async def _chat(self, request: pb.ChatRequest) -> AsyncIterator[pb.GenerateResponse]:
        turn = convert.chat_turn(request)
        turn_field = "tool_results" if request.tool_results else "message"
        kwargs = {
            "settings": convert.sampling_settings(request.sampling),
            "thinking": convert.thinking_mode(request.thinking),
            **convert.grammar(request),
            **convert.tool_kwargs(request),
        }
        if request.session_id:
            if request.system:
                raise RequestError("system can only be set on a session's first turn", "system")
            session = self.sessions.begin_turn(request.session_id)
            built = None
        else:
            if request.tool_results:
                convert.check_tool_results(turn, None)
            history = [{"role": "system", "content": request.system}] if request.system else []
            # Validate before creating, so a bad first turn leaves no session behind.
            built = await self._build_turn(turn_field, messages=[*history, *turn], **kwargs)
            session = self.sessions.begin_new(history)
        added, answered = None, False
        try:
            if built is None:
                if request.tool_results:
                    convert.check_tool_results(turn, session.messages)
                messages = [*session.messages, *turn]
                built = await self._build_turn(turn_field, messages=messages, **kwargs)
            text, reasoning, calls = [], [], []

            def cancel_on_close(handle: RequestHandle) -> None:
                # CloseSession mid-turn: the stream ends with finish_reason "cancelled".
                self.sessions.generating(session, handle.cancel)

            async for delta in self._run(replace(built, session=session.id), cancel_on_close):
                text.append(delta.text)
                reasoning.append(delta.reasoning)
                calls = merge_calls(calls, delta.tool_calls or [])
                if delta.finish_reason in ("stop", "length", "tool_calls"):
                    reply = assistant_message("".join(text), "".join(reasoning), calls)
                    added = [*turn, reply]
                if not answered:
                    self.sessions.settle(session)  # (a new session: the client learns its id)
                yield convert.response(delta, session.id)
                answered = True
        finally:
            self.sessions.end_turn(session, added)
            if not request.session_id and not answered:
                # The client never learned this session's id (e.g. the queue was full).
                self.sessions.discard(session.id)

    async def _build(self, **kwargs) -> GenerationRequest:
        """The engine's request, refused (as HTTP refuses it) when max_tokens do not fit;
        built in a worker thread (templating and tokenising megabytes take seconds)."""
        built = await off_loop(lambda: self.engine.build_request(**kwargs))
        check_room(built, kwargs["settings"].max_tokens)
        return built

    async def _build_turn(self, turn_field: str, **kwargs) -> GenerationRequest:
        """A Chat turn's request; an error about the conversation names the turn's field."""
        try:
            return await self._build(**kwargs)
        except RequestError as exc:
            raise convert.chat_error(exc, turn_field) from None

    async def _run(
        self, request: GenerationRequest, on_submit: Callable[[RequestHandle], object] | None = None
    ) -> AsyncIterator[Delta]:
        async for delta in self.engine.astream_request(request, on_submit):
            if delta.error:
                raise delta.exception()
            yield delta


def assistant_message(
    text: str, reasoning: str, calls: list[ToolCall] | None = None
) -> dict[str, Any]:
    """How a finished turn is kept in a session's conversation (with its tool calls, in
    OpenAI's shape, which chat templates render)."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ]
    return message


def add_service(service: FermiService, server: grpc.aio.Server) -> None:
    """Register the service's methods as the generated ``add_FermiServicer_to_server`` does,
    but a request that does not decode (bytes that are not protobuf, a string that is not
    UTF-8) is INVALID_ARGUMENT: grpc's own answer is UNKNOWN, with a traceback logged."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Fermi"].methods:
        request_type = getattr(pb, method.input_type.name)
        serialize = getattr(pb, method.output_type.name).SerializeToString
        behaviour = getattr(service, method.name)
        if method.server_streaming:
            handler = grpc.unary_stream_rpc_method_handler(
                _streamed(behaviour), _decoder(request_type), serialize
            )
        else:
            handler = grpc.unary_unary_rpc_method_handler(
                _unary(behaviour), _decoder(request_type), serialize
            )
        handlers[method.name] = handler
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class _Undecodable(NamedTuple):
    """What a request that does not decode is handed to its method as."""

    error: RequestError


def _decoder(request_type) -> Callable[[bytes], Any]:
    name = request_type.DESCRIPTOR.full_name

    def decode(data: bytes):
        try:
            return request_type.FromString(data)
        except DecodeError as exc:
            # "Error parsing message with type 'fermi.v1.X': String field had bad UTF-8"
            why = str(exc).rpartition("': ")[2]
            return _Undecodable(RequestError(f"the request is not a valid {name}: {why}"))

    return decode


def _unary(behaviour):
    async def handle(request, context):
        if isinstance(request, _Undecodable):
            await _abort(context, request.error)
        return await behaviour(request, context)

    return handle


def _streamed(behaviour):
    async def handle(request, context):
        if isinstance(request, _Undecodable):
            await _abort(context, request.error)
        async for response in behaviour(request, context):
            yield response

    return handle


async def _abort(context, exc: Exception) -> None:
    status = convert.status_of(exc)
    if status.code == grpc.StatusCode.INTERNAL:
        log.exception("gRPC call failed")
    await context.abort(status.code, status.details, status.metadata)


class GrpcServer:
    """The service, health and reflection on one grpc.aio server."""

    def __init__(self, engine: Engine, sessions: SessionConfig | None = None) -> None:
        self.engine = engine
        self.sessions = SessionStore(sessions or SessionConfig.from_env(), engine.release_session)
        self.health = health_aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self._housekeeping: asyncio.Task | None = None

    async def start(self, address: str) -> int:
        """Bind ``address`` (``host:port``; port 0 picks one) and start; return the port."""
        # No SO_REUSEPORT: a second server on a taken port must fail, not share it.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        add_service(FermiService(self.engine, self.sessions), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), server)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from None
        await server.start()
        self.server = server
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep())
        return port

    async def stop(self, grace: float | None = 5.0) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _housekeep(self) -> None:
        """End idle sessions; report NOT_SERVING while the engine makes no progress."""
        serving = True
        while True:
            await asyncio.sleep(_HOUSEKEEPING_SECONDS)
            self.sessions.expire()
            stalled = self.engine.stats().stalled()
            if stalled == serving:
                serving = not stalled
                status = health_pb2.HealthCheckResponse
                await self._set_health(status.SERVING if serving else status.NOT_SERVING)
                if stalled:
                    log.error("no engine step for %.0f s with work queued", STALL_SECONDS)


def serve(engine: Engine, address: str, sessions: SessionConfig | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then drain for a few seconds."""

    async def main() -> None:
        server = GrpcServer(engine, sessions)
        port = await server.start(address)
        log.info("fermi.v1.Fermi serving %s on port %d", engine.model_name, port)
        print(f"gRPC: serving {engine.model_name} on {address.rsplit(':', 1)[0]}:{port}")
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()

    asyncio.run(main())


class ServerThread:
    """A :class:`GrpcServer` on its own event loop thread (tests, benchmarks, notebooks)."""

    def __init__(
        self, engine: Engine, sessions: SessionConfig | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.server = GrpcServer(engine, sessions)
        self.host = host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self.server.start(f"{self.host}:0"), self._loop)
        self.port = started.result(timeout=30)
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.server.stop(0), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
