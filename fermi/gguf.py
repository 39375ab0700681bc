"""Load a llama.cpp GGUF file as a :class:`fermi.loading.Checkpoint`.

The metadata becomes a Hugging Face style config (so the same architecture adapter reads
it as reads ``config.json``), the tensors are dequantized and renamed to our module names,
and the tokenizer is rebuilt with ``tokenizers`` from ``tokenizer.ggml.*``.
"""

from __future__ import annotations

import logging
import re
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from fermi import memory
from fermi.aliases import alias_for_file
from fermi.errors import ModelLoadError
from fermi.gguf_reader import GGUFFile, check_type
from fermi.loading import (
    DTYPE_ADVICE,
    Checkpoint,
    GenerationDefaults,
    build_model,
    check_tokenizer_fits,
    parse_dtype,
)
from fermi.models.half_weights import use_half_cache, use_half_embedding, use_half_weights
from fermi.models.quant import QuantizedWeight, QuantSpec
from fermi.models.registry import (
    UnsupportedModelError,
    adapter_for,
    bounded_size,
    factor_list,
)
from fermi.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# GGUF architecture -> Hugging Face architecture, and whether llama.cpp's converter
# permuted the q/k rows. It does so only for archs it runs with interleaved ("normal")
# rope, to turn Hugging Face's rotate-half layout into pairs (Llama and its derivatives);
# Qwen, Gemma and Phi-3 use NeoX rope in llama.cpp and are written unchanged.
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("LlamaForCausalLM", True),
    "qwen3": ("Qwen3ForCausalLM", False),
    "gemma3": ("Gemma3ForCausalLM", False),
    "smollm3": ("SmolLM3ForCausalLM", True),
    "granite": ("GraniteForCausalLM", True),
    "phi3": ("Phi3ForCausalLM", False),
}

