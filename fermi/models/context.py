"""The per-step tensors every decoder layer reads, travelling as one object."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepContext:
    """What a layer needs besides its input: built once per forward by
    :meth:`fermi.models.decoder.Decoder.step_context` and passed down unchanged.

    A dataclass of tensors traces through ``torch.compile(fullgraph=True)``; ``kv_len``
    stays a Python int because it picks a shape (a compiled bucket of the cache length),
    and ``causal`` a Python bool because it picks the attention path.
    """

    positions: torch.Tensor  # [B, T] position of each token
    # Per rope table the layers use (ModelConfig.layer_ropes): its cos and signed sin rows
    # (fermi.models.rope) at the positions, each [B, T, rotary_dim].
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]
    slots: torch.Tensor  # [B] the cache slot each row writes
    read_slots: torch.Tensor | None  # the slots read; None when row i is slot i (a view)
    kv_len: int  # attended cache length: every position is < kv_len
    # Additive mask per layer window (None: global); only the windows whose layers read
    # the cache through a mask this step (see ``causal``).
    masks: dict[int | None, torch.Tensor]
    # Every row's tokens sit at positions 0..T-1 of its sequence (a row's padding, if any,
    # after its last real token): a layer without a window or soft-cap then attends causally
    # over this forward's own keys and values, with no mask and no cache read. A Python
    # bool like ``kv_len``, so a compiled graph holds one choice.
    causal: bool = False
    # The layers run in fermi's CPU kernels (Decoder.use_native_rows): a step of one token
    # per row, few rows. A Python bool like ``causal``.
    native: bool = False
