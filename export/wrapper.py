"""Export wrappers: the engine's :class:`Decoder` with a cache that graph I/O can carry.

The wrappers hold the same ``Decoder`` modules and weights the engine runs, attention
included; they only inject another cache (``Decoder.use_caches``). For ONNX the cache
window arrives as an input and the new entries leave as outputs (the runner keeps the
cache). For Core ML the cache is two registered buffers that the converter turns into
model state.
"""

from __future__ import annotations

import torch
from torch import nn

from fermi.models.context import StepContext
from fermi.models.decoder import Decoder


class WindowCache(nn.Module):
    """The ONNX cache: reads and writes a window given as graph input.

    The window holds ``kv_len`` positions of each row's cache; the decoder writes this
    step's keys/values into a copy of it (so attention sees them) and the wrapper returns
    just those new entries for the runner to store.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.new_keys = self.new_values = keys

    def write(self, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> None:
        self.new_keys, self.new_values = k, v
        positions = ctx.positions
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        rows = rows.expand_as(positions)
        # Functional update (a copy of the window): graph inputs are never written in place.
        self.keys, self.values = self.keys.clone(), self.values.clone()
        self.keys[rows, :, positions] = k.transpose(1, 2)
        self.values[rows, :, positions] = v.transpose(1, 2)

    def read(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
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
        caches = [WindowCache(past_keys[i], past_values[i]) for i in range(len(past_keys))]
        self.decoder.use_caches(caches)
        batch = tokens.shape[0]
        slots = torch.arange(batch, device=tokens.device)
        logits = self.decoder(
            tokens, positions, slots, kv_len=past_keys.shape[3], rows_are_slots=True
        )
        new_keys = torch.stack([c.new_keys for c in caches])
        new_values = torch.stack([c.new_values for c in caches])
        return logits, new_keys, new_values


class StateCache(nn.Module):
    """The Core ML cache: layer ``layer`` of the wrapper's state buffers [L, 1, KV, S, D],
    written by slice (which coremltools turns into ``slice_update`` + ``write_state``).

    The step's T tokens sit at positions kv_len-T .. kv_len-1 (see :class:`CoreMLStep`),
    so the slice follows from the shapes and attention reads the first kv_len positions.
    """

    def __init__(self, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = layer
        self.dtype = dtype  # the model's, which attention computes in; the state may differ
        # The wrapper's buffers, bound by CoreMLStep.forward so that the trace reads state.
        self.keys: torch.Tensor
        self.values: torch.Tensor

    def write(self, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> None:
        end = ctx.kv_len
        start = end - k.shape[2]
        self.keys[self.layer, :, :, start:end] = k.to(self.keys.dtype)
        self.values[self.layer, :, :, start:end] = v.to(self.values.dtype)

    def read(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.keys[self.layer, :, :, : ctx.kv_len].to(self.dtype)
        return keys, self.values[self.layer, :, :, : ctx.kv_len].to(self.dtype)


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
        decoder.setup_cache(1, max_seq_len)  # the rope tables and windows of this length
        self.decoder = decoder
        shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=cache_dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=cache_dtype))
        dtype = decoder.model.embed_tokens.weight.dtype
        self.caches = [StateCache(i, dtype) for i in range(cfg.num_hidden_layers)]
        decoder.use_caches(self.caches)

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        for cache in self.caches:
            cache.keys, cache.values = self.k_cache, self.v_cache
        t, end = input_ids.shape[1], causal_mask.shape[-1]
        positions = torch.arange(end - t, end, device=input_ids.device)[None]
        slots = torch.zeros(1, dtype=torch.long, device=input_ids.device)
        ctx = self.decoder.step_context(
            positions, slots, end, rows_are_slots=True, causal_mask=causal_mask
        )
        return self.decoder.step(input_ids, ctx)
