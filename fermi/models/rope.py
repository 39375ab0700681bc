"""Rotary position embedding tables.

The tables are computed once for every position up to ``max_seq_len`` and gathered by
position inside ``forward``, so the forward pass has no shape that depends on data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    # The raw scaling parameters from the checkpoint (factor, low_freq_factor, ...).
    params: dict = field(default_factory=dict)
    # Context length the model was trained with (for llama3 / yarn / longrope).
    max_position_embeddings: int = 4096
    partial_rotary_factor: float = 1.0

    @staticmethod
    def from_hf(cfg: dict) -> RopeConfig:
        """Read ``rope_theta``/``rope_scaling`` (transformers 4) or ``rope_parameters`` (5)."""
        scaling = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        scaling = dict(scaling)
        theta = scaling.pop("rope_theta", None)  # 0 is kept: the checks refuse it by name
        if theta is None:
            theta = cfg.get("rope_theta", 10000.0)
        rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        return RopeConfig(
            theta=float(theta),
            rope_type=rope_type,
            params=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            partial_rotary_factor=float(cfg.get("partial_rotary_factor", 1.0)),
        )


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def inverse_frequencies(
    rope: RopeConfig, head_dim: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [rotary_dim // 2], attention_scaling) for a rope configuration.

    ``seq_len`` matters only for longrope, whose factors switch with the context length.
    """
    dim = round(head_dim * rope.partial_rotary_factor)  # (a factor stored as rotary / head_dim)
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (rope.theta**exponent)
    p = rope.params
    kind = rope.rope_type
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(p["factor"]), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, p, rope.max_position_embeddings), 1.0
    if kind == "yarn":
        return _yarn(rope, dim)
    if kind == "longrope":
        return _longrope(rope, dim, inv_freq, seq_len)
    supported = ", ".join(SUPPORTED_ROPE_TYPES)
    raise ValueError(f"rope scaling type {kind!r} is not supported (supported: {supported})")


def _llama3(inv_freq: torch.Tensor, p: dict, max_pos: int) -> torch.Tensor:
    factor = float(p["factor"])
    low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old_ctx = float(p.get("original_max_position_embeddings", max_pos))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    p = rope.params
    factor = float(p["factor"])
    orig = p.get("original_max_position_embeddings") or rope.max_position_embeddings
    attention_factor = p.get("attention_factor")
    mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = float(p.get("beta_fast") or 32), float(p.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def _longrope(
    rope: RopeConfig, dim: int, inv_freq: torch.Tensor, seq_len: int | None
) -> tuple[torch.Tensor, float]:
    p = rope.params
    orig = int(p.get("original_max_position_embeddings") or rope.max_position_embeddings)
    long_ctx = seq_len is not None and seq_len > orig
    ext = torch.tensor(p["long_factor" if long_ctx else "short_factor"], dtype=torch.float32)
    factor = p.get("factor") or rope.max_position_embeddings / orig
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return inv_freq / ext, float(attention_factor)


def longrope_switch(rope: RopeConfig) -> int | None:
    """The position from which LongRoPE uses its long factors, or None for other types.

    transformers picks the long factors for a whole forward once its largest position
    reaches the original training length (``max(position_ids) + 1 > original``).
    """
    if rope.rope_type != "longrope":
        return None
    p = rope.params
    return int(p.get("original_max_position_embeddings") or rope.max_position_embeddings)


def rope_tables(
    rope: RopeConfig, head_dim: int, max_seq_len: int, seq_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables of shape [max_seq_len, rotary_dim] in float32.

    The sin table carries the rotate-half sign: its first half is negated (-sin, +sin), so
    that a rotation is ``x * cos + swap_halves(x) * sin`` (see :func:`rotate`).
    """
    inv_freq, scaling = inverse_frequencies(rope, head_dim, seq_len)
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    sign = torch.cat((-torch.ones_like(inv_freq), torch.ones_like(inv_freq)))
    return emb.cos() * scaling, emb.sin() * scaling * sign


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` features of ``x`` by cos and signed sin (rotate-half
    layout, :func:`rope_tables`), both already broadcastable to ``x[..., :rotary_dim]``.

    Three ops for a full-width rotation: a product, a roll (swapping the two halves) and a
    fused multiply-add; the sign of the rotate-half trick lives in the sin table.
    """
    rot = cos.shape[-1]
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if rot == x.shape[-1]:
        return torch.addcmul(x * cos, x.roll(rot // 2, -1), sin)
    x_rot = x[..., :rot]
    out = torch.addcmul(x_rot * cos, x_rot.roll(rot // 2, -1), sin)
    return torch.cat((out, x[..., rot:]), dim=-1)
