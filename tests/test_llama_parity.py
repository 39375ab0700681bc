"""The decoder equals transformers' LlamaForCausalLM on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch

from fermi.loading import load_folder
from tests.arch_parity import TOL, greedy_pair, load_pair, max_error_prefill_and_decode
from tests.tiny import LLAMA3_ROPE, write_checkpoint

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 10000.0}

CONFIGS = {
    "tied": {},
    "untied": {"tie_word_embeddings": False},
    # one KV head for four query heads, and head_dim 24 != hidden 64 / heads 4
    "gqa_odd_head_dim": {"num_key_value_heads": 1, "head_dim": 24},
    "no_gqa": {"num_key_value_heads": 4},
    "biases": {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False},
    "llama3_rope": LLAMA3_ROPE,
}


def load(tmp_path, name):
    folder = write_checkpoint(tmp_path / name, {**LLAMA, **CONFIGS[name]}, seed=len(name))
    model, ref = load_pair(folder)
    assert model.cfg.architecture == "LlamaForCausalLM"
    assert type(ref).__name__ == "LlamaForCausalLM"
    return model, ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_llama_prefill_and_cached_decode_logits_match_transformers(tmp_path, name):
    model, ref = load(tmp_path, name)
    assert max_error_prefill_and_decode(model, ref, prompt_len=37, steps=48) < TOL


@pytest.mark.parametrize("name", ["tied", "llama3_rope"])
def test_llama_greedy_64_tokens_identical_to_transformers_generate(tmp_path, name):
    model, ref = load(tmp_path, name)
    tokens, expected = greedy_pair(model, ref, prompt_len=12)
    assert tokens == expected


def test_llama_tied_embeddings_share_one_tensor(tmp_path):
    model, _ = load(tmp_path, "tied")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_llama_with_unsupported_activation_is_a_clear_error(tmp_path):
    from fermi.errors import ModelLoadError

    folder = write_checkpoint(tmp_path / "gelu", {**LLAMA, "hidden_act": "relu2"})
    with pytest.raises(ModelLoadError, match="hidden_act='relu2'"):
        load_folder(folder, torch.device("cpu"), torch.float32)


# Llama 3.2 1B / 3B: tied embeddings, llama3 rope (factor 32, original context 8192 -> 32
# here), GQA 4:1 with head_dim 64 (16 here, hidden 128 / 8 heads).
LLAMA_3_2 = {
    **LLAMA,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
}


def test_llama_3_2_shape_logits_and_64_greedy_tokens_match_transformers(tmp_path):
    model, ref = load_pair(write_checkpoint(tmp_path / "llama32", LLAMA_3_2, seed=32))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # 40 + 64 positions: far past the original context of 32.
    assert max_error_prefill_and_decode(model, ref, prompt_len=40, steps=64) < TOL
    tokens, expected = greedy_pair(model, ref, prompt_len=12)
    assert tokens == expected and len(set(tokens)) > 1
