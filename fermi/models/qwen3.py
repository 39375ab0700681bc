"""Qwen3 (``Qwen3ForCausalLM``): GQA, q/k RMSNorm, SwiGLU, optional tied embeddings."""

from __future__ import annotations

from fermi.models.decoder import ModelConfig
from fermi.models.registry import (
    Adapter,
    UnsupportedModelError,
    bounded_size,
    flag,
    layer_types,
    register,
    shape_fields,
    sliding_window,
)


def sliding_windows(cfg: dict) -> tuple[int | None, ...]:
    """Per-layer attention windows from ``layer_types`` / ``use_sliding_window``.

    As transformers reads Qwen2/Qwen3 configs: without ``use_sliding_window`` there is no
    window at all, even where ``layer_types`` names sliding layers.
    """
    layers = bounded_size("num_hidden_layers", cfg.get("num_hidden_layers"), "config.json")
    window = sliding_window(cfg) if cfg.get("use_sliding_window") else None
    if not window:
        return ()
    types = layer_types(cfg, layers)
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    start = cfg.get("max_window_layers", 28)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise UnsupportedModelError(
            f"config.json: max_window_layers must be a non-negative integer, not {start!r}"
        )
    return tuple(window if i >= start else None for i in range(layers))


def qwen3_config(cfg: dict) -> ModelConfig:
    bias = flag(cfg, "attention_bias")
    return ModelConfig(
        architecture="Qwen3ForCausalLM",
        **shape_fields(cfg, "Qwen3", max_positions=40960),
        attention_bias=bias,
        o_proj_bias=bias,
        qk_norm=True,
        sliding_windows=sliding_windows(cfg),
    )


ADAPTER = register(Adapter("Qwen3ForCausalLM", qwen3_config))
