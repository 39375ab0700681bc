"""The decoder equals transformers' Qwen3ForCausalLM on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch

from fermi.loading import load_folder
from tests.arch_parity import TOL, greedy_pair, load_pair, max_error_prefill_and_decode
from tests.tiny import write_checkpoint

CONFIGS = {
    "tied": {},
    "untied": {"tie_word_embeddings": False},
    # head_dim 24 != hidden 64 / heads 4, and one KV head (GQA 4:1)
    "odd_head_dim": {"head_dim": 24, "num_key_value_heads": 1},
    "yarn": {
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
        }
    },
}


def load(tmp_path, name):
    return load_pair(write_checkpoint(tmp_path / name, CONFIGS[name], seed=len(name)))


def fwd(model, tokens, start, slot=0, last_only=False):
    b, t = tokens.shape
    pos = torch.arange(start, start + t)[None].expand(b, t)
    slots = torch.full((b,), slot) if b == 1 else torch.arange(b)
    causal = model.prefill_is_causal(start)  # as the runners' prefill
    with torch.inference_mode():
        return model(tokens, pos, slots, start + t, last_only=last_only, causal=causal)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_cached_decode_logits_match_transformers(tmp_path, name):
    model, ref = load(tmp_path, name)
    assert max_error_prefill_and_decode(model, ref, prompt_len=37, steps=64) < TOL


def test_greedy_64_tokens_identical_to_transformers_generate(tmp_path):
    model, ref = load(tmp_path, "untied")
    tokens, expected = greedy_pair(model, ref, prompt_len=12)
    assert tokens == expected


def test_batch_of_different_lengths_equals_each_solo_run(tmp_path):
    folder = write_checkpoint(tmp_path / "m", {})
    model = load_folder(folder, torch.device("cpu"), torch.float32).model
    model.setup_cache(max_batch=3, max_seq_len=128)
    torch.manual_seed(3)
    prompts = [torch.randint(0, model.cfg.vocab_size, (1, n)) for n in (5, 17, 9)]

    def greedy_solo(prompt, slot, steps=20):
        logits = fwd(model, prompt, 0, slot=slot, last_only=True)
        out = []
        for _ in range(steps):
            out.append(int(logits.argmax(-1)))
            pos = prompt.shape[1] + len(out) - 1
            logits = fwd(model, torch.tensor([[out[-1]]]), pos, slot=slot, last_only=True)
        return out

    solo = [greedy_solo(p, slot=0) for p in prompts]
    # Prefill each into its own slot, then decode all three in one batched forward.
    last = []
    for slot, p in enumerate(prompts):
        last.append(int(fwd(model, p, 0, slot=slot, last_only=True).argmax(-1)))
    outs = [[t] for t in last]
    lengths = [p.shape[1] for p in prompts]
    with torch.inference_mode():
        for _ in range(19):
            pos = torch.tensor([[lengths[i] + len(outs[i]) - 1] for i in range(3)])
            tokens = torch.tensor([[o[-1]] for o in outs])
            # slots given in a shuffled order to prove rows are independent of slot ids
            logits = model(tokens, pos, torch.tensor([0, 1, 2]), kv_len=int(pos.max()) + 1)
            for i in range(3):
                outs[i].append(int(logits[i].argmax(-1)))
    assert outs == solo
