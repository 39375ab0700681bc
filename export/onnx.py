"""ONNX export: one graph for prefill and decode, the KV cache window as input/output.

Graph: input_ids [batch, query] int64, position_ids [batch, query] int64,
past_keys / past_values [layers, batch, kv_heads, past, head_dim] ->
logits [batch, vocab] float32 (each row's last token), new_keys / new_values
[layers, batch, kv_heads, query, head_dim]. ``past`` covers positions 0..P-1 with every
position of this step < P; the runner keeps the cache and stores the new entries.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import torch

from export.wrapper import OnnxStep
from fermi.models.decoder import Decoder
from fermi.runners.artefact import TensorSpec

# onnxruntime 1.2x implements opset 18 throughout; newer opsets add nothing this graph uses.
OPSET = 18
INPUT_NAMES = ["input_ids", "position_ids", "past_keys", "past_values"]
OUTPUT_NAMES = ["logits", "new_keys", "new_values"]
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}


def export_onnx(decoder: Decoder, path: Path, max_seq_len: int) -> None:
    """Trace ``decoder`` (with torch.export) into ``path``; weights may go to a
    ``<name>.data`` file beside it."""
    cfg = decoder.cfg
    decoder.setup_cache(1, max_seq_len)  # the rope tables; the wrapper replaces the cache
    dtype = decoder.model.embed_tokens.weight.dtype
    step = OnnxStep(decoder).eval()
    # Example sizes are distinct and > 1 so that no axis gets specialised to a constant.
    batch, query, past = 2, 3, 7
    layers, kv, dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    example = (
        torch.zeros(batch, query, dtype=torch.long),
        torch.arange(past - query, past).expand(batch, query).contiguous(),
        torch.zeros(layers, batch, kv, past, dim, dtype=dtype),
        torch.zeros(layers, batch, kv, past, dim, dtype=dtype),
    )
    b, q, p = torch.export.Dim("batch"), torch.export.Dim("query"), torch.export.Dim("past")
    dynamic = ({0: b, 1: q}, {0: b, 1: q}, {1: b, 3: p}, {1: b, 3: p})
    # The exporter logs a warning per torchvision op it cannot register; none is used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            step,
            example,
            dynamo=True,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            verbose=False,
        )
    program.save(str(path), external_data=_needs_external_data(decoder))


def _needs_external_data(decoder: Decoder) -> bool:
    # A protobuf file cannot exceed 2 GiB; keep small models in one file.
    size = sum(p.numel() * p.element_size() for p in decoder.parameters())
    return size > 1 << 30


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation of the MatMul weights (activations quantised at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])


def move_model(source: Path, target_dir: Path, name: str) -> None:
    """Move an exported model (and its external data file, if any) into ``target_dir``."""
    shutil.move(source, target_dir / name)
    data = source.with_name(source.name + ".data")
    if data.exists():
        # The graph refers to its data file by name; keep the name it was saved with.
        shutil.move(data, target_dir / data.name)


def io_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs as onnxruntime reports them."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def spec(arg) -> TensorSpec:
        shape = [d if isinstance(d, int) else str(d) for d in arg.shape]
        return TensorSpec(arg.name, shape, _ORT_DTYPES.get(arg.type, arg.type))

    return [spec(a) for a in session.get_inputs()], [spec(a) for a in session.get_outputs()]
