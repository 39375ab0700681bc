"""One HTTP request's engine requests (``n`` choices, several prompts), merged for asyncio.

The engine calls its sink from the scheduler thread. The sink appends to a deque and wakes
the event loop only when the consumer may be asleep, so a consumer that falls behind gets
several deltas per wake-up instead of one loop callback per token.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Sequence

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
        self.handles: list[RequestHandle] = []
        self.replicas: list[Replica] = []
        self.unfinished = len(requests)
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
            items.append((index, delta))
            # Checked after the append: if a wake-up is already queued it will see this item.
            if not self._wake_pending:
                self._wake_pending = True
                loop.call_soon_threadsafe(self._wake)

        return sink

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
