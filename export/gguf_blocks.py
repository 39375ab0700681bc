"""A GGUF file's quantized blocks, for a Core ML package to keep instead of quantizing the
dequantized weights a second time.

Q4_0, Q4_1 and Q8_0 store blocks of 32 weights along a row: 4- or 8-bit codes and a
float16 scale d (Q4_1 also a float16 minimum m): w = d * (q - 8) (Q4_0), d * q + m (Q4_1),
d * q (Q8_0). That is scale * (codes - offset) per block with offset 8, -m / d or 0: the
form of Core ML's ``constexpr_blockwise_shift_scale`` (a float16 offset, so -m / d is
rounded: an error below 2^-11 of |m|, far under a quantization step) and of onnxruntime's
MatMulNBits (a float zero point, exact). The K-quants (Q4_K, Q6_K, ...: 256-weight
super-blocks with 6-bit sub-scales) have no such form and are quantized again from their
dequantized values.

Our decoder fuses q/k/v and gate/up (``projection_parts``); the fused weight keeps blocks
only when every part is kept at the same width. Llama GGUF files store q/k rows permuted;
rows move whole, so blocks (along a row) move with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from fermi.gguf import ARCHITECTURES, our_name, unpermute_rows
from fermi.gguf_reader import GGUFFile
from fermi.models.decoder import ModelConfig, projection_parts

BLOCK = 32
KEPT = {
    GGMLQuantizationType.Q4_0: 4,
    GGMLQuantizationType.Q4_1: 4,
    GGMLQuantizationType.Q8_0: 8,
}


@dataclass(frozen=True)
class Blocks:
    """w = scale * (codes - offset) per block of 32 along each row."""

    codes: np.ndarray  # [rows, cols] uint8 (4-bit: 0..15) or int8 (8-bit)
    scale: np.ndarray  # [rows, cols / 32] float16
    offset: np.ndarray | None  # [rows, cols / 32] float32, or None (Q8_0)
    bits: int
    # Q4_1's m as stored (float16 values in float32): w = d * q + m. Where d = 0 every
    # weight of the block is m, which the offset form cannot say (its offset is 0 there).
    minimum: np.ndarray | None = None

    def dequantized(self) -> np.ndarray:
        scale = np.repeat(self.scale.astype(np.float32), BLOCK, axis=1)
        if self.minimum is not None:
            return scale * self.codes.astype(np.float32) + np.repeat(self.minimum, BLOCK, axis=1)
        offset = 0.0 if self.offset is None else np.repeat(self.offset, BLOCK, axis=1)
        return scale * (self.codes.astype(np.float32) - offset)


def _read(gguf: GGUFFile, name: str) -> Blocks | None:
    info = gguf.tensors[name]
    try:
        qtype = GGMLQuantizationType(info.type_id)
    except ValueError:
        return None
    if qtype not in KEPT or len(info.shape) != 2:
        return None
    rows, cols = info.shape
    _, size = GGML_QUANT_SIZES[qtype]
    blocks = gguf.raw(name).reshape(rows * cols // BLOCK, size)
    d = blocks[:, 0:2].copy().view(np.float16).reshape(rows, cols // BLOCK)
    if qtype == GGMLQuantizationType.Q8_0:
        codes = blocks[:, 2:].copy().view(np.int8).reshape(rows, cols)
        return Blocks(codes, d, None, 8)
    packed = blocks[:, 2:] if qtype == GGMLQuantizationType.Q4_0 else blocks[:, 4:]
    # Byte j of a block holds weight j in its low nibble and weight j + 16 in its high one.
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=1).reshape(rows, cols)
    if qtype == GGMLQuantizationType.Q4_0:
        return Blocks(codes, d, np.full(d.shape, 8.0, dtype=np.float32), 4)
    m = blocks[:, 2:4].copy().view(np.float16).reshape(rows, cols // BLOCK)
    return q4_1_blocks(codes, d, m)


def q4_1_blocks(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> Blocks:
    """Q4_1's codes [rows, cols], scales d and minima m [rows, cols / 32] (float16) as
    :class:`Blocks`: offset -m / d. A block with d = 0 (llama.cpp writes one for 32 equal
    weights, every code 0) is all m, which -m / d cannot say: it becomes scale m, offset
    -1 (m * (0 + 1) = m, exactly in float16). With other codes it keeps offset 0, and only
    ``minimum`` says what it holds."""
    zero = d == 0
    flat = zero & ~(codes.reshape(*d.shape, BLOCK) != 0).any(axis=-1)
    scale = np.where(flat, m, d).astype(np.float16)
    minimum = m.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = -minimum / d.astype(np.float32)
    offset = np.where(flat, np.float32(-1), np.where(zero, np.float32(0), ratio))
    return Blocks(codes, scale, offset.astype(np.float32), 4, minimum)


def _rows(blocks: Blocks, heads: int) -> Blocks:
    """Undo llama.cpp's q/k row permutation on the codes and the per-block values."""

    def move(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else unpermute_rows(torch.from_numpy(a), heads).numpy()

    moved = (move(blocks.codes), move(blocks.scale), move(blocks.offset))
    return Blocks(*moved, blocks.bits, move(blocks.minimum))


def _cat(parts: list[Blocks]) -> Blocks | None:
    if len({p.bits for p in parts}) != 1 or len({p.offset is None for p in parts}) != 1:
        return None
    offsets = None if parts[0].offset is None else np.concatenate([p.offset for p in parts])
    minimum = None
    if any(p.minimum is not None for p in parts):  # Q4_1 beside Q4_0, whose m is -8d
        minimum = np.concatenate(
            [-8.0 * p.scale.astype(np.float32) if p.minimum is None else p.minimum for p in parts]
        )
    return Blocks(
        np.concatenate([p.codes for p in parts]),
        np.concatenate([p.scale for p in parts]),
        offsets,
        parts[0].bits,
        minimum,
    )


def model_blocks(path: Path, cfg: ModelConfig) -> dict[str, Blocks]:
    """Our decoder's weight name -> the blocks the GGUF file stores for it (only weights
    whose every part is in a kept format)."""
    gguf = GGUFFile(path)
    arch = gguf.metadata.get("general.architecture")
    permuted = ARCHITECTURES.get(arch, ("", False))[1]
    found: dict[str, Blocks] = {}
    for name in gguf.tensors:
        ours = our_name(name, arch)
        blocks = _read(gguf, name) if ours is not None else None
        if blocks is None:
            continue
        if permuted and ".attn_q." in name:
            blocks = _rows(blocks, cfg.num_attention_heads)
        elif permuted and ".attn_k." in name:
            blocks = _rows(blocks, cfg.num_key_value_heads)
        found[ours] = blocks
    for fused, parts in projection_parts(cfg).items():
        for layer in range(cfg.num_hidden_layers):
            prefix = f"model.layers.{layer}."
            names = [f"{prefix}{part}.weight" for part, _ in parts]
            if all(n in found for n in names):
                joined = _cat([found.pop(n) for n in names])
                if joined is not None:
                    found[f"{prefix}{fused}.weight"] = joined
            else:
                for n in names:
                    found.pop(n, None)
    if cfg.tie_word_embeddings:
        found.pop("lm_head.weight", None)
    return found
