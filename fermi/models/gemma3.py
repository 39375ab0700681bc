"""Gemma 3 (``Gemma3ForCausalLM``): Gemma 3 270M / 1B; and the text model of 4B / 12B / 27B,
whose checkpoints are ``Gemma3ForConditionalGeneration`` (its ``text_config`` and
``language_model.*`` weights load; the vision tower is left unread, so images are not
supported).

Gemma 2's layer (embeddings × sqrt(hidden), RMSNorm × (1 + weight), sandwich norms, GeGLU,
``query_pre_attn_scalar``) with four changes, each a :class:`ModelConfig` field:

- a pattern of sliding-window and global layers: ``layer_types``, or in older configs
  ``sliding_window_pattern`` (every N-th layer global; 6 gives Gemma 3's 5 : 1);
- two rope tables: the sliding layers rotate with ``rope_local_base_freq`` (10 000), the
  global ones with ``rope_theta`` (1 000 000) and ``rope_scaling`` (4B+: linear × 8);
  transformers 5 writes both as ``rope_parameters`` per layer type;
- RMSNorm on q and k (Gemma-style, × (1 + weight));
- no attention soft-capping (a final-logit cap is honoured when a config sets one).
"""

from __future__ import annotations

from dataclasses import replace

from fermi.models.decoder import GLOBAL_ROPE, LOCAL_ROPE, ModelConfig
from fermi.models.gemma2 import GELU_TANH
from fermi.models.registry import (
    Adapter,
    UnsupportedModelError,
    checked_rope,
    flag,
    layer_types,
    positive_number,
    register,
    shape_fields,
    sliding_window,
)
from fermi.models.rope import RopeConfig

SLIDING, FULL = "sliding_attention", "full_attention"
# transformers' Gemma3TextConfig defaults for keys a config leaves out (the 4B+ checkpoints'
# text_config names only what differs from them).
GLOBAL_THETA, LOCAL_THETA, PATTERN = 1_000_000.0, 10_000.0, 6
TEXT_DEFAULTS = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}


def gemma3_layer_types(cfg: dict, layers: int) -> list[str]:
    """Each layer's kind: ``layer_types``, else every ``sliding_window_pattern``-th layer
    (counting from 1) global and the rest sliding, as transformers derives them."""
    types = layer_types(cfg, layers)
    if types is None:
        pattern = cfg.get("sliding_window_pattern", PATTERN)
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
            raise UnsupportedModelError(
                f"config.json: sliding_window_pattern must be a positive integer, not {pattern!r}"
            )
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
    return types


def gemma3_ropes(cfg: dict) -> tuple[RopeConfig, RopeConfig]:
    """(global, local) rope settings, from either spelling of a Gemma 3 config."""
    params = cfg.get("rope_parameters")
    if params:  # transformers 5: one entry per layer type
        if not isinstance(params, dict) or not set(params) <= {SLIDING, FULL}:
            raise UnsupportedModelError(
                f"config.json: Gemma 3's rope_parameters must hold one entry per layer type "
                f"({FULL}, {SLIDING}), not {params!r}"
            )
        full = {"rope_theta": GLOBAL_THETA, **_object(params.get(FULL), f"rope_parameters.{FULL}")}
        local = {
            "rope_theta": LOCAL_THETA,
            **_object(params.get(SLIDING), f"rope_parameters.{SLIDING}"),
        }
        bases = (f"rope_parameters.{FULL}.rope_theta", f"rope_parameters.{SLIDING}.rope_theta")
    else:  # transformers 4: rope_theta + rope_scaling globally, rope_local_base_freq locally
        scaling = _object(cfg.get("rope_scaling"), "rope_scaling")
        full = {"rope_theta": cfg.get("rope_theta", GLOBAL_THETA), **scaling}
        local = {"rope_theta": cfg.get("rope_local_base_freq", LOCAL_THETA)}
        bases = ("rope_theta", "rope_local_base_freq")
    ropes = []
    for name, spelled, base in (("global", full, bases[0]), ("local", local, bases[1])):
        rope = checked_rope({**_without_rope(cfg), "rope_parameters": spelled}, base)
        if rope.rope_type == "longrope":
            raise UnsupportedModelError(
                f"config.json: Gemma 3 with longrope on its {name} layers is not supported"
            )
        ropes.append(rope)
    return ropes[0], ropes[1]


