"""The runner interface: what the scheduler needs from a backend.

A runner owns ``max_batch`` KV-cache slots of ``max_seq_len`` positions. The scheduler
prefills a prompt into a slot chunk by chunk, then calls one batched decode step for
all running sequences. Logits come back as float32 tensors on the runner's device;
sampling happens on that device too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Capabilities:
    name: str  # "torch-cpu", "torch-cuda", "onnx", "coreml"
    max_batch: int
    max_seq_len: int
    vocab_size: int
    device: torch.device
    prefill_chunk: int  # longest prompt chunk one prefill call takes


@runtime_checkable
class Runner(Protocol):
    capabilities: Capabilities

    def prefill(self, slot: int, token_ids: list[int], start_pos: int) -> torch.Tensor:
        """Write ``token_ids`` into ``slot`` at positions ``start_pos...``; return the
        logits of the last token [vocab] (float32). At most ``prefill_chunk`` tokens."""
        ...

    def decode(self, slots: list[int], token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each slot at its position; return logits [len(slots), vocab]."""
        ...

    def release(self, slot: int) -> None:
        """The slot's sequence is finished; its cache may be reused."""
        ...


# Optional: ``move_slot(src, dst, length)`` copies slot ``src``'s first ``length`` cache
# positions (and any per-slot state the runner keeps) into slot ``dst``. A runner whose decode
# step costs less over slots 0..B-1 than over scattered slots has it; the scheduler then moves
# running sequences down into freed lower slots between steps (``Scheduler._compact``).
