"""Export wrappers: the engine's :class:`Decoder` with a cache that graph I/O can carry.

The wrappers hold the same ``Decoder`` modules and weights the engine runs; they only
inject another cache (``Decoder.use_caches``). For ONNX the per-layer caches are graph
inputs and outputs, and each layer's cache write and attention is one fused onnxruntime
operator (:class:`FusedAttention`). For Core ML the cache is two registered buffers that
the converter turns into model state, and attention is the engine's own.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from export.gqa import group_query_attention
from fermi.models.cache import AttendingCache
from fermi.models.context import StepContext
from fermi.models.decoder import Decoder, RMSNorm


class FusedAttention(AttendingCache):
    """The ONNX cache and attention of one layer: one ``group_query_attention`` call (see
    :mod:`export.onnx`), which becomes onnxruntime's GroupQueryAttention node. The node
    writes this step's keys/values into the layer's present cache (in place when the caller
    binds past and present to one buffer) and attends over each row's live length."""

    def __init__(
        self,
        decoder: Decoder,
        layer: int,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> None:
        super().__init__()
        cfg = decoder.cfg
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_logit_softcap or 0.0
        window = decoder.windows[layer]
        # The node's local_window_size is the window as the engine counts it, W keys up to
        # the query's own (W - 1 or W + 1 part from the engine: tests/test_arch_export.py).
        # -1: no window.
        self.local_window = -1 if window is None else window
        self.past_key, self.past_value, self.attention_mask = past_key, past_value, attention_mask
        self.present_key = self.present_value = past_key

    def attend(self, q, k, v, ctx: StepContext) -> torch.Tensor:
        b, t = q.shape[:2]
        out, self.present_key, self.present_value = group_query_attention(
            q.reshape(b, t, -1),
            k.reshape(b, t, -1),
            v.reshape(b, t, -1),
            self.past_key,
            self.past_value,
            self.attention_mask,
            self.heads,
            self.kv_heads,
            self.scale,
            self.softcap,
            self.local_window,
        )
        return out


class OnnxStep(nn.Module):
    """The ONNX graph's forward, in the layout onnxruntime-genai and Hugging Face exports
    use (``export/onnx.py`` documents it): input_ids, attention_mask, position_ids
    [B, T] and past_key_values.N.key/value [B, Hkv, P, D] -> logits [B, 1, V] of each row's
    last token, present.N.key/value."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, attention_mask, position_ids, *past):
        decoder = self.decoder
        layers = decoder.cfg.num_hidden_layers
        caches = [
            FusedAttention(decoder, i, past[2 * i], past[2 * i + 1], attention_mask)
            for i in range(layers)
        ]
        decoder.use_caches(caches)
        # Slot 0 for every row: the only per-slot state is LongRoPE's mark, which the graph
        # leaves unset (a forward picks its table from its own positions).
        slots = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        ctx = decoder.step_context(position_ids, slots, input_ids.shape[1], rows_are_slots=True)
        logits = decoder.step(input_ids, ctx)[:, None]
        presents = [t for c in caches for t in (c.present_key, c.present_value)]
        return (logits, *presents)


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
        dtype = decoder.dtype
        self.caches = [StateCache(i, dtype) for i in range(cfg.num_hidden_layers)]
        decoder.use_caches(self.caches)
        if dtype == torch.float16:
            _fused_norms(decoder)

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


class PositionStateCache(StateCache):
    """The Core ML cache of the fixed-shape (Neural Engine) package: the step's T tokens
    are written from ``start`` (a 0-dim tensor the step sets: the ``position`` input), and
    attention reads the whole cache, masked (see :class:`CoreMLPositionStep`)."""

    def __init__(self, layer: int, dtype: torch.dtype) -> None:
        super().__init__(layer, dtype)
        self.start: torch.Tensor

    def write(self, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> None:
        start, t = self.start, k.shape[2]
        # A slice with a traced start: coremltools turns it into slice_update + write_state.
        self.keys[self.layer, :, :, start : start + t] = k.to(self.keys.dtype)
        self.values[self.layer, :, :, start : start + t] = v.to(self.values.dtype)


class CoreMLPositionStep(CoreMLStep):
    """input_ids [1,T] (int32, T one of the package's enumerated sizes), position [1]
    (int32: the position of the first of the T tokens) -> logits [1,V] of the last token.

    Every input has a fixed shape but the enumerated T, so each size can be compiled for
    the Neural Engine (which runs a range-flexible input only at its default shape). The
    price: attention reads all ``max_seq_len`` cache positions every step, masked by
    position inside the model, where :class:`CoreMLStep` reads only the live ones.
    """

    def __init__(self, decoder: Decoder, max_seq_len: int, cache_dtype: torch.dtype) -> None:
        super().__init__(decoder, max_seq_len, cache_dtype)
        dtype = decoder.dtype
        self.caches = [PositionStateCache(i, dtype) for i in range(decoder.cfg.num_hidden_layers)]
        decoder.use_caches(self.caches)
        self.max_seq_len = max_seq_len

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        positions = position.long() + torch.arange(t, device=input_ids.device)
        for cache in self.caches:
            cache.keys, cache.values, cache.start = self.k_cache, self.v_cache, positions[0]
        slots = torch.zeros(1, dtype=torch.long, device=input_ids.device)
        # No mask given: the decoder masks key j > position from the positions themselves.
        ctx = self.decoder.step_context(
            positions[None], slots, self.max_seq_len, rows_are_slots=True
        )
        return self.decoder.step(input_ids, ctx)


def _fused_norms(decoder: Decoder) -> None:
    """Trace every RMS norm as ``F.rms_norm``, as a float32 decoder's norms are. In fp16
    the decoder spells the norm out (square, mean, rsqrt), and Core ML would square fp16
    activations; the converter turns ``rms_norm`` into a form that scales by the largest
    magnitude first, which cannot overflow. (Gemma's unit-offset norms are spelled out in
    either dtype.)"""

    def fused(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        # (in float32: coremltools 9 converts an fp16 rms_norm with a float32 epsilon and
        # fails; its fp16 pass then computes this in fp16, as it does a float32 trace's)
        weight = norm.weight.float()
        return F.rms_norm(x.float(), weight.shape, weight, norm.eps).to(x.dtype)

    for module in decoder.modules():
        if isinstance(module, RMSNorm) and not module.unit_offset:
            module.forward = types.MethodType(fused, module)
