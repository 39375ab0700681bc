"""Tiny random checkpoints for tests, written the way Hugging Face writes them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tiny_tokenizer import TINY_VOCAB_SIZE, write_tiny_tokenizer

QWEN3_BASE = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "hidden_act": "silu",
    "bos_token_id": None,
    "eos_token_id": None,
    "torch_dtype": "float32",
    # Larger than the usual 0.02 so that greedy output of the random model varies.
    "initializer_range": 0.1,
}


def hf_model(config: dict, seed: int = 0):
    """A transformers model built from ``config`` with seeded random weights."""
    import transformers

    cls = getattr(transformers, config["architectures"][0])
    cfg_cls = transformers.AutoConfig.for_model(config["model_type"]).__class__
    hf_cfg = cfg_cls(**{k: v for k, v in config.items() if k not in ("architectures",)})
    hf_cfg.architectures = config["architectures"]
    torch.manual_seed(seed)
    model = cls(hf_cfg).eval()
    with torch.no_grad():  # default init leaves norms at 1: perturb so they are tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


# Llama 3 rope scaling on a tiny context (its original length 32 sits inside test prompts).
LLAMA3_ROPE = {
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
}


def write_checkpoint(
    folder: Path, overrides: dict | None = None, seed: int = 0, template: str = "qwen3"
) -> Path:
    """Write config.json, model.safetensors, generation_config.json and the tiny tokenizer."""
    config = {**QWEN3_BASE, **(overrides or {})}
    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(folder, template=template)
    specials = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in specials}
    config["eos_token_id"] = ids["<|im_end|>"]
    model = hf_model(config, seed)
    model.config.eos_token_id = ids["<|im_end|>"]
    model.save_pretrained(folder, safe_serialization=True)
    gen = {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "do_sample": True}
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def write_checkpoint_for(
    folder: Path,
    config: dict,
    seed: int = 0,
    *,
    added_tokens: tuple[tuple[str, bool], ...] = (),
    tokenizer_config: dict | None = None,
    eos_tokens: tuple[str, ...] = ("<|im_end|>",),
) -> Path:
    """Write a checkpoint of any transformers architecture that ``config`` names.

    The tiny tokenizer gets ``added_tokens`` ((text, special), ids after its own) and
    ``tokenizer_config`` entries (chat_template, bos/eos tokens) over its defaults.
    ``eos_tokens`` become generation_config's eos ids, the first also config's.
    Biases are perturbed like the norms, since transformers initialises them to zero.
    """
    from tokenizers import AddedToken, Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(folder, template="plain")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text, special in added_tokens:
        token = AddedToken(text, special=special, normalized=False)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    tok.save(str(folder / "tokenizer.json"))
    if tok.get_vocab_size() > config["vocab_size"]:
        raise ValueError(f"vocab_size {config['vocab_size']} < tokenizer's {tok.get_vocab_size()}")
    tok_config_path = folder / "tokenizer_config.json"
    tok_config = {**json.loads(tok_config_path.read_text()), **(tokenizer_config or {})}
    tok_config_path.write_text(json.dumps(tok_config, indent=2))

    eos_ids = [tok.token_to_id(t) for t in eos_tokens]
    config = {**config, "eos_token_id": eos_ids[0] if eos_ids else None}
    model = hf_model(config, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    gen = {"eos_token_id": eos_ids, "do_sample": True}
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def every_slot_back(engine) -> bool:
    """Whether every cache slot is free or keeps a finished request's cache (none runs)."""
    stats = engine.stats()
    return len(stats.free_slots) + len(stats.cached_slots) == engine.max_batch
