"""The decoder on an NVIDIA GPU: compiled once, replayed as CUDA graphs.

Compilation. Each decoder layer is compiled with ``fullgraph=True`` and dynamic shapes
("regional" compilation): the layers share one compiled program, so the cost of a compile is
one layer's, not the whole model's, and one program serves every batch size, chunk length and
attended cache length (four compiles in all: the one-row decode step, the wider decode step,
and prefill twice: causal for chunks that start a sequence, masked for chunks after cached
context, see ``Decoder.prefill_is_causal``). The glue between layers (embedding, rope
tables, masks, lm_head) runs as plain kernels. ``compile_scope="model"`` compiles
``Decoder.forward`` whole instead (minutes for a 28-layer model, a few fused kernels fewer).
Each shape the runner uses is then captured once as a CUDA graph and replayed; a step costs
one graph launch and one small host-to-device copy of its positions (and of its token ids,
unless they are fed back on the device: below).

Buckets. Decode runs over rows 0..B-1 with B the smallest batch bucket (1, 2, 4, ...,
``max_batch``) that holds the highest live slot: the scheduler hands out the lowest free slots
first and moves running sequences down into slots freed below them (``move_slot``), so the
batch stays dense. The attended cache length is the smallest length bucket
(256, 384, 512, 768, ... about 1.5x apart, up to the cache) that holds the longest live
context, so attention cost follows the context rather than ``max_seq_len``. Prefill pads a
chunk to a power-of-two length bucket.

Padding. The cache has one spare position past the largest attended length (the "scratch"
position). Padded decode rows and padded prefill tokens are placed there, so their keys and
values land in a column that no step ever reads; they never overwrite a real entry, not even
of a slot that is half-way through a chunked prefill. (It also keeps every attended length
shorter than the cache, so a read is never the whole buffer, which would compile apart.)

Sampling runs inside the decode graph (``decode_sample``): the step returns token ids, and
the scheduler reads back only those. It calls the same ``fermi.sampling.sample`` as
every other runner, on this runner's ``sampling`` tensors, whose addresses never change. The
graph also writes the sampled ids into its own token input (and a prompt's first token,
sampled after its last chunk, is copied into its slot's), so the next step over those slots
can start before the host has read them (``decode_sample(slots, None, ...)``): the
scheduler overlaps its per-token work with the GPU's next step.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fermi.models.attention import DECODE_KERNELS
from fermi.models.decoder import Decoder
from fermi.runners import packaged
from fermi.runners.base import (
    Batch,
    Capabilities,
    Decode,
    Runner,
    StepOutput,
    on_host,
    warmup_scope,
)
from fermi.runners.compile_cache import CompileCache, cache_key, cache_root
from fermi.sampling import SampleOutput, SamplingBatch, mask_logits, sample

log = logging.getLogger(__name__)

SMALLEST_KV = 256
SMALLEST_CHUNK = 16
CACHE_ALIGN = 128  # cache length multiple: kernels tile the key axis in blocks of 128
DEFAULT_CHUNK = 2048
# Sampling variants compiled and captured at warm-up: plain (greedy or temperature) and
# top-k/top-p/min-p. Penalties and logprobs still run inside the graph, uncompiled.
WARM_VARIANTS = ((False, False, -1), (True, False, -1))

Variant = tuple  # (filters, penalties, logprobs[, mask]): a static variant of a step


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... below ``max_batch``, then ``max_batch`` itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch]


def kv_buckets(cache_len: int, smallest: int = SMALLEST_KV) -> list[int]:
    """Attended lengths 256, 384, 512, 768, 1024, ... (x1.5 then x4/3), capped by the cache."""
    sizes, n = [], smallest
    while n < cache_len:
        sizes.append(n)
        n = n * 3 // 2 if n & (n - 1) == 0 else n * 4 // 3
    return [*sizes, cache_len]


def chunk_buckets(chunk: int, smallest: int = SMALLEST_CHUNK) -> list[int]:
    """Padded prefill lengths 16, 32, 64, ... below ``chunk``, then ``chunk``."""
    sizes, n = [], smallest
    while n < chunk:
        sizes.append(n)
        n *= 2
    return [*sizes, chunk]


ATTENTION_FALLBACK = {"split": "sdpa", "flex": "math", "math": "sdpa"}


def warmup_plans(row_kernels: bool, attention: str) -> list[tuple[bool, str]]:
    """The (row kernels, decode attention) set-ups a warm-up tries in turn: each decode
    attention kernel down its fallback chain (split -> sdpa, flex -> math -> sdpa), with
    the fused row products and then without, so that one failing part does not turn the
    other off."""
    chain = [attention]
    while chain[-1] in ATTENTION_FALLBACK:
        chain.append(ATTENTION_FALLBACK[chain[-1]])
    rows = [True, False] if row_kernels else [False]
    return [(r, a) for a in chain for r in rows]


def pick(value: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= value (callers check that one exists)."""
    return buckets[bisect.bisect_left(buckets, value)]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def cache_positions(max_seq_len: int) -> int:
    """The positions a compiled runner's KV cache holds for ``max_seq_len``: the longest
    attended length, rounded up to the kernels' key tile, and one spare position that the
    padding rows of a captured step write to (``check_cache_fits`` counts these)."""
    return _round_up(max_seq_len, CACHE_ALIGN) + 1


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    outputs: tuple  # tensors the replay overwrites in place


