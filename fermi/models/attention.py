"""Attention for one-token decode steps, as kernels that spread a long cache over the GPU.

The attention module itself is :class:`fermi.models.decoder.Attention`; it calls these
for one-token steps when a runner picks one (``Attention.decode_kernel``).

Plain SDPA kernels give a one-token query too little parallel work at batch 1 (about one
thread block per KV head), so a long cache is read by a handful of multiprocessors. Two
alternatives, both only worth it under ``torch.compile`` on CUDA:

- ``flex``: FlexAttention, which lowers a short query to a split-KV ("flash decoding")
  Triton kernel and reads each KV head once for its whole group of query heads;
- ``math``: the same arithmetic spelled as products and sums, which Inductor turns into
  reductions parallel over every (head, key) pair;
- ``split``: our own Triton split-KV kernel (``fermi.models.split_decode``), the default on
  CUDA: one program per range of keys of each (row, KV head), no mask tensor.

Both take the causal/window mask and Gemma-style soft-capping as a score modification, so
the attended length is simply the cache view's length.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import flex_attention

DECODE_KERNELS = ("sdpa", "flex", "math", "split")


def decode_attention(
    kind: str,
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    window: int | None,
    scale: float,
    softcap: float | None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, H, T, D] over keys/values [B, Hkv, L, D] at ``positions`` [B, T] -> [B, H, T, D].
    ``counters``: the split kernel's (``KVCache.counters``)."""
    if kind == "flex":
        return _flex(q, keys, values, positions, window, scale, softcap)
    if kind == "math":
        return _math(q, keys, values, positions, window, scale, softcap)
    if kind == "split":  # a Triton split-KV kernel (fermi.models.split_decode), CUDA only
        from fermi.models.split_decode import split_decode_attention

        if counters is None:
            raise ValueError("split decode attention needs the cache's counters")
        return split_decode_attention(q, keys, values, positions, window, scale, softcap, counters)
    raise ValueError(f"decode attention {kind!r} is not one of {', '.join(DECODE_KERNELS)}")


def _flex(q, keys, values, positions, window, scale, softcap) -> torch.Tensor:
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


def _math(q, keys, values, positions, window, scale, softcap) -> torch.Tensor:
    b, h, t, d = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    g = h // kv_heads
    # [B, Hkv, G*T, 1, D] x [B, Hkv, 1, L, D] summed over D: no copy of the cache per head.
    qg = q.reshape(b, kv_heads, g * t, 1, d).float()
    scores = (qg * keys[:, :, None].float()).sum(-1) * scale  # [B, Hkv, G*T, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    key_pos = torch.arange(length, device=q.device)
    pos = positions.repeat(1, g).view(b, 1, g * t, 1)  # row (g, t) sits at positions[:, t]
    visible = key_pos <= pos
    if window is not None:
        visible = visible & (key_pos > pos - window)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    out = (probs[..., None] * values[:, :, None].float()).sum(-2)  # [B, Hkv, G*T, D]
    return out.to(q.dtype).view(b, h, t, d)
