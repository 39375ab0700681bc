"""Gemma 3 (text) on the shared decoder equals transformers' Gemma3ForCausalLM (fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from fermi.errors import ModelLoadError
from fermi.loading import load_folder
from fermi.models.decoder import GLOBAL_ROPE, LOCAL_ROPE
from fermi.models.gemma3 import gemma3_conditional_config, gemma3_config
from fermi.models.shapes import SHAPES
from tests.arch_parity import TOL, greedy_pair, load_pair, max_error_prefill_and_decode
from tests.tiny import write_checkpoint_for

WINDOW = 8  # tiny stand-in for Gemma 3's 512
PATTERN = 3  # two sliding layers, then a global one (Gemma 3's is 6: five, then one)

GEMMA3_BASE = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 6,  # sliding, sliding, global, sliding, sliding, global
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    # Bases far apart, so that a layer rotated with the other table gives other logits.
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 100.0,
    "max_position_embeddings": 512,
    "query_pre_attn_scalar": 24,  # not head_dim, so the scale is really read from it
    "sliding_window": WINDOW,
    "sliding_window_pattern": PATTERN,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "initializer_range": 0.1,
    "torch_dtype": "float32",
}

CONFIGS = {
    "gemma3": {},
    # Gemma 3 4B+: linear rope scaling on the global layers only.
    "linear_rope": {"rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    "untied_gqa1_softcap": {
        "tie_word_embeddings": False,
        "num_key_value_heads": 1,
        "final_logit_softcapping": 2.0,
    },
}


def write(tmp_path, name):
    return write_checkpoint_for(
        tmp_path / name, {**GEMMA3_BASE, **CONFIGS[name]}, seed=len(name) + 3
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_past_the_window_and_64_decode_steps_match_transformers(tmp_path, name):
    model, ref = load_pair(write(tmp_path, name))
    # 40 prompt tokens + 64 steps: five times the window before decoding even starts.
    assert max_error_prefill_and_decode(model, ref, prompt_len=40) < TOL


def test_greedy_64_tokens_identical_to_transformers_generate(tmp_path):
    model, ref = load_pair(write(tmp_path, "gemma3"))
    ours, expected = greedy_pair(model, ref, prompt_len=12)
    assert ours == expected
    assert len(set(ours)) > 1


def test_layer_pattern_gives_windows_and_rope_tables(tmp_path):
    model, _ = load_pair(write(tmp_path, "gemma3"))
    layers = [layer.self_attn for layer in model.model.layers]
    assert [a.window for a in layers] == [WINDOW, WINDOW, None] * 2
    assert [a.rope for a in layers] == [LOCAL_ROPE, LOCAL_ROPE, GLOBAL_ROPE] * 2
    assert model.ropes == (GLOBAL_ROPE, LOCAL_ROPE)


@pytest.mark.parametrize("change", ["no_window", "one_rope_table", "plain_qk_norm"])
def test_each_gemma3_feature_changes_the_logits(tmp_path, change):
    # Guards the parity tests: without each feature the model would disagree.
    model, ref = load_pair(write(tmp_path, "gemma3"))
    for layer in model.model.layers:
        attn = layer.self_attn
        if change == "no_window":
            attn.window = None
        elif change == "one_rope_table":
            attn.rope = GLOBAL_ROPE
        else:
            attn.q_norm.unit_offset = attn.k_norm.unit_offset = False
    assert max_error_prefill_and_decode(model, ref, prompt_len=40, steps=2) > 100 * TOL


def test_layer_types_spelling_equals_the_pattern_spelling(tmp_path):
    folder = write(tmp_path, "gemma3")
    config = json.loads((folder / "config.json").read_text())
    # transformers 5 writes layer_types and rope_parameters per layer type.
    assert "layer_types" in config and "full_attention" in config["rope_parameters"]
    ours = load_folder(folder, torch.device("cpu"), torch.float32).config
    old = {k: v for k, v in GEMMA3_BASE.items()}  # the transformers 4 spelling
    assert gemma3_config(old) == ours


def test_real_gemma3_1b_config_reads_every_gemma3_feature():
    cfg = gemma3_config(SHAPES["Gemma-3-1b-it"])
    assert cfg.sliding_windows == ((512,) * 5 + (None,)) * 4 + (512, 512)
    assert cfg.layer_ropes == ((LOCAL_ROPE,) * 5 + (GLOBAL_ROPE,)) * 4 + (LOCAL_ROPE,) * 2
    assert (cfg.rope.theta, cfg.local_rope.theta) == (1_000_000.0, 10_000.0)
    assert cfg.qk_norm and cfg.norm_unit_offset and cfg.sandwich_norms
    assert cfg.attn_logit_softcap is None and cfg.final_logit_softcap is None
    assert cfg.attn_scale == pytest.approx(1 / 16)  # query_pre_attn_scalar 256
    assert cfg.embedding_scale == pytest.approx(1152**0.5)
    assert cfg.hidden_act == "gelu_pytorch_tanh" and cfg.tie_word_embeddings


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("attn_logit_softcapping", 50.0, "attn_logit_softcapping"),
        ("use_bidirectional_attention", True, "use_bidirectional_attention"),
        ("layer_types", ["sliding_attention"] * 5 + ["chunked_attention"], "chunked_attention"),
        ("rope_parameters", {"rope_type": "default", "rope_theta": 1e4}, "one entry per layer"),
    ],
)
def test_unsupported_gemma3_settings_are_clear_load_errors(tmp_path, key, value, message):
    folder = write(tmp_path, "gemma3")
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        load_folder(folder, torch.device("cpu"), torch.float32)


# Gemma 3 4B / 12B / 27B are published as Gemma3ForConditionalGeneration: a text model
# under language_model.* beside a SigLIP vision tower. A tiny one: 3 text layers (both
# rope tables and the window), a one-layer vision tower that must be left unread.
CONDITIONAL = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "vocab_size": 512,  # for the test writer; the model reads text_config's
    "text_config": {
        **{k: v for k, v in GEMMA3_BASE.items() if k not in ("architectures", "model_type")},
        "num_hidden_layers": 3,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 16,
    },
    "mm_tokens_per_image": 4,
    "image_token_index": 511,
    "boi_token_index": 509,
    "eoi_token_index": 510,
    "initializer_range": 0.1,
}


def test_conditional_generation_checkpoint_loads_its_text_model(tmp_path):
    from safetensors import safe_open

    folder = write_checkpoint_for(tmp_path / "conditional", CONDITIONAL, seed=4)
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        stored = set(f.keys())
    assert any(name.startswith("vision_tower.") for name in stored)
    assert any(name.startswith("language_model.model.") for name in stored)
    model, ref = load_pair(folder)
    assert type(ref).__name__ == "Gemma3ForConditionalGeneration"
    assert model.cfg.architecture == "Gemma3ForConditionalGeneration"
    assert [layer.self_attn.window for layer in model.model.layers] == [WINDOW, WINDOW, None]
    assert max_error_prefill_and_decode(model, ref, prompt_len=40) < TOL


def test_conditional_vision_tensors_are_never_read(tmp_path, monkeypatch):
    import fermi.loading

    folder = write_checkpoint_for(tmp_path / "conditional", CONDITIONAL, seed=4)
    read = []
    real = fermi.loading.materialize

    def spy(located, *args, **kwargs):
        read.extend(key for _, key in located.values())
        return real(located, *args, **kwargs)

    monkeypatch.setattr(fermi.loading, "materialize", spy)
    load_folder(folder, torch.device("cpu"), torch.float32)
    assert read and all(key.startswith("language_model.") for key in read)


def test_real_gemma3_4b_text_config_fills_transformers_defaults():
    # google/gemma-3-4b-it's text_config names only what differs from Gemma3TextConfig.
    sparse = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
    }
    cfg = gemma3_conditional_config(sparse)
    assert (cfg.vocab_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (262208, 8, 4)
    assert cfg.head_dim == 256 and cfg.tie_word_embeddings
    assert cfg.sliding_windows == ((1024,) * 5 + (None,)) * 5 + (1024,) * 4
    assert cfg.rope.rope_type == "linear" and cfg.rope.params["factor"] == 8.0
    assert cfg.local_rope.rope_type == "default" and cfg.local_rope.theta == 10_000.0
    import transformers

    ref = transformers.Gemma3TextConfig(**sparse["text_config"])
    assert (ref.vocab_size, ref.num_attention_heads, ref.num_key_value_heads) == (262208, 8, 4)