def _object(value: object, name: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UnsupportedModelError(f"config.json: {name} must be an object, not {value!r}")
    return value


def _without_rope(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("rope_parameters", "rope_scaling")}


def gemma3_config(cfg: dict) -> ModelConfig:
    cfg = {**TEXT_DEFAULTS, **cfg}
    global_rope, local_rope = gemma3_ropes(cfg)
    fields = shape_fields(
        {**_without_rope(cfg), "rope_theta": global_rope.theta},
        "Gemma 3",
        max_positions=131072,
        tied=True,
        head_dim=256,
        act_key="hidden_activation",
        acts=GELU_TANH,
    )
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError(
            "config.json: Gemma 3 with use_bidirectional_attention (an encoder) is not supported"
        )
    if cfg.get("attn_logit_softcapping") is not None:
        # Gemma 3 dropped it; transformers' Gemma 3 attention never applies it.
        raise UnsupportedModelError(
            "config.json: Gemma 3 with attn_logit_softcapping is not supported (Gemma 3 "
            "checkpoints set it to null; transformers would ignore it)"
        )
    layers = fields["num_hidden_layers"]
    types = gemma3_layer_types(cfg, layers)
    window = sliding_window(cfg, 4096)
    cap = cfg.get("final_logit_softcapping")
    cap = None if cap is None else positive_number(cap, "final_logit_softcapping")
    bias = flag(cfg, "attention_bias")
    return ModelConfig(
        architecture="Gemma3ForCausalLM",
        **{**fields, "rope": global_rope, "hidden_act": "gelu_pytorch_tanh"},
        attention_bias=bias,
        o_proj_bias=bias,
        qk_norm=True,
        sliding_windows=tuple(window if t == SLIDING else None for t in types) if window else (),
        layer_ropes=tuple(LOCAL_ROPE if t == SLIDING else GLOBAL_ROPE for t in types),
        local_rope=local_rope,
        embedding_scale=fields["hidden_size"] ** 0.5,
        norm_unit_offset=True,
        sandwich_norms=True,
        final_logit_softcap=cap,
        query_pre_attn_scalar=positive_number(
            cfg.get("query_pre_attn_scalar", 256), "query_pre_attn_scalar"
        ),
    )


def gemma3_conditional_config(cfg: dict) -> ModelConfig:
    """The text model of a ``Gemma3ForConditionalGeneration`` config: its ``text_config``,
    with the top level's ``tie_word_embeddings`` (transformers ties at the top)."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise UnsupportedModelError(
            "config.json: Gemma3ForConditionalGeneration without a text_config object"
        )
    tied = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    text_cfg = gemma3_config({**text, "tie_word_embeddings": tied})
    return replace(text_cfg, architecture="Gemma3ForConditionalGeneration")


def text_model_name(name: str) -> str | None:
    """A ``Gemma3ForConditionalGeneration`` tensor name -> the decoder's (None: the vision
    tower and projector, never read). Hub checkpoints name the text model
    ``language_model.model.*``; transformers 5 holds it as ``model.language_model.*``."""
    for prefix in ("language_model.model.", "model.language_model."):
        if name.startswith(prefix):
            return "model." + name.removeprefix(prefix)
    if name in ("language_model.lm_head.weight", "lm_head.weight"):
        return "lm_head.weight"
    vision = ("vision_tower.", "multi_modal_projector.")
    if name.startswith(vision) or name.removeprefix("model.").startswith(vision):
        return None
    return name  # anything else is reported as an unexpected tensor


ADAPTER = register(Adapter("Gemma3ForCausalLM", gemma3_config))
CONDITIONAL_ADAPTER = register(
    Adapter("Gemma3ForConditionalGeneration", gemma3_conditional_config, rename=text_model_name)
)
