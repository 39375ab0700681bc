"""Decode-step attention through FlexAttention.

A one-token query per sequence over a long cache gives plain attention kernels too little
parallel work at batch 1 (one thread block per KV head). Under ``torch.compile`` FlexAttention
lowers a short query to a split-KV ("flash decoding") Triton kernel that spreads the cache
over many blocks and reads each KV head once for its whole group of query heads. The mask
(causal by position, optional sliding window) and Gemma-style soft-capping are a score
modification, so the attended length is simply the cache view's length.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import flex_attention


def flex_decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    window: int | None,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """Attention of q [B, H, T, D] over keys/values [B, Hkv, L, D] at ``positions`` [B, T]."""

    def score_mod(score, b, h, q_idx, kv_idx):
        pos = positions[b, q_idx]
        visible = kv_idx <= pos
        if window is not None:
            visible = visible & (kv_idx > pos - window)
        if softcap is not None:
            score = torch.tanh(score / softcap) * softcap
        return torch.where(visible, score, -float("inf"))

    groups = q.shape[1] // keys.shape[1]
    return flex_attention(q, keys, values, score_mod=score_mod, scale=scale, enable_gqa=groups > 1)
