"""Continuous batching over a runner's cache slots.

One background thread owns the runner. Each loop iteration it admits waiting requests
into free slots, prefills one chunk of one prompt (so a long prompt never stalls running
decodes for long), and runs one batched decode step for every sequence past its prompt.
A finished or cancelled sequence frees its slot at once, unless its request names a
session: then the slot keeps its KV cache for that session's next request (which prefills
only past the shared prefix) until the session is released or the slot is needed by
another request (least recently used session first), so idle sessions never block work.
"""

from __future__ import annotations

import bisect
import logging
import queue
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fermi.engine.output import OutputStream
from fermi.engine.sampling import SampleOutput, SamplingBatch, sample
from fermi.engine.types import Delta, FinishReason, GenerationRequest, TokenLogprob, Usage
from fermi.errors import EngineOverloadedError
from fermi.runners.base import Runner
from fermi.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Sink = Callable[[Delta], None]


class RequestHandle:
    """Returned by :meth:`Scheduler.submit`; ``cancel()`` stops generation within a step."""

    def __init__(self, request: GenerationRequest, sink: Sink) -> None:
        self.request = request
        self.sink = sink
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Sequence:
    handle: RequestHandle
    slot: int
    output: OutputStream
    prefilled: int = 0  # prompt tokens already in the cache
    reused: int = 0  # of those, tokens a session's cache already held at admission
    keep: bool = True  # False once the request's session was released while it ran
    last_token: int = -1
    generated: int = 0
    token_ids: list[int] = field(default_factory=list)

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    @property
    def position(self) -> int:
        """Cache position of the next token to feed."""
        return len(self.request.prompt_ids) + self.generated - 1


@dataclass
class _Kept:
    """A session's slot between requests and the tokens its cache holds."""

    slot: int
    tokens: list[int]


@dataclass(frozen=True)
class _Release:
    session: str


@dataclass
class _InFlight:
    """A decode step queued on the device whose tokens the host has not read yet."""

    seqs: list[_Sequence]
    host: SampleOutput  # the step's output, live rows in ``seqs`` order, in host memory
    ready: torch.cuda.Event | None  # recorded after the copies (None: not a CUDA device)


@dataclass
class SchedulerStats:
    running: int = 0
    waiting: int = 0
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    last_step_at: float = 0.0


