"""Qwen3 (``Qwen3ForCausalLM``): GQA, q/k RMSNorm, SwiGLU, optional tied embeddings."""

from __future__ import annotations

from fermi.models.decoder import ModelConfig
from fermi.models.registry import Adapter, UnsupportedModelError, register, require
from fermi.models.rope import RopeConfig


def sliding_windows(cfg: dict) -> tuple[int | None, ...]:
    """Per-layer attention windows from ``layer_types`` / ``use_sliding_window``.

    As transformers reads Qwen2/Qwen3 configs: without ``use_sliding_window`` there is no
    window at all, even where ``layer_types`` names sliding layers.
    """
    layers = int(cfg["num_hidden_layers"])
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    if not window:
        return ()
    types = cfg.get("layer_types")
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    start = int(cfg.get("max_window_layers", 28))
    return tuple(window if i >= start else None for i in range(layers))


def qwen3_config(cfg: dict) -> ModelConfig:
    heads = int(require(cfg, "num_attention_heads"))
    hidden = int(require(cfg, "hidden_size"))
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"config.json: Qwen3 with hidden_act={act!r} is not supported")
    return ModelConfig(
        architecture="Qwen3ForCausalLM",
        vocab_size=int(require(cfg, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(require(cfg, "intermediate_size")),
        num_hidden_layers=int(require(cfg, "num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=RopeConfig.from_hf(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 40960)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        o_proj_bias=bool(cfg.get("attention_bias", False)),
        qk_norm=True,
        sliding_windows=sliding_windows(cfg),
    )


ADAPTER = register(Adapter("Qwen3ForCausalLM", qwen3_config))
