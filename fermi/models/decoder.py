"""One decoder-only transformer with a static KV cache, shared by every architecture.

Module and parameter names follow the Hugging Face checkpoints (``model.layers.N.self_attn.
q_proj``...), so most checkpoints load without renaming. Architecture adapters
(``fermi.models.<arch>``) only translate ``config.json`` into :class:`ModelConfig` and fix
naming quirks of their checkpoints.

``forward`` has no Python control flow on tensor values and no host syncs: the same code
runs eagerly on CPU, compiles with ``fullgraph=True``, captures in CUDA graphs and exports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fermi.models.attention import decode_attention
from fermi.models.gemv import ACT_SILU_MUL, row_linear
from fermi.models.rope import RopeConfig, longrope_switch, rope_tables, rotate


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

    @property
    def attn_scale(self) -> float:
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return 1.0 / math.sqrt(base)

    def window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None


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


class KVCache(nn.Module):
    """Two buffers [max_batch, kv_heads, max_seq_len, head_dim]; row ``s`` is cache slot ``s``."""

    def __init__(
        self, max_batch: int, kv_heads: int, max_seq_len: int, head_dim: int, dtype, device
    ) -> None:
        super().__init__()
        shape = (max_batch, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # Zeroed counters for the split decode kernel (fermi.models.split_decode).
        counters = torch.zeros(max_batch * kv_heads, dtype=torch.int32, device=device)
        self.register_buffer("counters", counters, persistent=False)

    def write(
        self, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Write k/v [B, H, T, D] in place at (slots[b], :, positions[b, t])."""
        if torch.compiler.is_compiling():
            # Compiled, an in-place write through a transposed view of the buffer becomes a
            # copy of the whole cache (functionalization writes the view back): index the
            # buffer itself, which Inductor fuses into one small scatter with the rope.
            index = slots[:, None].expand_as(positions)
            self.k[index, :, positions] = k.transpose(1, 2)
            self.v[index, :, positions] = v.transpose(1, 2)
            return
        # Eager, on the [B, S, H, D] view of the cache, (slots[b], positions[b, t]) picks the
        # [H, D] entry of each token: one index_put_ per buffer, no index expansion.
        index = (slots[:, None], positions)
        self.k.transpose(1, 2).index_put_(index, k.transpose(1, 2))
        self.v.transpose(1, 2).index_put_(index, v.transpose(1, 2))

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions into slot ``dst``."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]

    def read(self, slots: torch.Tensor | None, batch: int, kv_len: int):
        """The first ``kv_len`` positions of the given slots (a view when ``slots`` is None,
        meaning rows 0..batch-1 are slots 0..batch-1)."""
        if slots is None:
            return self.k[:batch, :, :kv_len], self.v[:batch, :, :kv_len]
        return self.k[slots, :, :kv_len], self.v[slots, :, :kv_len]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        h, d, kv = cfg.num_attention_heads, cfg.head_dim, cfg.num_key_value_heads
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.o_proj_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.cache: KVCache | None = None
        # The layer's sliding window; setup_cache drops one that cannot bind in the cache.
        self.window: int | None = cfg.window(layer)
        # Kernel for one-token steps: "sdpa", or "flex"/"math" (see fermi.models.attention),
        # which only pay off compiled on CUDA.
        self.decode_kernel = "sdpa"
        # After fuse_projections(): one qkv_proj instead of q_proj, k_proj and v_proj.
        self.fused = False

    def fuse_projections(self) -> None:
        """Replace q/k/v_proj by one ``qkv_proj`` (rows q, then k, then v)."""
        if not self.fused:
            self.qkv_proj = concat_linears([self.q_proj, self.k_proj, self.v_proj])
            del self.q_proj, self.k_proj, self.v_proj
            self.fused = True

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        read_slots: torch.Tensor | None,
        kv_len: int,
        masks: dict[int | None, torch.Tensor],
    ) -> torch.Tensor:
        if self.fused:
            qkv = self.qkv_proj(x)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        qkv = _as_dtype(qkv, x.dtype)
        out = self.attend(qkv, cos, sin, positions, slots, read_slots, kv_len, masks)
        return self.o_proj(out)

    def attend(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        read_slots: torch.Tensor | None,
        kv_len: int,
        masks: dict[int | None, torch.Tensor],
    ) -> torch.Tensor:
        """Attention from the projected ``qkv`` [B, T, (H + 2 Hkv) * D] (q, then k, then v)
        to the input of ``o_proj`` [B, T, H * D]; writes this step's keys and values."""
        cfg = self.cfg
        b, t = qkv.shape[:2]
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # Heads stay on dim 2 ([B, T, heads, D], the projections' layout) until attention.
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        qkv = qkv.view(b, t, h + kv + kv, d)
        q, k, v = qkv.split([h, kv, kv], dim=2)
        if cfg.qk_norm:
            q, k = rotate(self.q_norm(q), cos, sin), rotate(self.k_norm(k), cos, sin)
        else:  # q and k sit side by side: one rotation for both
            q, k = rotate(qkv[:, :, : h + kv], cos, sin).split([h, kv], dim=2)
        q = q.transpose(1, 2)

        assert self.cache is not None, "call Decoder.setup_cache() before forward()"
        self.cache.write(slots, positions, k.transpose(1, 2), v.transpose(1, 2))
        keys, values = self.cache.read(read_slots, b, kv_len)

        if t == 1 and self.decode_kernel != "sdpa":
            out = decode_attention(
                self.decode_kernel,
                q,
                keys,
                values,
                positions,
                self.window,
                cfg.attn_scale,
                cfg.attn_logit_softcap,
                self.cache.counters,
            )
        else:
            out = self._attend(q, keys, values, masks[self.window])
        return out.transpose(1, 2).reshape(b, t, h * d)

    def _attend(self, q, keys, values, mask) -> torch.Tensor:
        """q [B, H, T, D] over keys/values [B, Hkv, L, D]; ``mask`` is the additive mask
        [B, 1, G*T, L] of :meth:`Decoder._masks` (its first T rows are the plain mask)."""
        cfg = self.cfg
        b, h, t, d = q.shape
        kv_heads = keys.shape[1]
        groups = h // kv_heads
        if cfg.attn_logit_softcap is None:
            # Fold each KV head's group of query heads into the query length: the same
            # attention as repeating K/V for every query head, without copying the cache.
            q = q.reshape(b, kv_heads, groups * t, d)
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=cfg.attn_scale
            )
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
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = _activation(cfg.hidden_act)
        # After fuse_projections(): one gate_up_proj instead of gate_proj and up_proj.
        self.fused = False

    def fuse_projections(self) -> None:
        """Replace gate_proj and up_proj by one ``gate_up_proj`` (gate rows first)."""
        if not self.fused:
            self.gate_up_proj = concat_linears([self.gate_proj, self.up_proj])
            del self.gate_proj, self.up_proj
            self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


