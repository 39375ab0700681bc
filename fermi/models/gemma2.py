"""Gemma 2 (``Gemma2ForCausalLM``): Gemma-2 2B / 9B / 27B.

What sets it apart, each a :class:`ModelConfig` field the shared decoder implements:
embeddings scaled by sqrt(hidden_size), RMSNorm scaling by (1 + weight), "sandwich"
norms after attention and around the feed-forward, GeGLU with tanh GELU, soft-capped
attention and final logits, attention scaled by ``query_pre_attn_scalar`` instead of the
head size, and sliding-window layers alternating with global ones.
"""

from __future__ import annotations

from fermi.models.decoder import ModelConfig
from fermi.models.registry import (
    Adapter,
    UnsupportedModelError,
    flag,
    layer_types,
    register,
    shape_fields,
    sliding_window,
)

GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


def gemma2_windows(cfg: dict, layers: int) -> tuple[int | None, ...]:
    """The window of each layer: ``layer_types`` when given, else layers 0, 2, 4, ...
    slide and the odd ones attend globally (transformers' default)."""
    window = sliding_window(cfg, 4096)
    if not window:
        return ()
    types = layer_types(cfg, layers) or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
    ]
    return tuple(window if t == "sliding_attention" else None for t in types)


def gemma2_config(cfg: dict) -> ModelConfig:
    # Gemma 2 reads hidden_activation; hidden_act is a leftover of Gemma 1 configs.
    fields = shape_fields(
        cfg,
        "Gemma 2",
        max_positions=8192,
        tied=True,
        head_dim=256,
        act_key="hidden_activation",
        acts=GELU_TANH,
    )
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError(
            "config.json: Gemma 2 with use_bidirectional_attention (an encoder) is not supported"
        )
    bias = flag(cfg, "attention_bias")
    return ModelConfig(
        architecture="Gemma2ForCausalLM",
        **{**fields, "hidden_act": "gelu_pytorch_tanh"},
        attention_bias=bias,
        o_proj_bias=bias,
        sliding_windows=gemma2_windows(cfg, fields["num_hidden_layers"]),
        embedding_scale=fields["hidden_size"] ** 0.5,
        norm_unit_offset=True,
        sandwich_norms=True,
        attn_logit_softcap=_optional_float(cfg.get("attn_logit_softcapping", 50.0)),
        final_logit_softcap=_optional_float(cfg.get("final_logit_softcapping", 30.0)),
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
    )


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


ADAPTER = register(Adapter("Gemma2ForCausalLM", gemma2_config))