@dataclass
class StartupStats:
    seconds: float = 0.0  # warm-up before the first request can run
    compiles: int = 0  # frames Dynamo compiled in that time
    graphs: int = 0  # graphs captured (all of them, once complete_s is set)
    deferred: int = 0  # shapes left to idle time (``warmup="first"``)
    complete_s: float | None = None  # when the whole warm-up was done, from its start
    cache_hit: bool = False
    decode_attention: str = "sdpa"
    row_kernels: bool = False
    pdl: bool = False  # the row products launched with programmatic dependent launch
    aot: bool = False  # the steps run as AOTInductor packages (FERMI_AOT, runners.packaged)
    packages_built_s: float | None = None  # the packages this start built: their export and compile
    notes: list[str] = field(default_factory=list)


def quantization_label(model: Decoder) -> str | None:
    """What the loader quantized or stored in fp16 on CPU (it changes the compiled code), or
    None."""
    if model.quantization is not None:
        return model.quantization.spec.label
    from fermi.models.half_weights import HalfWeightLinear

    half = [m for m in model.modules() if isinstance(m, HalfWeightLinear)]
    if half:  # each layout (fermi's kernels', FBGEMM's, plain) compiles to different code
        labels = {"native": "fp16-native", "fbgemm": "fp16-packed", "plain": "fp16-storage"}
        return labels[half[0].layout]
    return None


