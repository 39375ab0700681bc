"""SmolLM3 (``SmolLM3ForCausalLM``): SmolLM3-3B.

Llama with no rotary embedding on some layers ("NoPE"): ``no_rope_layers`` holds one flag
per layer, 1 where the layer rotates q/k and 0 where it does not; without it, every
``no_rope_layer_interval``-th layer (counting from 1; 4 in SmolLM3-3B) skips rope.
A sliding window, when ``use_sliding_window`` turns one on, applies to the layers
``layer_types`` names sliding (by default the NoPE ones), as transformers reads it.
"""

from __future__ import annotations

from fermi.models.decoder import GLOBAL_ROPE, ModelConfig
from fermi.models.registry import (
    Adapter,
    UnsupportedModelError,
    flag,
    layer_types,
    register,
    shape_fields,
    sliding_window,
)

DEFAULT_INTERVAL = 4  # transformers' SmolLM3Config default


def rope_flags(cfg: dict, layers: int) -> list[bool]:
    """Whether each layer rotates q/k."""
    flags = cfg.get("no_rope_layers")
    if flags is None:
        interval = cfg.get("no_rope_layer_interval", DEFAULT_INTERVAL)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise UnsupportedModelError(
                f"config.json: no_rope_layer_interval must be a positive integer, not {interval!r}"
            )
        return [(i + 1) % interval != 0 for i in range(layers)]
    if not isinstance(flags, list) or any(f not in (0, 1) or isinstance(f, float) for f in flags):
        raise UnsupportedModelError(
            "config.json: no_rope_layers must be a list of 0/1 flags (1: the layer uses rope)"
        )
    if len(flags) != layers:
        raise UnsupportedModelError(
            f"config.json: no_rope_layers has {len(flags)} entries for {layers} layers"
        )
    return [bool(f) for f in flags]


def smollm3_config(cfg: dict) -> ModelConfig:
    fields = shape_fields(cfg, "SmolLM3", max_positions=32768, tied=True)
    layers = fields["num_hidden_layers"]
    uses_rope = rope_flags(cfg, layers)
    window = sliding_window(cfg) if cfg.get("use_sliding_window") else None
    windows: tuple[int | None, ...] = ()
    if window:
        types = layer_types(cfg, layers) or [
            "full_attention" if rope else "sliding_attention" for rope in uses_rope
        ]
        windows = tuple(window if t == "sliding_attention" else None for t in types)
    bias = flag(cfg, "attention_bias")
    return ModelConfig(
        architecture="SmolLM3ForCausalLM",
        **fields,
        attention_bias=bias,
        o_proj_bias=bias,
        mlp_bias=flag(cfg, "mlp_bias"),
        sliding_windows=windows,
        layer_ropes=tuple(GLOBAL_ROPE if rope else None for rope in uses_rope),
    )


ADAPTER = register(Adapter("SmolLM3ForCausalLM", smollm3_config))
