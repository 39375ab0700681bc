"""Llama (``LlamaForCausalLM``): SmolLM2, TinyLlama, Llama 3.x, DeepSeek-R1-Distill-Llama.

The plain member of the family: GQA, SwiGLU, no q/k norm; optional biases, tied or untied
embeddings, and Llama 3 rope scaling (handled by :mod:`fermi.models.rope`).
"""

from __future__ import annotations

from fermi.models.decoder import ModelConfig
from fermi.models.registry import (
    Adapter,
    UnsupportedModelError,
    bounded_size,
    flag,
    register,
    shape_fields,
)


def llama_config(cfg: dict) -> ModelConfig:
    if bounded_size("pretraining_tp", cfg.get("pretraining_tp") or 1, "config.json") != 1:
        # transformers itself ignores it for inference; say so rather than guess wrongly.
        raise UnsupportedModelError("config.json: Llama with pretraining_tp != 1 is not supported")
    # Llama's attention_bias covers q/k/v and the output projection alike.
    bias = flag(cfg, "attention_bias")
    return ModelConfig(
        architecture="LlamaForCausalLM",
        **shape_fields(cfg, "Llama", max_positions=2048),
        attention_bias=bias,
        o_proj_bias=bias,
        mlp_bias=flag(cfg, "mlp_bias"),
    )


ADAPTER = register(Adapter("LlamaForCausalLM", llama_config))
