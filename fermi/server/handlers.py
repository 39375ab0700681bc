"""The endpoints, independent of the server interface (RSGI or ASGI) that carries them.

``Api.handle`` takes a method, a path, the Authorization header and the body bytes, and
returns a :class:`Reply` (a whole body) or a :class:`StreamReply` (server-sent events).
Every failure it expects is an :class:`ApiError`; the interface adapters in ``app.py``
turn anything else into a 500 without a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fermi import __version__
from fermi.engine.types import Delta, GenerationRequest
from fermi.heap import off_loop
from fermi.server.anthropic_protocol import error_body, error_status, speaks_anthropic
from fermi.server.build import chat_requests, completion_requests, decode_body
from fermi.server.chunks import (
    ChatChunker,
    ChoiceText,
    TextChunker,
    chat_completion,
    sse,
    text_completion,
    usage_body,
)
from fermi.server.config import ServerConfig
from fermi.server.cors import CorsPolicy
from fermi.server.embeddings import embeddings_reply
from fermi.server.errors import ApiError
from fermi.server.generation import Generation
from fermi.server.health import HealthChecker
from fermi.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from fermi.server.metrics import ServerMetrics
from fermi.server.openapi import OPENAPI_JSON
from fermi.server.pool import EnginePool
from fermi.server.protocol import (
    CHAT_DECODER,
    COMPLETION_DECODER,
    EMBEDDING_DECODER,
    ENCODER,
    ErrorBody,
    ModelCard,
    ModelList,
)
from fermi.server.responses_build import not_stored

JSON = "application/json"
DONE = b"data: [DONE]\n\n"
# A client's x-request-id is echoed when it is a plain token of sane length; otherwise (or
# when none is sent) the server makes one.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


class Headers(Protocol):
    """A request's headers, looked up by lower-case name (Granian's RSGI headers, or the
    dict the ASGI adapter builds)."""

    def get(self, name: str, default: str | None = None) -> str | None: ...


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


def error_reply(error: ApiError, path: str = "") -> Reply:
    """The error in the shape of the API that ``path`` belongs to: Anthropic's on
    ``/v1/messages*``, OpenAI's elsewhere."""
    if speaks_anthropic(path):
        return Reply(error_status(error), error_body(error), headers=error.headers)
    return Reply(error.status, error.body(), headers=error.headers)


class _Timing:
    """Latency metrics of one request. Time to first token is observed when it arrives;
    the gaps between later arrivals are noted and go into the histogram when the request
    ends (``flush``, on the event loop): a histogram update per token cost ~8 us on the
    engine thread, where a pushed stream builds its events."""

    __slots__ = ("gaps", "last", "metrics", "start")

    def __init__(self, metrics: ServerMetrics, start: float) -> None:
        self.metrics = metrics
        self.start = start
        self.last = 0.0
        self.gaps: list[float] = []

    def arrived(self) -> None:
        now = time.perf_counter()
        if self.last:
            self.gaps.append(now - self.last)
        else:
            self.metrics.ttft.observe(now - self.start)
        self.last = now

    def flush(self) -> None:
        gaps, self.gaps = self.gaps, []
        observe = self.metrics.itl.observe
        for gap in gaps:
            observe(gap)

    def done(self, requests: list[GenerationRequest], n: int, choices: list[ChoiceText]) -> int:
        """Count the tokens and the end; return the prompt tokens (each prompt once)."""
        m = self.metrics
        prompt_tokens = sum(len(r.prompt_ids) for r in requests[::n])
        m.prompt_tokens.inc(prompt_tokens)
        m.generation_tokens.inc(sum(c.tokens for c in choices))
        m.e2e.observe(time.perf_counter() - self.start)
        for c in choices:
            m.finished(c.finish_reason or "abort")
        return prompt_tokens


