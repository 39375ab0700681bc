"""Architecture adapters: Hugging Face ``config.json`` -> :class:`ModelConfig`.

Each adapter is a small function named after the architecture it reads. An adapter may
also provide ``rename(name)`` to map a checkpoint's tensor names onto the decoder's before
any tensor is read (None leaves a tensor unread: a vision tower beside the text model), and
``sanitize(weights)`` to fix a checkpoint's naming quirks (renamed tensors, extra buffers)
before the weights are matched against the module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fermi.models.decoder import ModelConfig
from fermi.models.rope import SUPPORTED_ROPE_TYPES, RopeConfig


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture (or one of its settings) is not supported."""


Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Adapter:
    architecture: str
    to_config: Callable[[dict], ModelConfig]
    sanitize: Callable[[Weights, ModelConfig], Weights] | None = None
    rename: Callable[[str], str | None] | None = None
    # Tensors a checkpoint may carry that the model does not use.
    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)


_ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    _ADAPTERS[adapter.architecture] = adapter
    return adapter


def supported_architectures() -> list[str]:
    _import_adapters()
    return sorted(_ADAPTERS)


def adapter_for(hf_config: dict, source: str = "config.json") -> Adapter:
    _import_adapters()
    names = hf_config.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UnsupportedModelError(
            f"{source}: architectures must be a list of class names, not {names!r}"
        )
    for name in names:
        if name in _ADAPTERS:
            return _ADAPTERS[name]
    found = ", ".join(names) if names else "none"
    raise UnsupportedModelError(
        f"{source}: architectures [{found}] not supported; "
        f"supported: {', '.join(sorted(_ADAPTERS))}"
    )


def _import_adapters() -> None:
    # Adapters register themselves on import; importing here keeps the registry the one
    # place that knows which modules exist.
    from fermi.models import gemma2, gemma3, granite, llama, phi3, qwen2, qwen3, smollm3  # noqa: F401


# Bounds on the sizes a config (or GGUF header) declares, checked before anything is built
# from them: a hostile file with num_hidden_layers = 4294967295 would otherwise loop for
# minutes building modules, and a huge hidden_size overflows torch's storage arithmetic.
# Each sits far above any released model (largest today: Llama 3.1 405B with 126 layers,
# hidden 16384, intermediate 53248, 128 heads; Gemma 3's 262k vocabulary; Llama 4 Scout's
# 10M-token context), so no real checkpoint is refused.
SIZE_LIMITS = {
    "num_hidden_layers": 1024,
    "hidden_size": 65536,
    "intermediate_size": 1 << 20,
    "vocab_size": 1 << 22,  # 4M
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "max_position_embeddings": 1 << 24,  # 16M tokens
    "sliding_window": 1 << 24,
    "original_max_position_embeddings": 1 << 24,
    "pretraining_tp": 1024,
}


def bounded_size(field: str, value: object, source: str, name: str | None = None) -> int:
    """``value`` as an int in 1..SIZE_LIMITS[field]; otherwise UnsupportedModelError naming
    ``source`` and the field as the file spells it (``name``, default ``field``)."""
    name = name or field
    limit = SIZE_LIMITS[field]
    # JSON writes some integers as floats (1e12); a bool or a string is never a size.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise UnsupportedModelError(f"{source}: {name} must be an integer, not {value!r}")
    if not 1 <= value <= limit:
        raise UnsupportedModelError(
            f"{source}: {name} = {value} is outside 1..{limit} (no real model comes near "
            "that bound; the file is corrupt or hostile)"
        )
    return int(value)


def sliding_window(cfg: dict, default: int | None = None) -> int | None:
    """``sliding_window`` in 1..SIZE_LIMITS (None or 0: no window)."""
    value = cfg.get("sliding_window", default)
    if value is None or value == 0:
        return None
    return bounded_size("sliding_window", value, "config.json")


LAYER_KINDS = ("sliding_attention", "full_attention")


def layer_types(cfg: dict, layers: int) -> list[str] | None:
    """``layer_types``: one attention kind per layer, or None when the config has none. A
    kind other than sliding or full attention (a misspelling, or another model family's
    chunked or linear attention) is refused: read as full attention it would run a
    different model."""
    types = cfg.get("layer_types")
    if not types:
        return None
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise UnsupportedModelError("config.json: layer_types must be a list of strings")
    if len(types) != layers:
        raise UnsupportedModelError(
            f"config.json: layer_types has {len(types)} entries for {layers} layers"
        )
    unknown = sorted(set(types) - set(LAYER_KINDS))
    if unknown:
        raise UnsupportedModelError(
            f"config.json: layer_types {unknown[0]!r} is not one of {', '.join(LAYER_KINDS)}"
        )
    return types


