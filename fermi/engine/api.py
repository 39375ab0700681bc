"""The Python API: ``Engine.generate`` / ``stream`` / ``astream`` over one scheduler.

``astream`` hands deltas from the engine thread to the event loop without a wake-up per
token: the engine thread appends each delta to its stream's buffer and wakes the loop only
when that stream's consumer is waiting, and one wake-up (one thread-safe call) serves every
stream of the loop that became ready before the loop ran it. A consumer that keeps up still
costs one wake-up per engine step; one that falls behind takes the deltas that piled up
without any (perf/notes_serve.md section 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from fermi.engine.core import STALL_SECONDS, EngineCore, EngineStats
from fermi.engine.requests import ChatPrompt, RequestBuilder, SamplingSettings
from fermi.engine.scheduler import RequestHandle
from fermi.engine.types import (
    Completion,
    Delta,
    GenerationRequest,
    Thinking,
    TokenLogprob,
    Usage,
)
from fermi.errors import FermiError
from fermi.loading import GenerationDefaults
from fermi.runners.base import Runner
from fermi.text.tokenizer import Tokenizer

__all__ = ["STALL_SECONDS", "ChatPrompt", "Engine", "EngineStats", "RequestHandle"]


class Engine:
    """A loaded model ready to generate. Thread-safe: concurrent calls share the batch."""

    def __init__(
        self,
        runner: Runner,
        tokenizer: Tokenizer,
        generation: GenerationDefaults,
        model_name: str,
        max_waiting: int = 1024,
        prefix_reuse: bool = True,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.capabilities = runner.capabilities
        caps = self.capabilities
        self.requests = RequestBuilder(tokenizer, generation, caps.vocab_size, caps.max_seq_len)
        self._core = EngineCore(runner, tokenizer, max_waiting, prefix_reuse)

    def stats(self) -> EngineStats:
        """Counters of the engine now (running, waiting, tokens, the last step's time)."""
        return self._core.stats()

    @property
    def capacity(self) -> int:
        """Requests held at once (running plus waiting); ``submit`` refuses beyond."""
        return self._core.capacity

    @property
    def load(self) -> int:
        """Requests submitted and not yet finished (used to pick the least loaded replica)."""
        return self._core.load

    @property
    def max_seq_len(self) -> int:
        return self.capabilities.max_seq_len

    @property
    def max_batch(self) -> int:
        return self.capabilities.max_batch

    @property
    def supports_thinking(self) -> bool:
        return self.requests.supports_thinking

    @property
    def generation(self) -> GenerationDefaults:
        """The model's generation defaults, under every request's own settings."""
        return self.requests.generation

    @generation.setter
    def generation(self, value: GenerationDefaults) -> None:
        self.requests.generation = value

    # -- requests ---------------------------------------------------------------------

    def chat_prompt(self, messages: Sequence[dict], thinking: Thinking = "auto") -> ChatPrompt:
        """Render ``messages`` with the model's chat template for a thinking mode."""
        return self.requests.chat_prompt(messages, thinking)

    def build_request(
        self,
        *,
        messages: Sequence[dict] | None = None,
        prompt: str | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        thinking: Thinking = "auto",
        truncate: bool = False,
        skip_special_tokens: bool = True,
        settings: SamplingSettings | None = None,
        **values: Any,
    ) -> GenerationRequest:
        """Validate and resolve a request; raises :class:`RequestError` naming the field.

        Give one of ``messages``, ``prompt`` or ``prompt_token_ids``. The sampling settings
        (``max_tokens=``, ``temperature=``, ...: the fields of :class:`SamplingSettings`)
        come as keyword arguments, as ``settings``, or both (the keywords win). ``truncate``
        keeps the end of a prompt longer than the context instead of refusing it.
        """
        return self.requests.build(
            messages=messages,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            settings=(settings or SamplingSettings()).updated(values),
            thinking=thinking,
            truncate=truncate,
            skip_special_tokens=skip_special_tokens,
        )

    # -- running ----------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink) -> RequestHandle:
        """Low level: queue a prepared request; ``sink(delta)`` is called from the engine
        thread for every delta. Front ends with their own event loop use this."""
        return self._core.submit(request, sink)

    def stream(self, **kwargs) -> Iterator[Delta]:
        """Yield deltas as they are generated. Closing the iterator cancels the request."""
        request = self.build_request(**kwargs)
        return self.stream_request(request)

    def stream_request(self, request: GenerationRequest) -> Iterator[Delta]:
        box: queue.Queue[Delta] = queue.Queue()
        handle = self.submit(request, box.put)
        try:
            while True:
                delta = box.get()
                if delta.error:
                    raise FermiError(delta.error)
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            handle.cancel()

    def astream(self, **kwargs) -> AsyncIterator[Delta]:
        """``stream`` for asyncio code. Leaving the ``async for`` early (``break``, an
        exception, a cancelled task) cancels the request once the iterator is closed: by the
        event loop when it is released, or at once by ``aclose()``. Bad arguments raise on
        the first iteration."""
        return self._deltas(None, kwargs, raise_errors=True)

    def astream_request(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Low level: deltas of a prepared request; a failure arrives as a final delta with
        ``error`` set (front ends turn it into their own error shape)."""
        return self._deltas(request, None, raise_errors=False)

    async def _deltas(
        self, request: GenerationRequest | None, kwargs: dict | None, raise_errors: bool
    ) -> AsyncIterator[Delta]:
        if request is None:
            request = self.build_request(**(kwargs or {}))
        loop = asyncio.get_running_loop()
        waker = _waker_of(loop)
        lock = waker.lock
        box = _Box(waker)
        handle = self.submit(request, box.put)
        try:
            while True:
                with lock:
                    items = box.items
                    if items:
                        box.items = []
                    else:
                        waiter = box.waiter = loop.create_future()
                if not items:
                    await waiter
                    continue
                for delta in items:
                    if raise_errors and delta.error:
                        raise FermiError(delta.error)
                    yield delta
                    if delta.finish_reason is not None:
                        return
        finally:
            with lock:
                box.closed, box.items, box.waiter = True, [], None
            handle.cancel()

    def generate(self, **kwargs) -> Completion:
        """Generate to the end and return the whole completion."""
        request = self.build_request(**kwargs)
        return self.generate_request(request)

    def generate_request(self, request: GenerationRequest) -> Completion:
        text, reasoning, ids = [], [], []
        logprobs: list[TokenLogprob] | None = [] if request.logprobs is not None else None
        box: queue.Queue[Delta] = queue.Queue()
        handle = self.submit(request, box.put)
        try:
            while True:
                delta = box.get()
                if delta.error:
                    raise FermiError(delta.error)
                text.append(delta.text)
                reasoning.append(delta.reasoning)
                ids.extend(delta.token_ids)
                if logprobs is not None and delta.logprobs:
                    logprobs.extend(delta.logprobs)
                if delta.finish_reason is not None:
                    break
        finally:
            handle.cancel()
        first = handle.first_token_at or handle.finished_at or handle.submitted_at
        return Completion(
            text="".join(text),
            reasoning="".join(reasoning),
            token_ids=ids,
            finish_reason=delta.finish_reason,
            usage=delta.usage or Usage(len(request.prompt_ids), len(ids)),
            logprobs=logprobs,
            time_to_first_token=first - handle.submitted_at,
            decode_time=(handle.finished_at or first) - first,
        )

    def release_session(self, session: str) -> None:
        """Drop the KV cache kept for requests with ``session`` set (see GenerationRequest)."""
        self._core.release_session(session)

    def close(self) -> None:
        self._core.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _LoopWaker:
    """Wakes futures of one event loop from other threads, one thread-safe call (one write
    to the loop's self-pipe) for all the futures that became due before the loop ran it.

    ``lock`` also guards the buffers of every ``_Box`` of this loop. The loop is held
    weakly: ``_wakers`` maps it to its waker and must not keep it alive, so ``due`` holds
    its futures weakly too (a future holds its loop, and a wake-up that never runs, because
    the loop was closed first, would leave its future there for good)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)
        self.lock = threading.Lock()
        self.due: list[weakref.ref[asyncio.Future[None]]] = []

    def call(self) -> None:
        """From any thread: have the loop run ``wake`` (the caller queued the first due)."""
        loop = self.loop()
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(self.wake)

    def wake(self) -> None:
        """On the loop: resolve every due future."""
        with self.lock:
            due, self.due = self.due, []
        for ref in due:
            future = ref()
            if future is not None and not future.done():  # its task may have been cancelled
                future.set_result(None)


_wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWaker] = (
    weakref.WeakKeyDictionary()
)
_wakers_lock = threading.Lock()


def _waker_of(loop: asyncio.AbstractEventLoop) -> _LoopWaker:
    with _wakers_lock:
        waker = _wakers.get(loop)
        if waker is None:
            waker = _wakers[loop] = _LoopWaker(loop)
        return waker


class _Box:
    """One async stream's deltas between the engine thread and its consumer."""

    __slots__ = ("closed", "items", "waiter", "waker")

    def __init__(self, waker: _LoopWaker) -> None:
        self.waker = waker
        self.items: list[Delta] = []
        self.waiter: asyncio.Future[None] | None = None  # set while the consumer waits
        self.closed = False

    def put(self, delta: Delta) -> None:
        """The sink, on the engine thread: buffer ``delta``; wake the loop only when the
        consumer waits and no wake-up of this loop is on its way already."""
        waker = self.waker
        with waker.lock:
            if self.closed:
                return
            self.items.append(delta)
            waiter = self.waiter
            if waiter is None:
                return
            self.waiter = None
            waker.due.append(weakref.ref(waiter))
            if len(waker.due) > 1:
                return
        waker.call()
