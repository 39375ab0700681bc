"""Phi-3 (``Phi3ForCausalLM``): Phi-3 / Phi-3.5-mini.

A Llama-shaped decoder whose checkpoints fuse the q/k/v projections (``qkv_proj``) and
the gate/up projections (``gate_up_proj``); :func:`split_fused` cuts them apart so the
shared decoder runs them as three and two matrices. Long contexts use LongRoPE, whose
short and long factor tables the decoder switches between (``Decoder._rope``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fermi.errors import ModelLoadError
from fermi.models.decoder import ModelConfig
from fermi.models.registry import (
    Adapter,
    UnsupportedModelError,
    Weights,
    register,
    shape_fields,
)
from fermi.models.rope import RopeConfig

# transformers' Phi3Config defaults this when config.json does not say.
DEFAULT_ORIGINAL_CONTEXT = 4096


def phi3_rope(cfg: dict, head_dim: int) -> RopeConfig:
    rope = RopeConfig.from_hf(cfg)
    if rope.rope_type in ("su", "yarn"):
        # Early Phi-3 configs name LongRoPE "su" (or "yarn"); transformers reads both as it.
        rope = replace(rope, rope_type="longrope")
    if rope.rope_type == "default":
        return rope
    if rope.rope_type != "longrope":
        raise UnsupportedModelError(
            f"config.json: Phi-3 with rope type {rope.rope_type!r} is not supported "
            "(default or longrope)"
        )
    half = int(head_dim * rope.partial_rotary_factor) // 2
    for key in ("short_factor", "long_factor"):
        factors = rope.params.get(key)
        if not isinstance(factors, list) or len(factors) != half:
            raise UnsupportedModelError(
                f"config.json: rope_scaling.{key} must be a list of {half} numbers"
            )
    # Phi-3 keeps the training length at the top level, and transformers lets it win
    # over any value inside rope_scaling.
    original = int(cfg.get("original_max_position_embeddings") or DEFAULT_ORIGINAL_CONTEXT)
    return replace(rope, params={**rope.params, "original_max_position_embeddings": original})


def phi3_config(cfg: dict) -> ModelConfig:
    fields = shape_fields(cfg, "Phi-3", max_positions=4096, eps=1e-5)
    window = cfg.get("sliding_window")
    return ModelConfig(
        architecture="Phi3ForCausalLM",
        **{**fields, "rope": phi3_rope(cfg, fields["head_dim"])},
        # transformers gives every Phi-3 layer the same window when one is set.
        sliding_windows=(int(window),) * fields["num_hidden_layers"] if window else (),
    )


def split_fused(weights: Weights, cfg: ModelConfig) -> Weights:
    """``qkv_proj`` -> q/k/v_proj and ``gate_up_proj`` -> gate/up_proj (gate first)."""
    q_rows = cfg.num_attention_heads * cfg.head_dim
    kv_rows = cfg.num_key_value_heads * cfg.head_dim
    out: Weights = {}
    for name, tensor in weights.items():
        if name.endswith("self_attn.qkv_proj.weight"):
            prefix = name.removesuffix("qkv_proj.weight")
            _expect_rows(name, tensor, q_rows + 2 * kv_rows)
            q, k, v = torch.split(tensor, [q_rows, kv_rows, kv_rows], dim=0)
            out.update({f"{prefix}q_proj.weight": q, f"{prefix}k_proj.weight": k})
            out[f"{prefix}v_proj.weight"] = v
        elif name.endswith("mlp.gate_up_proj.weight"):
            prefix = name.removesuffix("gate_up_proj.weight")
            _expect_rows(name, tensor, 2 * cfg.intermediate_size)
            gate, up = torch.chunk(tensor, 2, dim=0)
            out.update({f"{prefix}gate_proj.weight": gate, f"{prefix}up_proj.weight": up})
        else:
            out[name] = tensor
    return out


def _expect_rows(name: str, tensor: torch.Tensor, rows: int) -> None:
    if tensor.ndim != 2 or tensor.shape[0] != rows:
        raise ModelLoadError(
            f"tensor {name!r} has shape {tuple(tensor.shape)}; config.json implies {rows} rows"
        )


ADAPTER = register(Adapter("Phi3ForCausalLM", phi3_config, sanitize=split_fused))
