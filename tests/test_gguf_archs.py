"""GGUF files of Gemma 3, SmolLM3, Granite and Phi-4-mini (Phi-3 with a partial rotary and
LongRoPE), written from tiny random checkpoints as llama.cpp's converter lays them out
(tests/gguf_files.py), load with the logits transformers gives the original checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from gguf import GGUFValueType

from fermi.errors import ModelLoadError
from fermi.gguf import load_gguf
from fermi.models.decoder import GLOBAL_ROPE, LOCAL_ROPE
from tests.arch_parity import TOL, max_error_prefill_and_decode
from tests.gguf_files import write_gguf
from tests.test_arch_gemma3 import GEMMA3_BASE
from tests.test_arch_granite import GRANITE_BASE
from tests.test_arch_phi4_mini import PHI4_MINI
from tests.test_arch_smollm3 import SMOLLM3_BASE
from tests.tiny import write_checkpoint_for

CPU = torch.device("cpu")

# llama.cpp fixes what a Gemma 3 GGUF does not carry: every 6th layer global, a local rope
# base of 10 000, attention scaled by 1/sqrt(head_dim). The tiny checkpoint follows them.
GEMMA3 = {
    **GEMMA3_BASE,
    "num_hidden_layers": 7,  # five sliding, one global, one sliding
    "sliding_window_pattern": 6,
    "rope_local_base_freq": 10000.0,
    "query_pre_attn_scalar": 16,
}

CASES = {
    "gemma3": ("gemma3", GEMMA3),
    "gemma3_linear_rope_softcap": (
        "gemma3",
        {
            **GEMMA3,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "final_logit_softcapping": 2.0,
        },
    ),
    "smollm3": ("smollm3", SMOLLM3_BASE),
    "granite": ("granite", {**GRANITE_BASE, "tie_word_embeddings": False}),
    "phi4_mini": ("phi3", PHI4_MINI),
}


def write(tmp_path, name, metadata=None):
    arch, config = CASES[name]
    folder = write_checkpoint_for(tmp_path / name, config, seed=len(name))
    return folder, write_gguf(folder, tmp_path / f"{name}.gguf", arch, metadata=metadata)


def hf_reference(folder):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(CASES))
def test_gguf_gives_the_logits_transformers_gives_the_checkpoint(tmp_path, name):
    folder, path = write(tmp_path, name)
    loaded = load_gguf(path, CPU, torch.float32)
    assert loaded.config.architecture == CASES[name][1]["architectures"][0]
    model = loaded.model
    model.setup_cache(max_batch=2, max_seq_len=256)
    # 20 prompt tokens + 64 steps: past the 8-token windows and Phi-4-mini's switch at 32.
    assert max_error_prefill_and_decode(model, hf_reference(folder), prompt_len=20) < TOL


def test_gemma3_gguf_reads_the_layer_pattern_and_both_rope_bases(tmp_path):
    _, path = write(tmp_path, "gemma3_linear_rope_softcap")
    cfg = load_gguf(path, CPU, torch.float32).config
    assert cfg.sliding_windows == (8,) * 5 + (None, 8)
    assert cfg.layer_ropes == (LOCAL_ROPE,) * 5 + (GLOBAL_ROPE, LOCAL_ROPE)
    assert (cfg.rope.theta, cfg.local_rope.theta) == (1_000_000.0, 10_000.0)
    assert cfg.rope.rope_type == "linear" and cfg.local_rope.rope_type == "default"
    assert cfg.final_logit_softcap == 2.0 and cfg.attn_scale == 0.25


def test_gemma3_gguf_without_a_window_has_only_global_layers(tmp_path):
    # As llama.cpp reads it: no sliding window, no sliding layers, one rope base.
    no_window = {"gemma3.attention.sliding_window": (0, GGUFValueType.UINT32)}
    _, path = write(tmp_path, "gemma3", no_window)
    cfg = load_gguf(path, CPU, torch.float32).config
    assert cfg.sliding_windows == () and cfg.layer_ropes == (GLOBAL_ROPE,) * 7


def test_smollm3_gguf_skips_rope_on_every_fourth_layer(tmp_path):
    _, path = write(tmp_path, "smollm3")
    assert load_gguf(path, CPU, torch.float32).config.layer_ropes == (GLOBAL_ROPE,) * 3 + (None,)


def test_phi4_mini_gguf_keeps_the_partial_rotary_and_both_factor_lists(tmp_path):
    _, path = write(tmp_path, "phi4_mini")
    model = load_gguf(path, CPU, torch.float32).model
    rope = model.cfg.rope
    assert rope.rope_type == "longrope" and rope.partial_rotary_factor == 0.75
    assert rope.params["original_max_position_embeddings"] == 32
    assert len(rope.params["long_factor"]) == len(rope.params["short_factor"]) == 6
    model.setup_cache(max_batch=1, max_seq_len=64)
    assert model.rope_switch == 32 and model.rope_cos.shape[-1] == 12


def test_granite_gguf_without_an_attention_scale_uses_llama_cpps_default(tmp_path):
    # llama.cpp's Granite: an absent attention.scale means 1/sqrt(head_dim).
    _, path = write(tmp_path, "granite", {"granite.attention.scale": (0.0, GGUFValueType.FLOAT32)})
    cfg = load_gguf(path, CPU, torch.float32).config
    assert cfg.attn_scale == pytest.approx(16**-0.5)
    assert cfg.residual_multiplier == pytest.approx(0.22) and cfg.logits_scaling == 8.0


def test_granite_gguf_without_logit_scale_is_a_load_error_naming_the_key(tmp_path):
    folder, _ = write(tmp_path, "granite")
    path = tmp_path / "no_scale.gguf"
    write_gguf(folder, path, "granite")
    raw = path.read_bytes().replace(b"granite.logit_scale", b"granite.logit_xxxxx")
    path.write_bytes(raw)
    with pytest.raises(ModelLoadError, match=r"granite\.logit_scale"):
        load_gguf(path, CPU, torch.float32)


def test_phi3_gguf_with_the_wrong_number_of_rope_factors_is_a_load_error(tmp_path):
    folder, _ = write(tmp_path, "phi4_mini")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"]["long_factor"] = [1.0] * 5  # 6 rotated pairs a head
    (folder / "config.json").write_text(json.dumps(config))
    path = write_gguf(folder, tmp_path / "five.gguf", "phi3")
    with pytest.raises(ModelLoadError, match=r"rope_factors_long\.weight.*implies \(6,\)"):
        load_gguf(path, CPU, torch.float32)


@pytest.mark.parametrize(
    ("name", "metadata", "said"),
    [
        (
            "granite",
            {"granite.residual_scale": (-1.0, GGUFValueType.FLOAT32)},
            "granite.residual_scale = -1.0 must be",
        ),
        (
            "gemma3",
            {"gemma3.rope.freq_base_swa": (0.0, GGUFValueType.FLOAT32)},
            "gemma3.rope.freq_base_swa = 0.0 must be positive (read as rope_local_base_freq)",
        ),
        (
            "gemma3",
            {"gemma3.rope.freq_base": (0.0, GGUFValueType.FLOAT32)},
            "gemma3.rope.freq_base = 0.0 must be positive (read as rope_theta)",
        ),
        (
            "phi4_mini",
            {"phi3.rope.scaling.attn_factor": (-1.0, GGUFValueType.FLOAT32)},
            "phi3.rope.scaling.attn_factor = -1.0 must be positive "
            "(read as rope_scaling.attention_factor)",
        ),
    ],
)
def test_gguf_architecture_settings_refused_by_the_config_checks_name_their_key(
    tmp_path, name, metadata, said
):
    _, path = write(tmp_path, name, metadata)
    with pytest.raises(ModelLoadError) as caught:
        load_gguf(path, CPU, torch.float32)
    assert str(caught.value).startswith(f"{path}: {said}"), str(caught.value)
