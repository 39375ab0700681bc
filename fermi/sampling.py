"""Token sampling on the device for a batch of rows, each row with its own parameters.

``sample`` uses only fixed-shape tensor ops: no ``.item()``, no boolean-mask indexing and no
Python branch on a tensor value. Nothing waits for the device, and the function can be traced
by ``torch.compile(fullgraph=True)`` and replayed inside a CUDA graph. The Python flags it takes
(``use_filters``, ``use_penalties``, ``want_logprobs``) choose a static variant; the caller
reads them from the requests' ``SamplingParams`` on the host, so choosing costs no sync either.

Randomness does not come from a torch generator. The noise for one token is an integer hash of
(row seed, row step, token id), so a seeded request draws the same tokens whether it runs
alone or among other rows, at any row index and for any batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

MAX_LOGPROBS = 20
# Far beyond any useful value, and small enough to stay finite in float32 arithmetic.
MAX_TEMPERATURE = 100.0

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a value below 2**32 times one of them stays below 2**63, so the
# int64 product never overflows and its low 32 bits are the exact product mod 2**32.
_MUL_A = 0x7FEB352D
_MUL_B = 0x31848BAB
# Separates the seed stream from a plain hash of small integers (seed 0, step 0 is common).
_SEED_SALT = 0x9E3779B9
_HALF_24 = 1 << 23
_TWO_POW_M24 = 2.0**-24


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    # HF semantics: applies to prompt and generated tokens; logit > 0 divided, < 0 multiplied.
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI semantics: generated tokens only
    frequency_penalty: float = 0.0  # OpenAI semantics: generated tokens only, times count
    seed: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is out of range."""
        # Written as "not (in range)" so that NaN is rejected too.
        checks = (
            (
                "temperature",
                0.0 <= self.temperature <= MAX_TEMPERATURE,
                f"in [0, {MAX_TEMPERATURE}]",
            ),
            ("top_k", 0 <= self.top_k < 2**31, "in [0, 2**31) (0 = off)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 100.0, "in (0, 100]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            # (a seed is drawn from as 64 bits: 2**64 would repeat seed 0's draws)
            ("seed", self.seed is None or -(2**63) <= self.seed < 2**63, "a signed 64-bit integer"),
        )
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_filters(self) -> bool:
        # Filters never change a greedy row's argmax: the top token always survives them.
        active = self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0
        return active and not self.is_greedy

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


class SampleOutput(NamedTuple):
    tokens: torch.Tensor  # [B] int64
    # [B] float32, log-prob of the chosen token under the penalised, tempered, unfiltered
    # distribution (temperature 1 for greedy rows); None when want_logprobs < 0.
    logprobs: torch.Tensor | None
    top_ids: torch.Tensor | None  # [B, k] int64, most likely first; None unless k > 0
    top_logprobs: torch.Tensor | None  # [B, k] float32, same distribution as ``logprobs``


def _as_int64(value: int) -> int:
    """Wrap any Python int to the signed 64-bit value with the same low 64 bits."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def mask_words(vocab_size: int) -> int:
    """int32 words in one row of a token bitmask."""
    return (vocab_size + 31) // 32


def unpack_bits(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [rows, vocab_size] from int32 bitmask rows [rows, words], on their device."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    unpacked = (bits.unsqueeze(-1) >> shifts) & 1
    return unpacked.view(bits.shape[0], -1)[:, :vocab_size].bool()


def mask_logits(logits: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``logits`` [B, V] with the tokens whose bit is clear in ``bits`` [B, words] at -inf."""
    allowed = unpack_bits(bits, logits.shape[-1])
    return logits.float().masked_fill(~allowed, float("-inf"))


def check_row(
    params: SamplingParams, prompt_ids: list[int] | torch.Tensor, seed: int, vocab_size: int
) -> torch.Tensor:
    """Raise if a row could not be set from these values; return the prompt ids as a tensor.
    The engine calls it when it admits a request, so a malformed one fails alone."""
    params.validate()
    _as_int64(seed)  # a TypeError for anything but an int
    ids = torch.as_tensor(prompt_ids, dtype=torch.int64)
    # Checking a device tensor would sync, so only host ids are checked.
    on_host = ids.device.type == "cpu" and ids.numel() > 0
    if on_host and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"prompt_ids must lie in [0, {vocab_size})")
    return ids


