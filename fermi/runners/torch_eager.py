"""The decoder run eagerly with torch (CPU, or any device without compilation)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fermi.models.decoder import Decoder
from fermi.runners.base import Capabilities, Runner


class TorchRunner(Runner):
    def __init__(
        self, model: Decoder, max_batch: int, max_seq_len: int, prefill_chunk: int = 512
    ) -> None:
        self.model = model
        device = model.device
        model.setup_cache(max_batch, max_seq_len)
        if device.type == "cpu":
            # One-token steps in fermi's own kernels, where the model's fp16 weights are
            # stored for them (fermi.models.half_weights); otherwise torch's ops.
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
        self._use_threads(prompt=False)
        dev = self.device
        tokens = torch.tensor(token_ids, dtype=torch.long, device=dev)[:, None]
        pos = torch.tensor(positions, dtype=torch.long, device=dev)[:, None]
        slot_t = torch.tensor(slots, dtype=torch.long, device=dev)
        # Attention cost follows the longest live context, not max_seq_len. When rows are
        # slots 0..B-1 (the scheduler hands out the lowest free slots) the cache is read as
        # a view instead of gathered.
        dense = list(slots) == list(range(len(slots)))
        return self.model(tokens, pos, slot_t, kv_len=max(positions) + 1, rows_are_slots=dense)

    @torch.inference_mode()
    def embed(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        self._use_threads(prompt=True)
        return self.model.last_token_states(token_ids)

    @torch.inference_mode()
    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Move a sequence's first ``length`` cached positions from ``src`` to ``dst``."""
        self.model.move_slot(src, dst, length)