def _as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``: a projection may answer in its weights' dtype (fp16 storage on
    CPU); the rope and the KV cache work in the model's."""
    return x if x.dtype == dtype else x.to(dtype)


def concat_linears(parts: list[nn.Module]) -> nn.Module:
    """One linear layer whose output is the outputs of ``parts`` (same input) side by side.

    Handles ``nn.Linear`` and the CPU fp16-storage ``HalfWeightLinear``; the new weight is
    one concatenated tensor on the parts' device and dtype (no random initialisation).
    """
    from fermi.models.half_weights import HalfWeightLinear

    first = parts[0]
    if all(type(p) is HalfWeightLinear for p in parts):
        return HalfWeightLinear.concat(parts)
    if not all(type(p) is nn.Linear for p in parts):
        names = sorted({type(p).__name__ for p in parts})
        raise TypeError(f"cannot fuse projections of type {', '.join(names)}")
    has_bias = first.bias is not None
    if any((p.bias is not None) != has_bias for p in parts):
        raise ValueError("cannot fuse projections where only some have a bias")
    weight = torch.cat([p.weight.detach() for p in parts])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=first.weight.requires_grad)
    if has_bias:
        bias = torch.cat([p.bias.detach() for p in parts])
        fused.bias = nn.Parameter(bias, requires_grad=first.bias.requires_grad)
    return fused


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
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.row_kernels = False  # see Decoder.use_row_kernels

    def forward(
        self, x, cos, sin, positions, slots, read_slots, kv_len: int, masks
    ) -> torch.Tensor:
        if self.row_kernels and x.shape[0] * x.shape[1] == 1:
            return self._one_row(x, cos, sin, positions, slots, read_slots, kv_len, masks)
        h = self.self_attn(
            self.input_layernorm(x), cos, sin, positions, slots, read_slots, kv_len, masks
        )
        if not self.sandwich:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)

    def _one_row(self, x, cos, sin, positions, slots, read_slots, kv_len: int, masks):
        """The same layer for a single token, in four fused products: the norms, the
        residual adds and silu(gate) * up ride inside them (``fermi.models.gemv``)."""
        attn, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        qkv_proj, o_proj = attn.qkv_proj, attn.o_proj
        gate_up, down = mlp.gate_up_proj, mlp.down_proj
        qkv = row_linear(x, qkv_proj.weight, qkv_proj.bias, norm_weight=norm1.weight, eps=norm1.eps)
        h = attn.attend(qkv, cos, sin, positions, slots, read_slots, kv_len, masks)
        x = row_linear(h, o_proj.weight, o_proj.bias, residual=x)
        gu = row_linear(x, gate_up.weight, gate_up.bias, norm_weight=norm2.weight, eps=norm2.eps)
        return row_linear(gu, down.weight, down.bias, act=ACT_SILU_MUL, residual=x)


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
        self.rope_switch: int | None = None  # LongRoPE: first position of the long factors
        # Each layer's attention window (None = global); setup_cache drops unbinding ones.
        self.windows: tuple[int | None, ...] = tuple(
            cfg.window(i) for i in range(cfg.num_hidden_layers)
        )

    def fuse_projections(self) -> Decoder:
        """Fuse each layer's q/k/v projections into one ``qkv_proj`` and gate/up into one
        ``gate_up_proj``: two fewer products per layer, the same outputs. Call after the
        weights are loaded (checkpoints name the separate projections); works on any
        device, for ``nn.Linear`` and fp16-storage layers alike. Returns the model."""
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()
        return self

    def use_row_kernels(self) -> bool:
        """Run one-token forwards (batch-1 decode, and the last token's lm_head) through
        the fused row products of ``fermi.models.gemv``, where the architecture fits them:
        pre-norm layers with plain RMSNorm and SiLU, fused projections, ``nn.Linear``
        weights. Returns whether it did. On CPU the products are their torch reference."""
        cfg = self.cfg
        if cfg.sandwich_norms or cfg.norm_unit_offset or cfg.hidden_act != "silu":
            return False
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if not (attn.fused and mlp.fused):
                return False
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if any(type(m) is not nn.Linear for m in (*linears, self.lm_head)):
                return False
        for layer in self.model.layers:
            layer.row_kernels = True
        self.row_kernels = True
        return True

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Move a sequence's cache (its first ``length`` positions) and its per-slot rope
        mark from slot ``src`` to slot ``dst``; ``src`` then holds nothing that is read."""
        for layer in self.model.layers:
            layer.self_attn.cache.move(src, dst, length)
        marks = getattr(self, "rope_long", None)
        if marks is not None:
            marks[dst] = marks[src]

    def setup_cache(
        self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None
    ) -> None:
        """Allocate the KV cache and the rope tables on the model's device."""
        weight = self.model.embed_tokens.weight
        dtype = dtype or weight.dtype
        cfg = self.cfg
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.cache = KVCache(
                max_batch, cfg.num_key_value_heads, max_seq_len, cfg.head_dim, dtype, weight.device
            )
            # A window as long as the cache masks nothing: skip the extra mask (Phi-3.5's
            # 262144, or Gemma 2's 4096 with a 4096-token cache).
            window = cfg.window(i)
            layer.self_attn.window = window if window is not None and window < max_seq_len else None
        self.windows = tuple(layer.self_attn.window for layer in self.model.layers)
        self.rope_switch = longrope_switch(cfg.rope)
        if self.rope_switch is None:
            cos, sin = rope_tables(cfg.rope, cfg.head_dim, max_seq_len)
        else:  # LongRoPE keeps a short- and a long-factor table; _rope picks one per row
            short = rope_tables(cfg.rope, cfg.head_dim, max_seq_len)
            long = rope_tables(cfg.rope, cfg.head_dim, max_seq_len, seq_len=self.rope_switch + 1)
            cos, sin = torch.stack((short[0], long[0])), torch.stack((short[1], long[1]))
            # Slots a runner marked long (fermi.runners.longrope); host-set between steps.
            marks = torch.zeros(max_batch, dtype=torch.bool, device=weight.device)
            self.register_buffer("rope_long", marks, persistent=False)
        self.register_buffer("rope_cos", cos.to(weight.device), persistent=False)
        self.register_buffer("rope_sin", sin.to(weight.device), persistent=False)
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
    ) -> torch.Tensor:
        """Run ``tokens`` [B, T] at ``positions`` [B, T] for cache ``slots`` [B].

        ``kv_len`` (a Python int, static per compiled graph) bounds the attended cache
        length: every position must be < kv_len. ``rows_are_slots`` says batch row i is
        slot i, which lets attention read the cache as a view. Returns float32 logits for
        the last position of each row [B, V], or for every position [B, T, V].
        ``last_index`` [B] (implies last_only) picks each row's last real token when the
        rows are padded to a fixed length.
        """
        cfg = self.cfg
        x = self.model.embed_tokens(tokens)
        if cfg.embedding_scale != 1.0:
            x = x * torch.tensor(cfg.embedding_scale, dtype=x.dtype)
        cos, sin = self._rope(positions, slots, last_index)
        read_slots = None if rows_are_slots else slots
        masks = self._masks(positions, kv_len)
        for layer in self.model.layers:
            x = layer(x, cos, sin, positions, slots, read_slots, kv_len, masks)
        if last_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last_index][:, None]
            last_only = True
        elif last_only:
            x = x[:, -1:]
        # One row (not one batch row of T positions): the final norm rides along.
        if self.row_kernels and x.shape[0] * x.shape[1] == 1:
            norm = self.model.norm
            logits = row_linear(x, self.lm_head.weight, norm_weight=norm.weight, eps=norm.eps)
            logits = logits.float()
        else:
            logits = self.lm_head(self.model.norm(x)).float()
        if cfg.final_logit_softcap is not None:
            cap = cfg.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits[:, -1] if last_only else logits

    def _masks(self, positions: torch.Tensor, kv_len: int) -> dict[int | None, torch.Tensor]:
        """Additive masks [B, 1, G*T, kv_len] (0 or -inf, in the model's dtype), one per
        distinct layer window, built once per forward: key j is visible to a query at
        position p when j <= p (and inside the window). Rows are repeated for each of the
        G query heads that share a KV head (row g*T + t is query t), the layout of
        attention's folded query; the first T rows are the plain mask."""
        cfg = self.cfg
        groups = cfg.num_attention_heads // cfg.num_key_value_heads
        dtype = self.model.embed_tokens.weight.dtype
        query_pos = positions.repeat(1, groups)[:, None, :, None]  # [B, 1, G*T, 1]
        key_pos = torch.arange(kv_len, device=positions.device)
        causal = key_pos <= query_pos
        masks = {}
        for window in set(self.windows):
            visible = causal if window is None else causal & (key_pos > query_pos - window)
            zeros = torch.zeros(visible.shape, dtype=dtype, device=positions.device)
            masks[window] = zeros.masked_fill(~visible, float("-inf"))
        return masks

    def _rope(
        self, positions: torch.Tensor, slots: torch.Tensor, last_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, T, rotary_dim] for ``positions`` [B, T] of cache ``slots`` [B];
        ``last_index`` [B] marks each row's last real token when rows are padded."""
        if self.rope_switch is None:
            return self.rope_cos[positions], self.rope_sin[positions]
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
