"""Granite (``GraniteForCausalLM``): IBM Granite 3.x dense models.

Llama with four µP multipliers, each a :class:`ModelConfig` field of the shared decoder:
``embedding_multiplier`` scales the embeddings, ``attention_multiplier`` *is* the
attention scale (in place of 1/sqrt(head_dim)), ``residual_multiplier`` scales each
attention and feed-forward output before its residual add, and the logits are divided by
``logits_scaling``.
"""

from __future__ import annotations

from fermi.models.decoder import ModelConfig
from fermi.models.registry import Adapter, flag, positive_number, register, shape_fields


def granite_config(cfg: dict) -> ModelConfig:
    def multiplier(key: str) -> float:
        return positive_number(cfg.get(key, 1.0), key)

    bias = flag(cfg, "attention_bias")
    return ModelConfig(
        architecture="GraniteForCausalLM",
        **shape_fields(cfg, "Granite", max_positions=2048),
        attention_bias=bias,
        o_proj_bias=bias,
        mlp_bias=flag(cfg, "mlp_bias"),
        embedding_scale=multiplier("embedding_multiplier"),
        attention_multiplier=multiplier("attention_multiplier"),
        residual_multiplier=multiplier("residual_multiplier"),
        logits_scaling=multiplier("logits_scaling"),
    )


ADAPTER = register(Adapter("GraniteForCausalLM", granite_config))