class Scheduler:
    def __init__(self, runner: Runner, tokenizer: Tokenizer, max_waiting: int = 1024) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        caps = runner.capabilities
        self.caps = caps
        # A runner that samples inside its own decode step owns the sampling tensors.
        self.sampling = getattr(runner, "sampling", None) or SamplingBatch(
            caps.max_batch, caps.vocab_size, caps.device
        )
        self.max_waiting = max_waiting
        self.stats = SchedulerStats()
        self._inbox: queue.Queue[RequestHandle | _Release | None] = queue.Queue()
        self._waiting: deque[RequestHandle] = deque()
        self._free = list(range(caps.max_batch))
        self._kept: OrderedDict[str, _Kept] = OrderedDict()  # idle sessions, LRU first
        self._released: set[str] = set()  # sessions released while a request of theirs waited
        self._prefilling: deque[_Sequence] = deque()
        self._decoding: list[_Sequence] = []
        # Runners that feed sampled ids back on the device let step n+1 be queued before the
        # host reads step n's tokens: the host's per-token work overlaps the GPU's next step.
        self._overlap = bool(getattr(runner, "feeds_back", False))
        self._in_flight: _InFlight | None = None
        # Set when a sequence is admitted or ends, or a slot is freed: only then can a running
        # sequence come to sit above a slot it could move into (``_compact`` clears it).
        self._may_compact = False
        self._lock = threading.Lock()
        self._pending = 0  # submitted but not yet finished, for back-pressure
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="fermi-scheduler", daemon=True)
        self._thread.start()

    # -- public -----------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: Sink) -> RequestHandle:
        with self._lock:
            if self._stopped:
                raise RuntimeError("the engine is closed")
            if self._pending >= self.capacity:
                raise EngineOverloadedError(
                    f"the request queue is full ({self.max_waiting} waiting); try again later"
                )
            if not request.prompt_ids:
                raise ValueError("the prompt is empty")
            self._pending += 1
            handle = RequestHandle(request, sink)
            # Queued under the lock, so it cannot land behind close()'s stop marker.
            self._inbox.put(handle)
        return handle

    def release_session(self, session: str) -> None:
        """Drop the KV cache kept for ``session`` (no-op when none is kept)."""
        self._inbox.put(_Release(session))

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            self._inbox.put(None)
        self._thread.join(timeout=30)

    @property
    def capacity(self) -> int:
        """Requests it holds at once (running plus waiting); ``submit`` refuses beyond."""
        return self.max_waiting + self.caps.max_batch

    @property
    def load(self) -> int:
        """Requests submitted and not yet finished (used to pick the least loaded replica)."""
        return self._pending

    # -- loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            # Waiting requests keep the loop busy only while a slot could take them.
            admissible = self._waiting and (self._free or self._kept)
            busy = bool(admissible or self._prefilling or self._decoding)
            try:
                item = self._inbox.get(block=not busy)
                while True:
                    if item is None:
                        self._fail_all("the engine is closed")
                        return
                    if isinstance(item, _Release):
                        self._release(item.session)
                    else:
                        self._waiting.append(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            try:
                self._step()
            except Exception as exc:  # a broken batched step fails the batch, not the engine
                log.exception("engine step failed")
                self._fail_running(f"engine step failed: {type(exc).__name__}: {exc}")

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self._in_flight is None:  # else the queued step reads the rows where they are
            self._compact()
        if self._prefilling:
            seq = self._prefilling[0]
            try:
                self._prefill_chunk(seq)
            except Exception as exc:  # one prompt's failure ends that request only
                log.exception("prefill failed")
                if seq in self._prefilling:
                    self._prefilling.remove(seq)
                if not seq.handle.done.is_set():
                    message = f"prefill failed: {type(exc).__name__}: {exc}"
                    self._complete(seq, Delta(error=message), "error")
        if self._decoding:
            self._decode()
        self.stats.running = len(self._prefilling) + len(self._decoding)
        self.stats.waiting = len(self._waiting)
        self.stats.last_step_at = time.monotonic()
        self.stats.steps += 1

    def _admit(self) -> None:
        while self._waiting and (self._free or self._kept):
            handle = self._waiting.popleft()
            if handle.cancelled.is_set():
                self._finish_unstarted(handle, "cancelled")
                continue
            req = handle.request
            slot, reused = self._take_slot(req)
            try:
                seed = req.params.seed if req.params.seed is not None else random.getrandbits(62)
                self.sampling.set_row(slot, req.params, list(req.prompt_ids), seed)
                out = OutputStream(self.tokenizer, req)
            except Exception as exc:  # this request is malformed: fail it alone
                log.exception("admitting a request failed")
                self._free_slot(slot)
                self._finish_unstarted(handle, "error", f"{type(exc).__name__}: {exc}")
                continue
            seq = _Sequence(handle, slot, out, prefilled=reused, reused=reused)
            if req.session is not None and req.session in self._released:
                seq.keep = False
            self._prefilling.append(seq)
            self._may_compact = True
            if req.session is not None and not any(
                h.request.session == req.session for h in self._waiting
            ):
                self._released.discard(req.session)

    def _compact(self) -> None:
        """Keep running sequences in the lowest slots, so a decode step spans as few rows as
        run: a GPU runner's step covers slots 0..B-1 for the smallest batch bucket B that
        holds the highest live slot, and the eager runner reads slots 0..B-1 as a view but
        gathers scattered ones. A request alone in slot 3 (its neighbours finished, or a
        kept session holds slot 0) would otherwise decode at bucket 4, without the one-row
        kernels.

        Between steps only (nothing in flight reads the rows), each of the n running
        sequences that sits at slot n or above moves into a slot below n that no running
        sequence holds: a free one first, else a kept session's, whose cache first moves to a
        free slot at n or above (so it is copied once, not again by a later move). Each move
        copies the sequence's cached positions (about 0.1 MB per position for Qwen3-1.7B in
        bf16, so about 0.1 ms per 1000 positions on an H100) and its sampling row.
        """
        move = getattr(self.runner, "move_slot", None)
        if move is None or not self._may_compact:
            return
        self._may_compact = False
        running = [*self._prefilling, *self._decoding]
        n = len(running)
        holes = sorted(set(range(n)) - {s.slot for s in running})
        if not holes:  # slots 0..n-1 run (and _decoding is in slot order: see insort)
            return
        kept_at = {k.slot: k for k in self._kept.values()}
        holes.sort(key=lambda h: h in kept_at)  # free holes first
        movers = sorted((s for s in running if s.slot >= n), key=lambda s: s.slot)
        for seq, hole in zip(movers, holes, strict=True):
            # The free list changes only after each copy: a copy that raises (a device
            # error) fails the batch, and every slot is still running, kept or free.
            kept = kept_at.get(hole)
            if kept is not None:
                spare = next((f for f in self._free if f >= n), None)
                if spare is None:  # every slot above is running or kept
                    break
                move(hole, spare, len(kept.tokens))
                self._free.remove(spare)
                bisect.insort(self._free, hole)
                kept.slot = spare
            move(seq.slot, hole, _cached(seq))
            self.sampling.move_row(seq.slot, hole)
            self._free.remove(hole)
            bisect.insort(self._free, seq.slot)
            seq.slot = hole
        # Rows in slot order: the eager runner reads slots 0..B-1 as a view only in that order.
        self._decoding.sort(key=lambda s: s.slot)

    def _take_slot(self, request: GenerationRequest) -> tuple[int, int]:
        """A slot for ``request`` and how many of its prompt tokens that slot already holds."""
        kept = self._kept.pop(request.session, None) if request.session is not None else None
        if kept is not None:
            shared = _common_prefix(kept.tokens, request.prompt_ids)
            # The last prompt token always runs again: its logits pick the first new token.
            # Cache entries past the shared prefix are masked by position, then overwritten.
            return kept.slot, min(shared, len(request.prompt_ids) - 1)
        if not self._free:
            _, lru = self._kept.popitem(last=False)
            self._free_slot(lru.slot)
        return self._free.pop(0), 0

    def _keep(self, seq: _Sequence) -> None:
        prompt = seq.request.prompt_ids
        if seq.prefilled < len(prompt):
            tokens = list(prompt[: seq.prefilled])
        else:  # the newest token was sampled but never fed, so it is not in the cache
            tokens = [*prompt, *seq.output.token_ids[: max(seq.generated - 1, 0)]]
        key = seq.request.session
        assert key is not None
        older = self._kept.pop(key, None)  # two overlapping requests of one session
        if older is not None:
            self._free_slot(older.slot)
        self._kept[key] = _Kept(seq.slot, tokens)

    def _release(self, session: str) -> None:
        kept = self._kept.pop(session, None)
        if kept is not None:
            self._free_slot(kept.slot)
        for seq in (*self._prefilling, *self._decoding):
            if seq.request.session == session:
                seq.keep = False
        if any(h.request.session == session for h in self._waiting):
            self._released.add(session)  # queued requests of it must not keep a cache either

    def _prefill_chunk(self, seq: _Sequence) -> None:
        prompt = seq.request.prompt_ids
        chunk = list(prompt[seq.prefilled : seq.prefilled + self.caps.prefill_chunk])
        logits = self.runner.prefill(seq.slot, chunk, seq.prefilled)
        seq.prefilled += len(chunk)
        self.stats.prompt_tokens += len(chunk)
        if seq.prefilled < len(prompt):
            return
        self._prefilling.popleft()
        self._sample_and_emit([seq], logits[None])
        if not seq.handle.done.is_set():
            bisect.insort(self._decoding, seq, key=lambda s: s.slot)

    def _decode(self) -> None:
        if self._overlap:
            self._decode_overlapped()
            return
        seqs = list(self._decoding)
        slots = [s.slot for s in seqs]
        args = (slots, [s.last_token for s in seqs], [s.position for s in seqs])
        fused = getattr(self.runner, "decode_sample", None)
        out = None
        if fused is not None:  # the runner samples (and records) inside its decode step
            out = fused(*args, self.sampling, **self._sample_options(seqs))
        if out is None:
            self._sample_and_emit(seqs, self.runner.decode(*args))
        else:
            self._emit_host(seqs, out)  # .tolist() there is the one host sync per step
        self._decoding = [s for s in self._decoding if not s.handle.done.is_set()]

    def _decode_overlapped(self) -> None:
        """Queue the next step, then read the previous one.

        While the batch is unchanged, step n+1 continues step n's rows with the ids step n
        sampled on the device; a row that step n ends (eos, stop string) makes step n+1's
        row for it wasted work, which is dropped. When the batch changed (a sequence joined,
        finished or was cancelled), the queued step is read first and the next one starts
        from the host's ids.
        """
        flight, self._in_flight = self._in_flight, None
        seqs = list(self._decoding)
        following = None
        same = flight is not None and len(flight.seqs) == len(seqs)
        same = same and all(a is b for a, b in zip(flight.seqs, seqs, strict=False))
        if same and self._can_continue(seqs):
            # Each row's fed token is the one step n sampled: one position past its last.
            following = self._launch(seqs, [s.position + 1 for s in seqs], feed=True)
        if flight is not None:
            self._collect(flight)
            self._decoding = [s for s in self._decoding if not s.handle.done.is_set()]
        if following is not None:
            if self._decoding:  # else every row it continued has ended: nothing to read
                self._in_flight = following
        elif self._decoding:
            self._compact()  # the batch changed and nothing is in flight: rows may move
            seqs = list(self._decoding)
            self._in_flight = self._launch(seqs, [s.position for s in seqs], feed=False)

    def _can_continue(self, seqs: list[_Sequence]) -> bool:
        """Whether every row still has room for one more token after the one in flight."""
        limit = self.caps.max_seq_len
        return all(
            not s.handle.done.is_set()
            and s.generated + 1 < s.request.max_tokens
            and s.position + 1 < limit - 1
            for s in seqs
        )

    def _launch(self, seqs: list[_Sequence], positions: list[int], *, feed: bool) -> _InFlight:
        slots = [s.slot for s in seqs]
        tokens = None if feed else [s.last_token for s in seqs]
        options = self._sample_options(seqs)
        # The runner samples and records the tokens on the device; nothing here may wait
        # for the GPU (a host read, or a copy from pageable memory), or the overlap is lost.
        out = self.runner.decode_sample(slots, tokens, positions, self.sampling, **options)
        cuda = out.tokens.device.type == "cuda"
        host = SampleOutput(*(None if t is None else _to_host(t, cuda) for t in out))
        ready = None
        if cuda:  # on the stream of the runner's GPU, not this thread's current device
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(out.tokens.device))
        return _InFlight(seqs, host, ready)

    def _collect(self, flight: _InFlight) -> None:
        """Emit the tokens of a queued step (waiting for it), skipping rows already ended."""
        if flight.ready is not None:
            flight.ready.synchronize()
        live = [i for i, s in enumerate(flight.seqs) if not s.handle.done.is_set()]
        if not live:
            return
        if len(live) < len(flight.seqs):
            index = torch.tensor(live)
            host = SampleOutput(*(None if t is None else t[index] for t in flight.host))
        else:
            host = flight.host
        self._emit_host([flight.seqs[i] for i in live], host)

    def _sample_options(self, seqs: list[_Sequence]) -> dict:
        flags = [self.sampling.row_flags(s.slot) for s in seqs]
        want = max((s.request.logprobs for s in seqs if s.request.logprobs is not None), default=-1)
        return {
            "use_filters": any(f.filters for f in flags),
            "use_penalties": any(f.penalties for f in flags),
            "want_logprobs": want,
        }

    def _sample_and_emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        rows = torch.tensor([s.slot for s in seqs], dtype=torch.long, device=logits.device)
        all_greedy = all(s.request.params.is_greedy for s in seqs)
        options = self._sample_options(seqs)
        out = sample(logits, self.sampling, rows, **options, all_greedy=all_greedy)
        self.sampling.record(rows, out.tokens)
        self._emit_host(seqs, out)  # .tolist() there is the one host sync per step

    def _emit_host(self, seqs: list[_Sequence], out: SampleOutput) -> None:
        tokens = out.tokens.tolist()
        chosen = out.logprobs.tolist() if out.logprobs is not None else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        now = time.perf_counter()
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            lp = None
            k = seq.request.logprobs
            if k is not None and chosen is not None:
                top = ()
                if k > 0 and top_ids is not None and top_lp is not None:
                    top = tuple(
                        (t, self.tokenizer.decode([t]), p)
                        for t, p in zip(top_ids[i][:k], top_lp[i][:k], strict=True)
                    )
                lp = TokenLogprob(token, self.tokenizer.decode([token]), chosen[i], top)
            self._emit_token(seq, token, lp, now)

    def _emit_token(self, seq: _Sequence, token: int, lp: TokenLogprob | None, now: float) -> None:
        if seq.handle.first_token_at is None:
            seq.handle.first_token_at = now
        seq.generated += 1
        seq.last_token = token
        self.stats.generated_tokens += 1
        delta, reason = seq.output.push(token, lp)
        if reason is None:
            if seq.generated >= seq.request.max_tokens:
                reason = "length"
            elif len(seq.request.prompt_ids) + seq.generated >= self.caps.max_seq_len:
                reason = "length"  # the context is full
        if reason is None:
            if delta.text or delta.reasoning or delta.token_ids:
                self._send(seq.handle, delta)
            return
        final = seq.output.finish(reason)
        delta.text += final.text
        delta.reasoning += final.reasoning
        self._complete(seq, delta, reason)

    def _complete(self, seq: _Sequence, delta: Delta, reason: FinishReason) -> None:
        self._may_compact = True  # a hole where it ran (free, or kept for its session)
        delta.finish_reason = reason
        delta.usage = Usage(len(seq.request.prompt_ids), seq.generated, seq.reused)
        if seq.request.session is not None and seq.keep and reason != "error":
            self._keep(seq)
        else:
            self._free_slot(seq.slot)
        self._finish(seq.handle, delta)

    def _free_slot(self, slot: int) -> None:
        self._may_compact = True
        self.runner.release(slot)
        self._free.append(slot)
        self._free.sort()  # lowest slots first keeps the decode batch dense

    def _finish(self, handle: RequestHandle, delta: Delta) -> None:
        handle.finished_at = time.perf_counter()
        handle.done.set()
        with self._lock:
            self._pending -= 1
        self._send(handle, delta)

    def _send(self, handle: RequestHandle, delta: Delta) -> None:
        try:
            handle.sink(delta)
        except Exception:  # a consumer that went away must not break the batch
            log.exception("delivering output failed; cancelling the request")
            handle.cancel()

    def _finish_unstarted(self, handle: RequestHandle, reason: FinishReason, error=None) -> None:
        n = len(handle.request.prompt_ids)
        self._finish(handle, Delta(finish_reason=reason, usage=Usage(n, 0), error=error))

    def _drop_cancelled(self) -> None:
        for seqs in (self._prefilling, self._decoding):
            for seq in [s for s in seqs if s.handle.cancelled.is_set()]:
                seqs.remove(seq)
                self._complete(seq, Delta(), "cancelled")
        for handle in [h for h in self._waiting if h.cancelled.is_set()]:
            self._waiting.remove(handle)
            self._finish_unstarted(handle, "cancelled")

    def _fail_running(self, message: str) -> None:
        self._in_flight = None
        for seq in list(self._prefilling) + list(self._decoding):
            if not seq.handle.done.is_set():
                self._complete(seq, Delta(error=message), "error")
        self._prefilling.clear()
        self._decoding.clear()

    def _fail_all(self, message: str) -> None:
        self._fail_running(message)
        while self._waiting:
            self._finish_unstarted(self._waiting.popleft(), "error", message)


def _to_host(t: torch.Tensor, cuda: bool) -> torch.Tensor:
    """A host copy of ``t``; from CUDA an asynchronous copy into pinned memory."""
    if not cuda:
        return t.cpu()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def _cached(seq: _Sequence) -> int:
    """Cache positions a running sequence holds (its next token to feed is not written)."""
    return seq.position if seq.prefilled >= len(seq.request.prompt_ids) else seq.prefilled


def _common_prefix(a: list[int], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
