"""The per-step tensors every decoder layer reads, travelling as one object."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepContext:
    """What a layer needs besides its input: built once per forward by
    :meth:`fermi.models.decoder.Decoder.step_context` and passed down unchanged.

    A dataclass of tensors traces through ``torch.compile(fullgraph=True)``; ``kv_len``
    stays a Python int because it picks a shape (a compiled bucket of the cache length).
    """

    positions: torch.Tensor  # [B, T] position of each token
    # Per rope table the layers use (ModelConfig.layer_ropes): its cos and signed sin rows
    # (fermi.models.rope) at the positions, each [B, T, rotary_dim].
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]
    slots: torch.Tensor  # [B] the cache slot each row writes
    read_slots: torch.Tensor | None  # the slots read; None when row i is slot i (a view)
    kv_len: int  # attended cache length: every position is < kv_len
    masks: dict[int | None, torch.Tensor]  # additive mask per layer window (None: global)
