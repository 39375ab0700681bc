"""Phi-4-mini (``Phi3ForCausalLM`` with a partial rotary and LongRoPE) equals transformers
(fp32) on a tiny checkpoint of Phi-4-mini's proportions, across the LongRoPE switch."""

from __future__ import annotations

import pytest
import torch

from fermi.models.phi3 import phi3_config
from fermi.models.rope import inverse_frequencies
from fermi.models.shapes import SHAPES
from fermi.runners.longrope import LongRopeRunner
from tests.arch_parity import TOL, load_pair, max_error_prefill_and_decode
from tests.test_arch_phi3 import reencoding_generate
from tests.tiny import write_checkpoint_for

ORIGINAL = 32  # tiny stand-in for Phi-4-mini's original_max_position_embeddings (4096)

# Phi-4-mini-instruct: hidden 3072 = 24 heads x 128, 8 KV heads (3:1), rotary on 0.75 of
# each head (96 of 128), tied embeddings, a context 32 x the original, short factors all
# 1.0. The same proportions in miniature: 6 heads x 16, 2 KV heads, rotary 12 of 16.
PHI4_MINI = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "vocab_size": 512,
    "hidden_size": 96,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "partial_rotary_factor": 0.75,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 32 * ORIGINAL,
    "original_max_position_embeddings": ORIGINAL,
    "rope_scaling": {  # one factor per rotary pair: 12 / 2
        "type": "longrope",
        "short_factor": [1.0] * 6,
        "long_factor": [1.0, 1.5, 2.8, 6.0, 14.0, 40.0],
    },
    "sliding_window": 262144,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "pad_token_id": 0,
    "initializer_range": 0.1,
    "torch_dtype": "float32",
}


def write(tmp_path):
    return write_checkpoint_for(tmp_path / "phi4_mini", PHI4_MINI, seed=9)


# A 20-token prompt decoded 64 steps crosses position 32 mid-decode (short -> long);
# a 40-token prompt starts past it.
@pytest.mark.parametrize("prompt_len", [20, 40])
def test_partial_rotary_longrope_matches_transformers_across_the_switch(tmp_path, prompt_len):
    model, ref = load_pair(write(tmp_path))
    assert model.rope_switch == ORIGINAL
    assert model.rope_cos.shape[-1] == 12  # rotary on 12 of 16 features
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert max_error_prefill_and_decode(model, ref, prompt_len=prompt_len) < TOL


@reencoding_generate
def test_engine_greedy_equals_transformers_generate_across_the_switch(tmp_path):
    import fermi

    folder = write(tmp_path)
    _, ref = load_pair(folder)
    torch.manual_seed(2)
    prompt = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        expected = ref.generate(
            prompt, max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, 12:].tolist()
    kw = {"max_seq_len": 128, "max_batch": 2, "prefill_chunk": 512, "dtype": "float32"}
    with fermi.load(folder, **kw) as engine:
        assert isinstance(engine.runner, LongRopeRunner)
        out = engine.generate(
            prompt_token_ids=prompt[0].tolist(), max_tokens=64, temperature=0, ignore_eos=True
        )
    assert out.token_ids == expected
    assert len(set(expected)) > 1


def test_real_phi4_mini_rope_equals_transformers_short_and_long():
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = SHAPES["Phi-4-mini-instruct"]
    cfg = phi3_config(hf)
    assert (cfg.head_dim, cfg.rope.partial_rotary_factor) == (128, 0.75)
    assert cfg.tie_word_embeddings and cfg.num_key_value_heads == 8
    ref_cfg = transformers.Phi3Config(**{k: v for k, v in hf.items() if k != "architectures"})
    longrope = ROPE_INIT_FUNCTIONS["longrope"]
    for seq_len in (None, 4097):
        expected, expected_scale = longrope(ref_cfg, None, seq_len=seq_len)
        ours, scale = inverse_frequencies(cfg.rope, cfg.head_dim, seq_len)
        assert ours.shape == (48,)
        assert torch.allclose(ours, expected, rtol=1e-6)
        assert scale == pytest.approx(expected_scale)
