"""SmolLM3 on the shared decoder equals transformers' SmolLM3ForCausalLM (fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from fermi.errors import ModelLoadError
from fermi.loading import load_folder
from fermi.models.decoder import GLOBAL_ROPE
from fermi.models.shapes import SHAPES
from fermi.models.smollm3 import smollm3_config
from tests.arch_parity import TOL, greedy_pair, load_pair, max_error_prefill_and_decode
from tests.tiny import write_checkpoint_for

SMOLLM3_BASE = {
    "architectures": ["SmolLM3ForCausalLM"],
    "model_type": "smollm3",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,  # SmolLM3-3B's GQA is 4:1
    "rms_norm_eps": 1e-6,
    "rope_theta": 5000000.0,
    "max_position_embeddings": 512,
    "no_rope_layer_interval": 4,  # layer 3 skips rope, as every 4th of SmolLM3-3B's 36
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "pad_token_id": 0,
    "bos_token_id": None,
    "initializer_range": 0.1,
    "torch_dtype": "float32",
}

CONFIGS = {
    "smollm3": {},
    # Two NoPE layers of four, named explicitly; rope base small enough to matter.
    "explicit_flags": {"no_rope_layers": [1, 0, 1, 0], "rope_theta": 1000.0},
    # A window on the NoPE layers (transformers' default layer_types with a window).
    "sliding": {"no_rope_layers": [1, 0, 1, 0], "use_sliding_window": True, "sliding_window": 8},
    "untied_biases": {"tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True},
}


def write(tmp_path, name):
    return write_checkpoint_for(
        tmp_path / name, {**SMOLLM3_BASE, **CONFIGS[name]}, seed=len(name) + 11
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_64_decode_steps_match_transformers(tmp_path, name):
    model, ref = load_pair(write(tmp_path, name))
    assert max_error_prefill_and_decode(model, ref, prompt_len=40) < TOL


def test_greedy_64_tokens_identical_to_transformers_generate(tmp_path):
    model, ref = load_pair(write(tmp_path, "explicit_flags"))
    ours, expected = greedy_pair(model, ref, prompt_len=12)
    assert ours == expected
    assert len(set(ours)) > 1


def test_nope_layers_have_no_rope_and_carry_the_window(tmp_path):
    model, _ = load_pair(write(tmp_path, "sliding"))
    layers = [layer.self_attn for layer in model.model.layers]
    assert [a.rope for a in layers] == [GLOBAL_ROPE, None] * 2
    assert [a.window for a in layers] == [None, 8] * 2


def test_rotating_a_nope_layer_changes_the_logits(tmp_path):
    # Guards the parity tests: a NoPE layer given rope would disagree.
    model, ref = load_pair(write(tmp_path, "explicit_flags"))
    model.model.layers[1].self_attn.rope = GLOBAL_ROPE
    assert max_error_prefill_and_decode(model, ref, prompt_len=40, steps=2) > 100 * TOL


def test_real_smollm3_config_skips_rope_on_every_fourth_layer():
    cfg = smollm3_config(SHAPES["SmolLM3-3B"])
    assert cfg.layer_ropes == (GLOBAL_ROPE, GLOBAL_ROPE, GLOBAL_ROPE, None) * 9
    assert cfg.sliding_windows == ()
    assert cfg.rope.theta == 5_000_000.0 and cfg.tie_word_embeddings
    # The interval alone says the same.
    without = {k: v for k, v in SHAPES["SmolLM3-3B"].items() if k != "no_rope_layers"}
    assert smollm3_config(without).layer_ropes == cfg.layer_ropes


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("no_rope_layers", [1, 1, 1], "3 entries for 4 layers"),
        ("no_rope_layers", [1, 2, 1, 0], "0/1 flags"),
        ("no_rope_layer_interval", 0, "positive integer"),
    ],
)
def test_bad_nope_settings_are_clear_load_errors(tmp_path, key, value, message):
    folder = write(tmp_path, "smollm3")
    config = json.loads((folder / "config.json").read_text())
    config.pop("no_rope_layers", None)
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        load_folder(folder, torch.device("cpu"), torch.float32)
