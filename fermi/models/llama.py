"""Llama (``LlamaForCausalLM``): SmolLM2, TinyLlama, Llama 3.x, DeepSeek-R1-Distill-Llama.

The plain member of the family: GQA, SwiGLU, no q/k norm; optional biases, tied or untied
embeddings, and Llama 3 rope scaling (handled by :mod:`fermi.models.rope`).
"""

from __future__ import annotations

from fermi.models.decoder import ModelConfig
from fermi.models.registry import Adapter, UnsupportedModelError, register, require
from fermi.models.rope import RopeConfig


def llama_config(cfg: dict) -> ModelConfig:
    heads = int(require(cfg, "num_attention_heads"))
    hidden = int(require(cfg, "hidden_size"))
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"config.json: Llama with hidden_act={act!r} is not supported")
    if int(cfg.get("pretraining_tp") or 1) != 1:
        # transformers itself ignores it for inference; say so rather than guess wrongly.
        raise UnsupportedModelError("config.json: Llama with pretraining_tp != 1 is not supported")
    # Llama's attention_bias covers q/k/v and the output projection alike.
    bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=int(require(cfg, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(require(cfg, "intermediate_size")),
        num_hidden_layers=int(require(cfg, "num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=RopeConfig.from_hf(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bias,
        o_proj_bias=bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
    )


ADAPTER = register(Adapter("LlamaForCausalLM", llama_config))
