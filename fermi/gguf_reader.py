"""Read a GGUF file: metadata, tensor directory, and tensors dequantized to torch.

The ``gguf`` package supplies the format's constants and the block dequantizers
(``gguf.quants``). Its ``GGUFReader`` is not used for the header: it builds a numpy view per
array element, which takes about 4.5 s on SmolLM2's 49k-token vocabulary alone on this
machine, against ~0.1 s for the plain ``struct`` walk below.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf import quants as gguf_quants

from fermi.errors import ModelLoadError
from fermi.models.quant import QuantizedWeight

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# ggml tensors have at most 4 dimensions (GGML_MAX_DIMS).
MAX_DIMS = 4
# llama.cpp never writes arrays of arrays; a few levels are allowed, not the thousands a
# hostile file uses to exhaust the stack.
MAX_ARRAY_DEPTH = 4
# The fewest bytes a key/value pair (key length, value type, one byte) and a tensor entry
# (name length, dimension count, type, offset) take: counts that need more bytes than the
# file holds are refused before any loop runs over them.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8
_INT64_MAX = (1 << 63) - 1

# Plain float types map straight onto a torch dtype; no dequantization needed.
_FLOAT_TYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}
# Block formats we dequantize (through gguf.quants); each one is covered by a test.
_BLOCK_TYPES = (
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q2_K,
    GGMLQuantizationType.Q3_K,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K,
)
SUPPORTED_TYPES = tuple(t.name for t in (*_FLOAT_TYPES, *_BLOCK_TYPES))

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY_TYPES = {
    GGUFValueType.UINT8: np.uint8,
    GGUFValueType.INT8: np.int8,
    GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16,
    GGUFValueType.UINT32: np.uint32,
    GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32,
    GGUFValueType.BOOL: np.bool_,
    GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64,
    GGUFValueType.FLOAT64: np.float64,
}


# The type the format gives each key the loader reads (arch-specific keys by the part after
# "{arch}."): a hostile file that stores a list as general.architecture or a string as a
# token id is refused here, naming the key, instead of failing somewhere in the loader.
_STR, _INT, _NUMBER, _BOOL, _STR_LIST, _INT_ARRAY = (
    "a string",
    "an integer",
    "a number",
    "a boolean",
    "an array of strings",
    "an array of integers",
)
KEY_TYPES = {
    "general.architecture": _STR,
    "general.name": _STR,
    "tokenizer.ggml.model": _STR,
    "tokenizer.ggml.pre": _STR,
    "tokenizer.chat_template": _STR,
    "tokenizer.ggml.tokens": _STR_LIST,
    "tokenizer.ggml.merges": _STR_LIST,
    "tokenizer.ggml.token_type": _INT_ARRAY,
    "tokenizer.ggml.add_bos_token": _BOOL,
    "tokenizer.ggml.add_eos_token": _BOOL,
    **{
        f"tokenizer.ggml.{name}_token_id": _INT
        for name in ("bos", "eos", "eot", "padding", "unknown", "seperator")
    },
}
ARCH_KEY_TYPES = {
    **dict.fromkeys(
        (
            "block_count",
            "context_length",
            "embedding_length",
            "feed_forward_length",
            "vocab_size",
            "attention.head_count",
            "attention.head_count_kv",
            "attention.key_length",
            "attention.value_length",
            "attention.sliding_window",
            "rope.dimension_count",
            "rope.scaling.original_context_length",
        ),
        _INT,
    ),
    **dict.fromkeys(
        (
            "attention.layer_norm_rms_epsilon",
            "attention.scale",
            "rope.freq_base",
            "rope.freq_base_swa",
            "rope.scaling.factor",
            "rope.scaling.attn_factor",
            "logit_scale",
            "embedding_scale",
            "residual_scale",
            "final_logit_softcapping",
        ),
        _NUMBER,
    ),
    "rope.scaling.type": _STR,
}


def _has_type(value: Any, kind: str) -> bool:
    if kind == _STR:
        return isinstance(value, str)
    if kind == _BOOL:
        return isinstance(value, bool | np.bool_)
    if kind == _INT:
        return isinstance(value, int | np.integer) and not isinstance(value, bool)
    if kind == _NUMBER:
        return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
            value, bool
        )
    if kind == _STR_LIST:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.integer)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: ggml's dimension list reversed
    type_id: int  # ggml type number (GGMLQuantizationType value)
    offset: int  # from the start of the file
    nbytes: int

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.type_id).name
        except ValueError:
            return f"type {self.type_id}"


class _Cursor:
    """Sequential little-endian reads from a buffer, with errors naming the file."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def scalar(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise ModelLoadError(f"{self.path}: GGUF header is truncated") from None
        self.pos += struct.calcsize(fmt)
        return value

    def count(self, fmt: str, each: int, what: str) -> int:
        """A count of items that take at least ``each`` bytes: refused when the rest of the
        file cannot hold them, so no loop runs over a hostile 2**64."""
        value = self.scalar(fmt)
        if value * each > len(self.buf) - self.pos:
            raise ModelLoadError(
                f"{self.path}: GGUF header is truncated or corrupt: {what} declares "
                f"{value} items, more than the rest of the file can hold"
            )
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        end = self.pos + length
        if end > len(self.buf):
            raise ModelLoadError(f"{self.path}: GGUF header is truncated")
        text = self.buf[self.pos : end].decode("utf-8", errors="replace")
        self.pos = end
        return text

    def value(self, vtype: int, key: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            return self.array(key, depth=1)
        try:
            return self.scalar(_SCALAR_FORMATS[GGUFValueType(vtype)])
        except (ValueError, KeyError):
            raise ModelLoadError(f"{self.path}: {key}: unknown GGUF value type {vtype}") from None

    def array(self, key: str, depth: int) -> list | np.ndarray:
        if depth > MAX_ARRAY_DEPTH:
            raise ModelLoadError(
                f"{self.path}: {key}: arrays nested more than {MAX_ARRAY_DEPTH} deep"
            )
        etype = self.scalar("<I")
        if etype == GGUFValueType.STRING:
            return [self.string() for _ in range(self.count("<Q", 8, key))]
        if etype == GGUFValueType.ARRAY:
            return [self.array(key, depth + 1) for _ in range(self.count("<Q", 12, key))]
        try:
            dtype = np.dtype(_NUMPY_TYPES[GGUFValueType(etype)])
        except (ValueError, KeyError):
            raise ModelLoadError(f"{self.path}: {key}: unknown GGUF array type {etype}") from None
        count = self.scalar("<Q")
        end = self.pos + dtype.itemsize * count
        if end > len(self.buf):
            raise ModelLoadError(f"{self.path}: GGUF header is truncated")
        values = np.frombuffer(
            self.buf, dtype=dtype.newbyteorder("<"), count=count, offset=self.pos
        )
        self.pos = end
        return values.copy()


class GGUFFile:
    """A memory-mapped GGUF file: ``metadata`` (key -> value) and ``tensors`` (name -> info)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
            raise ModelLoadError(f"{self.path}: cannot read GGUF file: {exc}") from None
        cur = _Cursor(self._buf, self.path)
        if self._buf[:4] != MAGIC:
            raise ModelLoadError(f"{self.path} is not a GGUF file (no GGUF magic)")
        cur.pos = 4
        version = cur.scalar("<I")
        if version not in (2, 3):
            # A byte-swapped version number means a big-endian file.
            raise ModelLoadError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors = cur.count("<Q", _MIN_TENSOR_BYTES, "the tensor count")
        n_kv = cur.count("<Q", _MIN_KV_BYTES, "the metadata count")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"), key)
        self._check_types()
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ModelLoadError(
                    f"{self.path}: tensor {name!r} has {n_dims} dimensions (ggml allows 1 to "
                    f"{MAX_DIMS})"
                )
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            if 0 in dims:
                raise ModelLoadError(f"{self.path}: tensor {name!r} has a dimension of 0 {dims}")
            infos.append((name, tuple(reversed(dims)), cur.scalar("<I"), cur.scalar("<Q")))
        align = self._alignment()
        data_start = -(-cur.pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, type_id, offset in infos:
            nbytes = self._nbytes(name, shape, type_id)
            if offset % align:
                raise ModelLoadError(
                    f"{self.path}: tensor {name!r} has offset {offset}, not a multiple of "
                    f"general.alignment ({align})"
                )
            start = data_start + offset
            # The bytes the shape declares must lie in the file: a header cannot make the
            # loader allocate more than the file holds.
            if start + nbytes > len(self._buf):
                raise ModelLoadError(
                    f"{self.path}: tensor {name!r} of shape {shape} needs {nbytes} bytes "
                    "and runs past the end of the file"
                )
            if name in self.tensors:  # (the last one would have won, silently)
                raise ModelLoadError(f"{self.path}: tensor {name!r} is listed twice")
            self.tensors[name] = TensorInfo(name, shape, type_id, start, nbytes)

    def _check_types(self) -> None:
        for key, value in self.metadata.items():
            kind = KEY_TYPES.get(key) or ARCH_KEY_TYPES.get(key.partition(".")[2])
            if kind is not None and not _has_type(value, kind):
                shown = repr(value) if len(repr(value)) < 80 else type(value).__name__
                raise ModelLoadError(f"{self.path}: {key} must be {kind}, not {shown}")

    def _alignment(self) -> int:
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        # As llama.cpp: a positive power of two (it divides every tensor offset).
        if (
            isinstance(align, bool)
            or not isinstance(align, int | np.integer)
            or align <= 0
            or align & (align - 1)
        ):
            raise ModelLoadError(
                f"{self.path}: general.alignment must be a positive power of two, not {align!r}"
            )
        return int(align)

    def _nbytes(self, name: str, shape: tuple[int, ...], type_id: int) -> int:
        elements = prod(shape)
        if elements > _INT64_MAX:
            raise ModelLoadError(f"{self.path}: tensor {name!r} has too many elements {shape}")
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
        except (ValueError, KeyError):
            return 0  # unknown type: reported by check_type when the tensor is used
        if shape and shape[-1] % block:
            raise ModelLoadError(
                f"{self.path}: tensor {name!r} has rows of {shape[-1]} values, not a multiple "
                f"of its type's block of {block}"
            )
        return elements // block * size

    @property
    def quantized(self) -> bool:
        """Whether any tensor is stored in a block format (Q4_0, Q6_K, ...)."""
        return any(info.type_id not in _FLOAT_TYPES for info in self.tensors.values())

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (uint8, no copy)."""
        info = self.tensors[name]
        return np.frombuffer(self._buf, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def int4_codes(self, name: str) -> QuantizedWeight | None:
        """A 4-bit block tensor (Q4_0, Q4_1, Q4_K) as int4 with groups of 32, its codes as
        stored (no float round trip); None for any other type. Its scales and minimums
        are the block's, as float32 (Q4_K's are d * scale and -dmin * min of each 32)."""
        info = self.tensors[name]
        check_type(info, self.path)
        qtype = GGMLQuantizationType(info.type_id)
        if qtype not in _INT4_BLOCKS or len(info.shape) != 2:
            return None
        n, k = info.shape
        blocks = self.raw(name).reshape(-1, GGML_QUANT_SIZES[qtype][1])
        codes, scales, mins = _INT4_BLOCKS[qtype](blocks)
        return QuantizedWeight(
            torch.from_numpy(codes.reshape(n, k // 2)),
            torch.from_numpy(scales.reshape(n, k // 32)),
            torch.from_numpy(mins.reshape(n, k // 32)),
        )

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor in torch order, dequantized and cast to ``dtype``."""
        info = self.tensors[name]
        check_type(info, self.path)
        data = self.raw(name)
        qtype = GGMLQuantizationType(info.type_id)
        if qtype in _FLOAT_TYPES:
            # bf16 has no numpy dtype: reinterpret the bytes in torch instead.
            out = torch.frombuffer(bytearray(data), dtype=_FLOAT_TYPES[qtype])
        else:
            block, size = GGML_QUANT_SIZES[qtype]
            if qtype in _FAST_DEQUANT:
                values = _FAST_DEQUANT[qtype](data.reshape(-1, size))
            else:
                values = gguf_quants.dequantize(
                    data.reshape(-1, info.shape[-1] // block * size), qtype
                )
            out = torch.from_numpy(values)
        return out.reshape(info.shape).to(dtype)


def check_type(info: TensorInfo, path: Path) -> None:
    """Raise ModelLoadError naming the tensor when its storage type is not supported."""
    if info.type_name not in SUPPORTED_TYPES:
        raise ModelLoadError(
            f"{path}: tensor {info.name!r} is stored as {info.type_name}, which is not "
            f"supported (supported: {', '.join(SUPPORTED_TYPES)})"
        )


# Q8_0, Q4_0 and Q4_1 are unpacked here with whole-array numpy ops: gguf.quants splits the
# work into many small chunks and spent 1.4 s of SmolLM2's load on them (Q4_1 + Q8_0),
# about twice this. Each block starts with a float16 scale d (Q4_1: then a float16 min m).


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    # Byte j holds element j in its low nibble and element j + 16 in its high one.
    out = np.empty((packed.shape[0], 2 * packed.shape[1]), dtype=np.uint8)
    half = packed.shape[1]
    np.bitwise_and(packed, 0x0F, out=out[:, :half])
    np.right_shift(packed, 4, out=out[:, half:])
    return out.astype(np.float32)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    out = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    out *= _half(blocks, 0)
    return out


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    out = _nibbles(blocks[:, 2:])
    out -= 8.0
    out *= _half(blocks, 0)
    return out


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    out = _nibbles(blocks[:, 4:])
    out *= _half(blocks, 0)
    out += _half(blocks, 2)
    return out


_FAST_DEQUANT = {
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
}


# The 4-bit block formats as int4 groups of 32: (codes [blocks, 16 bytes per group],
# scales, mins) with w = q * scale + min; Q4_0 and Q4_1 store their nibbles in the order
# fermi.models.quant packs them (byte j: value j low, value j + 16 high).


def _q4_0_codes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scales = _half(blocks, 0)[:, 0]
    return blocks[:, 2:].copy(), scales, -8.0 * scales


def _q4_1_codes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return blocks[:, 4:].copy(), _half(blocks, 0)[:, 0], _half(blocks, 2)[:, 0]


def _q4_k_codes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K: 256 values a block, d and dmin (fp16), 12 bytes of 6-bit sub-scales and
    sub-minimums for its eight groups of 32, then 128 bytes where each run of 32 bytes holds
    two groups (low nibbles the first, high nibbles the second), regrouped here."""
    d, dmin = _half(blocks, 0), _half(blocks, 2)
    packed = blocks[:, 4:16].astype(np.uint8)
    sc = np.empty((blocks.shape[0], 8), dtype=np.uint8)
    mn = np.empty_like(sc)
    sc[:, :4] = packed[:, 0:4] & 63
    mn[:, :4] = packed[:, 4:8] & 63
    sc[:, 4:] = (packed[:, 8:12] & 0x0F) | ((packed[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (packed[:, 8:12] >> 4) | ((packed[:, 4:8] >> 6) << 4)
    qs = blocks[:, 16:].reshape(-1, 4, 32)
    values = np.stack((qs & 0x0F, qs >> 4), axis=2).reshape(-1, 8, 2, 16)  # [b, group, half, j]
    codes = values[:, :, 0] | (values[:, :, 1] << 4)
    scales = (d * sc.astype(np.float32)).reshape(-1)
    mins = (-dmin * mn.astype(np.float32)).reshape(-1)
    return codes.reshape(-1, 16), scales, mins


_INT4_BLOCKS = {
    GGMLQuantizationType.Q4_0: _q4_0_codes,
    GGMLQuantizationType.Q4_1: _q4_1_codes,
    GGMLQuantizationType.Q4_K: _q4_k_codes,
}
