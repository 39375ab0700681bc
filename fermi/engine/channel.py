"""Items from the engine thread to a consumer on an asyncio event loop.

The engine calls a request's sink on its own thread; the consumer lives on an event loop.
A :class:`Channel` is that hand-off, consumed one of two ways:

- pulled (``async for batch in channel``): ``put`` appends to a buffer and wakes the loop
  only when the consumer waits, so a consumer that falls behind takes every item that piled
  up in one batch, without a wake-up each. One wake-up (one thread-safe call, one write to
  the loop's self-pipe) also serves every channel of the loop that became ready before the
  loop ran it: with many streams on one loop, one per engine step, not one per stream;
- pushed (``await channel.push(deliver)``): ``put`` hands each item to ``deliver`` on the
  producer's thread itself, and the loop wakes once, when ``deliver`` says the stream is
  complete. A wake-up of the loop from another thread costs far more than building and
  sending a token's event (perf/notes_serve.md sections 3 and 5), so this is the streaming
  path wherever the transport may be written from any thread.

Either way the consumer ends with ``close()`` (``push`` closes on its own); a closed
channel drops what is put into it, so a consumer that left costs the engine thread nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Channel(Generic[T]):
    """One stream's items between producer threads and one consumer on an event loop.

    ``put`` may be called from any thread (several at once: the items of one thread keep
    their order, and pushed items are handed on one at a time). The consumer's side runs
    on the loop the channel was made on."""

    __slots__ = ("_deliver", "_done", "_error", "_items", "_lock", "_waiter", "_waker", "closed")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._waker = _waker_of(loop or asyncio.get_running_loop())
        self._lock = threading.Lock()
        self._items: list[T] = []
        self._waiter: asyncio.Future[None] | None = None  # set while the consumer waits
        self._deliver: Callable[[T], bool] | None = None  # set while pushing
        self._done: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.closed = False

    # -- the producer's side (any thread) -----------------------------------------------

    def put(self, item: T) -> None:
        """Buffer ``item`` and wake the consumer if it waits; or, while pushing, hand it to
        ``deliver`` here and now; or drop it once the channel is closed."""
        with self._lock:
            if self.closed:
                return
            if self._deliver is not None:
                if self._hand_on(item):
                    self._waker.due(self._done)  # type: ignore[arg-type]
                return
            self._items.append(item)
            waiter = self._waiter
            if waiter is None:
                return
            self._waiter = None
        self._waker.due(waiter)

    def _hand_on(self, item: T) -> bool:
        """Pushed delivery of one item (the lock is held). Once ``deliver`` says the stream
        is complete, or raises, the channel closes; returns whether it did."""
        try:
            complete = self._deliver(item)  # type: ignore[misc]
        except Exception as exc:
            complete, self._error = True, exc
        if complete:
            self.closed, self._deliver = True, None
        return complete

    # -- the consumer's side (the loop) -------------------------------------------------

    def __aiter__(self) -> Channel[T]:
        return self

    async def __anext__(self) -> list[T]:
        """The items put since the last batch (waiting for one at least), in order. Ends
        once the channel is closed."""
        while True:
            with self._lock:
                if self.closed:
                    raise StopAsyncIteration
                items = self._items
                if items:
                    self._items = []
                    return items
                waiter = self._waiter = self._waker.loop().create_future()  # type: ignore[union-attr]
            await waiter

    async def push(self, deliver: Callable[[T], bool]) -> None:
        """Hand every item (those already buffered first) to ``deliver(item)`` on the thread
        that puts it, until ``deliver`` returns True (the stream is complete); then return,
        or raise what ``deliver`` raised. The channel is closed after; leaving early
        (cancellation) closes it too, and drops ``deliver`` with what it holds."""
        loop = self._waker.loop()
        assert loop is not None  # we are running on it
        done = loop.create_future()
        with self._lock:
            if self.closed:
                return
            items, self._items = self._items, []
            self._deliver, self._done = deliver, done
            del deliver  # held by the channel only, so that closing it drops it
            # any() stops at the item that completes the stream.
            complete = any(self._hand_on(item) for item in items)
        try:
            if not complete:
                await done
        finally:
            self.close()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Stop the stream: drop what is buffered and whatever is put from now on."""
        with self._lock:
            self.closed = True
            self._items, self._waiter, self._deliver, self._done = [], None, None, None


class _LoopWaker:
    """Wakes futures of one event loop from other threads: one thread-safe call for all the
    futures that became due before the loop ran it.

    The loop is held weakly: ``_wakers`` maps it to its waker and must not keep it alive,
    so the due futures are held weakly too (a future holds its loop, and a wake-up that
    never runs, because the loop was closed first, would leave its future here for good)."""

    __slots__ = ("_due", "_lock", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._due: list[weakref.ref[asyncio.Future[None]]] = []

    def due(self, future: asyncio.Future[None]) -> None:
        """From any thread: resolve ``future`` on the loop, sharing the loop's wake-up with
        every future that became due before the loop ran it."""
        with self._lock:
            self._due.append(weakref.ref(future))
            if len(self._due) > 1:  # a wake-up is on its way already
                return
        loop = self.loop()
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        """On the loop: resolve every due future."""
        with self._lock:
            due, self._due = self._due, []
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
