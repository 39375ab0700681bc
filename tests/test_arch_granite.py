"""Granite on the shared decoder equals transformers' GraniteForCausalLM (fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from fermi.errors import ModelLoadError
from fermi.loading import load_folder
from fermi.models.granite import granite_config
from fermi.models.shapes import SHAPES
from tests.arch_parity import TOL, greedy_pair, load_pair, max_error_prefill_and_decode
from tests.tiny import write_checkpoint_for

GRANITE_BASE = {
    "architectures": ["GraniteForCausalLM"],
    "model_type": "granite",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,  # Granite 3.3 2B's GQA is 4:1
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    # Granite 3.3 2B's multipliers, except the attention scale: 1/64 suits its head_dim
    # 64; 0.1 here is neither that nor 1/sqrt(16), so it must really be read.
    "embedding_multiplier": 12.0,
    "attention_multiplier": 0.1,
    "residual_multiplier": 0.22,
    "logits_scaling": 8.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "pad_token_id": 0,
    "initializer_range": 0.1,
    "torch_dtype": "float32",
}

CONFIGS = {
    "granite": {},
    "untied_biases": {"tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True},
}


def write(tmp_path, name):
    return write_checkpoint_for(
        tmp_path / name, {**GRANITE_BASE, **CONFIGS[name]}, seed=len(name) + 5
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_64_decode_steps_match_transformers(tmp_path, name):
    model, ref = load_pair(write(tmp_path, name))
    assert max_error_prefill_and_decode(model, ref, prompt_len=40) < TOL


def test_greedy_64_tokens_identical_to_transformers_generate(tmp_path):
    # Untied: with the embeddings x 12 in the residual, a tied random head keeps picking
    # one token, which would prove little.
    model, ref = load_pair(write(tmp_path, "untied_biases"))
    ours, expected = greedy_pair(model, ref, prompt_len=12)
    assert ours == expected
    assert len(set(ours)) > 1


@pytest.mark.parametrize(
    "field",
    ["embedding_scale", "attention_multiplier", "residual_multiplier", "logits_scaling"],
)
def test_each_multiplier_changes_the_logits(tmp_path, field):
    # Guards the parity tests: the model without any one multiplier disagrees.
    from dataclasses import replace

    from fermi.models.decoder import Decoder

    model, ref = load_pair(write(tmp_path, "granite"))
    neutral = {"attention_multiplier": None}.get(field, 1.0)
    plain = Decoder(replace(model.cfg, **{field: neutral}))
    plain.load_state_dict(model.state_dict())
    plain.setup_cache(max_batch=2, max_seq_len=256)
    assert max_error_prefill_and_decode(plain, ref, prompt_len=20, steps=2) > 100 * TOL


def test_real_granite_config_reads_the_four_multipliers():
    cfg = granite_config(SHAPES["Granite-3.3-2b-instruct"])
    assert cfg.embedding_scale == 12.0 and cfg.attn_scale == 0.015625
    assert (cfg.residual_multiplier, cfg.logits_scaling) == (0.22, 8.0)
    assert cfg.head_dim == 64 and cfg.tie_word_embeddings


@pytest.mark.parametrize("key", ["attention_multiplier", "logits_scaling"])
@pytest.mark.parametrize("value", [0, -1.0, "big"])
def test_a_multiplier_that_is_not_positive_is_a_clear_load_error(tmp_path, key, value):
    folder = write(tmp_path, "granite")
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=key):
        load_folder(folder, torch.device("cpu"), torch.float32)
