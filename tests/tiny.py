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


# Qwen3-Embedding's sentence-transformers files: the pooling module pools the last token.
EMBEDDING_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {
        "idx": 2,
        "name": "2",
        "path": "2_Normalize",
        "type": "sentence_transformers.models.Normalize",
    },
]
QUERY_PROMPT = (
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
)


def write_embedding_checkpoint(
    folder: Path,
    overrides: dict | None = None,
    seed: int = 0,
    *,
    sentence_transformers: bool = True,
) -> Path:
    """A tiny random checkpoint laid out as Qwen3-Embedding's: config.json naming
    Qwen3ForCausalLM over the bare ``Qwen3Model`` weights (``layers.0...``, no
    ``model.`` prefix, no ``lm_head``), a tokenizer whose post-processor appends
    ``<|endoftext|>`` to every text, and (``sentence_transformers``) modules.json and
    1_Pooling/config.json with last-token pooling. ``tie_word_embeddings`` defaults to
    true, as in Qwen3-Embedding-0.6B; false is the 4B/8B layout, which has no head."""
    import transformers
    from tokenizers import Tokenizer, processors

    config = {**QWEN3_BASE, **(overrides or {})}
    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(folder, template="plain")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = "<|endoftext|>"
    eos_id = tok.token_to_id(eos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, eos_id)]
    )
    tok.save(str(folder / "tokenizer.json"))
    tok_config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    tok_config["padding_side"] = "left"
    tok_config_path.write_text(json.dumps(tok_config, indent=2))

    config["eos_token_id"] = eos_id
    hf_cfg = transformers.Qwen3Config(
        **{k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    )
    torch.manual_seed(seed)
    model = transformers.Qwen3Model(hf_cfg).eval()
    with torch.no_grad():  # as hf_model: perturbed norms are tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    written = json.loads((folder / "config.json").read_text())
    written["architectures"] = ["Qwen3ForCausalLM"]  # as the real checkpoint says
    (folder / "config.json").write_text(json.dumps(written, indent=2))
    if sentence_transformers:
        (folder / "modules.json").write_text(json.dumps(EMBEDDING_MODULES, indent=2))
        pooling = {
            "word_embedding_dimension": config["hidden_size"],
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": True,
            "include_prompt": True,
        }
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
        st_config = {
            "prompts": {"query": QUERY_PROMPT, "document": ""},
            "similarity_fn_name": "cosine",
        }
        (folder / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2))
    return folder


def hf_embeddings(folder: Path, texts: list[str]) -> torch.Tensor:
    """transformers' reference: AutoModel's final hidden state at each text's last token
    (the appended <|endoftext|>), L2-normalised, float32; each text run alone."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            batch = tok([text], return_tensors="pt")
            rows.append(model(**batch).last_hidden_state[0, -1])
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)
