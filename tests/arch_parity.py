"""Shared checks of the decoder against a transformers model on the same weights."""

from __future__ import annotations

from pathlib import Path

import torch

from fermi.loading import load_folder
from fermi.models.decoder import Decoder

TOL = 1e-4  # fp32 logits


def load_pair(folder: Path, max_seq_len: int = 256):
    """Our decoder (cache set up) and transformers' model, both from ``folder`` in fp32."""
    import transformers

    model = load_folder(folder, torch.device("cpu"), torch.float32).model
    model.setup_cache(max_batch=2, max_seq_len=max_seq_len)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, ref


def forward(model: Decoder, tokens: torch.Tensor, start: int, last_only: bool = False):
    """Run ``tokens`` [1, T] in slot 0 at positions start.. (causal from position 0, as
    the runners' prefill is)."""
    t = tokens.shape[1]
    positions = torch.arange(start, start + t)[None]
    slots = torch.zeros(1, dtype=torch.long)
    causal = model.prefill_is_causal(start)
    with torch.inference_mode():
        return model(tokens, positions, slots, start + t, last_only=last_only, causal=causal)


def max_error_prefill_and_decode(
    model: Decoder, ref, prompt_len: int, steps: int = 64, seed: int = 1
) -> float:
    """Largest |ours - transformers| over a prefill and ``steps`` cached greedy steps."""
    torch.manual_seed(seed)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_len))
    worst = 0.0
    with torch.no_grad():
        out = ref(prompt, use_cache=True)
    worst = max(worst, (forward(model, prompt, 0) - out.logits).abs().max().item())
    past, length = out.past_key_values, prompt_len
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        ours = forward(model, token, length, last_only=True)
        with torch.no_grad():
            out = ref(token, past_key_values=past, use_cache=True)
        past, length = out.past_key_values, length + 1
        worst = max(worst, (ours - out.logits[:, -1]).abs().max().item())
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return worst


def greedy_pair(model: Decoder, ref, prompt_len: int, steps: int = 64, seed: int = 2):
    """(our greedy tokens, transformers' ``generate`` greedy tokens) for a random prompt."""
    torch.manual_seed(seed)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_len))
    with torch.no_grad():
        expected = ref.generate(
            prompt, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, prompt_len:].tolist()
    logits = forward(model, prompt, 0, last_only=True)
    tokens: list[int] = []
    for _ in range(steps):
        tokens.append(int(logits.argmax(-1)))
        step = torch.tensor([[tokens[-1]]])
        logits = forward(model, step, prompt_len + len(tokens) - 1, last_only=True)
    return tokens, expected
