"""What each engine step runs (``schedule``), and what its output does (``update``).

``schedule`` admits waiting requests into slots (reusing a cached prefix where one
matches: ``fermi.engine.slots``; fairly between API calls: ``WaitingQueue``), picks one
chunk of one prompt to prefill (so a long prompt never stalls running decodes for long; the
prompt with the fewest chunks so far, so it never stalls a short prompt either), and one
decode row for every sequence past
its prompt, and returns it all as a plain ``Batch`` for the runner. ``update`` takes the
step's sampled ids, turns them into text (``fermi.engine.output``), ends sequences on eos,
stop strings and length, and hands each request its deltas.

With a runner that overlaps (``Capabilities.overlaps``), the engine schedules and queues
step n+1 before it reads step n. Step n+1 continues step n's decode rows with the ids step
n sampled, still on the device, and the sequence whose first token step n's prefill
samples joins them the same way; a row that step n ends by length leaves (its token count
says so before it is read), and one that step n ends otherwise (eos, a stop string) makes
step n+1's row for it wasted work, which ``update`` drops. Under a server's steady load a
request joins or leaves at almost every step, so this keeps the host's work for step n
behind the device's step n+1. When a row needs an id only the host has (it was not in
step n, or a logits processor sampled step n), or when moving rows down into freed slots
would narrow the step, ``schedule`` returns None: the engine reads the step in flight
first, and the next step starts from the host's ids.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from fermi.engine.output import OutputStream
from fermi.engine.slots import SlotTable
from fermi.engine.types import Delta, FinishReason, GenerationRequest, Usage
from fermi.grammar import GrammarCompiler, Matcher
from fermi.runners.base import (
    Admission,
    Batch,
    Capabilities,
    Decode,
    PrefillChunk,
    SamplingOptions,
    SlotMove,
    StepOutput,
)
from fermi.sampling import LogitBias, SampleOutput, check_row
from fermi.text.thinking import THINK_OPEN
from fermi.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Sink = Callable[[Delta], None]


class RequestHandle:
    """Returned by ``Engine.submit``; ``cancel()`` stops generation within a step."""

    def __init__(self, request: GenerationRequest, sink: Sink, group: object = None) -> None:
        self.request = request
        self.sink = sink
        # Requests of one group (the choices and prompts of one API call) share the slots
        # as one client does: see ``WaitingQueue``. None: a group of its own.
        self.group = self if group is None else group
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(eq=False)
class Sequence:
    """A request admitted to a slot."""

    handle: RequestHandle
    slot: int
    output: OutputStream
    prefilled: int = 0  # prompt tokens in the cache (or queued to be written there)
    reused: int = 0  # of those, tokens the slot's cache already held at admission
    chunks: int = 0  # prefill chunks of its prompt scheduled so far
    keep: bool = True  # False once the request's session was released while it ran
    last_token: int = -1
    generated: int = 0  # tokens read back
    bias: LogitBias | None = None  # the request's logit_bias, a per-row logits processor
    matcher: Matcher | None = None  # where the output stands in the request's grammar

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    @property
    def done(self) -> bool:
        return self.handle.done.is_set()

    @property
    def masked(self) -> bool:
        """Whether the sequence samples under its grammar's masks (until it completes)."""
        return self.matcher is not None and not self.matcher.finished

    def under_grammar(self) -> bool:
        """Whether the next token is the grammar's: reasoning is not constrained."""
        splitter = self.output.splitter
        return self.masked and not (splitter is not None and splitter.in_reasoning)

    @property
    def position(self) -> int:
        """Cache position of the next token to feed (from the host)."""
        return len(self.request.prompt_ids) + self.generated - 1

    @property
    def cached(self) -> int:
        """Cache positions written (or queued) so far; the next token to feed is not."""
        prompt = len(self.request.prompt_ids)
        return self.position if self.prefilled >= prompt and self.generated else self.prefilled


@dataclass
class SchedulerStats:
    running: int = 0
    waiting: int = 0
    steps: int = 0
    prompt_tokens: int = 0  # prompt tokens prefilled (reused ones are not)
    cached_tokens: int = 0  # prompt tokens reused from a cache instead
    generated_tokens: int = 0
    last_step_at: float = 0.0


