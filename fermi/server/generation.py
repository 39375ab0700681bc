"""One HTTP request's engine requests (``n`` choices, several prompts), merged for asyncio.

Every engine request's sink puts ``(choice index, delta)`` into one
:class:`~fermi.engine.channel.Channel`, so the choices arrive merged, each in its order, and
the request is pulled (``batches``: ASGI, and whole responses) or pushed (``push``: each
delta handed on on the engine thread, the RSGI streaming path) like any other stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

from fermi.engine.api import RequestHandle
from fermi.engine.channel import Channel
from fermi.engine.types import Delta, GenerationRequest
from fermi.errors import EngineOverloadedError
from fermi.server.errors import ApiError, closed, overloaded
from fermi.server.pool import EnginePool, Replica


class Generation:
    def __init__(
        self,
        pool: EnginePool,
        requests: Sequence[GenerationRequest],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._channel: Channel[tuple[int, Delta]] = Channel(loop)
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
                handle = replica.engine.submit(request, self._sink_for(index), group=self)
                self.handles.append(handle)
        except EngineOverloadedError as exc:
            self.cancel()
            raise overloaded(exc) from None
        except RuntimeError as exc:  # the engine is closed (server shutting down)
            self.cancel()
            raise closed(exc) from None

    def _sink_for(self, index: int) -> Callable[[Delta], None]:
        put = self._channel.put

        def sink(delta: Delta) -> None:
            put((index, delta))

        return sink

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
        if opening:
            write(opening)  # nothing else writes before the channel hands deltas on

        def hand_on(item: tuple[int, Delta]) -> bool:
            index, delta = item
            if delta.finish_reason is not None:
                self.unfinished -= 1
            return deliver(index, delta)

        # The channel drops ``hand_on`` (and ``write`` with it) when it returns: Granian
        # ends the response body once its stream transport is freed.
        await self._channel.push(hand_on)

    async def batches(self) -> AsyncIterator[list[tuple[int, Delta]]]:
        """Yield the (choice index, delta) pairs that have arrived, until every choice
        finished. Leaving early (break, cancellation, disconnect) cancels the rest."""
        try:
            if not self.unfinished:
                return
            async for batch in self._channel:
                for _, delta in batch:
                    if delta.finish_reason is not None:
                        self.unfinished -= 1
                yield batch
                if not self.unfinished:
                    return
        finally:
            self._channel.close()
            if self.unfinished:
                self.cancel()

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()
