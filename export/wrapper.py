"""Export wrappers: the engine's :class:`Decoder` with its KV cache turned into graph I/O.

The wrappers hold the same ``Decoder`` modules and weights the engine runs; they only
change where the cache lives. For ONNX the cache window arrives as an input and the new
entries leave as outputs (the runner keeps the cache). For Core ML the cache is two
registered buffers that the converter turns into model state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fermi.models.decoder import Attention, Decoder
from fermi.models.rope import apply_rope


class _WindowCache(nn.Module):
    """Stands in for ``KVCache`` while tracing: reads and writes a window given as input.

    The window holds ``kv_len`` positions of each row's cache; the decoder writes this
    step's keys/values into a copy of it (so attention sees them) and the wrapper returns
    just those new entries for the runner to store.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.new_keys = self.new_values = keys

    def write(self, slots, positions, k, v) -> None:
        self.new_keys, self.new_values = k, v
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        rows = rows.expand_as(positions)
        # Functional update (a copy of the window): graph inputs are never written in place.
        self.keys, self.values = self.keys.clone(), self.values.clone()
        self.keys[rows, :, positions] = k.transpose(1, 2)
        self.values[rows, :, positions] = v.transpose(1, 2)

    def read(self, slots, batch: int, kv_len: int):
        return self.keys, self.values


class OnnxStep(nn.Module):
    """tokens [B,T], positions [B,T], past_keys/past_values [L,B,KV,P,D] ->
    logits [B,V] of each row's last token, new_keys/new_values [L,B,KV,T,D].

    Row ``b`` of the window must hold the cache of positions 0..P-1 of its sequence, and
    every position in ``positions`` must be < P (entries at those positions are ignored:
    this step's keys replace them).
    """

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens, positions, past_keys, past_values):
        layers = self.decoder.model.layers
        caches = []
        for i, layer in enumerate(layers):
            cache = _WindowCache(past_keys[i], past_values[i])
            layer.self_attn.cache = cache
            caches.append(cache)
        batch = tokens.shape[0]
        slots = torch.arange(batch, device=tokens.device)
        logits = self.decoder(
            tokens, positions, slots, kv_len=past_keys.shape[3], rows_are_slots=True
        )
        new_keys = torch.stack([c.new_keys for c in caches])
        new_values = torch.stack([c.new_values for c in caches])
        return logits, new_keys, new_values


class _StepInputs:
    """Per-call tensors the stateful attention layers read (set by ``CoreMLStep.forward``).

    A plain object rather than a module, so the layers can share it without making the
    wrapper a child of its own submodules.
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    mask: torch.Tensor
    start: int
    end: int


class _StatefulAttention(nn.Module):
    """The decoder's attention, with the cache in Core ML state and an additive mask.

    It uses the original layer's projections and norms; only the cache and the attention
    call differ from ``Attention.forward``: the state buffers are written by slice (which
    coremltools turns into ``slice_update`` + ``write_state``), the query is pre-scaled and
    SDPA gets no ``scale`` (so coremltools emits its fused iOS 18 op), and the KV heads are
    expanded by hand (coremltools ignores ``enable_gqa``).
    """

    def __init__(self, inner: Attention, layer: int, step: _StepInputs) -> None:
        super().__init__()
        self.inner = inner
        self.layer = layer
        self.step = step

    def forward(self, x, cos, sin, positions, slots, read_slots, kv_len, masks) -> torch.Tensor:
        # ``masks`` (the decoder's boolean masks) is unused: Core ML takes its mask as input.
        attn, cfg, step, i = self.inner, self.inner.cfg, self.step, self.layer
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = attn.k_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = attn.v_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        rot = int(cfg.head_dim * cfg.rope.partial_rotary_factor)
        q, k = apply_rope(q, cos, sin, rot), apply_rope(k, cos, sin, rot)

        step.k_cache[i, :, :, step.start : step.end] = k.to(step.k_cache.dtype)
        step.v_cache[i, :, :, step.start : step.end] = v.to(step.v_cache.dtype)
        keys = step.k_cache[i, :, :, : step.end].to(q.dtype)
        values = step.v_cache[i, :, :, : step.end].to(q.dtype)
        groups = cfg.num_attention_heads // cfg.num_key_value_heads
        if groups > 1:
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)

        mask = step.mask.to(q.dtype)
        window = attn.window  # None when the window cannot bind in this cache
        if window is not None:
            key_pos = torch.arange(step.end, device=x.device)
            outside = key_pos[None, :] <= positions[0][:, None] - window
            mask = mask.masked_fill(outside[None, None], float("-inf"))
        if cfg.attn_logit_softcap is None:
            # SDPA's default scale is 1/sqrt(head_dim); fold any other scale into q.
            ratio = cfg.attn_scale * math.sqrt(cfg.head_dim)
            if ratio != 1.0:
                q = q * ratio
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        else:
            scores = (q @ keys.transpose(-1, -2)) * cfg.attn_scale
            cap = cfg.attn_logit_softcap
            scores = torch.tanh(scores / cap) * cap + mask
            out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ values
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class CoreMLStep(nn.Module):
    """input_ids [1,T] (int32), causal_mask [1,1,T,K] (additive: 0 or -inf) ->
    logits [1,V] (float32) of the last token; the cache is state ``k_cache``/``v_cache``
    [L,1,KV,S,D].

    The T tokens sit at positions K-T .. K-1: the mask's shape carries the position, so the
    converted model needs no integer position input and its attention reads only the
    first K cache positions. Batch 1: a runner makes one state per slot.
    """

    def __init__(self, decoder: Decoder, max_seq_len: int, cache_dtype: torch.dtype) -> None:
        super().__init__()
        cfg = decoder.cfg
        decoder.setup_cache(1, max_seq_len)
        self.decoder = decoder
        shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=cache_dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=cache_dtype))
        self.step = _StepInputs()
        for i, layer in enumerate(decoder.model.layers):
            inner = layer.self_attn
            inner.cache = None
            layer.self_attn = _StatefulAttention(inner, i, self.step)

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        t, end = input_ids.shape[1], causal_mask.shape[-1]
        step = self.step
        step.k_cache, step.v_cache, step.mask = self.k_cache, self.v_cache, causal_mask
        step.start, step.end = end - t, end
        positions = torch.arange(end - t, end, device=input_ids.device)[None]
        slots = torch.zeros(1, dtype=torch.long, device=input_ids.device)
        return self.decoder(input_ids, positions, slots, kv_len=end, rows_are_slots=True)
