"""The runner interface: everything the engine asks of a backend, and the step it runs.

A runner owns ``max_batch`` KV-cache slots of ``max_seq_len`` positions and one
``SamplingBatch`` row per slot. The engine's scheduler describes each step as plain data
(a :class:`Batch`: slot moves, requests admitted to slots, at most one prompt chunk to
prefill, the rows to decode); ``Runner.execute`` runs it on the device, samples, and
returns the token ids (:class:`StepOutput`). Nothing else crosses the seam.

A backend writes ``prefill`` and ``decode`` (logits out); the base class turns those into
``execute`` with sampling on the runner's device. A backend that can also return hidden
states for embedding checkpoints writes ``embed``. A backend that can do better (sampling
inside a CUDA graph, queuing a step before the previous one is read) overrides ``execute``
and says so in its :class:`Capabilities`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fermi.errors import FermiError
from fermi.sampling import SampleOutput, SamplingBatch, SamplingParams, sample, to_device


@dataclass(frozen=True)
class Capabilities:
    name: str  # "torch-cpu", "torch-cuda", "onnx", "coreml"
    max_batch: int
    max_seq_len: int
    vocab_size: int
    device: torch.device
    prefill_chunk: int  # longest prompt chunk one prefill call takes
    # ``execute`` may return before the step ran, and a decode step may continue the previous
    # one's rows with the ids it sampled on the device (``Decode.token_ids`` None).
    overlaps: bool = False
    # ``move_slot`` exists: the engine then keeps running sequences in the lowest slots,
    # because a step over slots 0..B-1 costs less than one over scattered slots.
    moves_slots: bool = False
    # A slot's cache outlives its request, so a later prompt sharing a prefix with it
    # prefills only the rest (automatic prefix reuse, and gRPC sessions).
    keeps_cache: bool = True
    # ``embed`` exists: the final hidden states of whole inputs, for embedding checkpoints.
    embeds: bool = False


@dataclass(frozen=True)
class SamplingOptions:
    """Which static variant of ``sample`` a set of rows needs (chosen on the host)."""

    use_filters: bool = False
    use_penalties: bool = False
    want_logprobs: int = -1  # -1 none, 0 the chosen token's, k also the k most likely
    all_greedy: bool = False
    use_mask: bool = False  # some row samples under a grammar (``Batch.masks``)


class LogitsProcessor(Protocol):
    """Changes one row's float32 logits [vocab] before it is sampled (in place or not)."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor: ...


class TokenMasks(Protocol):
    """The grammar masks of a step's constrained rows, computed when the runner asks: as
    late as it can, so that the host's mask work overlaps the device's forward pass, and,
    when the step continues the one in flight, after that step's tokens were read."""

    slots: tuple[int, ...]  # the constrained rows sampled this step

    def fill(self, bits: torch.Tensor) -> None:
        """Write each slot's bitmask (int32 [words], bit t = token t allowed) into
        ``bits[slot]``. ``bits`` [max_batch, words] is on the host; other rows are left as
        they are."""
        ...


@dataclass(frozen=True)
class Admission:
    """A request taking ``slot``: its sampling row is set before anything else runs."""

    slot: int
    params: SamplingParams
    prompt_ids: tuple[int, ...]
    seed: int


@dataclass(frozen=True)
class SlotMove:
    """Copy slot ``src``'s first ``length`` cached positions and its sampling row to ``dst``
    (``src`` is left as it was: the engine either keeps using it or frees it)."""

    src: int
    dst: int
    length: int


@dataclass(frozen=True)
class PrefillChunk:
    """Write ``token_ids`` into ``slot`` at positions ``start...``; when ``sample`` is set
    (the prompt's last chunk) sample the request's first token from the last position."""

    slot: int
    token_ids: tuple[int, ...]
    start: int
    sample: bool
    options: SamplingOptions = SamplingOptions()


@dataclass(frozen=True)
class Decode:
    """One token for each slot at its position. ``token_ids`` None: each slot is fed the
    token the previous step sampled for it, still on the device (``Capabilities.overlaps``;
    each slot must be one that step sampled: a decode row, or the slot whose first token
    its prefill chunk sampled)."""

    slots: tuple[int, ...]
    token_ids: tuple[int, ...] | None
    positions: tuple[int, ...]
    options: SamplingOptions = SamplingOptions()


