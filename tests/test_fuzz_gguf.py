"""Fuzz the GGUF loader with hostile headers: fields of a real file overwritten with
extreme values, hostile metadata appended after a real file's own, and headers generated
from nothing. Every file either loads or raises ``ModelLoadError`` naming it; nothing
else escapes, nothing hangs, and memory stays bounded.

The header is walked here, independently of ``fermi/gguf_reader.py``, to find where each
count, type, length, dimension and offset lies.
"""

from __future__ import annotations

import resource
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fermi.errors import ModelLoadError
from fermi.gguf import load_gguf
from tests.gguf_files import packed_string, raw_gguf, write_gguf
from tests.tiny import write_checkpoint

CPU = torch.device("cpu")
STRING, ARRAY = 8, 9
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
# Keys a hostile file would aim at: sizes, alignment, rope scaling, the vocabulary.
KEYS = [
    "general.alignment",
    "general.architecture",
    "qwen3.block_count",
    "qwen3.context_length",
    "qwen3.embedding_length",
    "qwen3.feed_forward_length",
    "qwen3.attention.head_count",
    "qwen3.attention.head_count_kv",
    "qwen3.attention.key_length",
    "qwen3.attention.layer_norm_rms_epsilon",
    "qwen3.rope.freq_base",
    "qwen3.rope.dimension_count",
    "qwen3.rope.scaling.type",
    "qwen3.rope.scaling.factor",
    "qwen3.rope.scaling.original_context_length",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.chat_template",
]


def header_fields(data: bytes) -> tuple[list[tuple[int, int]], int]:
    """(offset, width) of every count, type, length, dimension and offset in a well-formed
    header (the first few of a long array's), and where the key/value section ends."""
    fields = [(4, 4), (8, 8), (16, 8)]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string() -> None:
        nonlocal pos
        fields.append((pos, 8))
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]

    def value(vtype: int, record: bool) -> None:
        nonlocal pos
        if vtype == STRING:
            if record:
                string()
            else:
                pos += 8 + struct.unpack_from("<Q", data, pos)[0]
        elif vtype == ARRAY:
            etype, count = struct.unpack_from("<IQ", data, pos)
            fields.extend([(pos, 4), (pos + 4, 8)])
            pos += 12
            for i in range(count):
                value(etype, record and i < 3)
        else:
            pos += _SCALAR_SIZES[vtype]

    for _ in range(n_kv):
        string()
        fields.append((pos, 4))
        pos += 4
        value(struct.unpack_from("<I", data, pos - 4)[0], True)
    kv_end = pos
    for _ in range(n_tensors):
        string()
        n_dims = struct.unpack_from("<I", data, pos)[0]
        fields.extend(
            (pos + 4 * (i > 0) + 8 * max(i - 1, 0), 4 if i == 0 else 8) for i in range(n_dims + 1)
        )
        pos += 4 + 8 * n_dims
        fields.extend([(pos, 4), (pos + 4, 8)])
        pos += 12
    return fields, kv_end


@pytest.fixture(scope="module")
def real_file(tmp_path_factory) -> bytes:
    folder = write_checkpoint(tmp_path_factory.mktemp("fuzz-gguf") / "tiny")
    path = write_gguf(folder, folder.parent / "tiny.gguf", "qwen3")
    load_gguf(path, CPU, torch.float32)  # the unmutated file loads
    return path.read_bytes()


def extreme(width: int) -> st.SearchStrategy[int]:
    top = (1 << (8 * width)) - 1
    return st.sampled_from([0, 1, 2, 3, 7, 8, 9, 13, 31, 32, 33, top, top >> 1, (top >> 1) + 1])