@dataclass
class _Scheduled:
    """What a batch handed out, to be matched with its output."""

    batch: Batch
    prefill: Sequence | None  # the sequence whose first token the prefill samples
    decode: list[Sequence] = field(default_factory=list)


class Scheduler:
    """Owned by the engine thread: not thread-safe (``Engine`` feeds it from its inbox)."""

    def __init__(
        self,
        caps: Capabilities,
        tokenizer: Tokenizer,
        prefix_reuse: bool = True,
        on_finish: Callable[[], None] = lambda: None,
        grammars: GrammarCompiler | None = None,
    ) -> None:
        self.caps = caps
        self.grammars = grammars
        # A single-token think opener may start a constrained reply (reasoning_may_open).
        self.think_open = tokenizer.token_to_id(THINK_OPEN)
        self._reasoning_mask: torch.Tensor | None = None  # see _reasoning_row
        self.on_finish = on_finish  # called as each request ends, before its last delta
        self.tokenizer = tokenizer
        reuse = prefix_reuse and caps.keeps_cache
        self.slots = SlotTable(caps.max_batch, reuse, moves=caps.moves_slots)
        self.stats = SchedulerStats()
        self.waiting = WaitingQueue()
        self.running: list[Sequence] = []  # in admission order
        self._released: set[str] = set()  # sessions released while a request of theirs waited
        self._scheduled: deque[_Scheduled] = deque()  # handed out, output not read yet
        # Set when a sequence is admitted or ends: only then can a running sequence come to
        # sit above a slot it could move into.
        self._may_compact = False

    @property
    def busy(self) -> bool:
        """Whether a step would do anything (waiting requests count while a slot is open)."""
        return bool(self.running or (self.waiting and self.slots.available))

    def add(self, handle: RequestHandle) -> None:
        self.waiting.append(handle)

    def release_session(self, session: str) -> None:
        self.slots.release_session(session)
        for seq in self.running:
            if seq.request.session == session:
                seq.keep = False
        if any(h.request.session == session for h in self.waiting):
            self._released.add(session)  # queued requests of it must not keep a cache either

    # -- schedule ---------------------------------------------------------------------

    def schedule(self) -> Batch | None:
        """The next step; None when it needs the ids of the step in flight (read it first)."""
        self._drop_cancelled()
        following = self._following() if self._scheduled else None
        if self._scheduled and following is None:
            return None
        new, moves = self._admit()
        if not self._scheduled:
            moves += self._compact()
        admitted = tuple(
            Admission(s.slot, s.request.params, s.request.prompt_ids, seed) for s, seed in new
        )
        prefill, chunk = self._prefill_chunk()
        if following is not None:
            decoding, rows = following
        else:
            decoding = sorted((s for s in self.running if s.generated), key=lambda s: s.slot)
            rows = None
            if decoding:
                rows = Decode(
                    tuple(s.slot for s in decoding),
                    tuple(s.last_token for s in decoding),
                    tuple(s.position for s in decoding),
                    _options(decoding),
                )
        sampled = [*decoding, *([prefill] if prefill is not None else [])]
        processors = {s.slot: s.bias for s in sampled if s.bias is not None}
        masked = [s for s in sampled if s.masked]
        masks = _Masks(self, masked) if masked else None
        batch = Batch(tuple(moves), admitted, chunk, rows, processors, masks)
        if batch.runs:  # (moves and admissions come with a prefill chunk)
            self._scheduled.append(_Scheduled(batch, prefill, decoding))
        self.stats.running = len(self.running)
        self.stats.waiting = len(self.waiting)
        return batch

    def _following(self) -> tuple[list[Sequence], Decode] | None:
        """Decode rows that can be queued behind the step in flight, fed the ids it samples
        on the device: its decode rows and the sequence whose first token its prefill
        samples, less those it ends by length (known before it is read) or that ended
        since (cancelled). None when a row needs its id from the host: a row that was not
        in that step, one with a logits processor, or any row of a step that ran one
        (processors sample outside the device's step). None too when nothing is left to
        run, when two steps are in flight, or when compaction would narrow the step."""
        last = self._scheduled[-1]
        if len(self._scheduled) > 1 or last.batch.processors:
            return None  # (a step with a logits processor samples its rows off the device)
        fed = set(last.decode)
        if last.prefill is not None:
            fed.add(last.prefill)
        limit = self.caps.max_seq_len
        decoding = []
        for s in sorted(self.running, key=lambda s: s.slot):
            if s.done or not (s.generated or s is last.prefill):
                continue  # (a prompt still being written has no token yet)
            if s not in fed or s.bias is not None:
                return None  # its id is on the host only, or is sampled outside the step
            if s.generated + 1 >= s.request.max_tokens or s.position + 1 >= limit - 1:
                continue  # the step in flight samples its last token
            decoding.append(s)
        if not decoding or self._narrows(decoding):
            return None
        slots = tuple(s.slot for s in decoding)
        positions = tuple(s.position + 1 for s in decoding)
        return decoding, Decode(slots, None, positions, _options(decoding))

    def _narrows(self, rows: list[Sequence]) -> bool:
        """Whether moving the running sequences down into free slots (which waits for the
        step in flight) would narrow the decode step: the runners' decode shapes grow in
        powers of two of the highest slot. ``rows`` are in slot order."""
        if not (self.caps.moves_slots and self._may_compact):
            return False
        span = rows[-1].slot + 1
        if _power_of_two(span) <= _power_of_two(len(self.running)):
            return False
        return not self._writing_a_prompt()  # (_compact waits for its first token)

    def _writing_a_prompt(self) -> bool:
        """Whether a running sequence's prompt is not all in the cache yet."""
        return any(s.prefilled < len(s.request.prompt_ids) for s in self.running)

    def _admit(self) -> tuple[list[tuple[Sequence, int]], list[SlotMove]]:
        """The requests admitted (with their seeds) and the slot copies they need first."""
        admitted, moves = [], []
        counts = running_by_group(self.running) if self.waiting else Counter()
        while self.waiting and self.slots.available:
            handle = self.waiting.pop(counts)
            if handle.cancelled.is_set():
                self._finish_unstarted(handle, "cancelled")
                continue
            req = handle.request
            try:  # a malformed request fails alone, before it takes a slot
                seed = req.params.seed if req.params.seed is not None else random.getrandbits(62)
                check_row(req.params, list(req.prompt_ids), seed, self.caps.vocab_size)
                output = OutputStream(self.tokenizer, req)
                matcher = None
                if req.grammar is not None:
                    if self.grammars is None:
                        raise ValueError("this engine was built without grammar support")
                    matcher = self.grammars.matcher(req.grammar, req.compiled_grammar)
            except Exception as exc:
                log.exception("admitting a request failed")
                self._finish_unstarted(handle, "error", f"{type(exc).__name__}: {exc}")
                continue
            slot, reused, copies = self.slots.take(req.prompt_ids, req.session)
            moves.extend(copies)
            seq = Sequence(handle, slot, output, prefilled=reused, reused=reused)
            if req.logit_bias:
                seq.bias = LogitBias(req.logit_bias)
            seq.matcher = matcher
            self.stats.cached_tokens += reused
            if req.session is not None and req.session in self._released:
                seq.keep = False
            self.running.append(seq)
            counts[handle.group] += 1
            admitted.append((seq, seed))
            self._may_compact = True
            self._unmark_released(req.session)
        return admitted, moves

    def _unmark_released(self, session: str | None) -> None:
        """A request of ``session`` left the queue: the release mark goes with the last."""
        if session in self._released and not any(
            h.request.session == session for h in self.waiting
        ):
            self._released.discard(session)

    def _compact(self) -> list[SlotMove]:
        if not self.caps.moves_slots or not self._may_compact:
            return []
        if self._writing_a_prompt():
            return []  # later: moves would stand between a prompt and its first token
        self._may_compact = False
        moves = self.slots.compact({s.slot: s.cached for s in self.running})
        by_slot = {s.slot: s for s in self.running}
        for move in moves:
            seq = by_slot.get(move.src)
            if seq is not None:
                seq.slot = move.dst
        return moves

    def _prefill_chunk(self) -> tuple[Sequence | None, PrefillChunk | None]:
        """The next chunk of the prompts still being written: of the one that has had the
        fewest chunks (the earliest admitted between equals). So a short prompt admitted
        while a long one is being written goes next instead of after the long one's last
        chunk, and long prompts take turns."""
        writing = [s for s in self.running if s.prefilled < len(s.request.prompt_ids)]
        if not writing:
            return None, None
        seq = min(writing, key=lambda s: s.chunks)
        seq.chunks += 1
        prompt = seq.request.prompt_ids
        start = seq.prefilled
        tokens = prompt[start : start + self.caps.prefill_chunk]
        seq.prefilled += len(tokens)
        self.stats.prompt_tokens += len(tokens)
        last = seq.prefilled == len(prompt)
        chunk = PrefillChunk(seq.slot, tokens, start, last, _options([seq]))
        return (seq if last else None), chunk

    # -- update -----------------------------------------------------------------------

    def update(self, batch: Batch, output: StepOutput) -> None:
        """Read a step's output (waiting for it): advance, stop and deliver its rows."""
        scheduled = self._scheduled.popleft()
        assert scheduled.batch is batch, "steps are read in the order they were scheduled"
        output.wait()
        now = time.perf_counter()
        if scheduled.prefill is not None and output.prefill is not None:
            self._emit([scheduled.prefill], output.prefill, now)
        if scheduled.decode and output.decode is not None:
            self._emit(scheduled.decode, output.decode, now)
        self.running = [s for s in self.running if not s.done]
        self.stats.running = len(self.running)
        self.stats.waiting = len(self.waiting)
        self.stats.last_step_at = time.monotonic()
        self.stats.steps += 1

    def _emit(self, seqs: list[Sequence], out: SampleOutput, now: float) -> None:
        tokens = out.tokens.tolist()
        chosen = out.logprobs.tolist() if out.logprobs is not None else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            if seq.done:  # ended by an earlier step: this row was wasted work
                continue
            lp = None
            if chosen is not None:
                top = list(zip(top_ids[i], top_lp[i], strict=True)) if top_ids and top_lp else []
                lp = seq.output.logprob(token, chosen[i], top)
            self._advance(seq, token, lp, now)

    def _advance(self, seq: Sequence, token: int, lp, now: float) -> None:
        if seq.handle.first_token_at is None:
            seq.handle.first_token_at = now
        if seq.under_grammar() and not self._opens_reasoning(seq, token):
            assert seq.matcher is not None
            if not seq.matcher.advance(token):
                error = seq.matcher.error or f"token {token} is outside the grammar"
                if seq.matcher.over_limits:
                    message = (
                        f"the grammar needed more work for one token than a request may "
                        f"take ({error}); a simpler schema or grammar avoids this"
                    )
                    log.warning("a constrained reply stopped at its grammar's limits: %s", error)
                    self._complete(seq, Delta(error=message, error_code="grammar_limit"), "error")
                    return
                log.error("a constrained row sampled a token its grammar rejects: %s", error)
                self._complete(seq, Delta(error=f"grammar: {error}"), "error")
                return
        seq.generated += 1
        seq.last_token = token
        self.stats.generated_tokens += 1
        delta, reason = seq.output.push(token, lp)
        if reason is None and seq.matcher is not None and seq.matcher.finished:
            reason = "stop"  # the grammar is complete
        if reason is None:
            if seq.generated >= seq.request.max_tokens:
                reason = "length"
            elif len(seq.request.prompt_ids) + seq.generated >= self.caps.max_seq_len:
                reason = "length"  # the context is full
        if reason is None:
            if delta.text or delta.reasoning or delta.token_ids:
                _send(seq.handle, delta)
            return
        final = seq.output.finish(reason)
        if final.logprobs:
            delta.logprobs = [*(delta.logprobs or ()), *final.logprobs]
        delta.text += final.text
        delta.reasoning += final.reasoning
        delta.stop_string = final.stop_string
        if final.tool_calls:
            delta.tool_calls = [*(delta.tool_calls or []), *final.tool_calls]
        # (a reply that called tools ends with tool_calls rather than stop)
        self._complete(seq, delta, final.finish_reason or reason)

    def _opens_reasoning(self, seq: Sequence, token: int) -> bool:
        return (
            seq.generated == 0
            and seq.request.reasoning_may_open
            and token == self.think_open
            and self.think_open is not None
        )

    def fill_masks(self, seqs: list[Sequence], bits: torch.Tensor) -> None:
        """The tokens each of ``seqs`` may sample next, as bitmask rows ``bits[slot]``
        (``TokenMasks``). A row in its reasoning is free except that it may not end there:
        the reply would end without the grammar's output."""
        under: list[tuple[Matcher, int]] = []
        for seq in seqs:
            if seq.under_grammar() and not seq.done:
                assert seq.matcher is not None
                under.append((seq.matcher, seq.slot))
                continue
            if seq.masked and not seq.done:
                bits[seq.slot].copy_(self._reasoning_row(bits.shape[1]))
            else:
                bits[seq.slot].fill_(-1)  # a row whose token will be dropped
        assert self.grammars is not None  # (a grammar's sequence was admitted)
        self.grammars.fill(under, bits)
        think = self.think_open
        if think is None:
            return
        for seq in seqs:
            if seq.generated == 0 and seq.request.reasoning_may_open and not seq.done:
                _set_bit(bits[seq.slot], think, True)

    def _reasoning_row(self, words: int) -> torch.Tensor:
        """The mask of a row reasoning before its grammar: every token but end-of-sequence
        (built once)."""
        row = self._reasoning_mask
        if row is None or row.numel() != words:
            row = torch.full((words,), -1, dtype=torch.int32)
            for eos in self.grammars.eos_ids if self.grammars else ():
                _set_bit(row, eos, False)
            self._reasoning_mask = row
        return row

    # -- endings ----------------------------------------------------------------------

    def _complete(self, seq: Sequence, delta: Delta, reason: FinishReason) -> None:
        self._may_compact = True  # a hole where it ran (free, or idle with its cache)
        delta.finish_reason = reason
        delta.usage = Usage(len(seq.request.prompt_ids), seq.generated, seq.reused)
        if reason == "error":
            self.slots.release(seq.slot)
        else:
            keep = seq.keep and self.caps.keeps_cache
            session = seq.request.session if keep else None
            self.slots.finish(seq.slot, self._cached_tokens(seq), session)
        self._finish(seq.handle, delta)

    @staticmethod
    def _cached_tokens(seq: Sequence) -> list[int]:
        prompt = seq.request.prompt_ids
        if seq.prefilled < len(prompt):
            return list(prompt[: seq.prefilled])
        # The newest token was sampled but never fed, so it is not in the cache.
        return [*prompt, *seq.output.token_ids[: max(seq.generated - 1, 0)]]

    def _finish_unstarted(
        self, handle: RequestHandle, reason: FinishReason, error: str | None = None
    ) -> None:
        n = len(handle.request.prompt_ids)
        self._unmark_released(handle.request.session)  # (it left the queue)
        self._finish(handle, Delta(finish_reason=reason, usage=Usage(n, 0), error=error))

    def _finish(self, handle: RequestHandle, delta: Delta) -> None:
        handle.finished_at = time.perf_counter()
        handle.done.set()
        self.on_finish()
        _send(handle, delta)

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.running if s.handle.cancelled.is_set() and not s.done]:
            self._complete(seq, Delta(), "cancelled")
        self.running = [s for s in self.running if not s.done]
        for handle in [h for h in self.waiting if h.cancelled.is_set()]:
            self.waiting.remove(handle)
            self._finish_unstarted(handle, "cancelled")

    def fail_running(self, message: str) -> None:
        """A step failed: end every running request with ``message``. Kept caches go too
        (the failed step's slot moves may not have run)."""
        self._scheduled.clear()
        for seq in self.running:
            if not seq.done:
                self._complete(seq, Delta(error=message), "error")
        self.running = []
        self.slots.drop_idle()
        self.stats.running = 0

    def fail_all(self, message: str) -> None:
        self.fail_running(message)
        while self.waiting:
            self._finish_unstarted(self.waiting.pop({}), "error", message)