@dataclass(frozen=True)
class Batch:
    """One engine step, in the order the runner applies it."""

    moves: tuple[SlotMove, ...] = ()
    admitted: tuple[Admission, ...] = ()
    prefill: PrefillChunk | None = None
    decode: Decode | None = None
    # Per-slot logits processors for the rows sampled this step.
    processors: dict[int, LogitsProcessor] = field(default_factory=dict)
    # Grammar masks of the rows sampled under one (their options have ``use_mask``).
    masks: TokenMasks | None = None

    @property
    def runs(self) -> bool:
        """Whether the step computes anything (moves and admissions alone do not)."""
        return self.prefill is not None or self.decode is not None


class StepOutput:
    """The ids a step sampled, in host memory: ``prefill`` (one row, when the chunk sampled)
    and ``decode`` (rows in ``Decode.slots`` order). A runner that overlaps may return it
    before the device finished; ``wait()`` blocks until the host copies are complete.

    A step under grammar masks may also return before it sampled (``pending``): the engine
    calls ``finish()`` once it has read the step before, so that the masks see its tokens;
    ``finish()`` queues the sampling and sets ``prefill``/``decode``."""

    __slots__ = ("_pending", "_wait", "decode", "prefill")

    def __init__(
        self,
        prefill: SampleOutput | None = None,
        decode: SampleOutput | None = None,
        wait: Callable[[], None] | None = None,
        pending: Callable[[], StepOutput] | None = None,
    ) -> None:
        self.prefill = prefill
        self.decode = decode
        self._wait = wait
        self._pending = pending

    def finish(self) -> None:
        """Queue the rest of the step (its sampling) if it waited for the host."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            rest = pending()
            self.prefill, self.decode, self._wait = rest.prefill, rest.decode, rest._wait

    def wait(self) -> None:
        self.finish()
        if self._wait is not None:
            self._wait()
            self._wait = None


WARMUP_SCOPES = ("first", "full")


def warmup_scope(warmup: bool | str) -> str | None:
    """A compiled runner's ``warmup`` argument as a scope: True is "full", False None."""
    if warmup is True or warmup is False:
        return "full" if warmup else None
    if warmup not in WARMUP_SCOPES:
        raise ValueError(f"warmup must be one of {', '.join(WARMUP_SCOPES)}, got {warmup!r}")
    return warmup


