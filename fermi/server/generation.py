"""One HTTP request's engine requests (``n`` choices, several prompts), merged for asyncio.

The engine calls its sink from the scheduler thread. Deltas reach the request in one of
two ways:

- pulled (``batches``): the sink appends to a deque and wakes the event loop only when the
  consumer may be asleep, so a consumer that falls behind gets several deltas per wake-up;
- pushed (``push``): the sink hands each delta to a callback on the engine thread itself,
  and the loop wakes once, when the request is complete. A wake-up of the loop from another
  thread costs far more than building and sending a token's event (perf/notes_serve.md),
  so this is the streaming path wherever the transport can be written from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence

from fermi.engine.scheduler import RequestHandle
from fermi.engine.types import Delta, GenerationRequest
from fermi.errors import EngineOverloadedError
from fermi.server.errors import ApiError
from fermi.server.pool import EnginePool, Replica

RETRY_AFTER_S = "1"


class Generation:
    def __init__(
        self,
        pool: EnginePool,
        requests: Sequence[GenerationRequest],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._loop = loop
        self._items: deque[tuple[int, Delta]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._wake_pending = False
        # Held by the sinks (several engine threads for n > 1 on several replicas) and by
        # ``push`` while it switches over, so deltas are handed on one at a time, in order.
        self._lock = threading.Lock()
        self._deliver: Callable[[int, Delta], bool] | None = None
        self._done: asyncio.Future[None] | None = None
        self._ended = False
        self.handles: list[RequestHandle] = []
        self.replicas: list[Replica] = []
        self.unfinished = len(requests)
        capacity = sum(r.engine.capacity for r in pool.replicas)
        if len(requests) > capacity:  # could never be queued whole: not a transient overload
            raise ApiError(
                400,
                f"this request asks for {len(requests)} completions (prompts x n); "
                f"the server holds at most {capacity} at once",
                param="n",
            )
        try:
            for index, request in enumerate(requests):
                replica = pool.pick()
                self.replicas.append(replica)
                self.handles.append(replica.engine.submit(request, self._sink_for(index)))
        except EngineOverloadedError as exc:
            self.cancel()
            raise ApiError(
                429,
                str(exc),
                type="rate_limit_error",
                code="engine_overloaded",
                headers=(("retry-after", RETRY_AFTER_S),),
            ) from None
        except RuntimeError as exc:  # the engine is closed (server shutting down)
            self.cancel()
            raise ApiError(
                503, str(exc), type="server_error", headers=(("retry-after", RETRY_AFTER_S),)
            ) from None

    def _sink_for(self, index: int):
        items, loop = self._items, self._loop

        def sink(delta: Delta) -> None:
            with self._lock:
                if self._deliver is not None:
                    self._hand_on(index, delta)
                    return
                items.append((index, delta))
                if not self._wake_pending:
                    self._wake_pending = True
                    loop.call_soon_threadsafe(self._wake)

        return sink

    def _hand_on(self, index: int, delta: Delta) -> None:
        """Pushed delivery of one delta (the lock is held): the callback says when the
        stream is complete; then, or when it raised, the loop learns it once."""
        if self._ended:
            return
        if delta.finish_reason is not None:
            self.unfinished -= 1
        assert self._deliver is not None and self._done is not None
        error: BaseException | None = None
        try:
            complete = self._deliver(index, delta)
        except Exception as exc:
            complete, error = True, exc
        if complete:
            self._ended = True
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
                self._loop.call_soon_threadsafe(_settle, self._done, error)

    async def push(
        self,
        opening: bytes,
        write: Callable[[bytes], object],
        deliver: Callable[[int, Delta], bool],
    ) -> None:
        """Write ``opening``, then hand every delta (those already queued first) to
        ``deliver(index, delta)`` on the thread it arrives on; ``deliver`` returns True once
        the stream is complete. Returns then; raises what ``deliver`` raised. Leaving early
        (cancellation) stops the hand-over; the caller cancels the generation."""
        self._done = self._loop.create_future()
        with self._lock:
            if opening:
                write(opening)
            self._deliver = deliver
            while self._items and not self._ended:
                self._hand_on(*self._items.popleft())
        try:
            await self._done
        finally:
            with self._lock:
                # Dropping the callback drops ``write`` too: Granian ends the response
                # body once its stream transport is freed.
                self._ended, self._deliver = True, None

    def _wake(self) -> None:
        self._wake_pending = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def batches(self) -> AsyncIterator[list[tuple[int, Delta]]]:
        """Yield the (choice index, delta) pairs that have arrived, until every choice
        finished. Leaving early (break, cancellation, disconnect) cancels the rest."""
        try:
            while self.unfinished:
                if not self._items:
                    self._waiter = self._loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
                    continue
                batch = []
                while self._items:
                    item = self._items.popleft()
                    if item[1].finish_reason is not None:
                        self.unfinished -= 1
                    batch.append(item)
                yield batch
        finally:
            if self.unfinished:
                self.cancel()

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
