"""Qwen2 (``Qwen2ForCausalLM``): Qwen2 / Qwen2.5 and DeepSeek-R1-Distill-Qwen.

Qwen3 without the q/k RMSNorm and with a bias on the q/k/v projections (none on the
output projection). Sliding-window attention is honoured exactly as transformers reads
it: only with ``use_sliding_window``, on the layers from ``max_window_layers`` on.
"""

from __future__ import annotations

from fermi.models.decoder import ModelConfig
from fermi.models.qwen3 import sliding_windows
from fermi.models.registry import Adapter, UnsupportedModelError, register, shape_fields


def qwen2_config(cfg: dict) -> ModelConfig:
    if cfg.get("use_mrope"):
        raise UnsupportedModelError(
            "config.json: Qwen2 with use_mrope (multimodal rope, Qwen2-VL) is not supported"
        )
    return ModelConfig(
        architecture="Qwen2ForCausalLM",
        **shape_fields(cfg, "Qwen2", max_positions=32768),
        attention_bias=True,  # always on in Qwen2, whatever the config says
        sliding_windows=sliding_windows(cfg),
    )


ADAPTER = register(Adapter("Qwen2ForCausalLM", qwen2_config))