def running_by_group(running: Iterable[Sequence]) -> Counter[object]:
    """How many of ``running`` each group has (``WaitingQueue.pop``)."""
    return Counter(s.handle.group for s in running)


class WaitingQueue:
    """Requests waiting for a slot, taken fairly between groups (a group is one API call's
    choices and prompts: ``RequestHandle.group``). ``pop`` hands out the oldest request of
    the group with the fewest sequences running; between groups running as many, the one
    whose turn came longest ago, a turn being a group's last admission or, before its
    first, its arrival. So a call that queued 64 prompts takes the slots while nothing else
    waits, a request that comes after it gets the next free slot instead of waiting for all
    64, and a stream of later requests cannot hold the call back for ever: once it runs
    nothing, it goes before every request that arrived after its last admission."""

    def __init__(self) -> None:
        # In the order of their turns, the longest ago first: a group joins at the end when
        # it arrives, and goes back to the end when admitted with requests still waiting.
        self._groups: OrderedDict[object, deque[RequestHandle]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[RequestHandle]:
        """Every waiting request (the queue must not change while this runs)."""
        return itertools.chain.from_iterable(self._groups.values())

    def append(self, handle: RequestHandle) -> None:
        queue = self._groups.get(handle.group)
        if queue is None:
            queue = self._groups[handle.group] = deque()
        queue.append(handle)
        self._count += 1

    def remove(self, handle: RequestHandle) -> None:
        queue = self._groups[handle.group]
        queue.remove(handle)
        self._count -= 1
        if not queue:
            del self._groups[handle.group]

    def pop(self, running: Mapping[object, int]) -> RequestHandle:
        """The next request to admit, given how many sequences each group runs now
        (``running_by_group``)."""
        group = next(iter(self._groups))
        if len(self._groups) > 1:
            counts = running
            fewest = counts.get(group, 0)
            for g in self._groups:  # in turn order: the first with the fewest running
                if fewest == 0:
                    break  # (none can run fewer; a common stop: the first group runs none)
                if counts.get(g, 0) < fewest:
                    group, fewest = g, counts.get(g, 0)
        queue = self._groups[group]
        handle = queue.popleft()
        self._count -= 1
        if queue:
            self._groups.move_to_end(group)  # its turn is now
        else:
            del self._groups[group]
        return handle


class _Masks:
    """A step's grammar masks (``fermi.runners.base.TokenMasks``), computed when the runner
    asks: after the step before was read when this step continues it."""

    __slots__ = ("_scheduler", "_seqs", "slots")

    def __init__(self, scheduler: Scheduler, seqs: list[Sequence]) -> None:
        self._scheduler = scheduler
        self._seqs = seqs
        self.slots = tuple(s.slot for s in seqs)

    def fill(self, bits: torch.Tensor) -> None:
        self._scheduler.fill_masks(self._seqs, bits)


def _set_bit(row: torch.Tensor, token: int, on: bool) -> None:
    """Allow (``on``) or forbid ``token`` in a bitmask row of int32 words."""
    word = int(row[token // 32])
    bit = 1 << (token % 32)
    word = word | bit if on else word & ~bit
    row[token // 32] = word - (1 << 32) if word >= 1 << 31 else word


def _power_of_two(n: int) -> int:
    """The smallest power of two >= ``n`` (n >= 1)."""
    return 1 << (n - 1).bit_length()


def _options(seqs: list[Sequence]) -> SamplingOptions:
    params = [s.request.params for s in seqs]
    want = max((s.request.logprobs for s in seqs if s.request.logprobs is not None), default=-1)
    return SamplingOptions(
        use_filters=any(p.uses_filters for p in params),
        use_penalties=any(p.uses_penalties for p in params),
        want_logprobs=want,
        all_greedy=all(p.is_greedy for p in params),
        use_mask=any(s.masked for s in seqs),
    )


def _send(handle: RequestHandle, delta: Delta) -> None:
    try:
        handle.sink(delta)
    except Exception:  # a consumer that went away must not break the batch
        log.exception("delivering output failed; cancelling the request")
        handle.cancel()
