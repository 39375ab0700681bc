"""The engine thread: one step after another, ``schedule`` -> ``execute`` -> ``update``.

Any thread submits requests (with back-pressure: a bounded queue); one background thread
owns the scheduler and the runner. A runner that overlaps (``Capabilities.overlaps``)
returns from ``execute`` before the step ran: the thread then reads the previous step
while this one runs on the device, so the host's per-token work (detokenising, stop
strings, delivery) hides behind the GPU. A failed step fails the requests that were
running, never the engine.

Embedding requests (:class:`~fermi.engine.embeddings.EmbeddingJob`) run on the same thread,
one batch before each step, so they never race a step for the runner.
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

from fermi.engine.embeddings import EmbeddingJob
from fermi.engine.scheduler import RequestHandle, Scheduler, Sink
from fermi.engine.types import GenerationRequest
from fermi.errors import EngineOverloadedError, RequestError
from fermi.grammar import GrammarCompiler
from fermi.runners.base import Batch, Runner, StepOutput
from fermi.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# A busy engine that has not finished a step for this long is wedged (HTTP and gRPC health).
STALL_SECONDS = 60.0
# How long the engine idles before it starts work that can wait (see EngineCore._next_item).
IDLE_WORK_AFTER_S = 0.5


@dataclass(frozen=True)
class EngineStats:
    running: int  # requests in a slot
    waiting: int  # requests queued for a slot
    load: int  # submitted and not finished (running, waiting, or not yet seen)
    capacity: int  # most requests held at once; ``submit`` refuses beyond
    steps: int
    prompt_tokens: int  # prompt tokens prefilled
    cached_tokens: int  # prompt tokens reused from a kept cache instead
    generated_tokens: int
    last_step_at: float  # time.monotonic() of the last step read
    free_slots: tuple[int, ...]  # slots holding nothing
    cached_slots: dict[int, str | None]  # idle slots keeping a cache -> their session

    def stalled(self, now: float | None = None) -> bool:
        """Whether work is queued and no step finished for ``STALL_SECONDS``."""
        now = time.monotonic() if now is None else now
        return self.load > 0 and now - self.last_step_at > STALL_SECONDS


@dataclass(frozen=True)
class _Release:
    session: str


# Engine cores whose thread may still run: closed when the interpreter exits.
_open_cores: weakref.WeakSet[EngineCore] = weakref.WeakSet()


@atexit.register
def _close_open_cores() -> None:
    """Stop every engine thread before the interpreter finalizes (a script need not call
    ``Engine.close()``). A daemon thread still running then is ended by ``pthread_exit``
    the next time it takes the GIL; when that is inside torch's C++ (the thread freeing a
    step's tensors just after it delivered the last token), the unwind through a noexcept
    frame aborts the process: "terminate called without an active exception", rc 134
    (1 run in 7 of a load-generate-exit script, tests/test_clean_exit.py)."""
    for core in list(_open_cores):
        core.close()


class EngineCore:
    def __init__(
        self,
        runner: Runner,
        tokenizer: Tokenizer,
        max_waiting: int = 1024,
        prefix_reuse: bool = True,
        grammars: GrammarCompiler | None = None,
        warm_grammars: bool = True,
    ) -> None:
        self.runner = runner
        self.caps = runner.capabilities
        self.max_waiting = max_waiting
        self.scheduler = Scheduler(
            self.caps, tokenizer, prefix_reuse, on_finish=self._finished, grammars=grammars
        )
        self._inbox: queue.Queue[RequestHandle | EmbeddingJob | _Release | None] = queue.Queue()
        self._embeddings: deque[EmbeddingJob] = deque()  # taking turns, a batch each
        self._unread: tuple[Batch, StepOutput] | None = None  # a step queued, not read yet
        self._lock = threading.Lock()
        self._pending = 0  # submitted but not yet finished, for back-pressure
        self._stopped = False
        self._grammars = grammars
        self._idle_work_done = not warm_grammars  # see _next_item
        self._runner_warming = True  # the runner may have warm-up left for idle time
        # The engine thread runs in a copy of this thread's context: torch keeps its compiler
        # settings in context variables (torch._dynamo.config.recompile_limit, which the
        # compiled runners raise), and a bare thread would start from torch's defaults.
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._loop,), name="fermi-engine", daemon=True
        )
        self._thread.start()
        _open_cores.add(self)

    # -- any thread -------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: Sink, group: object = None) -> RequestHandle:
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"submit takes a GenerationRequest (build_request), not {request!r}")
        if not callable(sink):
            raise TypeError(f"sink must be callable, not {sink!r}")
        if not request.prompt_ids:
            raise RequestError("the prompt is empty", "prompt")
        handle = RequestHandle(request, sink, group)
        self._queue(handle)
        return handle

    def submit_embedding(self, job: EmbeddingJob) -> None:
        """Queue an embedding job; its future gets the vectors (or the failure)."""
        self._queue(job)

    def _queue(self, item: RequestHandle | EmbeddingJob) -> None:
        with self._lock:
            if self._stopped:
                raise RuntimeError("the engine is closed")
            if self._pending >= self.capacity:
                raise EngineOverloadedError(
                    f"the request queue is full ({self.max_waiting} waiting); try again later"
                )
            self._pending += 1
            # Queued under the lock, so it cannot land behind close()'s stop marker.
            self._inbox.put(item)

    def release_session(self, session: str) -> None:
        """Drop the KV cache kept for ``session`` (no-op when none is kept)."""
        self._inbox.put(_Release(session))

    def close(self) -> None:
        """Stop the engine thread (failing what is still queued) and wait for it; also
        wait for the grammar compiler's background start, so that nothing of the engine
        runs after this returns. Called on the engine thread itself (from a request's
        sink), it stops the thread after the current step instead of waiting for it."""
        with self._lock:
            self._stopped = True
            self._inbox.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        if self._grammars is not None:
            self._grammars.wait_prepared()
        _open_cores.discard(self)

    @property
    def capacity(self) -> int:
        return self.max_waiting + self.caps.max_batch

    @property
    def load(self) -> int:
        return self._pending

    def stats(self) -> EngineStats:
        s, table = self.scheduler.stats, self.scheduler.slots
        # Copied in one C-level pass each (list() of a dict's items runs no Python code, so
        # the engine thread cannot change the table half-way under the GIL).
        free = tuple(table.free)
        idle = {slot: cached.session for slot, cached in list(table.idle.items())}
        return EngineStats(
            running=s.running,
            waiting=s.waiting,
            load=self._pending,
            capacity=self.capacity,
            steps=s.steps,
            prompt_tokens=s.prompt_tokens,
            cached_tokens=s.cached_tokens,
            generated_tokens=s.generated_tokens,
            last_step_at=s.last_step_at,
            free_slots=free,
            cached_slots=idle,
        )

    def _finished(self) -> None:
        with self._lock:
            self._pending -= 1

    # -- the engine thread ------------------------------------------------------------

    def _loop(self) -> None:
        scheduler = self.scheduler
        while True:
            busy = scheduler.busy or self._unread is not None or bool(self._embeddings)
            try:
                item = self._next_item(busy)
                if not busy:  # idle until now: the stall clock starts here, not at the last step
                    scheduler.stats.last_step_at = time.monotonic()
                while True:
                    if item is None:
                        self._unread = None
                        scheduler.fail_all("the engine is closed")
                        for job in self._embeddings:
                            job.fail("the engine is closed")
                        return
                    if isinstance(item, _Release):
                        scheduler.release_session(item.session)
                    elif isinstance(item, EmbeddingJob):
                        self._embeddings.append(item)
                    else:
                        scheduler.add(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            if self._embeddings:
                self._embed_batch()
            try:
                self.step()
            except Exception as exc:  # a broken step fails its requests, not the engine
                log.exception("engine step failed")
                self._unread = None
                scheduler.fail_running(f"engine step failed: {type(exc).__name__}: {exc}")

    def _next_item(self, busy: bool) -> RequestHandle | EmbeddingJob | _Release | None:
        """The next item of the inbox: at once when busy (``queue.Empty`` if none), else
        waiting for it. Work that can wait starts once the engine has been idle
        ``IDLE_WORK_AFTER_S``, each time it goes idle (a script's first request, sent as
        soon as the model is loaded, and a client's next request, sent as soon as the last
        one ended, come first):

        - the grammar compiler's view of the tokenizer, on a background thread: started at
          load, it held the GIL for 0.25 s of the first request's 0.35 s on a 2-core CPU
          (``fermi generate`` with SmolLM2-135M), and a request that needs it first builds
          it itself;
        - the runner's warm-up left for idle time (``Runner.warm_more``), one unit after
          another while the inbox stays empty: a request that arrives meanwhile waits for
          that unit only (a graph capture, tens of ms, or a compile, seconds; on the H200
          a request sent right after the last one ended waited 3.9 s for a compile before
          the idle wait was asked of every idle spell, ``perf/LOG.md`` run 43)."""
        if busy:
            return self._inbox.get(block=False)
        grammars = self._grammars is not None and not self._idle_work_done
        if grammars or self._runner_warming:
            try:
                return self._inbox.get(timeout=IDLE_WORK_AFTER_S)
            except queue.Empty:
                pass
        if grammars:
            self._idle_work_done = True
            try:
                self._grammars.prepare_in_background()
            except Exception:  # (a thread that cannot start): requests build it
                log.exception("could not start the grammar compiler's background build")
        while self._runner_warming:  # one unit at a time, as long as nothing comes in
            try:
                return self._inbox.get(block=False)
            except queue.Empty:
                self._runner_warming = self._warm_runner()
        return self._inbox.get()

    def _warm_runner(self) -> bool:
        try:
            return self.runner.warm_more()
        except Exception:  # the steps that need the shapes compile them themselves
            log.exception("the runner's idle warm-up failed")
            return False
        finally:
            # Progress, for health: a request that came in during a compile is not stalled.
            self.scheduler.stats.last_step_at = time.monotonic()

    def _embed_batch(self) -> None:
        """Run one batch of the first embedding job, which then goes to the back of the
        line: a small request is not held behind a large one. A failure fails the job."""
        job = self._embeddings.popleft()
        try:
            over = job.run_batch(self.runner)
        except Exception as exc:
            log.exception("embedding batch failed")
            job.fail(f"embedding failed: {type(exc).__name__}: {exc}")
            over = True
        self.scheduler.stats.last_step_at = time.monotonic()  # progress, for health
        if over:
            self._finished()
        else:
            self._embeddings.append(job)

    def step(self) -> None:
        """Schedule and queue one step; read the previous one (or, without overlap, this)."""
        batch = self.scheduler.schedule()
        if batch is None:  # the next step needs the ids of the one in flight
            self._read()
            batch = self.scheduler.schedule()
            assert batch is not None
        if not batch.runs:  # nothing runs, so nothing is in flight either
            return
        output = self.runner.execute(batch)
        self._read()
        output.finish()  # (a step under grammar masks samples once the step before is read)
        self._unread = (batch, output)
        if not self.caps.overlaps:
            self._read()

    def _read(self) -> None:
        if self._unread is not None:
            unread, self._unread = self._unread, None
            self.scheduler.update(*unread)