class Runner:
    """Base of every runner. Subclasses set ``capabilities`` and call ``super().__init__()``
    (which makes the sampling rows), and implement ``prefill`` and ``decode``."""

    capabilities: Capabilities
    sampling: SamplingBatch
    # load_masks' host mirror of the sampling rows' masks, made on first use
    _mask_mirror: torch.Tensor | None = None
    _mask_rows: frozenset[int] | set[int] = frozenset()  # its rows holding a mask
    _mask_copied: torch.cuda.Event | None = None  # the last copy out of it

    def __init__(self) -> None:
        caps = self.capabilities
        self.sampling = SamplingBatch(caps.max_batch, caps.vocab_size, caps.device)

    # -- what a backend implements ------------------------------------------------------

    def prefill(self, slot: int, token_ids: Sequence[int], start_pos: int) -> torch.Tensor:
        """Write ``token_ids`` into ``slot`` at positions ``start_pos...``; return the
        logits of the last token [vocab] (float32). At most ``prefill_chunk`` tokens."""
        raise NotImplementedError

    def decode(
        self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]
    ) -> torch.Tensor:
        """One token for each slot at its position; return logits [len(slots), vocab]."""
        raise NotImplementedError

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` cache positions (and any per-slot state the
        runner keeps) into slot ``dst``, leaving ``src`` as it was
        (``Capabilities.moves_slots``)."""
        raise NotImplementedError(f"the {self.capabilities.name} runner cannot move slots")

    def embed(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """The final hidden state (after the final norm, before ``lm_head``) at the last
        token of each input, float32 [len(token_ids), hidden], on the runner's device
        (``Capabilities.embeds``). Writes no cache slot: the engine calls it between steps,
        beside running sequences. Each input fits ``max_seq_len``."""
        raise FermiError(f"the {self.capabilities.name} runner cannot compute embeddings")

    def warm_more(self) -> bool:
        """Do one unit of warm-up left for idle time (a compile, a graph capture); True
        while more is left. The engine calls it between requests, never while a step is in
        flight. Runners that warm up in full when made have none."""
        return False

    # -- the step -----------------------------------------------------------------------

    def execute(self, batch: Batch) -> StepOutput:
        """Run one step: moves, admissions, the prefill chunk, the decode rows."""
        self.apply_moves_and_admissions(batch)
        prefill_logits = self.prefill_logits(batch)
        decode_logits = None
        rows = batch.decode
        if rows is not None:
            if rows.token_ids is None:
                raise ValueError(f"the {self.capabilities.name} runner needs each step's ids")
            decode_logits = self.decode(rows.slots, rows.token_ids, rows.positions)
        self.load_masks(batch)
        prefill = self.sample_prefill(prefill_logits, batch)
        decode = None
        if rows is not None:
            decode = self.sample(decode_logits, rows.slots, rows.options, batch)
        return StepOutput(on_host(prefill), on_host(decode))

    def prefill_logits(self, batch: Batch) -> torch.Tensor | None:
        """Write the batch's prompt chunk; the logits of its last token when the chunk is
        the prompt's last (its first token is sampled from them), else None."""
        chunk = batch.prefill
        if chunk is None:
            return None
        logits = self.prefill(chunk.slot, chunk.token_ids, chunk.start)
        return logits if chunk.sample else None

    def sample_prefill(self, logits: torch.Tensor | None, batch: Batch) -> SampleOutput | None:
        """Sample a prompt's first token from ``prefill_logits``' result (on the device,
        without waiting for it)."""
        chunk = batch.prefill
        if logits is None or chunk is None:
            return None
        return self.sample(logits[None], (chunk.slot,), chunk.options, batch)

    def load_masks(self, batch: Batch) -> None:
        """Have the scheduler compute the step's grammar masks and copy them into the
        sampling rows (asynchronously from pinned memory on a GPU).

        The masks are written into a host mirror of the sampling rows, kept between steps,
        and rows ``0 .. max(slots)`` go to the device in one copy: no allocation, index
        tensor or scatter per step (on the H200 a constrained batch-8 step is bound by the
        host, perf/LOG.md section 7). Mirror rows of slots that are not constrained stay
        all-ones, as their device rows are."""
        masks = batch.masks
        if masks is None or not masks.slots:
            return
        allowed = self.sampling.allowed
        mirror = self._mask_mirror
        if mirror is None:
            pinned = allowed.device.type == "cuda"
            mirror = torch.full(allowed.shape, -1, dtype=torch.int32, pin_memory=pinned)
            self._mask_mirror = mirror
        if self._mask_copied is not None:
            self._mask_copied.synchronize()  # the last copy out of the mirror is done
            # (an event not yet recorded, or long complete, returns at once)
        slots = set(masks.slots)
        for stale in self._mask_rows - slots:  # constrained before, not now
            mirror[stale].fill_(-1)
        self._mask_rows = slots
        masks.fill(mirror)
        high = max(slots) + 1
        allowed[:high].copy_(mirror[:high], non_blocking=True)
        if allowed.device.type == "cuda":
            if self._mask_copied is None:  # one event, recorded again at every copy
                self._mask_copied = torch.cuda.Event()
            self._mask_copied.record(torch.cuda.current_stream(allowed.device))

    def apply_moves_and_admissions(self, batch: Batch) -> None:
        admitted = {new.slot for new in batch.admitted}
        for move in batch.moves:
            self.move_slot(move.src, move.dst, move.length)
            if move.dst not in admitted:  # (an admitted row is set afresh below)
                self.sampling.move_row(move.src, move.dst)
        for new in batch.admitted:
            self.sampling.set_row(new.slot, new.params, list(new.prompt_ids), new.seed)

    def sample(
        self,
        logits: torch.Tensor,
        slots: Sequence[int],
        options: SamplingOptions,
        batch: Batch,
    ) -> SampleOutput:
        """Sample rows ``slots`` of ``logits`` [B, vocab] with the runner's sampling rows and
        record the tokens (on the device, without waiting for it)."""
        logits = apply_processors(logits, slots, batch.processors)
        rows = to_device(slots, logits.device)
        out = sample(
            logits,
            self.sampling,
            rows,
            use_filters=options.use_filters,
            use_penalties=options.use_penalties,
            want_logprobs=options.want_logprobs,
            all_greedy=options.all_greedy,
            use_mask=options.use_mask,
        )
        self.sampling.record(rows, out.tokens)
        return out


def on_host(out: SampleOutput | None) -> SampleOutput | None:
    """A host copy of ``out`` (synchronous)."""
    return None if out is None else SampleOutput(*(None if t is None else t.cpu() for t in out))


def apply_processors(
    logits: torch.Tensor, slots: Sequence[int], processors: dict[int, LogitsProcessor]
) -> torch.Tensor:
    """``logits`` with each row's processor applied (the same tensor when none applies)."""
    if not processors or not any(s in processors for s in slots):
        return logits
    logits = logits.float().clone()
    for i, slot in enumerate(slots):
        processor = processors.get(slot)
        if processor is not None:
            logits[i] = processor(logits[i])
    return logits
