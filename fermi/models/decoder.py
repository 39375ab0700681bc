"""One decoder-only transformer with a static KV cache, shared by every architecture.

Module and parameter names follow the Hugging Face checkpoints (``model.layers.N.self_attn.
o_proj``...), so most checkpoints load without renaming; q/k/v and gate/up are each one
fused product (``qkv_proj``, ``gate_up_proj``, Phi-3's names), which the loader builds from
a checkpoint's separate matrices (:func:`projection_parts`). Architecture adapters
(``fermi.models.<arch>``) only translate ``config.json`` into :class:`ModelConfig` and fix
naming quirks of their checkpoints.

A forward's per-step tensors travel as one :class:`~fermi.models.context.StepContext`;
each layer's attention writes and reads the cache injected into it
(:mod:`fermi.models.cache`).

``forward`` has no Python control flow on tensor values and no host syncs: the same code
runs eagerly on CPU, compiles with ``fullgraph=True``, captures in CUDA graphs and exports.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from fermi.models.attention import decode_attention
from fermi.models.cache import AttendingCache, Cache, KVCache, StepCache
from fermi.models.context import StepContext
from fermi.models.gemv import ACT_SILU_MUL, row_linear
from fermi.models.half_weights import NATIVE_ROWS, HalfWeightLinear
from fermi.models.quant import QuantLinear, QuantReport
from fermi.models.rope import RopeConfig, longrope_switch, rope_tables, rotate

# The rope tables a layer may use (ModelConfig.layer_ropes), and the prefix of the decoder
# buffers that hold each one's cos/sin (``rope_cos``, ``rope_local_cos``, ...).
GLOBAL_ROPE, LOCAL_ROPE = "global", "local"
ROPE_BUFFERS = {GLOBAL_ROPE: "rope", LOCAL_ROPE: "rope_local"}
# The KV cache dtypes fermi's CPU kernels read and write (use_native_rows).
KERNEL_CACHES = (torch.float32, torch.float16)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False  # bias on q/k/v projections
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    # Per layer: None (global attention) or a window length in tokens.
    sliding_windows: tuple[int | None, ...] = ()
    # Gemma 2 style extras; neutral defaults for everything else.
    embedding_scale: float = 1.0
    norm_unit_offset: bool = False  # RMSNorm multiplies by (1 + weight)
    sandwich_norms: bool = False  # extra post-attention / pre+post-feed-forward norms
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    # Per layer: the rope table that rotates its q and k, GLOBAL_ROPE (``rope``) or
    # LOCAL_ROPE (``local_rope``: Gemma 3's sliding layers have their own base), or None
    # for no rotation at all (SmolLM3's NoPE layers). Empty: every layer GLOBAL_ROPE.
    layer_ropes: tuple[str | None, ...] = ()
    local_rope: RopeConfig | None = None
    # Granite's multipliers: the attention scale itself (replacing 1/sqrt(head_dim)), a
    # scale on each block's output before its residual add, and a divisor of the logits.
    attention_multiplier: float | None = None
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0

    @property
    def attn_scale(self) -> float:
        if self.attention_multiplier is not None:
            return self.attention_multiplier
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return 1.0 / math.sqrt(base)

    @property
    def query_scale(self) -> float | None:
        """The factor folded into q so that attention's default 1/sqrt(head_dim) scale
        gives :attr:`attn_scale`; None when no factor is needed."""
        if self.attention_multiplier is not None:
            return self.attention_multiplier * math.sqrt(self.head_dim)
        if self.query_pre_attn_scalar not in (None, self.head_dim):
            return math.sqrt(self.head_dim / self.query_pre_attn_scalar)
        return None

    def window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None

    def rope_of(self, layer: int) -> str | None:
        """The rope table of ``layer`` (see ``layer_ropes``)."""
        return self.layer_ropes[layer] if self.layer_ropes else GLOBAL_ROPE

    def rope_config(self, table: str) -> RopeConfig:
        if table == LOCAL_ROPE:
            assert self.local_rope is not None, "a LOCAL_ROPE layer needs local_rope"
            return self.local_rope
        return self.rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not self.unit_offset:
            # One fused kernel; in float32 it is the spelled-out formula below.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # A float32 weight keeps a lower-precision input's result in float32 (fp16-storage
        # projections answer in fp16); same-dtype weights keep the input's dtype.
        dtype = torch.promote_types(x.dtype, self.weight.dtype)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:  # Gemma computes the scale in float32 before casting back
            return (h * (1.0 + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)


def projection_parts(cfg: ModelConfig) -> dict[str, tuple[tuple[str, int], ...]]:
    """The decoder's fused projections and the separate ones most checkpoints store, in row
    order: module suffix -> ((part suffix, rows), ...). The loader concatenates the parts
    once (``fermi.loading.build_model``), so ``forward`` has one layout."""
    h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return {
        "self_attn.qkv_proj": (
            ("self_attn.q_proj", h * d),
            ("self_attn.k_proj", kv * d),
            ("self_attn.v_proj", kv * d),
        ),
        "mlp.gate_up_proj": (
            ("mlp.gate_proj", cfg.intermediate_size),
            ("mlp.up_proj", cfg.intermediate_size),
        ),
    }


class Attention(nn.Module):
    """The one attention: projections, q/k norms, rope, the cache write and read, GQA,
    windows and soft-capping. The cache is injected (:mod:`fermi.models.cache`): the
    engine's slot cache, or an export wrapper's."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        h, d, kv = cfg.num_attention_heads, cfg.head_dim, cfg.num_key_value_heads
        # Rows q, then k, then v (projection_parts).
        self.qkv_proj = nn.Linear(cfg.hidden_size, (h + 2 * kv) * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.o_proj_bias)
        if cfg.qk_norm:  # Gemma 3's scale by (1 + weight), as its other norms do
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_unit_offset)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_unit_offset)
        self.rope = cfg.rope_of(layer)  # which table of the step's rope rotates q/k, or none
        self.cache: Cache | AttendingCache | None = None
        # The layer's sliding window; setup_cache drops one that cannot bind in the cache.
        self.window: int | None = cfg.window(layer)
        # Kernel for one-token steps: "sdpa", or "flex"/"math"/"split" (see
        # fermi.models.attention), which only pay off compiled on CUDA with a KVCache.
        self.decode_kernel = "sdpa"

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        qkv = _as_dtype(self.qkv_proj(x), x.dtype)
        return self.o_proj(self.attend(qkv, ctx))

    def attend(self, qkv: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Attention from the projected ``qkv`` [B, T, (H + 2 Hkv) * D] (q, then k, then v)
        to the input of ``o_proj`` [B, T, H * D]; writes this step's keys and values."""
        cfg = self.cfg
        b, t = qkv.shape[:2]
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # Heads stay on dim 2 ([B, T, heads, D], the projections' layout) until attention.
        qkv = qkv.view(b, t, h + kv + kv, d)
        q, k, v = qkv.split([h, kv, kv], dim=2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            cos, sin = (table.unsqueeze(2) for table in ctx.rope[self.rope])
            if cfg.qk_norm:
                q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            else:  # q and k sit side by side: one rotation for both
                q, k = rotate(qkv[:, :, : h + kv], cos, sin).split([h, kv], dim=2)
        assert self.cache is not None, "call Decoder.setup_cache() before forward()"
        if isinstance(self.cache, AttendingCache):  # the ONNX export's fused operator
            return self.cache.attend(q, k, v, ctx)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

        self.cache.write(k, v, ctx)
        if ctx.causal and not self.needs_mask:
            if getattr(self.cache, "rounds", False):
                # The prompt's own keys and values as the cache holds them: what later
                # steps (and a prompt that reuses this one's prefix) read back.
                store = self.cache.k.dtype
                k, v = k.to(store).to(q.dtype), v.to(store).to(q.dtype)
            # A graph runner pads a chunk to its bucket with rows at the scratch position,
            # past kv_len, and here they are among the keys: masked, but a masked weight of 0
            # times a NaN value (a padded row can hold one, e.g. after a windowed layer where
            # it saw no key) is NaN. Their keys and values are zeroed, so no padding value
            # reaches a real row whatever it holds.
            real = (ctx.positions < ctx.kv_len)[:, None, :, None]
            k, v = torch.where(real, k, 0), torch.where(real, v, 0)
            return self._attend_causal(q, k, v).transpose(1, 2).reshape(b, t, h * d)
        keys, values = self.cache.read(ctx)

        if t == 1 and self.decode_kernel != "sdpa":
            out = decode_attention(
                self.decode_kernel,
                q,
                keys,
                values,
                ctx.positions,
                self.window,
                cfg.attn_scale,
                cfg.attn_logit_softcap,
                self.cache.counters,
            )
        else:
            out = self._attend(q, keys, values, ctx.masks[self.window])
        return out.transpose(1, 2).reshape(b, t, h * d)

    @property
    def needs_mask(self) -> bool:
        """Whether this layer attends through a mask even when a step's tokens start its
        sequences (``StepContext.causal``): a window, or soft-capping (which spells
        attention out)."""
        return self.window is not None or self.cfg.attn_logit_softcap is not None

    def _attend_causal(self, q, k, v) -> torch.Tensor:
        """q [B, H, T, D] over this step's own keys/values [B, Hkv, T, D], query t seeing
        keys 0..t: right when the step's tokens are positions 0..T-1 (``StepContext.causal``).
        No mask is built or read and the query heads keep their own axis (``enable_gqa``
        shares each KV head with its group), so on CUDA SDPA can take the flash kernel (or
        cuDNN's, where torch ranks it first), which skips the key blocks above the diagonal:
        half the products of a masked prefill."""
        cfg = self.cfg
        grouped = cfg.num_attention_heads != cfg.num_key_value_heads
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=cfg.attn_scale, enable_gqa=grouped
        )

    def _attend(self, q, keys, values, mask) -> torch.Tensor:
        """q [B, H, T, D] over keys/values [B, Hkv, L, D]; ``mask`` is the additive mask
        [B, 1, G*T, L] of :meth:`Decoder.masks` (its first T rows are the plain mask)."""
        cfg = self.cfg
        b, t = q.shape[0], q.shape[2]
        # Head counts from the config, Python ints even under torch.jit.trace (Core ML).
        h, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        groups = h // kv_heads
        if cfg.attn_logit_softcap is None:
            # Fold each KV head's group of query heads into the query length: the same
            # attention as repeating K/V for every query head, without copying the cache.
            q = q.reshape(b, kv_heads, groups * t, d)
            # SDPA's default scale is 1/sqrt(head_dim); another scale is folded into q, so
            # that converters which map SDPA only without one (Core ML's fused op) keep it.
            if cfg.query_scale is not None:
                q = q * cfg.query_scale
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            return out.reshape(b, h, t, d)
        if groups > 1:
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
        # Soft-capping needs the raw scores, so this path spells attention out.
        scores = (q @ keys.transpose(-1, -2)) * cfg.attn_scale
        cap = cfg.attn_logit_softcap
        scores = torch.tanh(scores / cap) * cap + mask[:, :, :t]
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return probs @ values


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # Rows gate, then up (projection_parts).
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = _activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


def _as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``: a projection may answer in its weights' dtype (fp16 storage on
    CPU); the rope and the KV cache work in the model's."""
    return x if x.dtype == dtype else x.to(dtype)