def fingerprint(config: ServerConfig, model_name: str, runner: str) -> str:
    """``system_fingerprint``: Fermi's version, the runner, and a digest of what decides the
    weights — the model as named, its precision and quantization as asked, and for a local
    file or folder the size and modification time of each file in it (a re-export, or
    another checkpoint copied under the same name, changes it; the weights are not read)."""
    parts = [model_name, runner, config.dtype or "", config.quantize or ""]
    path = Path(config.model).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        for file in files:
            st = file.stat()
            parts.append(f"{file.name}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:8]
    return f"fermi-{__version__}-{runner}-{digest}"


class Api:
    def __init__(self, pool: EnginePool, config: ServerConfig) -> None:
        self.pool = pool
        self.config = config
        engine = pool.engine
        self.model_name = config.served_model_name or engine.model_name
        # A client may name the model as served or as it was passed to --model.
        self.model_names = {self.model_name, engine.model_name, config.model}
        self.created = int(time.time())
        self.metrics = ServerMetrics(pool, self.model_name)
        self.health = HealthChecker(pool)
        self._api_key = config.api_key.encode() if config.api_key else None
        self.cors = CorsPolicy(config.cors_origins)
        runner = engine.capabilities.name
        # Which weights, runner and Fermi version answered: changes when any of them does.
        self.fingerprint = fingerprint(config, engine.model_name, runner)
        from fermi.server.anthropic import Messages  # (which imports this module)

        messages = Messages(self)
        self._routes: dict[tuple[str, str], Callable[[bytes], Awaitable[Reply | StreamReply]]] = {
            ("POST", "/v1/chat/completions"): self.chat,
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/embeddings"): self.embeddings,
            ("POST", "/v1/messages"): messages.create,
            ("POST", "/v1/messages/count_tokens"): messages.count_tokens,
            ("POST", "/v1/responses"): self.responses,
            ("POST", "/v1/responses/input_tokens"): self.responses_input_tokens,
            ("GET", "/v1/models"): self.models,
            ("GET", "/health"): self.healthcheck,
            ("GET", "/metrics"): self.metrics_text,
            ("GET", "/openapi.json"): self.openapi,
        }

    def close(self) -> None:
        self.pool.close()

    # -- dispatch ---------------------------------------------------------------------

    async def handle(
        self, method: str, path: str, headers: Headers, body: bytes
    ) -> Reply | StreamReply:
        """Answer one request. Every reply carries ``x-request-id`` and, for an allowed
        origin, the CORS headers."""
        extra = self.reply_headers(headers)
        if method == "OPTIONS":
            return self._options(path, headers, extra)
        reply = await self._dispatch(method, path, headers, body)
        if isinstance(reply, StreamReply):
            reply.headers = extra
            return reply
        return dataclasses.replace(reply, headers=reply.headers + extra)

    def reply_headers(self, headers: Headers) -> tuple[tuple[str, str], ...]:
        """``x-request-id`` (the client's, echoed, or a new one) and the CORS headers."""
        given = headers.get("x-request-id")
        rid = given if given and _REQUEST_ID.fullmatch(given) else f"req_{uuid.uuid4().hex}"
        return (("x-request-id", rid), *self.cors.headers(headers.get("origin")))

    async def _dispatch(
        self, method: str, path: str, headers: Headers, body: bytes
    ) -> Reply | StreamReply:
        try:
            if path.startswith("/v1/"):
                self._authorize(headers)
            if method == "HEAD":  # a GET without its body (load balancers probe /health so)
                reply = await self._dispatch("GET", path, headers, body)
                assert isinstance(reply, Reply)  # no GET route streams
                return dataclasses.replace(reply, body=b"")
            route = self._routes.get((method, path))
            if route is None:
                return self._no_route(method, path)
            return await route(body)
        except ApiError as exc:
            reply = error_reply(exc, path)
            self.metrics.error(reply.status)  # as sent (Anthropic's 529 for a full queue)
            return reply

    def _options(self, path: str, headers: Headers, extra: tuple) -> Reply:
        """A CORS preflight (answered before authentication: browsers send no credentials
        with it), or a plain OPTIONS naming the methods a path takes."""
        methods = self._methods(path)
        origin = headers.get("origin")
        if origin is not None and headers.get("access-control-request-method") is not None:
            if not self.cors.allows(origin):
                how = (
                    "add it to --cors-origins"
                    if self.cors.enabled
                    else "start the server with --cors-origins to allow it"
                )
                error = ApiError(
                    403,
                    f"cross-origin requests from {origin!r} are not allowed; {how}",
                    code="cors_origin_not_allowed",
                )
                self.metrics.error(403)
                return dataclasses.replace(error_reply(error, path), headers=extra)
            rid = extra[:1]  # the CORS headers of a preflight are its own
            asked = headers.get("access-control-request-headers")
            return Reply(204, b"", headers=rid + self.cors.preflight(origin, asked))
        if methods is None:
            error = ApiError(404, f"no such endpoint: OPTIONS {path}", code="not_found")
            self.metrics.error(404)
            return dataclasses.replace(error_reply(error, path), headers=extra)
        return Reply(204, b"", headers=(("allow", methods), *extra))

    def _methods(self, path: str) -> str | None:
        """The ``Allow`` header's value for ``path`` (OPTIONS, and HEAD wherever GET is), or
        None where there is no such endpoint."""
        if path.startswith("/v1/models/"):
            taken = {"GET"}
        else:
            taken = {m for m, p in self._routes if p == path}
            if not taken:
                return None
        methods = sorted(taken | {"OPTIONS"})
        if "GET" in methods:
            methods.append("HEAD")
        return ", ".join(methods)

    def _authorize(self, headers: Headers) -> None:
        if self._api_key is None:
            return
        # Either OpenAI's "Authorization: Bearer <key>" (the scheme in any case) or
        # Anthropic's "x-api-key: <key>".
        scheme, _, token = (headers.get("authorization") or "").strip().partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
        if not given:
            given = headers.get("x-api-key") or ""
        if not hmac.compare_digest(given.encode(), self._api_key):
            raise ApiError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                "(or 'x-api-key: <key>')",
                code="invalid_api_key",
            )

    def _no_route(self, method: str, path: str) -> Reply:
        if path.startswith("/v1/models/") and method == "GET":
            return self._model_card(path.removeprefix("/v1/models/"))
        if path.startswith("/v1/responses/"):
            error = not_stored(method, path)
            self.metrics.error(error.status)
            return error_reply(error)
        methods = self._methods(path)
        if methods is None:
            error = ApiError(404, f"no such endpoint: {method} {path}", code="not_found")
            self.metrics.error(error.status)
            return error_reply(error, path)
        # (a model card is read-only: DELETE /v1/models/{id}, OpenAI's deletion of a
        # fine-tuned model, and any other method are refused here, not answered with it)
        error = ApiError(405, f"{method} is not allowed on {path}", code="method_not_allowed")
        self.metrics.error(error.status)
        reply = error_reply(error, path)
        return dataclasses.replace(reply, headers=(*reply.headers, ("allow", methods)))

    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    # -- models, health, metrics --------------------------------------------------------

    def _card(self) -> ModelCard:
        return ModelCard(
            id=self.model_name, created=self.created, max_model_len=self.pool.engine.max_seq_len
        )

    async def models(self, body: bytes) -> Reply:
        return Reply(200, ENCODER.encode(ModelList(data=[self._card()])))

    def _model_card(self, name: str) -> Reply:
        self._check_model(name)
        return Reply(200, ENCODER.encode(self._card()))

    async def healthcheck(self, body: bytes) -> Reply:
        ok, lines = await self.health.check()
        warming = [r.index for r in self.pool.replicas if r.warming]
        payload = {"status": "ok" if ok else "unhealthy", "replicas": lines, "warming": warming}
        return Reply(200 if ok else 503, ENCODER.encode(payload))

    async def metrics_text(self, body: bytes) -> Reply:
        return Reply(200, self.metrics.render(), METRICS_CONTENT_TYPE)

    async def openapi(self, body: bytes) -> Reply:
        return Reply(200, OPENAPI_JSON)

    # -- generation -------------------------------------------------------------------

    async def chat(self, raw: bytes) -> Reply | StreamReply:
        return await self._generate(raw, CHAT_DECODER, chat_requests, "chatcmpl", is_chat=True)

    async def completions(self, raw: bytes) -> Reply | StreamReply:
        return await self._generate(raw, COMPLETION_DECODER, completion_requests, "cmpl")

    async def embeddings(self, raw: bytes) -> Reply:
        body = decode_body(EMBEDDING_DECODER, raw)
        self._check_model(body.model)
        engine = self.pool.pick().engine
        reply, tokens = await embeddings_reply(engine, body, self.model_name)
        self.metrics.prompt_tokens.inc(tokens)
        return Reply(200, reply)

    async def responses(self, raw: bytes) -> Reply | StreamReply:
        from fermi.server.responses import create_response  # imports this module

        return await create_response(self, raw)

    async def responses_input_tokens(self, raw: bytes) -> Reply:
        from fermi.server.responses import count_input_tokens  # imports this module

        return await count_input_tokens(self, raw)

    async def _generate(
        self, raw: bytes, decoder, to_requests, id_prefix: str, is_chat: bool = False
    ) -> Reply | StreamReply:
        """Decode a chat or completions body, submit its engine requests, and answer with a
        stream or with the whole response."""
        start = time.perf_counter()
        body = decode_body(decoder, raw)
        self._check_model(body.model)
        # Templating and tokenising take up to seconds for megabytes of prompt: in a worker
        # thread, so the loop keeps answering (/health, other streams) meanwhile.
        requests = await off_loop(to_requests, self.pool.engine, body)
        generation = Generation(self.pool, requests, asyncio.get_running_loop())
        timing = _Timing(self.metrics, start)
        rid, created = f"{id_prefix}-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            options = body.stream_options
            include_usage = bool(options and options.include_usage)
            n, name = len(requests), self.model_name
            fp = self.fingerprint
            if is_chat:
                chunker = ChatChunker(rid, created, name, n, bool(body.logprobs), fp)
            else:
                chunker = TextChunker(rid, created, name, n, body.logprobs, fp)
            return StreamReply(self, generation, timing, chunker, requests, body.n, include_usage)
        choices = await self._collect(generation, timing, len(requests))
        prompt_tokens = timing.done(requests, body.n, choices)
        if is_chat:
            args = (choices, prompt_tokens, bool(body.logprobs))
            reply = chat_completion(rid, created, self.model_name, *args, body.n, self.fingerprint)
        else:
            args = (choices, prompt_tokens, body.logprobs)
            reply = text_completion(rid, created, self.model_name, *args, body.n, self.fingerprint)
        return Reply(200, ENCODER.encode(reply))

    async def _collect(self, generation: Generation, timing: _Timing, n: int) -> list[ChoiceText]:
        choices = [ChoiceText() for _ in range(n)]
        try:
            async for batch in generation.batches():
                timing.arrived()
                for index, delta in batch:
                    _raise_engine_error(delta)
                    choices[index].add(delta)
        finally:
            self._release(generation, timing)
        return choices

    def _release(self, generation: Generation, timing: _Timing) -> None:
        """Cancel what is still generating (the client left, or the stream failed); record
        the inter-token gaps seen so far."""
        timing.flush()
        if generation.unfinished:
            # Per choice, as request_success counts them (an n=4 request is four).
            self.metrics.aborted.inc(generation.unfinished)
            generation.cancel()


