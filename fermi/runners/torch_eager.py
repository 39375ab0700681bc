"""The decoder run eagerly with torch (CPU, or any device without compilation)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

import torch

from fermi.models.decoder import Decoder
from fermi.runners.base import Capabilities, Runner


class DecodeThreads:
    """The decode step's thread count, chosen by timing the running workload.

    Now and then two steps in a row run on the two candidate counts (a probe), and the
    count whose probe steps took less time in all over the last ``window`` probes runs the
    steps between. A step in fermi's kernels gains from a second thread when its core is
    idle, and loses several times over when another process holds that core (the step
    waits for a thread that is not running; perf/LOG.md run 70), which no fixed default can
    know. Probes come every ``first`` steps, twice as far apart each time the choice holds
    (up to ``last``), so a losing count costs little once known."""

    def __init__(
        self, more: int, fewer: int, first: int = 16, last: int = 256, window: int = 8
    ) -> None:
        self.counts = (more, fewer)
        self.first, self.last = first, last
        self.interval, self.countdown = first, 0  # steps until the next probe's first step
        self.pairs: deque[tuple[float, float]] = deque(maxlen=window)  # (more, fewer) s
        self.probe: tuple[int, float] | None = None  # the probe's first step: rows, seconds
        self.probing = 0  # 1: this step is the probe's first, 2: its second
        self.chosen = more

    def next(self) -> int:
        """The thread count for the coming step."""
        if self.probing == 0 and self.countdown <= 0:
            self.probing = 1
        if self.probing:
            return self.counts[self.probing - 1]
        return self.chosen

    def record(self, rows: int, seconds: float) -> None:
        """The step just run on the count :meth:`next` gave: its rows and seconds."""
        if self.probing == 0:
            self.countdown -= 1
            return
        if self.probing == 1:
            self.probe, self.probing = (rows, seconds), 2
            return
        first_rows, first = self.probe  # type: ignore[misc]
        self.probing, self.probe = 0, None
        if first_rows == rows:  # a like-for-like pair
            self.pairs.append((first, seconds))
            more = sum(p[0] for p in self.pairs)
            fewer = sum(p[1] for p in self.pairs)
            chosen = self.counts[0] if more <= fewer else self.counts[1]
            held = chosen == self.chosen
            self.chosen = chosen
            self.interval = min(self.interval * 2, self.last) if held else self.first
        self.countdown = self.interval


class TorchRunner(Runner):
    def __init__(
        self, model: Decoder, max_batch: int, max_seq_len: int, prefill_chunk: int = 512
    ) -> None:
        self.model = model
        device = model.device
        # One-token steps in fermi's own kernels, where the model's weights are stored for
        # them (fp16: fermi.models.half_weights; int8/int4: fermi.models.quant); otherwise
        # torch's ops, which would widen the whole live fp16 cache (use_half_cache) into a
        # float32 copy every step: a float32 cache there (planned_cache_dtype, which
        # check_cache_fits counted).
        if model.planned_cache_dtype() == model.dtype:
            model.cache_dtype = None
        model.setup_cache(max_batch, max_seq_len)
        if device.type == "cpu":
            model.use_native_rows()
        name = "torch-cpu" if device.type == "cpu" else f"torch-{device.type}"
        self.capabilities = Capabilities(
            name=name,
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            vocab_size=model.cfg.vocab_size,
            device=device,
            prefill_chunk=prefill_chunk,
            moves_slots=True,
            embeds=True,
        )
        self.device = device
        # (prompt work, decode steps): torch's CPU thread counts for each, when fermi
        # decides them (fermi.runners.select.use_default_cpu_threads); None leaves them be.
        self.threads: tuple[int, int] | None = None
        # Set instead of the decode count when steps run in fermi's kernels (select).
        self.decode_threads: DecodeThreads | None = None
        super().__init__()

    def _use_threads(self, prompt: bool) -> None:
        if self.threads is not None:
            n = self.threads[0 if prompt else 1]
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: Sequence[int], start_pos: int) -> torch.Tensor:
        self._use_threads(prompt=True)
        n = len(token_ids)
        tokens = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        positions = torch.arange(start_pos, start_pos + n, device=self.device)[None]
        slots = torch.tensor([slot], dtype=torch.long, device=self.device)
        causal = self.model.prefill_is_causal(start_pos)
        return self.model(tokens, positions, slots, kv_len=start_pos + n, causal=causal)[0]

    @torch.inference_mode()
    def decode(
        self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]
    ) -> torch.Tensor:
        if self.decode_threads is None:
            self._use_threads(prompt=False)
        dev = self.device
        tokens = torch.tensor(token_ids, dtype=torch.long, device=dev)[:, None]
        pos = torch.tensor(positions, dtype=torch.long, device=dev)[:, None]
        slot_t = torch.tensor(slots, dtype=torch.long, device=dev)
        # Attention cost follows the longest live context, not max_seq_len. When rows are
        # slots 0..B-1 (the scheduler hands out the lowest free slots) the cache is read as
        # a view instead of gathered.
        dense = list(slots) == list(range(len(slots)))
        kv_len = max(positions) + 1
        chooser = self.decode_threads
        if chooser is None:
            return self.model(tokens, pos, slot_t, kv_len=kv_len, rows_are_slots=dense)
        n = chooser.next()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        started = time.perf_counter()
        logits = self.model(tokens, pos, slot_t, kv_len=kv_len, rows_are_slots=dense)
        chooser.record(len(slots), time.perf_counter() - started)
        return logits

    @torch.inference_mode()
    def embed(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        self._use_threads(prompt=True)
        return self.model.last_token_states(token_ids)

    @torch.inference_mode()
    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Move a sequence's first ``length`` cached positions from ``src`` to ``dst``."""
        self.model.move_slot(src, dst, length)
