"""Qwen2 / DeepSeek-R1-Distill-Qwen on the shared decoder equals transformers (fp32)."""

from __future__ import annotations

import pytest

from fermi.errors import ModelLoadError
from fermi.loading import load_folder
from tests.arch_parity import TOL, greedy_pair, load_pair, max_error_prefill_and_decode
from tests.arch_templates import R1
from tests.tiny import write_checkpoint_for

QWEN2_BASE = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 21,
    "initializer_range": 0.1,
    "torch_dtype": "float32",
}

CONFIGS = {
    "r1_distill": {},
    "tied": {"tie_word_embeddings": True},
    # Layer 1 slides over 8 tokens; the 40-token prompt is far longer.
    "sliding": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    # A window set but not switched on is ignored, as transformers does.
    "window_off": {"sliding_window": 8, "max_window_layers": 0},
}


def write(tmp_path, name, **extra):
    config = {**QWEN2_BASE, **CONFIGS.get(name, {}), **extra}
    return write_checkpoint_for(
        tmp_path / name,
        config,
        seed=len(name),
        added_tokens=R1.added_tokens,
        tokenizer_config=R1.tokenizer_config,
        eos_tokens=R1.eos_tokens,
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_64_decode_steps_match_transformers(tmp_path, name):
    model, ref = load_pair(write(tmp_path, name))
    assert max_error_prefill_and_decode(model, ref, prompt_len=40) < TOL


def test_qkv_biases_are_loaded_and_output_projection_has_none(tmp_path):
    model, ref = load_pair(write(tmp_path, "r1_distill"))
    ours = model.model.layers[0].self_attn
    theirs = ref.model.layers[0].self_attn
    # Loaded fused: q's rows first, then k's, then v's.
    q_rows, kv_rows = theirs.q_proj.bias.numel(), theirs.k_proj.bias.numel()
    q_bias, k_bias, _ = ours.qkv_proj.bias.split([q_rows, kv_rows, kv_rows])
    assert (q_bias == theirs.q_proj.bias).all()
    assert k_bias.abs().sum() > 0
    assert ours.o_proj.bias is None


def test_sliding_window_applies_only_from_max_window_layers(tmp_path):
    model, _ = load_pair(write(tmp_path, "sliding"))
    assert [layer.self_attn.window for layer in model.model.layers] == [None, 8]
    model, _ = load_pair(write(tmp_path, "window_off"))
    assert [layer.self_attn.window for layer in model.model.layers] == [None, None]


def test_greedy_64_tokens_identical_to_transformers_generate(tmp_path):
    model, ref = load_pair(write(tmp_path, "sliding"))
    ours, expected = greedy_pair(model, ref, prompt_len=12)
    assert ours == expected
    assert len(set(ours)) > 1  # the random model does not just repeat one token


def test_unsupported_activation_is_a_clear_load_error(tmp_path):
    import torch

    folder = write(tmp_path, "r1_distill")
    config = (folder / "config.json").read_text().replace('"silu"', '"gelu"')
    (folder / "config.json").write_text(config)
    with pytest.raises(ModelLoadError, match="Qwen2 with hidden_act='gelu'"):
        load_folder(folder, torch.device("cpu"), torch.float32)
