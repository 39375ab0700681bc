"""Phi-3 (``Phi3ForCausalLM``): Phi-3 / Phi-3.5-mini.

A Llama-shaped decoder whose checkpoints store the q/k/v projections (``qkv_proj``) and
the gate/up projections (``gate_up_proj``) fused, as the shared decoder holds them: they
load as they are. Long contexts use LongRoPE, whose
short and long factor tables the decoder switches between (``Decoder._rope``).
"""

from __future__ import annotations

from dataclasses import replace

from fermi.models.decoder import ModelConfig
from fermi.models.registry import (
    Adapter,
    UnsupportedModelError,
    bounded_size,
    factor_list,
    register,
    shape_fields,
    sliding_window,
)
from fermi.models.rope import RopeConfig

# transformers' Phi3Config defaults this when config.json does not say.
DEFAULT_ORIGINAL_CONTEXT = 4096


def phi3_rope(cfg: dict, head_dim: int) -> RopeConfig:
    rope = RopeConfig.from_hf(cfg)
    if rope.rope_type in ("su", "yarn"):
        # Early Phi-3 configs name LongRoPE "su" (or "yarn"); transformers reads both as it.
        rope = replace(rope, rope_type="longrope")
    if rope.rope_type == "default":
        return rope
    if rope.rope_type != "longrope":
        raise UnsupportedModelError(
            f"config.json: Phi-3 with rope type {rope.rope_type!r} is not supported "
            "(default or longrope)"
        )
    half = round(head_dim * rope.partial_rotary_factor) // 2
    for key in ("short_factor", "long_factor"):
        factor_list(rope.params.get(key), half, f"rope_scaling.{key}")
    # Phi-3 keeps the training length at the top level, and transformers lets it win
    # over any value inside rope_scaling.
    original = bounded_size(
        "original_max_position_embeddings",
        cfg.get("original_max_position_embeddings") or DEFAULT_ORIGINAL_CONTEXT,
        "config.json",
    )
    return replace(rope, params={**rope.params, "original_max_position_embeddings": original})


def phi3_config(cfg: dict) -> ModelConfig:
    fields = shape_fields(cfg, "Phi-3", max_positions=4096, eps=1e-5)
    window = sliding_window(cfg)
    return ModelConfig(
        architecture="Phi3ForCausalLM",
        **{**fields, "rope": phi3_rope(cfg, fields["head_dim"])},
        # transformers gives every Phi-3 layer the same window when one is set.
        sliding_windows=(window,) * fields["num_hidden_layers"] if window else (),
    )


ADAPTER = register(Adapter("Phi3ForCausalLM", phi3_config))