def typed_value(depth: int = 0) -> st.SearchStrategy[tuple[int, bytes]]:
    """(value type, packed value) of any GGUF type, wrong ones and lying counts included."""
    scalar = st.sampled_from(sorted(_SCALAR_SIZES)).flatmap(
        lambda t: st.binary(min_size=_SCALAR_SIZES[t], max_size=_SCALAR_SIZES[t]).map(
            lambda raw, t=t: (t, raw)
        )
    )
    text = st.text(max_size=20).map(lambda s: (STRING, packed_string(s)))
    unknown = st.integers(13, 2**32 - 1).map(lambda t: (t, b""))
    choices = [scalar, text, unknown]
    if depth < 6:
        element = typed_value(depth + 1)

        def array(items: list[tuple[int, bytes]], lie: int | None) -> tuple[int, bytes]:
            etype = items[0][0] if items else STRING
            count = len(items) if lie is None else lie
            body = b"".join(raw for _, raw in items)
            return ARRAY, struct.pack("<IQ", etype, count) + body

        choices.append(st.builds(array, st.lists(element, max_size=3), st.none() | extreme(8)))
    return st.one_of(*choices)


def kv_entry() -> st.SearchStrategy[bytes]:
    key = st.sampled_from(KEYS) | st.text(max_size=12)
    return st.builds(
        lambda k, v: packed_string(k) + struct.pack("<I", v[0]) + v[1], key, typed_value()
    )


def tensor_info() -> st.SearchStrategy[bytes]:
    name = st.sampled_from(["token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight"])

    def pack(name: str, dims: list[int], ggml_type: int, offset: int) -> bytes:
        head = packed_string(name) + struct.pack("<I", len(dims))
        return head + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ggml_type, offset)

    dims = st.lists(extreme(8) | st.integers(1, 4096), max_size=6)
    return st.builds(pack, name | st.text(max_size=8), dims, st.integers(0, 40), extreme(8))


class Hostile(bytes):
    """A file's bytes, shown in a failure report by how they were made (not 1 MB of them)."""

    how: str

    def __repr__(self) -> str:
        return self.how


def hostile(data: bytes, how: str) -> Hostile:
    out = Hostile(data)
    out.how = how
    return out


@st.composite
def hostile_files(draw, real: bytes) -> Hostile:
    fields, kv_end = header_fields(real)
    kind = draw(st.sampled_from(["overwrite", "append", "generate", "cut"]))
    if kind == "overwrite":  # fields of the real header set to extreme values
        data, changes = bytearray(real), []
        for offset, width in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3)):
            value = draw(extreme(width))
            data[offset : offset + width] = value.to_bytes(width, "little")
            changes.append(f"{width} bytes at {offset} = {value}")
        return hostile(data, "real file with " + ", ".join(changes))
    if kind == "append":  # hostile metadata after the real file's own (later keys win)
        extra = draw(st.lists(kv_entry(), min_size=1, max_size=4))
        n_kv = struct.unpack_from("<Q", real, 16)[0] + len(extra)
        head = real[:16] + struct.pack("<Q", n_kv) + real[24:kv_end]
        return hostile(head + b"".join(extra) + real[kv_end:], f"real file plus {extra}")
    if kind == "generate":
        kvs = draw(st.lists(kv_entry(), max_size=5))
        tensors = draw(st.lists(tensor_info(), max_size=3))
        n_kv = draw(st.just(len(kvs)) | extreme(8))
        data = raw_gguf(b"".join(kvs), n_kv, b"".join(tensors), len(tensors)) + b"\0" * 64
        return hostile(data, repr(data))
    end = draw(st.integers(0, len(real) - 1))
    return hostile(real[:end], f"real file cut at {end}")


# A moved tensor offset loads other bytes as its scales: garbage float16 math overflows
# with a warning, which is a clean (if useless) load, not an error.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_hostile_gguf_headers_load_or_raise_model_load_error_naming_the_file(real_file):
    started = time.monotonic()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    outcomes = {"loaded": 0, "refused": 0}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "hostile.gguf"

        @settings(
            max_examples=200,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(hostile_files(real_file))
        def fuzz(data: bytes) -> None:
            path.write_bytes(data)
            try:
                load_gguf(path, CPU, torch.float32)
            except ModelLoadError as exc:
                assert str(path) in str(exc), str(exc)
                outcomes["refused"] += 1
            else:
                outcomes["loaded"] += 1

        fuzz()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown < 512, f"peak memory grew {grown:.0f} MiB"
    assert outcomes["refused"], outcomes
    assert time.monotonic() - started < 60
