"""Test helper: write a Hugging Face checkpoint folder as a GGUF file, as llama.cpp's
converter (convert_hf_to_gguf.py) lays it out. Not a test module.

Written from the format's description, independently of fermi/gguf.py, so the round-trip
tests check our reader against the converter's conventions rather than against itself.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, RopeScalingType
from gguf import quants as gguf_quants
from gguf.gguf_writer import GGUFValue
from safetensors.torch import load_file

# Hugging Face name (after "model.layers.N.") -> GGUF name (after "blk.N.").
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# Where an architecture's converter names a layer tensor otherwise.
ARCH_LAYER_TENSORS = {
    "gemma3": {
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
    },
    "phi3": {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"},
}
# Converters that permute q/k rows (LlamaModel and its subclasses).
PERMUTED = ("llama", "smollm3", "granite")

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def converter_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: rotate-half pairs become adjacent rows per head."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_name(hf_name: str, arch: str = "llama") -> str:
    stem, _, kind = hf_name.rpartition(".")
    if stem.startswith("model.layers."):
        _, _, layer, part = stem.split(".", 3)
        names = {**LAYER_TENSORS, **ARCH_LAYER_TENSORS.get(arch, {})}
        return f"blk.{layer}.{names[part]}.{kind}"
    return f"{TOP_TENSORS[stem]}.{kind}"


def llama3_rope_factors(cfg: dict, head_dim: int) -> np.ndarray:
    """What the converter stores as rope_freqs.weight for Llama 3 rope scaling."""
    rope = cfg.get("rope_parameters") or cfg["rope_scaling"]
    base = rope.get("rope_theta") or cfg["rope_theta"]
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_ctx = rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(
    folder: Path,
    out: Path,
    arch: str,
    weight_type: GGMLQuantizationType = GGMLQuantizationType.F32,
    pre: str = "gpt2",
    extra_tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]] | None = None,
    metadata: dict[str, tuple[object, GGUFValueType]] | None = None,
) -> Path:
    """Convert ``folder`` (config.json, model.safetensors, tokenizer.json) to ``out``.

    2-D weights are stored as ``weight_type``; 1-D tensors stay F32 as the converter keeps
    them. ``extra_tensors`` adds raw tensors (bytes + type) and ``metadata`` sets keys
    (value + type, over the converter's own) for error tests; the tensor data stays laid
    out with the writer's default alignment whatever ``general.alignment`` says.
    """
    cfg = json.loads((folder / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    writer = GGUFWriter(out, arch)
    writer.add_name("tiny test model")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    rope = cfg.get("rope_parameters") or {}
    if arch == "gemma3":  # one rope per layer type; the file holds the global one's base
        rope = rope["full_attention"]
    writer.add_rope_freq_base(float(rope.get("rope_theta") or cfg.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    partial = cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
    writer.add_rope_dimension_count(int(partial * cfg["hidden_size"]) // heads)
    writer.add_vocab_size(cfg["vocab_size"])
    _add_tokenizer(writer, folder, pre)
    _add_arch_metadata(writer, arch, cfg, rope)

    tensors = load_file(folder / "model.safetensors")
    if cfg.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg, head_dim))
    for name, tensor in tensors.items():
        data = tensor.float().numpy()
        if arch in PERMUTED and name.endswith("q_proj.weight"):
            data = converter_permute(data, heads)
        elif arch in PERMUTED and name.endswith("k_proj.weight"):
            data = converter_permute(data, kv_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1.0  # Gemma's converter stores 1 + w
        _add(writer, gguf_name(name, arch), data, weight_type if data.ndim == 2 else None)
    for name, (raw, qtype) in (extra_tensors or {}).items():
        writer.add_tensor(name, raw, raw_dtype=qtype)
    for key, (value, vtype) in (metadata or {}).items():
        writer.kv_data[0][key] = GGUFValue(value=value, type=vtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add_arch_metadata(writer: GGUFWriter, arch: str, cfg: dict, rope: dict) -> None:
    """The keys (and Phi-3's factor tensors) each architecture's converter adds."""
    if arch == "gemma3":
        if cfg.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        writer.add_sliding_window(cfg["sliding_window"])
        if rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["factor"])
    elif arch == "granite":
        writer.add_attention_scale(cfg["attention_multiplier"])
        writer.add_embedding_scale(cfg["embedding_multiplier"])
        writer.add_residual_scale(cfg["residual_multiplier"])
        writer.add_logit_scale(cfg["logits_scaling"])
    elif arch == "phi3":
        original = rope["original_max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_sliding_window(cfg.get("sliding_window") or 0)
        if rope.get("long_factor"):
            scale = cfg["max_position_embeddings"] / original
            attn = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
            writer.add_rope_scaling_attn_factors(attn)
            for kind in ("long", "short"):
                factors = np.array(rope[f"{kind}_factor"], dtype=np.float32)
                writer.add_tensor(f"rope_factors_{kind}.weight", factors)


def _add(writer: GGUFWriter, name: str, data: np.ndarray, qtype) -> None:
    if qtype in (None, GGMLQuantizationType.F32):
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    elif qtype == GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf_quants.quantize(data, qtype), raw_dtype=qtype)


def _add_tokenizer(writer: GGUFWriter, folder: Path, pre: str) -> None:
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(spec["model"]["vocab"])
    kinds = dict.fromkeys(vocab.values(), NORMAL)
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
        kinds[added["id"]] = CONTROL if added["special"] else USER_DEFINED
    tokens = [""] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([kinds[i] for i in range(len(tokens))])
    writer.add_token_merges(merges)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    writer.add_eos_token_id(vocab[config["eos_token"]])
    writer.add_pad_token_id(vocab[config["pad_token"]])
    writer.add_add_bos_token(False)
    if config.get("chat_template"):
        writer.add_chat_template(config["chat_template"])


def dequantized(data: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """What a loader should give back for ``data`` stored as ``qtype``."""
    if qtype == GGMLQuantizationType.F32:
        return data.float()
    if qtype == GGMLQuantizationType.F16:
        return data.half().float()
    raw = gguf_quants.quantize(data.float().numpy(), qtype)
    return torch.from_numpy(gguf_quants.dequantize(raw, qtype))


def raw_gguf(kv: bytes, n_kv: int, tensors: bytes = b"", n_tensors: int = 0) -> bytes:
    """A GGUF v3 file from already packed key/value and tensor-info bytes (for headers the
    writer refuses to produce, such as arrays nested thousands deep)."""
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + tensors


def packed_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data
