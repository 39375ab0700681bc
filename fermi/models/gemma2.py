"""Gemma 2 (``Gemma2ForCausalLM``): Gemma-2 2B / 9B / 27B.

What sets it apart, each a :class:`ModelConfig` field the shared decoder implements:
embeddings scaled by sqrt(hidden_size), RMSNorm scaling by (1 + weight), "sandwich"
norms after attention and around the feed-forward, GeGLU with tanh GELU, soft-capped
attention and final logits, attention scaled by ``query_pre_attn_scalar`` instead of the
head size, and sliding-window layers alternating with global ones.
"""

from __future__ import annotations

from fermi.models.decoder import ModelConfig
from fermi.models.registry import Adapter, UnsupportedModelError, register, require
from fermi.models.rope import RopeConfig

GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


def gemma2_windows(cfg: dict, layers: int) -> tuple[int | None, ...]:
    """The window of each layer: ``layer_types`` when given, else layers 0, 2, 4, ...
    slide and the odd ones attend globally (transformers' default)."""
    window = cfg.get("sliding_window", 4096)
    if not window:
        return ()
    types = cfg.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
    ]
    if len(types) != layers:
        raise UnsupportedModelError(
            f"config.json: layer_types has {len(types)} entries for {layers} layers"
        )
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


def gemma2_config(cfg: dict) -> ModelConfig:
    heads = int(require(cfg, "num_attention_heads"))
    hidden = int(require(cfg, "hidden_size"))
    layers = int(require(cfg, "num_hidden_layers"))
    # Gemma 2 reads hidden_activation; hidden_act is a leftover of Gemma 1 configs.
    act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in GELU_TANH:
        raise UnsupportedModelError(
            f"config.json: Gemma 2 with hidden_activation={act!r} is not supported"
        )
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError(
            "config.json: Gemma 2 with use_bidirectional_attention (an encoder) is not supported"
        )
    bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(
        architecture="Gemma2ForCausalLM",
        vocab_size=int(require(cfg, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(require(cfg, "intermediate_size")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or 256),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=RopeConfig.from_hf(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        hidden_act="gelu_pytorch_tanh",
        attention_bias=bias,
        o_proj_bias=bias,
        sliding_windows=gemma2_windows(cfg, layers),
        embedding_scale=hidden**0.5,
        norm_unit_offset=True,
        sandwich_norms=True,
        attn_logit_softcap=_optional_float(cfg.get("attn_logit_softcapping", 50.0)),
        final_logit_softcap=_optional_float(cfg.get("final_logit_softcapping", 30.0)),
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
    )


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


ADAPTER = register(Adapter("Gemma2ForCausalLM", gemma2_config))
