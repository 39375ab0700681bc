"""Qwen2 (``Qwen2ForCausalLM``): Qwen2 / Qwen2.5 and DeepSeek-R1-Distill-Qwen.

Qwen3 without the q/k RMSNorm and with a bias on the q/k/v projections (none on the
output projection). Sliding-window attention is honoured exactly as transformers reads
it: only with ``use_sliding_window``, on the layers from ``max_window_layers`` on.
"""

from __future__ import annotations

from fermi.models.decoder import ModelConfig
from fermi.models.qwen3 import sliding_windows
from fermi.models.registry import Adapter, UnsupportedModelError, register, require
from fermi.models.rope import RopeConfig


def qwen2_config(cfg: dict) -> ModelConfig:
    heads = int(require(cfg, "num_attention_heads"))
    hidden = int(require(cfg, "hidden_size"))
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"config.json: Qwen2 with hidden_act={act!r} is not supported")
    if cfg.get("use_mrope"):
        raise UnsupportedModelError(
            "config.json: Qwen2 with use_mrope (multimodal rope, Qwen2-VL) is not supported"
        )
    return ModelConfig(
        architecture="Qwen2ForCausalLM",
        vocab_size=int(require(cfg, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(require(cfg, "intermediate_size")),
        num_hidden_layers=int(require(cfg, "num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=RopeConfig.from_hf(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=True,  # always on in Qwen2, whatever the config says
        sliding_windows=sliding_windows(cfg),
    )


ADAPTER = register(Adapter("Qwen2ForCausalLM", qwen2_config))
