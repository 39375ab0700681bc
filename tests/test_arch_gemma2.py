"""Gemma 2 on the shared decoder equals transformers' Gemma2ForCausalLM (fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from fermi.errors import ModelLoadError
from fermi.loading import load_folder
from fermi.models.gemma2 import gemma2_config
from fermi.models.shapes import SHAPES
from tests.arch_parity import TOL, greedy_pair, load_pair, max_error_prefill_and_decode
from tests.arch_templates import GEMMA2
from tests.tiny import write_checkpoint_for

WINDOW = 8  # tiny stand-in for Gemma 2's 4096

GEMMA2_BASE = {
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,  # sliding, global, sliding, global
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "query_pre_attn_scalar": 24,  # not head_dim, so the scale is really read from it
    "sliding_window": WINDOW,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "initializer_range": 0.1,
    "torch_dtype": "float32",
}

CONFIGS = {
    "gemma2": {},
    # Caps small enough that tanh bends the scores and logits hard.
    "tight_caps": {"attn_logit_softcapping": 1.0, "final_logit_softcapping": 2.0},
    "no_caps": {"attn_logit_softcapping": None, "final_logit_softcapping": None},
    "untied_gqa1": {"tie_word_embeddings": False, "num_key_value_heads": 1},
}


def write(tmp_path, name):
    return write_checkpoint_for(
        tmp_path / name,
        {**GEMMA2_BASE, **CONFIGS[name]},
        seed=len(name),
        added_tokens=GEMMA2.added_tokens,
        tokenizer_config=GEMMA2.tokenizer_config,
        eos_tokens=GEMMA2.eos_tokens,
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_past_the_window_and_64_decode_steps_match_transformers(tmp_path, name):
    model, ref = load_pair(write(tmp_path, name))
    # 40 prompt tokens + 64 steps: five times the window before decoding even starts.
    assert max_error_prefill_and_decode(model, ref, prompt_len=40) < TOL


def test_even_layers_slide_and_odd_layers_attend_globally(tmp_path):
    model, _ = load_pair(write(tmp_path, "gemma2"))
    assert [layer.self_attn.window for layer in model.model.layers] == [WINDOW, None] * 2


def test_window_changes_the_logits(tmp_path):
    # Guards the parity test: without the window the model would disagree.
    model, ref = load_pair(write(tmp_path, "gemma2"))
    for layer in model.model.layers:
        layer.self_attn.window = None
    assert max_error_prefill_and_decode(model, ref, prompt_len=40, steps=2) > 100 * TOL


def test_greedy_64_tokens_identical_to_transformers_generate(tmp_path):
    model, ref = load_pair(write(tmp_path, "tight_caps"))
    ours, expected = greedy_pair(model, ref, prompt_len=12)
    assert ours == expected
    assert len(set(ours)) > 1


def test_real_gemma2_2b_config_reads_every_gemma_feature():
    cfg = gemma2_config(SHAPES["Gemma-2-2b-it"])
    assert cfg.embedding_scale == pytest.approx(48.0)  # sqrt(2304)
    assert cfg.norm_unit_offset and cfg.sandwich_norms
    assert (cfg.attn_logit_softcap, cfg.final_logit_softcap) == (50.0, 30.0)
    assert cfg.attn_scale == pytest.approx(1 / 16)  # query_pre_attn_scalar 256
    assert cfg.sliding_windows == (4096, None) * 13
    assert cfg.hidden_act == "gelu_pytorch_tanh" and cfg.tie_word_embeddings


def test_bidirectional_gemma_is_a_clear_load_error(tmp_path):
    folder = write(tmp_path, "gemma2")
    config = json.loads((folder / "config.json").read_text())
    config["use_bidirectional_attention"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="use_bidirectional_attention"):
        load_folder(folder, torch.device("cpu"), torch.float32)
