"""A GGUF file with every tensor dequantized: matrices as F16, 1-D tensors (norms) as F32.

For llama.cpp's F16 figures beside Fermi fp16 on the same model (``bench_vs_llamacpp.py
--f16-gguf``): llama.cpp's own converter stores a model's tensors this way, and the packaged
SmolLM2 file has only Q4_1 / Q8_0 blocks. Every key/value of the source is copied, the
tokenizer's arrays with their element types, except ``general.file_type``, which is set to
F16 (it names the tensors' storage, which changes here). Each tensor keeps its name and
shape; an F16 value is the block's dequantized float rounded once.

Uses ``gguf`` (gguf-py, llama.cpp's reader/writer), which is not one of Fermi's
dependencies: run it with llama-cpp-python's environment, after
``/tmp/llamacpp-venv/bin/pip install gguf``::

    /tmp/llamacpp-venv/bin/python perf/gguf_to_f16.py SOURCE.gguf /tmp/smollm2-135m-f16.gguf
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.constants import Keys
from gguf.quants import dequantize


def convert(source: Path, target: Path) -> None:
    reader = GGUFReader(source)
    architecture = reader.get_field(Keys.General.ARCHITECTURE).contents()
    writer = GGUFWriter(target, architecture)  # writes general.architecture itself
    for field in reader.fields.values():
        # "GGUF.*" are the reader's view of the header (version, counts), not keys.
        if field.name == Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub_kind = field.types[-1] if kind == GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == Keys.General.FILE_TYPE:
            value = LlamaFileType.MOSTLY_F16
        elif field.name == Keys.General.ALIGNMENT:
            writer.data_alignment = value
        writer.add_key_value(field.name, value, kind, sub_type=sub_kind)
    for tensor in reader.tensors:
        # The reader gives dimensions in GGML's order (fastest first); numpy's is the reverse,
        # and the writer reverses numpy's shape again when it writes the header.
        shape = tuple(reversed(tensor.shape.tolist()))
        values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        stored = np.float16 if len(shape) >= 2 else np.float32
        writer.add_tensor(tensor.name, np.ascontiguousarray(values, dtype=stored))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="GGUF file (any types gguf-py dequantizes)")
    parser.add_argument("target", type=Path, help="the F16 GGUF file to write")
    args = parser.parse_args()
    convert(args.source, args.target)
    written = GGUFReader(args.target)
    kinds = sorted({GGMLQuantizationType(t.tensor_type).name for t in written.tensors})
    size = args.target.stat().st_size / 1e6
    print(f"{args.target}: {len(written.tensors)} tensors ({', '.join(kinds)}), {size:.1f} MB")


if __name__ == "__main__":
    main()