def flag(cfg: dict, key: str, default: bool = False) -> bool:
    """A config switch: true, false or absent (``"false"`` would read as true)."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise UnsupportedModelError(f"config.json: {key} must be true or false, not {value!r}")
    return value


def factor_list(factors: object, count: int, name: str, source: str = "config.json") -> list:
    """LongRoPE's per-pair factors: ``count`` positive finite numbers (a NaN or a zero made
    every logit NaN, silently; a wrong length failed in the rope tables)."""
    ok = isinstance(factors, list) and len(factors) == count
    ok = ok and all(
        isinstance(f, int | float) and not isinstance(f, bool) and math.isfinite(f) and f > 0
        for f in factors
    )
    if not ok:
        shown = repr(factors) if len(repr(factors)) < 60 else type(factors).__name__
        raise UnsupportedModelError(
            f"{source}: {name} must be {count} positive numbers (one per rotated pair), not {shown}"
        )
    return factors


def positive_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UnsupportedModelError(f"config.json: {name} must be a finite number, not {value!r}")
    if value <= 0:
        raise UnsupportedModelError(f"config.json: {name} = {value} must be positive")
    return float(value)


def checked_rope(cfg: dict, theta_name: str | None = None) -> RopeConfig:
    """The rope settings of ``cfg``, refused with the key named when a value could not come
    from a real checkpoint (a zero or negative factor or base, a NaN, an unknown type);
    ``theta_name``: what to call the base in an error, where the caller moved it."""
    key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    scaling = cfg.get(key)
    if scaling is not None and not isinstance(scaling, dict):
        raise UnsupportedModelError(f"config.json: {key} must be an object, not {scaling!r}")
    try:
        rope = RopeConfig.from_hf(cfg)
    except (TypeError, ValueError) as exc:
        raise UnsupportedModelError(f"config.json: unreadable rope settings ({exc})") from None
    if theta_name is None:
        nested = isinstance(scaling, dict) and scaling.get("rope_theta") is not None
        theta_name = f"{key}.rope_theta" if nested else "rope_theta"
    positive_number(rope.theta, theta_name)
    if rope.rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"config.json: {key}.rope_type {rope.rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    fraction = rope.partial_rotary_factor
    if not 0 < positive_number(fraction, "partial_rotary_factor") <= 1:
        raise UnsupportedModelError(
            f"config.json: partial_rotary_factor = {fraction} is outside (0, 1]"
        )
    p = rope.params
    if rope.rope_type in ("linear", "llama3", "yarn"):
        if "factor" not in p:
            raise UnsupportedModelError(
                f"config.json: {key} of type {rope.rope_type} has no factor"
            )
        positive_number(p["factor"], f"{key}.factor")
    elif p.get("factor") is not None:
        positive_number(p["factor"], f"{key}.factor")
    for name in (
        "low_freq_factor",
        "high_freq_factor",
        "beta_fast",
        "beta_slow",
        "attention_factor",
        "mscale",
        "mscale_all_dim",
    ):
        if p.get(name) is not None:
            positive_number(p[name], f"{key}.{name}")
    low, high = p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    if rope.rope_type == "llama3" and not low < high:
        raise UnsupportedModelError(
            f"config.json: {key}.low_freq_factor ({low}) must be below high_freq_factor ({high})"
        )
    if p.get("original_max_position_embeddings") is not None:
        original = p["original_max_position_embeddings"]
        bounded_size(
            "original_max_position_embeddings",
            original,
            "config.json",
            f"{key}.original_max_position_embeddings",
        )
    return rope


def require(cfg: dict, key: str, source: str = "config.json"):
    """A config value that must be present, with an error that names it."""
    if key not in cfg:
        raise UnsupportedModelError(f"{source} has no {key!r}")
    return cfg[key]


def shape_fields(
    cfg: dict,
    family: str,
    *,
    max_positions: int,
    eps: float = 1e-6,
    tied: bool = False,
    head_dim: int | None = None,
    act_key: str = "hidden_act",
    acts: tuple[str, ...] = ("silu",),
) -> dict:
    """The :class:`ModelConfig` fields every architecture reads the same way.

    ``max_positions``, ``eps``, ``tied`` and ``head_dim`` are the family's defaults for
    keys a config may leave out; ``acts`` the activations the family supports.
    """

    def size(key: str, default: int | None = None) -> int:
        value = (cfg.get(key) or default) if default is not None else require(cfg, key)
        return bounded_size(key, value, "config.json")

    heads = size("num_attention_heads")
    hidden = size("hidden_size")
    act = cfg.get(act_key) or acts[0]
    if act not in acts:
        raise UnsupportedModelError(
            f"config.json: {family} with {act_key}={act!r} is not supported"
        )
    dim, rope = size("head_dim", head_dim or hidden // heads), checked_rope(cfg)
    rotary = round(dim * rope.partial_rotary_factor)  # rotated in two halves: an even count
    if rotary < 2 or rotary % 2:
        raise UnsupportedModelError(
            f"config.json: partial_rotary_factor = {rope.partial_rotary_factor} rotates "
            f"{rotary} of head_dim's {dim} values; rope needs an even number of them"
        )
    if rope.rope_type == "longrope":
        key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
        for name in ("short_factor", "long_factor"):
            factor_list(rope.params.get(name), rotary // 2, f"{key}.{name}")
    return {
        "vocab_size": size("vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": size("intermediate_size"),
        "num_hidden_layers": size("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": size("num_key_value_heads", heads),
        "head_dim": dim,
        "rms_norm_eps": positive_number(cfg.get("rms_norm_eps", eps), "rms_norm_eps"),
        "rope": rope,
        "max_position_embeddings": size("max_position_embeddings", max_positions),
        "tie_word_embeddings": flag(cfg, "tie_word_embeddings", tied),
        "hidden_act": act,
    }