# GGUF tensor name (after "blk.N.") -> ours (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Where an architecture's layer names differ from the table above.
_ARCH_LAYER_NAMES = {
    # Gemma's norm after attention, and its pair around the feed-forward.
    "gemma3": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    # Phi-3 keeps q/k/v fused, and gate/up fused under ffn_up (2 x feed_forward_length
    # rows): the decoder's own layout.
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# llama.cpp stores Llama 3.x rope scaling as per-frequency divisors in this tensor.
ROPE_FREQS = "rope_freqs.weight"
# ... and Phi-3's LongRoPE factors in these two.
ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT = "rope_factors_long.weight", "rope_factors_short.weight"
ROPE_TENSORS = (ROPE_FREQS, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT)
# Gemma's converter stores every RMSNorm weight w as 1 + w (llama.cpp multiplies by it).
_NORM_SHIFTED = ("gemma3",)
# llama.cpp's fixed settings for these architectures, which their GGUF files do not carry.
GEMMA3_LOCAL_BASE, GEMMA3_PATTERN = 10000.0, 6
SMOLLM3_NO_ROPE_INTERVAL = 4

# Token types in tokenizer.ggml.token_type (llama.cpp's llama_token_type).
CONTROL, USER_DEFINED = 3, 4

# Pre-tokenizer split patterns by tokenizer.ggml.pre, as llama.cpp applies them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
# These split every digit off before the GPT-2 pattern (StarCoder-style vocabularies).
_DIGIT_SPLIT = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
# Llama 3 vocabularies take a whole pre-token from the vocab before applying merges.
_IGNORE_MERGES = ("llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe")


def load_gguf(
    path: Path,
    device: torch.device,
    dtype: str | torch.dtype | None = None,
    quantize: QuantSpec | None = None,
) -> Checkpoint:
    """Load ``path`` (a .gguf file) with its weights in ``dtype`` on ``device``.

    On CPU, fp16 means fp16 weight storage with float32 arithmetic and KV cache
    (:mod:`fermi.models.half_weights`), and it is the default (``dtype`` None or "auto")
    for quantized files: their weights carry at most 8 bits, so fp16 loses nothing of
    them, and decoding reads half the bytes of float32. A file an alias names
    (``fermi.aliases``) takes that alias's sampling defaults and CPU dtype.

    ``quantize`` (:mod:`fermi.models.quant`): with int4, the layers' Q4_0/Q4_1/Q4_K blocks
    load with their codes as stored; every other weight (and every weight under int8, whose
    scales are per row where Q8_0's are per 32 values) is quantized once from the file's
    values, and the error that adds is logged (``model.quantization`` has it per layer).
    """
    path = Path(path)
    gguf = GGUFFile(path)
    alias = alias_for_file(path)
    if dtype in (None, "auto") and device.type == "cpu":
        if alias is not None and alias.cpu_dtype is not None:
            dtype = alias.cpu_dtype
        elif gguf.quantized:
            dtype = "fp16"
    torch_dtype = parse_dtype(dtype, device)
    half_storage = device.type == "cpu" and torch_dtype == torch.float16
    if half_storage:
        torch_dtype = torch.float32
    meta = gguf.metadata
    for info in gguf.tensors.values():
        check_type(info, gguf.path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    hf_config = hf_config_from_gguf(gguf, arch)
    try:
        adapter = adapter_for(hf_config, str(path))
        config = adapter.to_config(hf_config)
    except (UnsupportedModelError, ValueError) as exc:
        raise ModelLoadError(f"{path}: {_metadata_words(str(exc), arch)}") from None
    tokenizer = tokenizer_from_gguf(meta, str(path))  # before the weights: fail fast
    check_tokenizer_fits(tokenizer, config.vocab_size, path, "tensor 'token_embd.weight' rows")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    # Under int4 (groups of 32) the layers' 4-bit blocks keep their codes (no float copy).
    keep = quantize is not None and quantize.scheme == "int4" and quantize.group == 32
    kept = {n: gguf.int4_codes(n) for n in gguf.tensors if keep and _is_matrix(n, arch)}
    # With fp16 storage on CPU (and no quantization) the matrices and the embedding table
    # are read as fp16 and the model takes them so: use_half_weights packs them from there,
    # use_half_embedding keeps the table as it is, and no float32 copy of either is ever
    # made (perf/LOG.md runs 32, 44).
    matrices = torch.float16 if half_storage and quantize is None else None

    def itemsize(name: str) -> int:
        if matrices is not None and (_is_linear_weight(name, arch) or name == TABLE):
            return matrices.itemsize
        return torch_dtype.itemsize

    # Dequantizing allocates every other weight first (a Q4 file grows ~4x in fp16).
    need = sum(prod(i.shape) * itemsize(n) for n, i in gguf.tensors.items() if kept.get(n) is None)
    memory.require_free(need, "cpu", f"{path}: dequantizing its weights", DTYPE_ADVICE)
    weights = read_weights(gguf, arch, heads, kv_heads, torch_dtype, kept, matrices)
    del kept  # (the codes are in ``weights`` now, handed to build_model below)
    model = build_model(
        config, adapter, weights, device, torch_dtype, str(path), quantize, matrices, consume=True
    )
    # build_model emptied ``weights`` (consume=True): the parts it fused (q/k/v, gate/up)
    # or quantized went as each layer was built. Each layer's float weight goes as
    # use_half_weights packs it: the load's peak holds one float copy of the weights.
    del weights
    memory.release_free_heap()
    if half_storage:
        use_half_weights(model)  # the linear layers left in float (none when quantized)
        memory.release_free_heap()
    if device.type == "cpu" and (half_storage or quantize is not None):
        use_half_embedding(model)  # (the layers read 16 bits or fewer: the table too)
        use_half_cache(model)  # (and the KV cache)
    if model.quantization is not None:
        report = model.quantization
        head = "output.weight" if "output.weight" in gguf.tensors else "token_embd.weight"
        matrices = [n for n in gguf.tensors if _is_matrix(n, arch) or n == head]
        stored = sorted({gguf.tensors[n].type_name for n in matrices})
        message = f"{path} (weights stored as {', '.join(stored)}): {report.summary()}"
        # Re-quantizing a quantized file adds error the file did not have: say so.
        (log.warning if report.errors else log.info)(message)
    eos = [
        _token_id(meta, key, config.vocab_size, path)
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
        if key in meta
    ]
    sampling = alias.sampling if alias is not None else {}
    generation = GenerationDefaults(eos_token_ids=tuple(dict.fromkeys(eos)), **sampling)
    return Checkpoint(path, model, config, hf_config, tokenizer, generation, extra={"gguf": arch})


# The metadata keys (after ``{arch}.``) that hf_config_from_gguf reads each config.json
# field from, for errors the shared config checks raise in config.json's words.
_METADATA_KEYS = {
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "max_position_embeddings": "context_length",
    "rope_scaling": "rope.scaling",
    "sliding_window": "attention.sliding_window",
    "rope_local_base_freq": "rope.freq_base_swa",
    "final_logit_softcapping": "final_logit_softcapping",
    "logits_scaling": "logit_scale",  # Granite's multipliers
    "embedding_multiplier": "embedding_scale",
    "residual_multiplier": "residual_scale",
    "attention_multiplier": "attention.scale",
}
# Keys under rope_scaling spelled otherwise in the metadata (rope.scaling.<key>).
_SCALING_KEYS = {
    "original_max_position_embeddings": "original_context_length",
    "attention_factor": "attn_factor",
}
_CONFIG_FIELD = re.compile(r"config\.json: ([a-z_]+)((?:\.[a-z_]+)*)(.*)", re.S)


def _metadata_words(message: str, arch: str) -> str:
    """A config check's error about a GGUF file, naming the metadata key its field was read
    from ("llama.rope.freq_base = 0.0 must be positive (read as rope_theta)") instead of a
    config.json the file does not have."""
    found = _CONFIG_FIELD.fullmatch(message)
    if found is None or found.group(1) not in _METADATA_KEYS:
        return f"{message.removeprefix('config.json: ')} (a setting read from its metadata)"
    field, sub, rest = found.groups()
    spelled = ".".join(_SCALING_KEYS.get(part, part) for part in sub.split("."))
    return f"{arch}.{_METADATA_KEYS[field]}{spelled}{rest} (read as {field}{sub})"


def _token_id(meta: dict[str, Any], key: str, vocab_size: int, path: Path) -> int:
    value = int(meta[key])  # an integer: the reader checks the types of the keys it knows
    if not 0 <= value < vocab_size:
        raise ModelLoadError(
            f"{path}: {key} = {value} is outside the vocabulary (0..{vocab_size - 1})"
        )
    return value


def hf_config_from_gguf(gguf: GGUFFile, arch: str) -> dict[str, Any]:
    """The hyper-parameters of ``{arch}.*`` metadata, spelled as in ``config.json``."""
    meta, tensors = gguf.metadata, gguf.tensors

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            raise ModelLoadError(f"{gguf.path}: GGUF metadata has no {full!r}")
        return meta[full]

    def size(field: str, key: str, default: int | None = None) -> int:
        # Bounded as config.json's sizes are, before anything is built from them.
        # (a key that is present is read as it is: a head count of 0 is refused, not
        # replaced by the default)
        value = meta.get(f"{arch}.{key}", default) if default is not None else need(key)
        try:
            return bounded_size(field, value, str(gguf.path), f"{arch}.{key}")
        except UnsupportedModelError as exc:
            raise ModelLoadError(str(exc)) from None

    def decimal(key: str, default: float | None = None) -> float:
        value = meta.get(f"{arch}.{key}", default) if default is not None else need(key)
        try:
            return _decimal(value)
        except (TypeError, ValueError):
            message = f"{gguf.path}: {arch}.{key} must be a number, not {value!r}"
            raise ModelLoadError(message) from None

    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{gguf.path}: tensor 'token_embd.weight' is missing")
    hidden = size("hidden_size", "embedding_length")
    heads = size("num_attention_heads", "attention.head_count")
    head_dim = size("head_dim", "attention.key_length", hidden // heads)
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch][0]],
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "hidden_size": hidden,
        "intermediate_size": size("intermediate_size", "feed_forward_length"),
        "num_hidden_layers": size("num_hidden_layers", "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": size("num_key_value_heads", "attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": decimal("attention.layer_norm_rms_epsilon"),
        "rope_theta": decimal("rope.freq_base", 10000.0),
        "max_position_embeddings": size("max_position_embeddings", "context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_gate.bias" in tensors,
        "hidden_act": "silu",
    }
    _check_head_counts(gguf, arch, cfg)
    rotary = int(meta.get(f"{arch}.rope.dimension_count") or head_dim)
    if not 2 <= rotary <= head_dim or rotary % 2:  # rotated in two halves
        raise ModelLoadError(
            f"{gguf.path}: {arch}.rope.dimension_count = {rotary} must be an even number "
            f"from 2 to the head size, {head_dim}"
        )
    if rotary != head_dim:
        cfg["partial_rotary_factor"] = rotary / head_dim
    scaling = rope_scaling(gguf, arch, cfg["max_position_embeddings"], rotary)
    if scaling:
        cfg["rope_scaling"] = scaling
    cfg.update(_ARCH_SETTINGS.get(arch, lambda *_: {})(gguf, arch, cfg, decimal))
    return cfg


def _check_head_counts(gguf: GGUFFile, arch: str, cfg: dict[str, Any]) -> None:
    """The head counts against the first layer's q and k tensors, naming the metadata: a
    count that did not fit them failed later, in the rotary un-permute, as a traceback."""
    size = cfg["head_dim"]
    for tensor, heads, key in (
        ("blk.0.attn_q.weight", cfg["num_attention_heads"], "attention.head_count"),
        ("blk.0.attn_k.weight", cfg["num_key_value_heads"], "attention.head_count_kv"),
    ):
        info = gguf.tensors.get(tensor)
        if info is not None and info.shape[0] != heads * size:
            raise ModelLoadError(
                f"{gguf.path}: {arch}.{key} = {heads} heads of {size} values does not fit "
                f"tensor {tensor!r} ({info.shape[0]} rows)"
            )
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ModelLoadError(
            f"{gguf.path}: {arch}.attention.head_count_kv = {cfg['num_key_value_heads']} "
            f"does not divide {arch}.attention.head_count = {cfg['num_attention_heads']}"
        )


def _gemma3_settings(gguf: GGUFFile, arch: str, cfg: dict, decimal) -> dict[str, Any]:
    """What llama.cpp's Gemma 3 reads or fixes: every 6th layer global and the rest sliding
    over ``attention.sliding_window`` tokens (without a window every layer is global), a
    local rope base of 10 000 (``rope.freq_base_swa`` where a file has one), attention
    scaled by 1/sqrt(head_dim) except for the 62-layer 27B (1/sqrt(hidden / heads)), GELU,
    and an optional final-logit cap."""
    meta = gguf.metadata
    layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    window = meta.get(f"{arch}.attention.sliding_window") or None
    scalar = cfg["hidden_size"] // heads if layers == 62 else cfg["head_dim"]
    out = {
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": int(window) if window else None,
        "sliding_window_pattern": GEMMA3_PATTERN if window else 1,
        "rope_local_base_freq": decimal("rope.freq_base_swa", GEMMA3_LOCAL_BASE),
        "query_pre_attn_scalar": scalar,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    }
    if f"{arch}.final_logit_softcapping" in meta:
        out["final_logit_softcapping"] = decimal("final_logit_softcapping")
    return out


def _smollm3_settings(gguf: GGUFFile, arch: str, cfg: dict, decimal) -> dict[str, Any]:
    # llama.cpp skips rope on every 4th layer of any SmolLM3 file.
    return {"no_rope_layer_interval": SMOLLM3_NO_ROPE_INTERVAL}


def _granite_settings(gguf: GGUFFile, arch: str, cfg: dict, decimal) -> dict[str, Any]:
    """Granite's multipliers as llama.cpp reads them: ``logit_scale`` is required; an absent
    (or zero) embedding or residual scale is 1, an absent attention scale 1/sqrt(head_dim)."""
    meta = gguf.metadata
    if not meta.get(f"{arch}.rope.scaling.finetuned", True):
        raise ModelLoadError(
            f"{gguf.path}: {arch}.rope.scaling.finetuned = false (a Granite without rope) "
            "is not supported"
        )

    def scale(key: str, default: float) -> float:
        return decimal(key) if meta.get(f"{arch}.{key}") else default

    return {
        "logits_scaling": decimal("logit_scale"),
        "embedding_multiplier": scale("embedding_scale", 1.0),
        "residual_multiplier": scale("residual_scale", 1.0),
        "attention_multiplier": scale("attention.scale", cfg["head_dim"] ** -0.5),
    }


def _phi3_settings(gguf: GGUFFile, arch: str, cfg: dict, decimal) -> dict[str, Any]:
    """Phi-3's window (0: none, Phi-4-mini's) and LongRoPE's training length."""
    meta = gguf.metadata
    window = meta.get(f"{arch}.attention.sliding_window") or None
    out: dict[str, Any] = {"sliding_window": int(window) if window else None}
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        key = f"{arch}.rope.scaling.original_context_length"
        try:
            out["original_max_position_embeddings"] = bounded_size(
                "original_max_position_embeddings", original, str(gguf.path), key
            )
        except UnsupportedModelError as exc:
            raise ModelLoadError(str(exc)) from None
    return out


_ARCH_SETTINGS = {
    "gemma3": _gemma3_settings,
    "smollm3": _smollm3_settings,
    "granite": _granite_settings,
    "phi3": _phi3_settings,
}


def _decimal(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not
    9.99999997e-07): the shortest repr that rounds to the same float32."""
    return float(str(np.float32(value)))


def rope_scaling(gguf: GGUFFile, arch: str, context: int, rotary: int) -> dict[str, Any] | None:
    """Rope scaling in ``config.json``'s spelling; ``rotary``: the rotated features a head."""
    meta = gguf.metadata
    if ROPE_FACTORS_LONG in gguf.tensors or ROPE_FACTORS_SHORT in gguf.tensors:
        return _longrope_factors(gguf, arch, rotary)
    if ROPE_FREQS in gguf.tensors:
        # Per-frequency divisors of the inverse frequencies: exactly what longrope's factor
        # list does, with no attention scaling (Llama 3 rope baked in by llama.cpp).
        factors = gguf.tensor(ROPE_FREQS, torch.float32).tolist()
        _check_factors(gguf, ROPE_FREQS, factors, rotary)
        return {
            "rope_type": "longrope",
            "short_factor": factors,
            "long_factor": factors,
            "factor": 1.0,
            "attention_factor": 1.0,
            "original_max_position_embeddings": context,
        }
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        orig = meta.get(f"{arch}.rope.scaling.original_context_length", context)
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig}
    raise ModelLoadError(
        f"{gguf.path}: {arch}.rope.scaling.type {kind!r} is not supported "
        "(supported: none, linear, yarn)"
    )


def _longrope_factors(gguf: GGUFFile, arch: str, rotary: int) -> dict[str, Any]:
    """Phi-3's LongRoPE, stored by llama.cpp's converter as two factor tensors (one factor
    per rotated pair) and the attention factor it computed (``rope.scaling.attn_factor``)."""
    scaling: dict[str, Any] = {"rope_type": "longrope"}
    for kind, name in (("long", ROPE_FACTORS_LONG), ("short", ROPE_FACTORS_SHORT)):
        if name not in gguf.tensors:
            raise ModelLoadError(f"{gguf.path}: tensor {name!r} is missing (LongRoPE)")
        shape = gguf.tensors[name].shape
        if shape != (rotary // 2,):
            raise ModelLoadError(
                f"{gguf.path}: tensor {name!r} has shape {shape}, "
                f"{arch}.rope.dimension_count {rotary} implies ({rotary // 2},)"
            )
        scaling[f"{kind}_factor"] = gguf.tensor(name, torch.float32).tolist()
        _check_factors(gguf, name, scaling[f"{kind}_factor"], rotary)
    attn_factor = gguf.metadata.get(f"{arch}.rope.scaling.attn_factor")
    if attn_factor is not None:
        scaling["attention_factor"] = _decimal(attn_factor)
    return scaling


def _check_factors(gguf: GGUFFile, name: str, factors: object, rotary: int) -> None:
    """A rope factor tensor: one positive finite factor per rotated pair (a NaN or a zero
    made every logit NaN; a wrong shape failed in the rope tables)."""
    try:
        factor_list(factors, rotary // 2, f"tensor {name!r}", str(gguf.path))
    except UnsupportedModelError as exc:
        raise ModelLoadError(str(exc)) from None


def our_name(gguf_name: str, arch: str) -> str | None:
    """Our parameter name for a GGUF tensor name (None for tensors we do not load)."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        pieces = stem.split(".", 2)
        if len(pieces) != 3 or not pieces[1].isdigit():
            return None  # (not a layer's tensor: refused by name as an unexpected one)
        _, layer, part = pieces
        mapped = _ARCH_LAYER_NAMES.get(arch, {}).get(part) or _LAYER_NAMES.get(part)
        return f"model.layers.{layer}.{mapped}.{kind}" if mapped else None
    mapped = _TOP_NAMES.get(stem)
    return f"{mapped}.{kind}" if mapped else None


def unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: within each head it stored the rotate-half pairs
    (i, i + d/2) as adjacent rows (2i, 2i + 1)."""
    dim = weight.shape[0] // heads
    rest = weight.shape[1:]
    return weight.reshape(heads, dim // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


def _is_matrix(name: str, arch: str) -> bool:
    """Whether a GGUF tensor is a layer's projection matrix (what quantization replaces)."""
    ours = our_name(name, arch) if name.startswith("blk.") else None
    return ours is not None and ours.endswith("_proj.weight")


TABLE = "token_embd.weight"  # the token embedding table (and a tied head's weight)


def _is_linear_weight(name: str, arch: str) -> bool:
    """Whether a GGUF tensor becomes a linear layer's weight: a projection, or an untied
    output head."""
    return _is_matrix(name, arch) or name == "output.weight"


def read_weights(
    gguf: GGUFFile,
    arch: str,
    heads: int,
    kv_heads: int,
    dtype: torch.dtype,
    kept: dict[str, QuantizedWeight | None] | None = None,
    matrix_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Every tensor under our name, dequantized to ``dtype`` (the layers' projection
    matrices, an output head and the embedding table to ``matrix_dtype`` when given),
    except those
    ``kept`` (GGUF name -> codes as stored, ``GGUFFile.int4_codes``), which come as they
    are."""
    permuted = ARCHITECTURES[arch][1]
    kept = kept or {}
    weights: dict[str, torch.Tensor | QuantizedWeight] = {}
    for name in gguf.tensors:
        ours = our_name(name, arch)
        if ours is None:
            if name in ROPE_TENSORS:
                continue
            raise ModelLoadError(f"{gguf.path}: unexpected tensor {name!r} for GGUF arch {arch}")
        to = dtype
        if matrix_dtype is not None and (_is_linear_weight(name, arch) or name == TABLE):
            to = matrix_dtype
        tensor = kept.get(name) or gguf.tensor(name, to)
        if permuted and ".attn_q." in name:
            tensor = _unpermute(tensor, heads)
        elif permuted and ".attn_k." in name:
            tensor = _unpermute(tensor, kv_heads)
        if arch in _NORM_SHIFTED and name.endswith("norm.weight"):
            # Back to the checkpoint's w (the decoder's Gemma RMSNorm scales by 1 + w); in
            # float32, as the norms are stored, whatever dtype the weights load in.
            tensor = (gguf.tensor(name, torch.float32) - 1.0).to(dtype)
        weights[ours] = tensor
    return weights


def _unpermute(
    tensor: torch.Tensor | QuantizedWeight, heads: int
) -> torch.Tensor | QuantizedWeight:
    if isinstance(tensor, QuantizedWeight):  # rows move with their codes, scales and mins
        return tensor.map_rows(lambda t: unpermute_rows(t, heads))
    return unpermute_rows(tensor, heads)


def tokenizer_from_gguf(meta: dict[str, Any], source: str) -> Tokenizer:
    """Rebuild a byte-level BPE tokenizer from ``tokenizer.ggml.*`` metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(
            f"{source}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')"
        )
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    merges: list[str] = meta.get("tokenizer.ggml.merges") or []
    if not tokens:
        raise ModelLoadError(f"{source}: GGUF metadata has no tokenizer.ggml.tokens")
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)  # first spelling wins, as in llama.cpp
    pre = meta.get("tokenizer.ggml.pre")
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    broken = next((i for i, pair in enumerate(pairs) if len(pair) != 2 or "" in pair), None)
    if broken is not None:
        raise ModelLoadError(
            f"{source}: tokenizer.ggml.merges[{broken}] = {merges[broken]!r} is not two "
            "tokens separated by a space"
        )
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _IGNORE_MERGES)
    except Exception as exc:  # (the Rust side raises a bare Exception: a merge's token
        # missing from tokenizer.ggml.tokens, ...)
        raise ModelLoadError(
            f"{source}: tokenizer.ggml.tokens and tokenizer.ggml.merges do not make a "
            f"tokenizer: {exc}"
        ) from None
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None and len(types) != len(tokens):
        raise ModelLoadError(
            f"{source}: tokenizer.ggml.token_type has {len(types)} entries, "
            f"tokenizer.ggml.tokens {len(tokens)}"
        )
    if types is not None:
        special = [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(types)
            if t == CONTROL
        ]
        plain = [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types)
            if t == USER_DEFINED
        ]
        tok.add_special_tokens(special)
        tok.add_tokens(plain)

    def token_at(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        if index is None:
            return None
        if not 0 <= int(index) < len(tokens):  # (as an eos id out of range is refused)
            raise ModelLoadError(
                f"{source}: tokenizer.ggml.{key} = {index} is outside the vocabulary "
                f"(0..{len(tokens) - 1})"
            )
        return tokens[int(index)]

    return Tokenizer(
        tok,
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token=token_at("bos_token_id"),
        eos_token=token_at("eos_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre in _SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    # "gpt2", "default" and vocabularies we do not know: GPT-2's own pattern.
    return byte_level
