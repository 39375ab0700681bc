"""LongRoPE (Phi-3.5) through any torch runner, the way transformers' ``generate`` does it.

A LongRoPE model rotates a sequence with its short factors while the sequence fits the
original training length and with its long factors once it is longer. The KV cache holds
rotated keys, so when a sequence first grows past that length its earlier keys are stale;
transformers then drops its cache and encodes the whole sequence again with the long
factors (``Phi3ForCausalLM.prepare_inputs_for_generation``). This wrapper does the same
per slot: it remembers each slot's tokens, marks the slot long in the decoder
(``Decoder.rope_long``) and re-prefills the earlier tokens before the step that crosses.
The reverse (a slot reused for a shorter sequence) re-encodes short the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from fermi.models.decoder import Decoder
from fermi.runners.base import Batch, Runner, StepOutput


class LongRopeRunner(Runner):
    """A runner that keeps every slot's cache encoded with the factors its length needs."""

    def __init__(self, inner: Runner, model: Decoder) -> None:
        if model.rope_switch is None:
            raise ValueError("LongRopeRunner needs a LongRoPE model with its cache set up")
        self.inner = inner
        self.model = model
        # Never overlapping: each decode step must name its tokens, which this wrapper
        # records for a later re-encode, so the engine reads every step before the next.
        # No embeddings: a LongRoPE forward's factors depend on the slot (Decoder.rope_long).
        self.capabilities = replace(inner.capabilities, overlaps=False, embeds=False)
        self.sampling = inner.sampling
        self.switch = model.rope_switch
        self._tokens: dict[int, list[int]] = {}  # slot -> token id at each cached position
        self._long: dict[int, bool] = {}  # slot -> which factors its cached keys carry

    def execute(self, batch: Batch) -> StepOutput:
        # Moves first: a re-encode below writes to the slot a sequence moved to.
        self.apply_moves_and_admissions(batch)
        chunk = batch.prefill
        if chunk is not None:
            self._prepare(chunk.slot, chunk.start, chunk.start + len(chunk.token_ids))
            self._record(chunk.slot, chunk.start, chunk.token_ids)
        rows = batch.decode
        if rows is not None:
            if rows.token_ids is None:
                raise ValueError("a LongRoPE step needs each step's ids")
            for slot, token, pos in zip(rows.slots, rows.token_ids, rows.positions, strict=True):
                self._prepare(slot, pos, pos + 1)
                self._record(slot, pos, [token])
        return self.inner.execute(replace(batch, moves=(), admitted=()))

    def prefill(self, slot: int, token_ids: Sequence[int], start_pos: int) -> torch.Tensor:
        self._prepare(slot, start_pos, start_pos + len(token_ids))
        self._record(slot, start_pos, token_ids)
        return self.inner.prefill(slot, token_ids, start_pos)

    def decode(
        self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]
    ) -> torch.Tensor:
        for slot, token, pos in zip(slots, token_ids, positions, strict=True):
            self._prepare(slot, pos, pos + 1)
            self._record(slot, pos, [token])
        return self.inner.decode(slots, token_ids, positions)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """The inner runner's move (the cache and the decoder's rope mark), plus this
        wrapper's record of the slot's tokens and factors. ``src`` keeps both (a copy: the
        engine may keep using it). Its factors entry must stay in any case: the
        decoder's mark for ``src`` stays as it was, and the two must agree, or a short
        sequence admitted to ``src`` later would run with a stale long mark."""
        self.inner.move_slot(src, dst, length)
        self._tokens[dst] = self._tokens.get(src, [])[:length]
        self._long[dst] = self._long.get(src, False)

    def warm_more(self) -> bool:
        return self.inner.warm_more()

    def __getattr__(self, name: str):
        # Anything else a front end or benchmark asks of the runner is the inner one's.
        return getattr(self.inner, name)

    def _record(self, slot: int, start: int, token_ids: Sequence[int]) -> None:
        tokens = self._tokens.setdefault(slot, [])
        del tokens[start:]
        tokens.extend(token_ids)

    def _prepare(self, slot: int, start: int, end: int) -> None:
        """Before a forward writing positions [start, end): make [0, start) match."""
        want = end > self.switch  # transformers: max(position_ids) + 1 > original length
        if self._long.get(slot, False) == want:
            return
        self.model.rope_long[slot] = want
        self._long[slot] = want
        earlier = self._tokens.get(slot, [])[:start]
        chunk = self.capabilities.prefill_chunk
        for begin in range(0, len(earlier), chunk):
            self.inner.prefill(slot, earlier[begin : begin + chunk], begin)


def with_longrope(runner: Runner, model: Decoder) -> Runner:
    """``runner`` wrapped when its model uses LongRoPE and its cache can pass the switch."""
    switch = model.rope_switch
    if switch is None or runner.capabilities.max_seq_len <= switch:
        return runner
    return LongRopeRunner(runner, model)