def _activation(name: str):
    if name == "silu":
        return F.silu
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"activation {name!r} is not supported")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        eps, off = cfg.rms_norm_eps, cfg.norm_unit_offset
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.sandwich = cfg.sandwich_norms
        self.residual_multiplier = cfg.residual_multiplier
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.row_kernels = False  # see Decoder.use_row_kernels
        self.row_pdl = False  # the row products launched with PDL (fermi.models.gemv)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self.row_kernels and x.shape[0] * x.shape[1] == 1:
            return self._one_row(x, ctx)
        h = self.self_attn(self.input_layernorm(x), ctx)
        if not self.sandwich:
            x = x + self._scaled(h)
            return x + self._scaled(self.mlp(self.post_attention_layernorm(x)))
        x = x + self._scaled(self.post_attention_layernorm(h))
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self._scaled(self.post_feedforward_layernorm(h))

    def _scaled(self, h: torch.Tensor) -> torch.Tensor:
        """A block's output as it joins the residual stream (Granite scales it)."""
        return h if self.residual_multiplier == 1.0 else h * self.residual_multiplier

    def _one_row(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The same layer for a single token, in four fused products: the norms, the
        residual adds and silu(gate) * up ride inside them (``fermi.models.gemv``)."""
        attn, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        qkv_proj, o_proj = attn.qkv_proj, attn.o_proj
        gate_up, down = mlp.gate_up_proj, mlp.down_proj
        pdl = self.row_pdl
        qkv = _row(qkv_proj, x, pdl, norm_weight=norm1.weight, eps=norm1.eps)
        h = attn.attend(qkv, ctx)
        x = _row(o_proj, h, pdl, residual=x)
        gu = _row(gate_up, x, pdl, norm_weight=norm2.weight, eps=norm2.eps)
        return _row(down, gu, pdl, act=ACT_SILU_MUL, residual=x)


def _row(linear: nn.Module, x: torch.Tensor, pdl: bool, **fused) -> torch.Tensor:
    """The fused one-row product (``fermi.models.gemv``) of a plain, quantized or fp16
    (fermi's CPU kernels) linear; ``pdl``: launched with PDL on CUDA."""
    if isinstance(linear, QuantLinear):
        return linear.row(x, pdl=pdl, **fused)
    if isinstance(linear, HalfWeightLinear):  # (CPU only)
        return linear.row(x, **fused)
    return row_linear(x, linear.weight, linear.bias, pdl=pdl, **fused)


def _row_capable(linear: nn.Module) -> bool:
    if isinstance(linear, HalfWeightLinear):
        return linear.layout == "native"
    return type(linear) is nn.Linear or isinstance(linear, QuantLinear)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset)


class Decoder(nn.Module):
    """The causal LM: ``model`` (embeddings, layers, final norm) and ``lm_head``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.max_batch = 0
        self.max_seq_len = 0
        self.row_kernels = False  # see use_row_kernels
        self.row_pdl = False  # the row products launched with PDL (fermi.models.gemv)
        self.native_rows = False  # see use_native_rows
        self._native_stack: SimpleNamespace | None = None  # the kernels' view of the layers
        # Off: every prefill takes the masked path (see prefill_is_causal), for A/B timing.
        self.causal_prefill = True
        # Set by the loader when it quantized linear layers (fermi.models.quant).
        self.quantization: QuantReport | None = None
        # What setup_cache's KV caches hold when not the model's dtype (use_half_cache).
        self.cache_dtype: torch.dtype | None = None
        self.rope_switch: int | None = None  # LongRoPE: first position of the long factors
        self.ropes: tuple[str, ...] = ()  # the rope tables the layers use; setup_cache sets
        # Each layer's attention window (None = global); setup_cache drops unbinding ones.
        self.windows: tuple[int | None, ...] = tuple(
            cfg.window(i) for i in range(cfg.num_hidden_layers)
        )

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype, and the KV cache's unless ``cache_dtype`` says otherwise:
        the final norm's weight's.
        Weights stored smaller than that on CPU (fp16 products and embedding table, int8 and
        int4 layers) leave the norms in it."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def use_row_kernels(self) -> bool:
        """Run one-token forwards (batch-1 decode, and the last token's lm_head) through
        the fused row products of ``fermi.models.gemv``, where the architecture fits them:
        pre-norm layers with plain RMSNorm and SiLU, ``nn.Linear`` or int8/int4
        (``QuantLinear``) weights, and a residual add without a scale (the products add
        the residual unscaled: Granite's ``residual_multiplier`` keeps the unfused layer).
        Returns whether it did. On CPU the products are their torch reference."""
        if not self._row_shape():
            return False
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if not all(_row_capable(m) for m in (*linears, self.lm_head)):
                return False
        for layer in self.model.layers:
            layer.row_kernels = True
        self.row_kernels = True
        return True

    def use_native_rows(self) -> bool:
        """On CPU, run decode steps (one token per row, up to ``NATIVE_ROWS`` rows) in
        fermi's own kernels (``fermi.native``): every layer, its products (each weight read
        once for every tile of up to 8 rows, the norms, silu * up and residual adds inside them) and
        each row's q/k norms, rope, cache write and attention, in one call a step. A
        single row's final norm and head take one more call (:meth:`use_row_kernels`).
        Applies where the kernels build, every product is stored in one of their formats
        (``HalfWeightLinear`` fp16 or ``QuantLinear`` int8/int4 in ``layout="native"``)
        and the model (its norms) is float32 on CPU, its cache float32 or fp16; LongRoPE and
        soft-capping keep torch's path. Call
        after ``setup_cache``. Returns whether it does."""
        if not self.native_rows_fit():
            return False
        for layer in self.model.layers:
            cache = layer.self_attn.cache
            if not isinstance(cache, KVCache) or cache.k.dtype not in KERNEL_CACHES:
                return False
        if not self.use_row_kernels():  # the pre-norm, SiLU, unscaled-residual shape
            return False
        self._native_stack = None
        self.native_rows = True
        return True

    def native_rows_fit(self) -> bool:
        """Whether :meth:`use_native_rows` takes this model, its cache aside: a question
        without side effects, asked before ``setup_cache`` too (the runners choose the
        cache's dtype by it, and ``check_cache_fits`` counts that dtype's bytes)."""
        from fermi import native

        cfg = self.cfg
        if native.library() is None or self.device.type != "cpu" or self.dtype != torch.float32:
            return False
        used = {cfg.rope_of(i) for i in range(cfg.num_hidden_layers)}
        longrope = GLOBAL_ROPE in used and longrope_switch(cfg.rope) is not None
        if cfg.attn_logit_softcap is not None or longrope or not self._row_shape():
            return False
        linears = [self.lm_head]
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears += [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
        return all(getattr(m, "native_weight", None) is not None for m in linears)

    def _row_shape(self) -> bool:
        """The layers' shape the row products fuse: pre-norm, plain RMSNorm, SiLU, and a
        residual add without a scale (:meth:`use_row_kernels`)."""
        cfg = self.cfg
        if cfg.sandwich_norms or cfg.norm_unit_offset or cfg.hidden_act != "silu":
            return False
        return cfg.residual_multiplier == 1.0

    def planned_cache_dtype(self, compiled: bool = False) -> torch.dtype:
        """What a CPU or CUDA runner's KV cache will hold: ``cache_dtype`` (fp16 on CPU
        under fp16 storage or quantization) only where fermi's kernels run the decode step,
        the model's dtype elsewhere (``compiled``: the torch-compile runner, whose graphs
        run torch's attention, which would widen a whole fp16 cache every step)."""
        if self.cache_dtype in (None, self.dtype):
            return self.dtype
        if self.device.type == "cpu" and (compiled or not self.native_rows_fit()):
            return self.dtype
        return self.cache_dtype

    def _native_layers(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """All layers for one token in fermi's kernels (:meth:`use_native_rows`)."""
        if self._native_stack is None:
            self._native_stack = self._build_native_stack()
        stack = self._native_stack
        x = x.to(torch.float32).contiguous()
        slots = ctx.slots.to(torch.int64).contiguous()
        positions = ctx.positions.to(torch.int64).contiguous()
        tables = [ctx.rope.get(name, (None, None)) for name in (GLOBAL_ROPE, LOCAL_ROPE)]
        # (contiguous copies, if any, are held here until the call returns)
        rope = [None if t is None else t.to(torch.float32).contiguous() for p in tables for t in p]
        ptrs = [None if t is None else t.data_ptr() for t in rope]
        code = stack.lib.fermi_decode_rows(
            ctypes.byref(stack.stack),
            x.data_ptr(),
            x.shape[0],
            slots.data_ptr(),
            positions.data_ptr(),
            *ptrs,
            torch.get_num_threads(),
        )
        if code != 0:
            if code == -2:
                raise ValueError("fermi's CPU kernels do not take one of this model's weights")
            raise MemoryError("fermi's CPU kernels could not allocate their scratch rows")
        return x

    def _build_native_stack(self) -> SimpleNamespace:
        from fermi import native

        cfg = self.cfg
        layers = (native.Layer * cfg.num_hidden_layers)()
        ropes = {None: 0, GLOBAL_ROPE: 1, LOCAL_ROPE: 2}

        def ptr(t: torch.Tensor | None) -> int | None:
            if t is None:
                return None
            assert t.is_contiguous() and t.dtype == torch.float32
            return t.data_ptr()

        cache_dtype = self.model.layers[0].self_attn.cache.k.dtype
        for entry, layer in zip(layers, self.model.layers, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            products = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            for i, linear in enumerate(products):
                entry.w[i] = linear.native_weight.struct
                entry.bias[i] = ptr(linear.native_weight.bias)
            entry.norm1 = ptr(layer.input_layernorm.weight)
            entry.norm2 = ptr(layer.post_attention_layernorm.weight)
            if cfg.qk_norm:
                entry.q_norm, entry.k_norm = ptr(attn.q_norm.weight), ptr(attn.k_norm.weight)
            for name in ("k", "v"):
                buffer = getattr(attn.cache, name)
                assert buffer.is_contiguous() and buffer.dtype == cache_dtype
                setattr(entry, f"{name}_cache", buffer.data_ptr())
            entry.window = attn.window or 0
            entry.rope = ropes[attn.rope]
        rot = 0
        if self.ropes:
            rot = getattr(self, f"{ROPE_BUFFERS[self.ropes[0]]}_cos").shape[-1]
        stack = native.Stack(
            layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            inter=cfg.intermediate_size,
            rot=rot,
            max_seq=self.model.layers[0].self_attn.cache.k.shape[2],
            kv_half=int(cache_dtype == torch.float16),
            eps=cfg.rms_norm_eps,
            scale=cfg.attn_scale,
            layer=layers,
        )
        return SimpleNamespace(stack=stack, layers=layers, lib=native.library())

    def prefill_is_causal(self, start_pos: int) -> bool:
        """Whether a runner's prefill chunk at ``start_pos`` runs as a causal step
        (``forward(causal=True)``, :class:`StepContext`): it starts its sequence, and some
        layer attends without a mask (``Attention.needs_mask``; in Gemma 2, whose layers all
        soft-cap, none does, and a causal step would only be a second compile of the same
        arithmetic). ``causal_prefill`` off forces the masked path."""
        if start_pos != 0 or not self.causal_prefill:
            return False
        return any(not layer.self_attn.needs_mask for layer in self.model.layers)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Move a sequence's cache (its first ``length`` positions) and its per-slot rope
        mark from slot ``src`` to slot ``dst``, leaving ``src`` as it was."""
        caches = [layer.self_attn.cache for layer in self.model.layers]
        if all(isinstance(c, KVCache) for c in caches):  # one call for every layer's copy
            views = [(t[dst, :, :length], t[src, :, :length]) for c in caches for t in (c.k, c.v)]
            torch._foreach_copy_([d for d, _ in views], [s for _, s in views])
        else:
            for cache in caches:
                cache.move(src, dst, length)
        marks = getattr(self, "rope_long", None)
        if marks is not None:
            marks[dst] = marks[src]

    def _apply(self, fn, *args, **kwargs):
        # Whatever moves or converts the tensors (share_memory(), to(), float()) leaves the
        # kernels' view of the layers pointing at the storages it freed: build it anew, and
        # off the CPU not at all.
        self._native_stack = None
        out = super()._apply(fn, *args, **kwargs)
        if self.native_rows:  # (a move off the CPU, or a cache the kernels cannot read, ends it)
            self.native_rows = False
            self.use_native_rows()
        return out

    def __getstate__(self) -> dict:
        # Copies and pickles leave out the kernels' view of the layers (ctypes structures
        # holding this model's addresses); the copy builds its own at its first step.
        return {**super().__getstate__(), "_native_stack": None}

    def use_caches(self, caches: Sequence[Cache | AttendingCache]) -> None:
        """Inject one cache per layer (``setup_cache`` injects the engine's slot caches;
        the export wrappers inject theirs)."""
        for layer, cache in zip(self.model.layers, caches, strict=True):
            layer.self_attn.cache = cache
        self._native_stack = None  # it holds the caches' addresses

    def setup_cache(
        self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None
    ) -> None:
        """Allocate the KV cache and the rope tables on the model's device. The cache holds
        ``dtype``, else ``cache_dtype`` (fp16 on CPU where the loaders store the weights
        in 16 bits or fewer: :func:`fermi.models.half_weights.use_half_cache`), else the
        model's dtype; attention computes in the model's dtype either way."""
        dtype = dtype or self.cache_dtype or self.dtype
        cfg = self.cfg
        shape = (max_batch, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        caches = [KVCache(*shape, dtype, self.device, self.dtype) for _ in self.model.layers]
        self.use_caches(caches)
        for i, layer in enumerate(self.model.layers):
            # A window as long as the cache masks nothing: skip the extra mask (Phi-3.5's
            # 262144, or Gemma 2's 4096 with a 4096-token cache).
            window = cfg.window(i)
            layer.self_attn.window = window if window is not None and window < max_seq_len else None
        self.windows = tuple(layer.self_attn.window for layer in self.model.layers)
        used = {cfg.rope_of(i) for i in range(cfg.num_hidden_layers)} - {None}
        self.ropes = tuple(sorted(used))
        self.rope_switch = longrope_switch(cfg.rope) if GLOBAL_ROPE in used else None
        for table in self.ropes:
            rope = cfg.rope_config(table)
            if table != GLOBAL_ROPE or self.rope_switch is None:
                cos, sin = rope_tables(rope, cfg.head_dim, max_seq_len)
            else:  # LongRoPE keeps a short- and a long-factor table; _rope picks one per row
                short = rope_tables(rope, cfg.head_dim, max_seq_len)
                long = rope_tables(rope, cfg.head_dim, max_seq_len, seq_len=self.rope_switch + 1)
                cos, sin = torch.stack((short[0], long[0])), torch.stack((short[1], long[1]))
                # Slots a runner marked long (fermi.runners.longrope); host-set between steps.
                marks = torch.zeros(max_batch, dtype=torch.bool, device=self.device)
                self.register_buffer("rope_long", marks, persistent=False)
            prefix = ROPE_BUFFERS[table]
            self.register_buffer(f"{prefix}_cos", cos.to(self.device), persistent=False)
            self.register_buffer(f"{prefix}_sin", sin.to(self.device), persistent=False)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        kv_len: int,
        rows_are_slots: bool = False,
        last_only: bool = True,
        last_index: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """Run ``tokens`` [B, T] at ``positions`` [B, T] for cache ``slots`` [B].

        ``kv_len`` (a Python int, static per compiled graph) bounds the attended cache
        length: every position must be < kv_len. ``rows_are_slots`` says batch row i is
        slot i, which lets attention read the cache as a view. Returns float32 logits for
        the last position of each row [B, V], or for every position [B, T, V].
        ``last_index`` [B] (implies last_only) picks each row's last real token when the
        rows are padded to a fixed length. ``causal`` says every row's real tokens are
        positions 0..n-1 of its sequence, padding (if any) after them: attention then needs
        no mask and reads no cache (see :class:`StepContext`).
        """
        ctx = self.step_context(positions, slots, kv_len, rows_are_slots, last_index, causal=causal)
        return self.step(tokens, ctx, last_only, last_index)

    def step_context(
        self,
        positions: torch.Tensor,
        slots: torch.Tensor,
        kv_len: int,
        rows_are_slots: bool = False,
        last_index: torch.Tensor | None = None,
        causal_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> StepContext:
        """The per-step tensors of :meth:`forward`'s arguments, built once for all layers.
        ``causal_mask`` [B, 1, T, kv_len] (additive) replaces the one built from the
        positions (the Core ML graph takes it as an input)."""
        rope = self._rope(positions, slots, last_index)
        read_slots = None if rows_are_slots else slots
        if (
            self.native_rows
            and positions.shape[1] == 1
            and positions.shape[0] <= NATIVE_ROWS
            and not torch.compiler.is_compiling()
        ):
            # Every layer attends in fermi's kernels, from the cache's own positions: no mask.
            return StepContext(positions, rope, slots, read_slots, kv_len, {}, causal, True)
        masks = self.masks(positions, kv_len, causal_mask, causal)
        return StepContext(positions, rope, slots, read_slots, kv_len, masks, causal)

    def step(
        self,
        tokens: torch.Tensor,
        ctx: StepContext,
        last_only: bool = True,
        last_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of ``tokens`` [B, T] for the step ``ctx`` describes (see :meth:`forward`)."""
        cfg = self.cfg
        x = self._embed(tokens)
        if ctx.native:
            x = self._native_layers(x, ctx)
        else:
            for layer in self.model.layers:
                x = layer(x, ctx)
        if last_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last_index][:, None]
            last_only = True
        elif last_only:
            x = x[:, -1:]
        # One row (not one batch row of T positions): the final norm rides along.
        if self.row_kernels and x.shape[0] * x.shape[1] == 1:
            norm = self.model.norm
            head = _row(self.lm_head, x, self.row_pdl, norm_weight=norm.weight, eps=norm.eps)
            logits = head.float()
        else:
            logits = self.lm_head(self.model.norm(x)).float()
        if cfg.logits_scaling != 1.0:
            logits = logits / cfg.logits_scaling
        if cfg.final_logit_softcap is not None:
            cap = cfg.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits[:, -1] if last_only else logits

    def last_token_states(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """The final norm's output at the last token of each input, float32 [N, hidden]:
        what an embedding model pools (the input of ``lm_head``).

        The inputs run as one batch, right-padded: under the causal mask no real token sees
        the padding after it. Attention reads this forward's own keys (:class:`StepCache`,
        injected for the call), so no slot of the cache is written. Layers are called by
        their ``forward``: a runner's compiled layers (``Module.compile``) are not entered,
        so their compiled code and its guards stay as they were.
        """
        if self.rope_switch is not None:
            raise ValueError("a LongRoPE model's last-token states are not supported")
        lengths = [len(ids) for ids in token_ids]
        if not lengths or min(lengths) < 1:
            raise ValueError("every input needs at least one token")
        # At least two positions: a one-token forward may take the one-row products or a
        # decode attention kernel, which are written for the slot cache.
        width = max(2, *lengths)
        if width > self.max_seq_len:
            raise ValueError(f"an input of {width} tokens exceeds max_seq_len {self.max_seq_len}")
        device = self.device
        padded = [[*ids, *([0] * (width - len(ids)))] for ids in token_ids]
        tokens = torch.tensor(padded, dtype=torch.long, device=device)
        rows = torch.arange(len(padded), device=device)
        positions = torch.arange(width, device=device).expand(len(padded), width)
        kept = [layer.self_attn.cache for layer in self.model.layers]
        self.use_caches([StepCache() for _ in self.model.layers])
        try:
            ctx = self.step_context(positions, rows, width, rows_are_slots=True, causal=True)
            x = self._embed(tokens)
            for layer in self.model.layers:
                x = layer.forward(x, ctx)
        finally:
            self.use_caches(kept)
        last = torch.tensor(lengths, device=device) - 1
        return self.model.norm.forward(x[rows, last]).float()

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(tokens)
        if self.cfg.embedding_scale != 1.0:
            x = x * torch.tensor(self.cfg.embedding_scale, dtype=x.dtype)
        return x

    def masks(
        self,
        positions: torch.Tensor,
        kv_len: int,
        causal_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> dict[int | None, torch.Tensor]:
        """Additive masks [B, 1, G*T, kv_len] (0 or -inf, in the model's dtype), one per
        distinct layer window, built once per forward: key j is visible to a query at
        position p when j <= p (and inside the window). Rows are repeated for each of the
        G query heads that share a KV head (row g*T + t is query t), the layout of
        attention's folded query; the first T rows are the plain mask. A given
        ``causal_mask`` [B, 1, T, kv_len] stands for the j <= p part. A ``causal`` step
        (:class:`StepContext`) builds masks only for the layers that still need one
        (``Attention.needs_mask``): none at all for a model without windows or soft-caps."""
        cfg = self.cfg
        windows = set(self.windows)
        if causal and cfg.attn_logit_softcap is None:
            windows.discard(None)
        if not windows:
            return {}
        groups = cfg.num_attention_heads // cfg.num_key_value_heads
        dtype = self.dtype
        query_pos = positions.repeat(1, groups)[:, None, :, None]  # [B, 1, G*T, 1]
        key_pos = torch.arange(kv_len, device=positions.device)
        if causal_mask is None:
            future = key_pos > query_pos
            # (zeros_like: a shape read back from a tensor does not convert to Core ML)
            causal = torch.zeros_like(future, dtype=dtype).masked_fill(future, float("-inf"))
        else:
            causal = causal_mask.to(dtype).repeat(1, 1, groups, 1)
        masks = {}
        for window in windows:
            if window is None:
                masks[window] = causal
            else:
                masks[window] = causal.masked_fill(key_pos <= query_pos - window, float("-inf"))
        return masks

    def _rope(
        self, positions: torch.Tensor, slots: torch.Tensor, last_index: torch.Tensor | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin [B, T, rotary_dim] of each rope table the layers use, for ``positions``
        [B, T] of cache ``slots`` [B]; ``last_index`` [B] marks each row's last real token
        when rows are padded."""
        tables = {}
        for table in self.ropes:
            if table == GLOBAL_ROPE and self.rope_switch is not None:
                tables[table] = self._longrope(positions, slots, last_index)
            else:
                prefix = ROPE_BUFFERS[table]
                cos, sin = getattr(self, f"{prefix}_cos"), getattr(self, f"{prefix}_sin")
                tables[table] = cos[positions], sin[positions]
        return tables

    def _longrope(
        self, positions: torch.Tensor, slots: torch.Tensor, last_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # LongRoPE, as transformers' forward does it: a forward whose largest position
        # reaches the original training length uses the long factors for all its tokens;
        # so does a slot its runner marked long while re-encoding the slot's earlier tokens.
        # Chosen per row (a tensor select, no host sync): a sequence ignores its batch.
        if last_index is None:
            last = positions.amax(dim=-1, keepdim=True)
        else:  # padding sits at a spare position past the cache: it must not choose the table
            last = positions.gather(1, last_index.view(-1, 1))
        long = torch.logical_or(last >= self.rope_switch, self.rope_long[slots][:, None])
        variant = long.long().expand_as(positions)
        return self.rope_cos[variant, positions], self.rope_sin[variant, positions]
