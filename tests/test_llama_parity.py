"""The decoder equals transformers' LlamaForCausalLM on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch

from fermi.loading import load_folder
from tests.tiny import write_checkpoint

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 10000.0}

CONFIGS = {
    "tied": {},
    "untied": {"tie_word_embeddings": False},
    # one KV head for four query heads, and head_dim 24 != hidden 64 / heads 4
    "gqa_odd_head_dim": {"num_key_value_heads": 1, "head_dim": 24},
    "no_gqa": {"num_key_value_heads": 4},
    "biases": {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False},
    "llama3_rope": {
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    },
}

TOL = 1e-4


def load(tmp_path, name):
    folder = write_checkpoint(tmp_path / name, {**LLAMA, **CONFIGS[name]}, seed=len(name))
    ckpt = load_folder(folder, torch.device("cpu"), torch.float32)
    assert ckpt.config.architecture == "LlamaForCausalLM"
    ckpt.model.setup_cache(max_batch=2, max_seq_len=256)
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(ref).__name__ == "LlamaForCausalLM"
    return ckpt.model, ref


def fwd(model, tokens, start, last_only=False):
    b, t = tokens.shape
    pos = torch.arange(start, start + t)[None].expand(b, t)
    with torch.inference_mode():
        return model(tokens, pos, torch.zeros(b, dtype=torch.long), start + t, last_only=last_only)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_llama_prefill_and_cached_decode_logits_match_transformers(tmp_path, name):
    model, ref = load(tmp_path, name)
    torch.manual_seed(1)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 37))
    ours = fwd(model, prompt, 0)
    with torch.no_grad():
        out = ref(prompt, use_cache=True)
    assert (ours - out.logits).abs().max().item() < TOL
    past, length = out.past_key_values, prompt.shape[1]
    next_tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for step in range(48):
        ours = fwd(model, next_tok, length, last_only=True)
        length += 1
        with torch.no_grad():
            out = ref(next_tok, past_key_values=past, use_cache=True)
        past = out.past_key_values
        assert (ours - out.logits[:, -1]).abs().max().item() < TOL, f"step {step}"
        next_tok = out.logits[:, -1].argmax(-1, keepdim=True)


@pytest.mark.parametrize("name", ["tied", "llama3_rope"])
def test_llama_greedy_64_tokens_identical_to_transformers_generate(tmp_path, name):
    model, ref = load(tmp_path, name)
    torch.manual_seed(2)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        expected = ref.generate(
            prompt, max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, 12:].tolist()
    logits = fwd(model, prompt, 0, last_only=True)
    tokens: list[int] = []
    for _ in range(64):
        tokens.append(int(logits.argmax(-1)))
        logits = fwd(model, torch.tensor([[tokens[-1]]]), 12 + len(tokens) - 1, last_only=True)
    assert tokens == expected


def test_llama_tied_embeddings_share_one_tensor(tmp_path):
    model, _ = load(tmp_path, "tied")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_llama_with_unsupported_activation_is_a_clear_error(tmp_path):
    from fermi.errors import ModelLoadError

    folder = write_checkpoint(tmp_path / "gelu", {**LLAMA, "hidden_act": "relu2"})
    with pytest.raises(ModelLoadError, match="hidden_act='relu2'"):
        load_folder(folder, torch.device("cpu"), torch.float32)