class StreamReply:
    """The server-sent events of one streamed generation, built delta by delta.

    Two ways to deliver them, with the same bytes: ``chunks()`` is pulled by the event loop
    (one wake-up per batch of deltas; ASGI needs this), ``push(write)`` writes each delta's
    events from the thread where the delta arrives, the engine's, so a streamed token costs
    no event-loop wake-up at all (RSGI: Granian's stream ``send_bytes`` is a thread-safe,
    non-blocking channel send). ``cancel`` stops the generation, also when the stream never
    started (the client left first)."""

    def __init__(
        self,
        api: Api,
        generation: Generation,
        timing: _Timing,
        chunker: ChatChunker | TextChunker,
        requests: list[GenerationRequest],
        n: int,
        include_usage: bool,
    ) -> None:
        self.api = api
        self.generation = generation
        self.timing = timing
        self.chunker = chunker
        self.requests = requests
        self.n = n
        self.include_usage = include_usage
        self.choices = [ChoiceText() for _ in requests]
        self.failed = False
        self.cancel = generation.cancel
        self.headers: tuple[tuple[str, str], ...] = ()  # set by Api.handle

    # -- the events -------------------------------------------------------------------

    def opening(self) -> bytes:
        """The chat stream's role chunks (one per choice); completions have none."""
        if isinstance(self.chunker, ChatChunker):
            return b"".join(sse(chunk) for chunk in self.chunker.first())
        return b""

    def feed(self, index: int, delta: Delta) -> bytes:
        """The events of one delta; an engine error ends the stream with an error event."""
        if delta.error:
            # The stream ends here; the client raises on the error event.
            self.failed = True
            error = _engine_error(delta)
            self.api.metrics.error(error.status)
            return self.failed_event(error)
        self.choices[index].end(delta)  # a stream needs only how each choice ended
        return self.chunker.event(index, delta)

    def failed_event(self, error: ApiError) -> bytes:
        """The last events of a stream that fails with ``error``."""
        return sse(ErrorBody(error.detail())) + DONE

    def closing(self) -> bytes:
        """After every choice finished: count the request, then the usage chunk and DONE."""
        prompt_tokens = self.timing.done(self.requests, self.n, self.choices)
        if not self.include_usage:
            return DONE
        usage = usage_body(prompt_tokens, self.choices, self.n)
        return sse(self.chunker.usage(usage)) + DONE

    # -- delivery ---------------------------------------------------------------------

    async def chunks(self) -> AsyncIterator[bytes]:
        """Pulled: the events of every delta that arrived, one piece per wake-up. Ends with
        :class:`StreamEndedError` after an error event."""
        try:
            if opening := self.opening():
                yield opening
            async for batch in self.generation.batches():
                self.timing.arrived()
                events = []
                for index, delta in batch:
                    events.append(self.feed(index, delta))
                    if self.failed:
                        break
                if self.failed:
                    yield b"".join(events)
                    raise StreamEndedError
                if piece := b"".join(events):
                    yield piece
            yield self.closing()
        finally:
            self.api._release(self.generation, self.timing)

    async def push(self, write: Callable[[bytes], object]) -> None:
        """Pushed: call ``write(events)`` (thread-safe, non-blocking; its result is
        ignored) from the engine thread as each delta arrives, and return once the stream
        is complete. Raises :class:`StreamEndedError` after an error event, and whatever
        building an event raised."""

        def deliver(index: int, delta: Delta) -> bool:
            self.timing.arrived()
            events = self.feed(index, delta)
            complete = self.failed or not self.generation.unfinished
            if complete and not self.failed:
                events += self.closing()
            if events:
                write(events)
            return complete

        try:
            await self.generation.push(self.opening(), write, deliver)
        finally:
            self.api._release(self.generation, self.timing)
        if self.failed:
            raise StreamEndedError


class StreamEndedError(Exception):
    """Raised after an error event was sent; the adapter closes the stream quietly."""


def _engine_error(delta: Delta) -> ApiError:
    if delta.error_code == "grammar_limit":  # the request's grammar, not the server
        return ApiError(400, delta.error or "", code="grammar_too_complex")
    return ApiError(500, f"generation failed: {delta.error}", type="server_error")


def _raise_engine_error(delta: Delta) -> None:
    if delta.error:
        raise _engine_error(delta)
