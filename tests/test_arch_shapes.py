"""The published configs in fermi.models.shapes load through their adapters and give the
models' published sizes."""

from __future__ import annotations

import pytest
import torch

from fermi.models.decoder import Decoder
from fermi.models.registry import adapter_for
from fermi.models.shapes import SHAPES, config

# Parameter counts (billions) as published / as in /work/shared/GPU.md for Qwen3.
PARAMS_B = {
    "Qwen3-0.6B": 0.60,
    "Qwen3-1.7B": 1.72,
    "Qwen3-4B": 4.02,
    "Qwen3-8B": 8.19,
    "DeepSeek-R1-Distill-Qwen-1.5B": 1.78,
    "Phi-3.5-mini-instruct": 3.82,
    "Gemma-2-2b-it": 2.61,
    "Gemma-3-1b-it": 1.00,
    "SmolLM3-3B": 3.08,
    "Phi-4-mini-instruct": 3.84,
    "Granite-3.3-2b-instruct": 2.53,
    "Llama-3.2-1B-Instruct": 1.24,
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_shape_builds_a_decoder_of_the_published_size(name):
    hf = config(name)
    cfg = adapter_for(hf).to_config(hf)
    assert cfg.architecture == hf["architectures"][0]
    with torch.device("meta"):
        model = Decoder(cfg)
    params = sum(p.numel() for p in model.parameters()) / 1e9  # tied weights count once
    assert params == pytest.approx(PARAMS_B[name], abs=0.01)


def test_config_returns_a_copy_and_names_unknown_shapes():
    copy = config("Phi-3.5-mini-instruct")
    copy["rope_scaling"]["long_factor"].clear()
    assert len(SHAPES["Phi-3.5-mini-instruct"]["rope_scaling"]["long_factor"]) == 48
    with pytest.raises(KeyError, match=r"known: Qwen3-0\.6B"):
        config("Llama-9000")