class SamplingBatch:
    """Device tensors for ``max_batch`` rows, preallocated once and updated in place.

    The tensors never change address, so a CUDA graph that reads them sees the current values.
    Rows that were never set hold neutral parameters (temperature 1, no filter, no penalty).
    """

    def __init__(self, max_batch: int, vocab_size: int, device: torch.device | str) -> None:
        self.max_batch = max_batch
        self.vocab_size = vocab_size
        self.device = torch.device(device)

        def filled(value: float | int, dtype: torch.dtype) -> torch.Tensor:
            return torch.full((max_batch,), value, dtype=dtype, device=self.device)

        self.temperature = filled(1.0, torch.float32)
        self.top_k = filled(0, torch.int64)
        self.top_p = filled(1.0, torch.float32)
        self.min_p = filled(0.0, torch.float32)
        self.rep_penalty = filled(1.0, torch.float32)
        self.presence = filled(0.0, torch.float32)
        self.frequency = filled(0.0, torch.float32)
        self.seed = filled(0, torch.int64)
        # Tokens sampled so far by the row: selects the noise, so each step draws afresh.
        self.step = filled(0, torch.int64)
        shape = (max_batch, vocab_size)
        self.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self.counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
        # The tokens each row may sample next, one bit per token (bit t of word t // 32): all
        # set for a free row, rewritten before each step for a row under a grammar.
        words = mask_words(vocab_size)
        self.allowed = torch.full((max_batch, words), -1, dtype=torch.int32, device=self.device)

    def set_row(
        self, row: int, params: SamplingParams, prompt_ids: list[int] | torch.Tensor, seed: int
    ) -> None:
        """Admit a request into ``row``: host-side, once per request.

        ``seed`` is the seed actually used (the caller passes ``params.seed`` when set, else a
        random one); any Python int is accepted and wrapped to 64 bits.
        """
        if not 0 <= row < self.max_batch:
            raise IndexError(f"row {row} out of range for max_batch {self.max_batch}")
        ids = check_row(params, prompt_ids, seed, self.vocab_size)
        # fill_ with a number is a kernel of its own; ``t[row] = number`` copies the number
        # from host memory, which on a GPU waits for every step queued before (the engine
        # admits while a step runs).
        self.temperature[row].fill_(params.temperature)
        self.top_k[row].fill_(params.top_k)
        self.top_p[row].fill_(params.top_p)
        self.min_p[row].fill_(params.min_p)
        self.rep_penalty[row].fill_(params.repetition_penalty)
        self.presence[row].fill_(params.presence_penalty)
        self.frequency[row].fill_(params.frequency_penalty)
        self.seed[row].fill_(_as_int64(seed))
        self.step[row].fill_(0)
        self.counts[row].zero_()
        self.allowed[row].fill_(-1)
        self.prompt_mask[row].zero_()
        self.prompt_mask[row].index_fill_(0, to_device(ids, self.device), True)

    def move_row(self, src: int, dst: int) -> None:
        """Give row ``dst`` everything row ``src`` holds (its request moved to another cache
        slot); ``src`` is left as it was, to be set again before it is used."""
        for t in (
            self.temperature, self.top_k, self.top_p, self.min_p, self.rep_penalty,
            self.presence, self.frequency, self.seed, self.step, self.prompt_mask, self.counts,
            self.allowed,
        ):  # fmt: skip
            t[dst] = t[src]

    def record(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count ``tokens[i]`` as generated by ``rows[i]`` and advance those rows' steps.

        In place on the device and sync-free (``index_add_``, no host read), so it can sit in
        the same CUDA graph as ``sample``.
        """
        flat = rows * self.vocab_size + tokens
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=self.counts.dtype))
        self.step.index_add_(0, rows, torch.ones_like(rows))


def to_device(values: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Integers as a long tensor on ``device``, without waiting for the device. A copy to a
    GPU from ordinary (pageable) memory first waits for every step queued on the stream,
    which would stall an engine that queues its next step before reading the last; from
    pinned memory it is queued like a kernel (the caching host allocator does not reuse the
    block before the copy ran)."""
    host = torch.as_tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class LogitBias:
    """Adds a fixed bias to some tokens' logits of one row (OpenAI's ``logit_bias``): a
    per-row logits processor (``fermi.runners.base.LogitsProcessor``)."""

    def __init__(self, pairs: tuple[tuple[int, float], ...]) -> None:
        self.pairs = pairs
        self._tensors: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self._tensors is None or self._tensors[0].device != logits.device:
            ids = torch.tensor([t for t, _ in self.pairs], dtype=torch.long, device=logits.device)
            bias = torch.tensor([b for _, b in self.pairs], dtype=torch.float32)
            self._tensors = (ids, bias.to(logits.device))
        ids, bias = self._tensors
        return logits.index_add(0, ids, bias.to(logits.dtype))


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    counts: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """Penalise float logits [B, V] given per-row penalties [B].

    Repetition (HF) covers prompt and generated tokens; presence and frequency (OpenAI) cover
    generated tokens only. Neutral values (1, 0, 0) leave a row bit-identical, so a row's result
    does not depend on whether its batch needed penalties.
    """
    generated = counts > 0
    seen = prompt_mask | generated
    rep = repetition.unsqueeze(1)
    penalised = torch.where(logits < 0, logits * rep, logits / rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - frequency.unsqueeze(1) * counts.to(logits.dtype)
    return logits - presence.unsqueeze(1) * generated.to(logits.dtype)


def keep_top_k_top_p_min_p(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Which tokens survive top-k, then top-p, then min-p: [B, V] logits -> [B, V] bool.

    Each filter becomes a per-row probability floor read off the sorted probabilities, and a
    token survives when its probability reaches every floor. Comparing values rather than
    ranks keeps tokens tied with the last survivor, so the result does not depend on how the
    sort orders ties.
    """
    vocab = scaled.shape[-1]
    probs = torch.softmax(scaled, dim=-1)
    ordered = torch.sort(probs, dim=-1, descending=True).values
    rank = torch.arange(vocab, device=scaled.device)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    kth = _masked_min(ordered, rank < k)
    # Top-p sees the distribution renormalised over the top-k survivors. They are a prefix of
    # the sorted row, so their prefix masses need no mask: compare them with top_p * mass(top-k).
    # The scan reads the sort's output as it is, because inductor (torch 2.11) failed to
    # generate a long-row split scan whose fused input loaded per-row values.
    top_k_mass = ordered.masked_fill(ordered < kth, 0.0).sum(dim=-1, keepdim=True)
    mass_before = torch.cumsum(ordered, dim=-1) - ordered
    # A token is in the nucleus while the mass ahead of it is short of top_p; the first token
    # always is (mass 0). top_p == 1 means off: rounding could push a tail's mass past 1.
    in_nucleus = (mass_before < top_p.unsqueeze(1) * top_k_mass) | (top_p >= 1.0).unsqueeze(1)
    nucleus = _masked_min(ordered, in_nucleus)
    min_p_floor = min_p.unsqueeze(1) * ordered[:, :1]
    return probs >= torch.maximum(torch.maximum(kth, nucleus), min_p_floor)


def _masked_min(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Row-wise minimum of ``values`` where ``keep`` holds: [B, V] -> [B, 1].

    Used instead of a gather at a per-row index: inductor's Triton codegen (torch 2.11) failed
    on such data-dependent loads fused into the kernels around them.
    """
    return values.masked_fill(~keep, float("inf")).amin(dim=-1, keepdim=True)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective xorshift-multiply avalanche of int64 tensors holding values below 2**32."""
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _MASK32
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per row from its 64-bit seed and step: [B] int64 -> [B] int64."""
    # & _MASK32 after >> 32 because >> is arithmetic on negative int64 seeds.
    h = _mix32((seeds & _MASK32) ^ _SEED_SALT)
    h = _mix32(h ^ ((seeds >> 32) & _MASK32))
    h = _mix32(h ^ (steps & _MASK32))
    return _mix32(h ^ ((steps >> 32) & _MASK32))


def _exponential_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Exp(1) draws from 32-bit hashes, via u = (top 24 bits + 1/2) / 2**24 in (0, 1).

    float32 cannot hold u near 1 exactly, so each half of the range is folded onto
    v = min(u, 1 - u) in (0, 1/2), which it holds exactly: E = -log(u) = -log(v) below the
    middle and -log1p(-v) above it. E is then finite and strictly positive, and the small
    values of E, which decide the race, keep full precision.
    """
    top = bits >> 8
    lower = top < _HALF_24
    folded = torch.where(lower, top, 2 * _HALF_24 - 1 - top)
    v = (folded.to(torch.float32) + 0.5) * _TWO_POW_M24
    return torch.where(lower, -torch.log(v), -torch.log1p(-v))


def exponential_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise [B, V] float32, a pure function of (seed, step, token id) per element."""
    keys = row_keys(seeds, steps).unsqueeze(1)
    token = torch.arange(vocab_size, dtype=torch.int64, device=seeds.device)
    # key ^ token is a bijection of the token id within a row; two rounds spread its low bits.
    return _exponential_from_bits(_mix32(_mix32(keys ^ token)))


def sample(
    logits: torch.Tensor,
    batch: SamplingBatch,
    rows: torch.Tensor,
    *,
    use_filters: bool,
    use_penalties: bool,
    want_logprobs: int = 0,
    all_greedy: bool = False,
    use_mask: bool = False,
) -> SampleOutput:
    """Pick one token per row of ``logits`` [B, V]; ``rows`` [B] int64 maps them to batch rows.

    Order: penalties, then greedy rows (temperature 0) take the argmax; the other rows divide
    by their temperature, keep the top-k / top-p / min-p survivors, and run an exponential race
    argmax(p / E) with E ~ Exp(1) from ``exponential_noise``, computed as its log,
    argmax(logit - log E): the softmax normaliser is the same for every token of a row, so it
    is skipped.

    ``use_filters`` / ``use_penalties`` must be True when any row needs them (see
    ``SamplingParams.uses_filters``); rows with neutral values come out the same either way.
    ``all_greedy`` (every row has temperature 0, known on the host) skips the noise: on a
    CPU, hashing noise for a whole vocabulary costs as much as a small model's lm_head.
    ``use_mask``: rows may only sample the tokens their ``allowed`` bits permit (a grammar);
    the others' logits become -inf first, so penalties, logprobs and the race see only the
    allowed tokens. Rows with every bit set come out the same either way.
    ``want_logprobs``: -1 = none, 0 = the chosen token's, k in 1..20 = also the k most likely.
    Reported logprobs are from the distribution after penalties and temperature but before
    filtering (temperature 1 for greedy rows): the model's view of the token, not the sampler's.
    """
    if not -1 <= want_logprobs <= MAX_LOGPROBS:
        raise ValueError(f"want_logprobs must be in [-1, {MAX_LOGPROBS}], got {want_logprobs}")
    if logits.shape[-1] != batch.vocab_size:
        raise ValueError(f"logits have {logits.shape[-1]} columns, batch has {batch.vocab_size}")
    x = logits.float()
    if use_mask:
        x = mask_logits(x, batch.allowed[rows])
    if use_penalties:
        x = apply_penalties(
            x,
            batch.prompt_mask[rows],
            batch.counts[rows],
            batch.rep_penalty[rows],
            batch.presence[rows],
            batch.frequency[rows],
        )
    temperature = batch.temperature[rows]
    greedy = temperature == 0.0
    scaled = x / torch.where(greedy, 1.0, temperature).unsqueeze(1)

    if all_greedy:
        tokens = row_argmax(x)
        return _with_logprobs(tokens, scaled, want_logprobs)
    candidates = scaled
    if use_filters:
        keep = keep_top_k_top_p_min_p(
            scaled, batch.top_k[rows], batch.top_p[rows], batch.min_p[rows]
        )
        candidates = scaled.masked_fill(~keep, float("-inf"))
    noise = exponential_noise(batch.seed[rows], batch.step[rows], batch.vocab_size)
    sampled = row_argmax(candidates - torch.log(noise))
    tokens = torch.where(greedy, row_argmax(x), sampled)
    return _with_logprobs(tokens, scaled, want_logprobs)


ARGMAX_CHUNKS = 256


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """``argmax(x, dim=-1)`` of [B, V] (the first index of the maximum, as torch's).

    On a GPU one row is one reduction, which a compiler gives a single thread block: a
    150k-entry vocabulary then takes ~0.1 ms, as long as a small model's lm_head. There it
    reduces in two stages instead: each of 256 chunks' maximum and its index, then the first
    chunk holding the largest; padding entries are -inf. Elsewhere it is plain ``argmax``.
    """
    if x.device.type != "cuda":
        return torch.argmax(x, dim=-1)
    return chunked_argmax(x, ARGMAX_CHUNKS)


def chunked_argmax(x: torch.Tensor, chunks: int) -> torch.Tensor:
    """``argmax(x, dim=-1)`` of [B, V] as two reductions (see ``row_argmax``)."""
    b, v = x.shape
    width = -(-v // chunks)
    if width * chunks != v:
        x = torch.nn.functional.pad(x, (0, width * chunks - v), value=float("-inf"))
    best, where = x.view(b, chunks, width).max(dim=-1)  # first index of each chunk's maximum
    chunk = best.argmax(dim=-1, keepdim=True)  # the first chunk holding the row's maximum
    return (chunk * width + where.gather(1, chunk)).squeeze(1)


def _with_logprobs(tokens: torch.Tensor, scaled: torch.Tensor, want_logprobs: int) -> SampleOutput:
    if want_logprobs < 0:
        return SampleOutput(tokens, None, None, None)
    # Only the normaliser and one gather: no [B, V] log-softmax is kept.
    lse = torch.logsumexp(scaled, dim=-1)
    chosen = scaled.gather(1, tokens.unsqueeze(1)).squeeze(1) - lse
    if want_logprobs == 0:
        return SampleOutput(tokens, chosen, None, None)
    top = torch.topk(scaled, want_logprobs, dim=-1)
    return SampleOutput(tokens, chosen, top.indices, top.values - lse.unsqueeze(1))