def _compiled_frames() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CudaGraphRunner(Runner):
    """The runner (``fermi.runners.base``) whose decode steps sample inside their graph and
    are queued before the previous step is read (``Capabilities.overlaps``).

    ``backend`` is the ``torch.compile`` backend (None: run the model eagerly) and
    ``use_graphs`` defaults to True on CUDA. Both exist so that the same bucketing and
    padding logic runs, and is tested, on CPU.
    """

    def __init__(
        self,
        model: Decoder,
        max_batch: int,
        max_seq_len: int,
        prefill_chunk: int | None = None,
        *,
        backend: str | None = "inductor",
        use_graphs: bool | None = None,
        decode_attention: str | None = None,
        warmup: bool | str = True,
        compile_cache: bool = True,
        compile_scope: str = "layer",
        row_kernels: bool | None = None,
        aot: bool | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        chunk = min(prefill_chunk or DEFAULT_CHUNK, max_seq_len)
        if chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if compile_scope not in ("layer", "model"):
            raise ValueError(f"compile_scope must be 'layer' or 'model', got {compile_scope!r}")
        scope = warmup_scope(warmup)
        self.model = model
        self.device = model.device
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.max_batch, self.max_seq_len, self.chunk = max_batch, max_seq_len, chunk
        self.cache_len = cache_positions(max_seq_len)
        longest = self.cache_len - 1  # the largest attended length
        self.scratch = longest  # the spare cache position padding writes to
        model.setup_cache(max_batch, self.cache_len)
        self.batch_sizes = batch_buckets(max_batch)
        self.kv_sizes = kv_buckets(longest)
        self.chunk_sizes = chunk_buckets(chunk)
        self.capabilities = Capabilities(
            name="torch-cuda" if self.device.type == "cuda" else f"torch-{self.device.type}",
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            vocab_size=model.cfg.vocab_size,
            device=self.device,
            prefill_chunk=chunk,
            overlaps=True,
            moves_slots=True,
            embeds=True,
        )
        super().__init__()  # the sampling rows: the graphs read them by address

        # Static inputs, filled in place before each replay. Decode: [tokens, positions,
        # live-row order] x max_batch. Prefill: chunk tokens, chunk positions, slot, last row.
        long = {"dtype": torch.long, "device": self.device}
        self._io = torch.zeros(3, max_batch, 1, **long)
        self._rows = torch.arange(max_batch, **long)
        # A masked decode step's logits, between its forward graph and its sampling graph.
        self._logits = torch.zeros(max_batch, model.cfg.vocab_size, device=self.device)
        self._pio = torch.zeros(2 * chunk + 2, **long)
        self._pinned = self.device.type == "cuda"

        self.backend = backend
        compiled_cuda = backend == "inductor" and self.device.type == "cuda"
        if decode_attention is None:  # our split-KV kernel where Triton runs, else SDPA
            from fermi.models import split_decode

            decode_attention = "split" if split_decode.available() else "sdpa"
        self._set_decode_attention(decode_attention if compiled_cuda else "sdpa")
        from fermi.models import gemv

        if row_kernels is None:  # the fused one-row products where Triton runs
            row_kernels = compiled_cuda and gemv.available()
        # The steps as AOTInductor packages (FERMI_AOT=1; fermi.runners.packaged): no
        # Dynamo at a warm start. They launch no product with PDL (see packaged).
        self.aot = backend == "inductor" and (packaged.aot_wanted() if aot is None else aot)
        aot_refused = None
        if self.aot and self.device.type == "cuda":
            # On the GPU tried (torch 2.11, H100) loading any CUDA AOTInductor package killed
            # the process (perf/aoti_constants_probe.py, perf/LOG.md run 84): not offered.
            aot_refused = packaged.CUDA_REFUSED
            log.warning("%s", aot_refused)
            self.aot = False
        self._packages: packaged.StepPackages | None = None
        self._package_root: Path | None = None
        self._cache_wanted = False  # (warmup sets it)
        # Hopper's programmatic dependent launch for the row products (FERMI_PDL=1: on).
        self._pdl_wanted = gemv.pdl_wanted(self.device) and not self.aot
        # Set both ways: the model may come from a runner that turned them on.
        self._set_row_kernels(bool(row_kernels) and model.use_row_kernels())
        self._forward: Callable = model.forward
        self.compile_scope = compile_scope
        if backend is not None and not self.aot:
            self._compile()
        self._fed: set[int] = set()  # slots whose newest sampled ids sit in the token input
        self._samplers: dict[Variant, Callable] = {}
        self._graphs: dict[tuple, _Captured] = {}
        self._deferred: list[tuple] = []  # warm-up left for idle time (warm_more)
        self._warmed: set[tuple] = set()  # shapes run (and captured) once: _run notes them
        self._started = time.perf_counter()
        self._plans: list[tuple[bool, str]] = []  # kernel set-ups to try (warmup_plans)
        self._plan = 0  # the one in use
        self._cache: CompileCache | None = None  # saved once the whole warm-up is done
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._stream = torch.cuda.Stream(self.device) if self.use_graphs else None
        self.startup = StartupStats(
            decode_attention=self.decode_attention,
            row_kernels=self.row_kernels,
            pdl=self.pdl,
            aot=self.aot,
            notes=[aot_refused] if aot_refused else [],
        )
        if scope is not None:
            self.warmup(compile_cache=compile_cache and backend == "inductor", scope=scope)

    def _compile(self) -> None:
        """Have Dynamo and Inductor compile the model's steps (``torch.compile``)."""
        import torch._dynamo.config as dynamo_config

        # Each model a process compiles (or runs with other kernels) is one more compile
        # of the same layer code; Dynamo's default limit of 8 stops the ninth.
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        options = {"fullgraph": True, "dynamic": True, "backend": self.backend}
        model = self.model
        if self.compile_scope == "model":
            self._forward = torch.compile(model.forward, **options)
        else:  # every layer calls the same compiled code: one compile, not one per layer
            for module in (*model.model.layers, model.model.norm):
                module.compile(**options)

    # -- protocol ---------------------------------------------------------------------

    def prefill(self, slot: int, token_ids: list[int], start_pos: int) -> torch.Tensor:
        n = len(token_ids)
        if not 1 <= n <= self.chunk:
            raise ValueError(f"a prefill chunk holds 1..{self.chunk} tokens, got {n}")
        if start_pos < 0 or start_pos + n > self.max_seq_len:
            raise ValueError(
                f"positions {start_pos}..{start_pos + n - 1} exceed max_seq_len {self.max_seq_len}"
            )
        self._check_slots([slot])
        self._check_tokens(token_ids)
        t = pick(n, self.chunk_sizes)
        causal = self.model.prefill_is_causal(start_pos)
        # A causal chunk reads the cache only in windowed layers, whose masks hide any
        # column past its tokens: the chunk bucket's own length serves every such chunk,
        # so each chunk bucket has one causal graph, the one warm-up captured.
        kv = pick(t if causal else start_pos + n, self.kv_sizes)
        pad = self.chunk - n
        values = [
            *token_ids,
            *([0] * pad),
            *range(start_pos, start_pos + n),
            *([self.scratch] * pad),
            slot,
            n - 1,
        ]
        with self._on_device():
            self._pio.copy_(self._host(values, self._pio.shape), non_blocking=True)
            body = functools.partial(self._prefill_body, t, kv, causal)
            (logits,) = self._run(("prefill", t, kv, causal), body)
            return logits[0].clone()  # the graph's output buffer is reused by the next replay

    def decode(self, slots: list[int], token_ids: list[int], positions: list[int]) -> torch.Tensor:
        self._fed = set()  # (this graph leaves the host's ids in the token input)
        with self._on_device():
            b, kv = self._fill_decode(slots, token_ids, positions)
            body = functools.partial(self._decode_body, b, kv, None)
            (logits,) = self._run(("decode", b, kv, None), body)
            return logits.index_select(0, self._io[2, : len(slots), 0])

    def decode_sample(
        self,
        slots: list[int],
        token_ids: list[int] | None,
        positions: list[int],
        batch: SamplingBatch,
        *,
        use_filters: bool,
        use_penalties: bool,
        want_logprobs: int,
    ) -> SampleOutput | None:
        """One decode step with sampling in the same graph; rows of ``batch`` are slots.

        Returns None when ``batch`` is not this runner's ``sampling`` (the graphs read those
        tensors by address); the caller then samples the logits of ``decode`` itself.

        The sampled tokens are recorded in ``batch`` (penalty counts, noise steps), queued on
        the device behind the step.

        ``token_ids=None`` feeds each slot the token the previous step sampled for it, without
        a host round trip (each slot must be one of that step's decode rows, or the slot whose
        first token its prefill sampled): the step is queued behind the previous one while
        the host is still reading its tokens.
        """
        if batch is not self.sampling:
            return None
        if token_ids is None and not self._fed.issuperset(slots):
            raise ValueError("token_ids=None continues slots the previous step sampled only")
        variant = (use_filters, use_penalties, want_logprobs)
        with self._on_device():
            b, kv = self._fill_decode(slots, token_ids, positions)
            body = functools.partial(self._decode_body, b, kv, variant)
            out = self._run(("decode", b, kv, variant), body)
            self._fed = set(slots)
            live = self._io[2, : len(slots), 0]  # the slots, already on the device
            out = SampleOutput(*(None if t is None else t.index_select(0, live) for t in out))
            batch.record(live, out.tokens)
            return out

    def embed(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Eager, outside every graph and compiled layer (``Decoder.last_token_states``):
        embedding inputs come in any number and length, and the forward writes no cache
        slot, so the graphs, their inputs and the running sequences are untouched. Queued
        on the stream behind the step in flight."""
        for ids in token_ids:  # (an id outside the vocabulary would be a device-side assert)
            if ids:
                self._check_tokens(list(ids))
        with self._on_device(), torch.inference_mode():
            return self.model.last_token_states(token_ids)

    def execute(self, batch: Batch) -> StepOutput:
        """The step queued on the device; returns before it ran. The sampled ids are copied
        to pinned host memory behind it, and ``StepOutput.wait()`` waits for those copies.
        Nothing here may wait for the GPU (a host read, or a copy from pageable memory), or
        the engine could not queue the next step while this one runs.

        A step with grammar masks runs its forward pass and its sampling as two graphs: the
        masks are computed on the host while the forward pass runs. When the step continues
        the one in flight, the masks need that step's tokens, so the sampling is left
        pending (``StepOutput.finish``) until the engine has read them."""
        with self._on_device():
            self.apply_moves_and_admissions(batch)
            rows = batch.decode
            if batch.masks is None:
                prefill = self.sample_prefill(self.prefill_logits(batch), batch)
                decode = None if rows is None else self._decode_step(rows, batch)
                self._feed_first_token(batch, prefill, decoded=rows is not None)
                return self._step_output(prefill, decode)
            prefill_logits = self.prefill_logits(batch)
            width = None if rows is None else self._decode_logits(rows)

        def sample_rest() -> StepOutput:
            with self._on_device():
                self.load_masks(batch)
                prefill = self.sample_prefill(prefill_logits, batch)
                decode = None
                if rows is not None and width is not None:
                    decode = self._sample_logits(rows, width, batch)
                self._feed_first_token(batch, prefill, decoded=rows is not None)
                return self._step_output(prefill, decode)

        if rows is not None and rows.token_ids is None:
            return StepOutput(pending=sample_rest)
        return sample_rest()

    def _feed_first_token(self, batch: Batch, prefill: SampleOutput | None, decoded: bool) -> None:
        """Put the token a prompt's last chunk sampled into its slot's token input, so that
        the next step may feed it to the slot without a host round trip (after this step's
        decode graph, which writes every row of its bucket)."""
        if not decoded:
            self._fed = set()  # (the token input holds ids older than this step)
        if prefill is None or batch.prefill is None:
            return
        slot = batch.prefill.slot
        self._io[0, slot].copy_(prefill.tokens)
        self._fed.add(slot)

    def _step_output(self, prefill: SampleOutput | None, decode: SampleOutput | None) -> StepOutput:
        if not self._pinned:  # not a CUDA device (tests run this runner on CPU)
            return StepOutput(on_host(prefill), on_host(decode))
        if prefill is None and decode is None:
            return StepOutput()
        copies = [_pinned_copy(out) for out in (prefill, decode)]
        ready = torch.cuda.Event()  # on the stream of this runner's GPU
        ready.record(torch.cuda.current_stream(self.device))
        return StepOutput(*copies, wait=ready.synchronize)

    def _decode_step(self, rows: Decode, batch: Batch) -> SampleOutput:
        slots, positions = list(rows.slots), list(rows.positions)
        tokens = None if rows.token_ids is None else list(rows.token_ids)
        if any(s in batch.processors for s in slots):
            # A processor runs in Python: the graph gives logits, sampled outside it.
            if tokens is None:
                raise ValueError("a step with logits processors needs each step's ids")
            logits = self.decode(slots, tokens, positions)
            return self.sample(logits, slots, rows.options, batch)
        options = rows.options
        out = self.decode_sample(
            slots,
            tokens,
            positions,
            self.sampling,
            use_filters=options.use_filters,
            use_penalties=options.use_penalties,
            want_logprobs=options.want_logprobs,
        )
        assert out is not None  # the runner's own sampling rows
        return out

    def _decode_logits(self, rows: Decode) -> int:
        """The forward half of a masked decode step: its logits land in ``_logits`` (one
        row per slot, up to the batch bucket, which it returns)."""
        slots = list(rows.slots)
        if rows.token_ids is None and not self._fed.issuperset(slots):
            raise ValueError("token_ids=None continues slots the previous step sampled only")
        tokens = None if rows.token_ids is None else list(rows.token_ids)
        b, kv = self._fill_decode(slots, tokens, list(rows.positions))
        (logits,) = self._run(
            ("decode", b, kv, None), functools.partial(self._decode_body, b, kv, None)
        )
        self._logits[:b].copy_(logits)
        return b

    def _sample_logits(self, rows: Decode, b: int, batch: Batch) -> SampleOutput:
        """The sampling half of a masked decode step, over ``_logits``: a graph of its own,
        or eagerly when a row has a logits processor."""
        slots = list(rows.slots)
        live = self._io[2, : len(slots), 0]  # the slots, already on the device
        options = rows.options
        if any(s in batch.processors for s in slots):
            out = self.sample(self._logits.index_select(0, live), slots, options, batch)
            self._io[0, :, 0].index_copy_(0, live, out.tokens)
        else:
            variant = (options.use_filters, options.use_penalties, options.want_logprobs, True)
            out = self._run(
                ("sample", b, variant), functools.partial(self._sample_body, b, variant)
            )
            out = SampleOutput(*(None if t is None else t.index_select(0, live) for t in out))
            self.sampling.record(live, out.tokens)
        self._fed = set(slots)
        return out

    @torch.inference_mode()
    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Move a sequence's first ``length`` cached positions from ``src`` to ``dst``: two
        copies per layer on the runner's stream, so they run after every step queued before
        and before every step queued after (the scheduler moves rows between steps only)."""
        with self._on_device():
            self.model.move_slot(src, dst, length)

    # -- warm-up ----------------------------------------------------------------------

    def warmup(self, compile_cache: bool = True, scope: str = "full") -> StartupStats:
        """Compile and capture ahead of the first request. ``scope="full"``: every prefill
        chunk bucket and every decode (batch, length) bucket for the common sampling
        variants. ``scope="first"``: what a first request needs (the causal prefill and the
        one-row decode step, both sampling variants, at the smallest buckets); the rest is
        left to ``warm_more`` (the engine calls it while idle), and a step that meets a
        shape before then compiles or captures it itself. Either way each shape runs the
        same compiled code, so the tokens do not depend on when it was captured. Writes only
        to the scratch position."""
        started, frames = time.perf_counter(), _compiled_frames()
        self._started = started
        self._cache = None
        # Packaged steps go to the compile cache, or (without one) to a folder of this runner.
        self._package_root = cache_root() if compile_cache else None
        self._cache_wanted = compile_cache
        if not self.aot:
            self._open_compile_cache()
        jobs = self.warm_jobs()
        first = jobs if scope == "full" else self.first_jobs()
        # The fused row products and the decode kernels are the newest parts of the stack:
        # set-ups are tried in turn until one compiles (see warmup_plans).
        self._plans = warmup_plans(self.row_kernels, self.decode_attention)
        self._plan = 0
        while True:
            rows, attention = self._plans[self._plan]
            self._set_row_kernels(rows)
            self._set_decode_attention(attention)
            try:
                if self.aot:
                    self._bind_packages()
                self._warm(first)
                break
            except Exception as exc:
                # Packaging is the newest part: it goes first, before any kernel set-up.
                if self.aot and not isinstance(exc, torch.OutOfMemoryError):
                    self._leave_aot(exc)
                elif not self._next_plan(exc):
                    raise
        self._deferred = [key for key in self.deferred_order(jobs) if key not in self._warmed]
        self.startup.seconds = time.perf_counter() - started
        self.startup.compiles = _compiled_frames() - frames
        self.startup.graphs = len(self._graphs)
        self.startup.deferred = len(self._deferred)
        self.startup.decode_attention = self.decode_attention
        self.startup.row_kernels = self.row_kernels
        self.startup.pdl = self.pdl
        self._note_packages()
        if not self._deferred:
            self._warm_done()
        else:
            if self._cache is not None:  # for a process that ends before idle time is over
                self._cache.save(complete=False)
            log.info(
                "ready for a first request in %.1f s; %d graphs left for idle time",
                self.startup.seconds,
                len(self._deferred),
            )
        return self.startup

    def _open_compile_cache(self) -> None:
        """Load Inductor's artefact bundle for this set-up (saved once warm-up is done)."""
        if not self._cache_wanted:
            return
        self._cache = CompileCache(
            self._setup_key(
                scope=self.compile_scope,
                pdl=self.pdl,
                # A bundle from before the causal prefill variant lacks its compile,
                # and a loaded bundle is never rewritten: keep the two apart.
                causal_prefill=self.model.prefill_is_causal(0),
            )
        )
        self.startup.cache_hit = self._cache.load()

    def _setup_key(self, **more) -> str:
        """The compile cache's key of this model, its sizes and kernels, plus ``more``."""
        return cache_key(
            self.model.cfg,
            self.model.dtype,
            self.device,
            max_batch=self.max_batch,
            cache_len=self.cache_len,
            chunk=self.chunk,
            attention=self.decode_attention,
            row_kernels=self.row_kernels,
            quantization=quantization_label(self.model),
            **more,
        )

    def warm_jobs(self) -> list[tuple]:
        """Every shape a full warm-up captures, as ``_run`` keys: the prefill chunk buckets
        (causal for chunks that start a sequence, where the model has such layers, and
        masked for chunks after cached context: two compiles of the layer), then the decode
        buckets for the common sampling variants."""
        variants = sorted({self.model.prefill_is_causal(0), False})
        jobs: list[tuple] = [
            ("prefill", t, pick(t, self.kv_sizes), causal)
            for t in self.chunk_sizes
            for causal in variants
        ]
        jobs += [
            ("decode", b, kv, variant)
            for b in self.batch_sizes
            for kv in self.kv_sizes
            for variant in WARM_VARIANTS
        ]
        return jobs

    def first_jobs(self) -> list[tuple]:
        """The shapes of a first short request: the smallest prefill chunk (causal where
        the model has such layers) and the one-row decode step at the smallest length,
        both sampling variants."""
        t, kv = self.chunk_sizes[0], self.kv_sizes[0]
        first = [("prefill", t, pick(t, self.kv_sizes), self.model.prefill_is_causal(0))]
        first += [("decode", 1, kv, variant) for variant in WARM_VARIANTS]
        return first

    def deferred_order(self, jobs: list[tuple]) -> list[tuple]:
        """Idle warm-up order: the shapes that compile something first (the masked
        prefill, the wider decode step), then the one-row decode as a context grows, then
        the rest in ``warm_jobs`` order."""
        t = self.chunk_sizes[0]
        wide = self.batch_sizes[1] if len(self.batch_sizes) > 1 else None
        head = [("prefill", t, pick(t, self.kv_sizes), False)]
        if wide is not None:
            head += [("decode", wide, self.kv_sizes[0], variant) for variant in WARM_VARIANTS]
        head += [key for key in jobs if key[0] == "decode" and key[1] == 1]
        ordered = [key for key in head if key in jobs]
        return ordered + [key for key in jobs if key not in ordered]

    def warm_more(self) -> bool:
        """Compile or capture one shape the warm-up left for idle time (the engine calls
        this between requests, never while a step is in flight); True while more is left.
        A shape that fails here moves the runner to the next kernel set-up, as a failure
        at load does (``warmup_plans``): every shape is then warmed again, in idle time or
        by the steps that meet it. With no set-up left, or when the device ran out of
        memory, the shape is left to its steps."""
        while self._deferred and self._deferred[0] in self._warmed:  # a step ran it first
            self._deferred.pop(0)
        if self._deferred:
            key = self._deferred.pop(0)
            try:
                self._warm([key])
            except Exception as exc:
                # (running out of memory says nothing of the kernels: no change of set-up)
                oom = isinstance(exc, torch.OutOfMemoryError)
                if not oom and self.aot:
                    self._leave_aot(exc)
                    self._deferred = self.deferred_order(self.warm_jobs())
                elif not oom and self._next_plan(exc):
                    self._deferred = self.deferred_order(self.warm_jobs())
                else:
                    log.warning("warm-up of %s failed: %s: %s", key, type(exc).__name__, exc)
                    self.startup.notes.append(f"{key}: {type(exc).__name__}: {str(exc)[:500]}")
            finally:
                self._fed = set()  # the token input now holds the warm-up's ids
        if not self._deferred:
            self._warm_done()
        return bool(self._deferred)

    def _next_plan(self, exc: Exception) -> bool:
        """Move to the next set-up after ``exc``, dropping every graph: the same (row
        kernels, decode attention) without PDL first where the products used it (the
        newest part), else the next of ``warmup_plans``; False when none is left."""
        rows, attention = self._plans[self._plan]
        products = "fused row products" if rows else "plain products"
        if self.pdl:
            note = f"{products} launched with PDL, with {attention} decode attention, failed"
            self._pdl_wanted = False
            nxt = (rows, attention)
        elif self._plan + 1 < len(self._plans):
            note = f"{products} with {attention} decode attention failed"
            self._plan += 1
            nxt = self._plans[self._plan]
        else:
            return False
        log.warning("%s (%s: %s); trying %s", note, type(exc).__name__, exc, nxt)
        self.startup.notes.append(f"{note}: {type(exc).__name__}: {str(exc)[:500]}")
        self._set_row_kernels(nxt[0])
        self._set_decode_attention(nxt[1])
        self.startup.row_kernels, self.startup.decode_attention = nxt
        self.startup.pdl = self.pdl
        self._graphs.clear()
        self._warmed.clear()
        if self.use_graphs:  # the old pool went with its graphs: captures need a new one
            self._pool = torch.cuda.graph_pool_handle()
        return True

    def _leave_aot(self, exc: Exception) -> None:
        """After ``exc`` in the packaged steps: the same set-up through ``torch.compile``
        (every graph dropped, so that no step keeps a package's code), with its compile
        cache; the reason goes to ``startup.notes``."""
        from fermi.models import gemv

        note = f"packaged steps failed, compiling instead: {type(exc).__name__}: {exc}"
        log.warning("%s", note)
        self.startup.notes.append(note[:600])
        self._note_packages()
        self.aot = self.startup.aot = False
        self._packages = None
        self._forward = self.model.forward
        self._samplers.clear()
        self._graphs.clear()
        self._warmed.clear()
        if self.use_graphs:  # the old pool went with its graphs: captures need a new one
            self._pool = torch.cuda.graph_pool_handle()
        self._pdl_wanted = gemv.pdl_wanted(self.device)
        self._set_row_kernels(self.row_kernels)  # (PDL back where it was wanted)
        self._compile()
        self._open_compile_cache()

    def _note_packages(self) -> None:
        if self._packages is not None and self._packages.built:
            self.startup.packages_built_s = sum(self._packages.built.values())

    def _warm_done(self) -> None:
        if self.startup.complete_s is not None:
            return
        self.startup.graphs = len(self._graphs)
        self._note_packages()
        try:
            if self._cache is not None:
                self._cache.save()
        finally:
            self.startup.complete_s = time.perf_counter() - self._started  # callers poll it
        if self.startup.deferred:
            log.info(
                "warm-up complete %.1f s after it began: %d graphs",
                self.startup.complete_s,
                len(self._graphs),
            )

    def _warm(self, keys: list[tuple]) -> None:
        """Compile (on a shape's first run) and capture each key's step over idle inputs:
        padding tokens at the scratch position."""
        with self._on_device():
            for key in keys:
                if key[0] == "prefill":
                    _, t, kv, causal = key
                    values = [0] * self.chunk + [self.scratch] * self.chunk + [0, t - 1]
                    self._pio.copy_(self._host(values, self._pio.shape))
                    self._run(key, functools.partial(self._prefill_body, t, kv, causal))
                else:
                    _, b, kv, variant = key
                    idle = [0] * self.max_batch
                    values = [*idle, *([self.scratch] * self.max_batch), *idle]
                    self._io.copy_(self._host(values, self._io.shape))
                    self._run(key, functools.partial(self._decode_body, b, kv, variant))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

    # -- internals --------------------------------------------------------------------

    def _bind_packages(self) -> None:
        """Run the steps through the packages of the current set-up, kept in the compile
        cache: each is loaded (or built there first) when a step first needs it
        (``fermi.runners.packaged``)."""
        key = self._setup_key(
            packaged=packaged.FORMAT,
            source=packaged.source_digest(),
            **packaged.build_context(self.model, self.device),
        )
        if self._package_root is None:  # (no compile cache: gone with the runner)
            self._package_root = Path(tempfile.mkdtemp(prefix="fermi-aot-"))
            weakref.finalize(self, shutil.rmtree, self._package_root, True)
        packages = packaged.StepPackages(self, self._package_root / f"{key}.aot")
        self._packages = packages
        self._forward = packages.forward
        self._samplers.clear()

    def _set_decode_attention(self, kind: str) -> None:
        if kind not in DECODE_KERNELS:
            raise ValueError(f"decode_attention must be one of {', '.join(DECODE_KERNELS)}")
        self.decode_attention = kind
        for layer in self.model.model.layers:
            layer.self_attn.decode_kernel = kind

    def _set_row_kernels(self, on: bool) -> None:
        self.row_kernels = on
        self.pdl = on and self._pdl_wanted
        self.model.row_kernels = on
        self.model.row_pdl = self.pdl
        for layer in self.model.model.layers:
            layer.row_kernels = on
            layer.row_pdl = self.pdl

    def _prefill_body(self, t: int, kv: int, causal: bool) -> tuple[torch.Tensor]:
        c = self.chunk
        tokens = self._pio[:t].view(1, t)
        positions = self._pio[c : c + t].view(1, t)
        slot = self._pio[2 * c : 2 * c + 1]
        last = self._pio[2 * c + 1 : 2 * c + 2]
        # Causal: the padding after the n real tokens sits past them in the chunk, so no
        # real query sees a padded key.
        return (self._forward(tokens, positions, slot, kv, last_index=last, causal=causal),)

    def _decode_body(self, b: int, kv: int, variant: Variant | None) -> tuple:
        rows = self._rows[:b]
        logits = self._forward(self._io[0, :b], self._io[1, :b], rows, kv, rows_are_slots=True)
        if variant is None:
            return (logits,)
        out = self._sampler(variant)(logits, self.sampling, rows)
        self._io[0, :b, 0].copy_(out.tokens)  # the next step's input, if it continues these rows
        return tuple(out)

    def _sample_body(self, b: int, variant: Variant) -> tuple:
        # The mask is applied by a few eager kernels in this graph, and the rest is the same
        # compiled sampler as the unmasked variant's: no compile on a first masked step.
        logits = mask_logits(self._logits[:b], self.sampling.allowed[:b])
        out = self._sampler(variant[:3])(logits, self.sampling, self._rows[:b])
        self._io[0, :b, 0].copy_(out.tokens)  # the next step's input, as in _decode_body
        return tuple(out)

    def _sampler(self, variant: Variant) -> Callable:
        fn = self._samplers.get(variant)
        if fn is None:
            filters, penalties, logprobs = variant

            def fn(logits: torch.Tensor, batch: SamplingBatch, rows: torch.Tensor):
                # (a function, not a partial: Dynamo's saved frames need a qualified name)
                return sample(
                    logits,
                    batch,
                    rows,
                    use_filters=filters,
                    use_penalties=penalties,
                    want_logprobs=logprobs,
                )

            packaged_fn = None if self._packages is None else self._packages.sampler(variant)
            if packaged_fn is not None:
                fn = packaged_fn
            elif self.backend is not None and not self.aot and variant in WARM_VARIANTS:
                fn = torch.compile(fn, fullgraph=True, dynamic=True, backend=self.backend)
            self._samplers[variant] = fn
        return fn

    def _run(self, key: tuple, body: Callable[[], tuple]) -> tuple:
        # A shape a step ran (compiled, captured) needs no idle warm-up; one that failed
        # stays due, so that the idle warm-up meets the failure and changes set-up.
        if not self.use_graphs:
            with torch.inference_mode(), _no_duck_shapes():
                out = body()
            self._warmed.add(key)
            return out
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(body)
            self._warmed.add(key)
        captured.graph.replay()
        return captured.outputs

    def _capture(self, body: Callable[[], tuple]) -> _Captured:
        stream = self._stream
        assert stream is not None
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), _no_duck_shapes(), torch.cuda.stream(stream):
            # An eager run first: compilation, autotuning and lazy library set-up must not
            # happen inside the capture. It computes the same step the replay repeats.
            self._rehearse(body)
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=self._pool)
            try:
                outputs = body()
            finally:
                graph.capture_end()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return _Captured(graph, outputs)

    def _rehearse(self, body: Callable[[], tuple]) -> None:
        """Run ``body`` once outside a graph, leaving its inputs as the replay must find
        them: a decode step writes the ids it sampled into its own token input, and a
        replay after that would feed them in place of this step's tokens."""
        tokens = self._io[0].clone()
        body()
        self._io[0].copy_(tokens)

    def _fill_decode(
        self, slots: list[int], token_ids: list[int] | None, positions: list[int]
    ) -> tuple[int, int]:
        """Write the step's inputs; ``token_ids=None`` keeps the token row as the last step
        left it (the ids its decode rows sampled, and a prefilled slot's first token)."""
        n = len(slots)
        if n == 0 or len(positions) != n or (token_ids is not None and len(token_ids) != n):
            raise ValueError("decode needs one token id and one position per slot")
        self._check_slots(slots)
        if token_ids is not None:
            self._check_tokens(token_ids)
        if min(positions) < 0 or max(positions) >= self.max_seq_len:
            raise ValueError(f"decode positions must lie in [0, {self.max_seq_len})")
        b = pick(max(slots) + 1, self.batch_sizes)
        kv = pick(max(positions) + 1, self.kv_sizes)
        where = [self.scratch] * self.max_batch
        for slot, position in zip(slots, positions, strict=True):
            where[slot] = position
        order = [*slots, *([0] * (self.max_batch - n))]
        if token_ids is None:
            self._io[1:].copy_(self._host([*where, *order], self._io[1:].shape), non_blocking=True)
            return b, kv
        tokens = [0] * self.max_batch
        for slot, token in zip(slots, token_ids, strict=True):
            tokens[slot] = token
        values = [*tokens, *where, *order]
        self._io.copy_(self._host(values, self._io.shape), non_blocking=True)
        return b, kv

    def _host(self, values: list[int], shape: torch.Size) -> torch.Tensor:
        # Pinned memory from the caching host allocator is not reused before its copy ran,
        # so the copy can be asynchronous without racing the next step's fill.
        return torch.tensor(values, dtype=torch.long, pin_memory=self._pinned).view(shape)

    def _check_slots(self, slots: list[int]) -> None:
        if min(slots) < 0 or max(slots) >= self.max_batch or len(set(slots)) != len(slots):
            raise ValueError(f"slots must be distinct and in [0, {self.max_batch}), got {slots}")

    def _check_tokens(self, token_ids: list[int]) -> None:
        vocab = self.capabilities.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab})")

    def _on_device(self) -> contextlib.AbstractContextManager:
        # The scheduler thread's current device may be another GPU.
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()


def _pinned_copy(out: SampleOutput | None) -> SampleOutput | None:
    """An asynchronous copy of ``out`` from CUDA into pinned host memory."""
    if out is None:
        return None

    def copy(t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)

    return SampleOutput(*(None if t is None else copy(t) for t in out))


def _no_duck_shapes() -> contextlib.AbstractContextManager:
    """Compile with one symbol per dynamic size: by default two sizes that happen to be equal
    while tracing (say a chunk of 256 and an attended length of 256) share a symbol, and
    every later call where they differ would recompile."""
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(use_duck_shape=False)
