"""Core ML export: a stateful ML Program (.mlpackage) for macOS 15 / iOS 18.

Two shapes of package, by the compute units it is built for:

- ``ALL`` / ``CPU_AND_GPU`` / ``CPU_ONLY`` (range shapes): inputs input_ids [1, query]
  int32 and causal_mask [1, 1, query, kv] float16 (additive), both range-flexible;
  attention reads the kv live positions only.
- ``CPU_AND_NE`` (enumerated shapes, for the Neural Engine, which runs a range-flexible
  input only at its default shape): inputs input_ids [1, query] int32 with query one of
  ``query_sizes(chunk)`` (1, 2, 4, ... up to the prefill chunk) and position [1] int32;
  attention reads the whole cache, masked inside the model.

Both: output logits [1, vocab] float32; states k_cache / v_cache [layers, 1, kv_heads,
max_seq_len, head_dim] float16. Traced with ``torch.jit.trace`` (coremltools 9 converts a
torch 2.13 trace; its torch.export path is beta).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from export.gguf_blocks import Blocks
from export.wrapper import CoreMLPositionStep, CoreMLStep
from fermi.loading import Checkpoint
from fermi.models.decoder import Decoder
from fermi.runners.artefact import TensorSpec
from fermi.runners.base import Capabilities
from fermi.runners.coreml import causal_mask, split_query

STATE_NAMES = ("k_cache", "v_cache")
# What the export's numerics check runs for a package (Core ML cannot run off macOS).
CHECKED = (
    "the package's weights and rope tables, read back and dequantized, in the torch "
    "decoder with an fp16 cache (float32 arithmetic)"
)


def query_sizes(chunk: int) -> list[int]:
    """The enumerated query lengths of a Neural Engine package: the powers of two below
    ``chunk``, and ``chunk``. Any prompt chunk is a sum of at most log2(chunk) + 1 of them
    (taken largest first), and a decode step is size 1."""
    sizes = [1 << i for i in range(chunk.bit_length()) if 1 << i < chunk]
    return [*sizes, chunk]


def build_step(decoder: Decoder, max_seq_len: int, enumerated: bool = False) -> CoreMLStep:
    """The wrapper that gets traced: the decoder's weights, fp16 cache buffers; with
    ``enumerated``, the fixed-shape one (position input, whole cache read)."""
    kind = CoreMLPositionStep if enumerated else CoreMLStep
    return kind(decoder, max_seq_len, torch.float16).eval()


def cast_for_trace(decoder: Decoder) -> bool:
    """Cast ``decoder`` to fp16 for an fp16 package, so that the converter holds each
    weight once, in fp16 (traced in float32 it held float32 constants and then an fp16 copy
    of each: a 10.1 GB peak for Qwen3-0.6B's 2.4 GB, perf/LOG.md run 46). The weights that
    ship are the same either way. Not for a model that scales its queries by a number
    (Granite, some Gemma 3): in fp16 the converter makes that product float32 and the
    attention's inputs disagree, so it is traced in float32 as before. Returns whether it
    cast."""
    if decoder.cfg.query_scale is not None:
        return False
    decoder.half()
    return True


def trace(step: CoreMLStep) -> torch.jit.ScriptModule:
    ids = torch.zeros(1, 3, dtype=torch.int32)
    if isinstance(step, CoreMLPositionStep):
        example: tuple[torch.Tensor, ...] = (ids, torch.tensor([4], dtype=torch.int32))
    else:
        example = (ids, torch.from_numpy(causal_mask(4, 3)))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about shape arithmetic (intended)
        traced = torch.jit.trace(step, example)
    # Tracing ran the model once and wrote its cache buffers; start conversion from zeros.
    step.k_cache.zero_()
    step.v_cache.zero_()
    return traced


def convert(
    traced: torch.jit.ScriptModule,
    step: CoreMLStep,
    max_seq_len: int,
    max_query: int,
    compute_fp16: bool,
    compute_units: str = "ALL",
):
    """Convert the trace into a stateful ML Program (saved with ``.save(path)``), with
    range shapes, or the enumerated ones for a :class:`CoreMLPositionStep`."""
    import coremltools as ct

    _register_addcmul()
    if isinstance(step, CoreMLPositionStep):
        sizes = [[1, n] for n in query_sizes(max_query)]
        enumerated = ct.EnumeratedShapes(shapes=sizes, default=[1, 1])
        inputs = [
            ct.TensorType(name="input_ids", shape=enumerated, dtype=np.int32),
            ct.TensorType(name="position", shape=(1,), dtype=np.int32),
        ]
    else:
        query = ct.RangeDim(lower_bound=1, upper_bound=max_query, default=1, symbol="query")
        kv = ct.RangeDim(lower_bound=1, upper_bound=max_seq_len, default=1, symbol="kv")
        inputs = [
            ct.TensorType(name="input_ids", shape=(1, query), dtype=np.int32),
            ct.TensorType(name="causal_mask", shape=(1, 1, query, kv), dtype=np.float16),
        ]
    shape = tuple(step.k_cache.shape)
    states = [
        ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=name)
        for name in STATE_NAMES
    ]
    precision = ct.precision.FLOAT16 if compute_fp16 else ct.precision.FLOAT32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ct.convert(
            traced,
            inputs=inputs,
            outputs=[ct.TensorType(name="logits", dtype=np.float32)],
            states=states,
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=precision,
            compute_units=getattr(ct.ComputeUnit, compute_units),
            convert_to="mlprogram",
            skip_model_load=True,  # loading needs macOS; the runner loads it there
        )
    return model


def _register_addcmul() -> None:
    """Give coremltools a converter for ``addcmul`` (x + value * t1 * t2), which it lacks
    (9.0) and the decoder's rope uses (``fermi.models.rope.rotate``)."""
    from coremltools.converters.mil import Builder
    from coremltools.converters.mil.frontend.torch import register_torch_op
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    if _TORCH_OPS_REGISTRY.get_func("addcmul") is not None:
        return

    def addcmul(context, node):
        x, t1, t2, value = _get_inputs(context, node, expected=4)
        if value.val is None:
            raise NotImplementedError("addcmul with a value computed in the graph")
        product = Builder.mul(x=t1, y=t2)
        if value.val != 1:
            product = Builder.mul(x=product, y=float(value.val))
        context.add(Builder.add(x=x, y=product, name=node.name))

    register_torch_op(addcmul)


def quantize(model, quantize: str, kept: dict[str, Blocks] | None = None):
    """Weight-only quantisation of every large weight (linear layers and the embedding,
    which tied checkpoints share with the output layer) except the rope tables: int4 per
    block of 32, or int8 per output channel. ``kept`` (a GGUF source's blocks, by our
    weight name) are stored as they are instead (:mod:`export.gguf_blocks`)."""
    import coremltools.optimize.coreml as cto
    from coremltools.models.utils import _apply_graph_pass

    if quantize == "int4":
        # Per-block int4 (block 32), as in Apple's Llama 3.1 Core ML guide.
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32
        )
    else:
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel"
        )
    kept_consts = {
        const: blocks for name, blocks in (kept or {}).items() for const in _const_names_of(name)
    }
    # cos/sin tables are exact values gathered by position; 4 bits would blur every angle.
    skip = [n for n in _const_names(model.get_spec()) if "rope_" in n or n in kept_consts]
    config = cto.OptimizationConfig(global_config=op, op_name_configs=dict.fromkeys(skip))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cto.linear_quantize_weights(model, config)
        if kept_consts:
            model = _apply_graph_pass(model, _keep_blocks(kept_consts), skip_model_load=True)
    return model


def _const_names_of(weight: str) -> tuple[str, str]:
    """The MIL const the converter makes of our decoder's weight ``weight``: traced in
    fp16 (``export.build`` casts a package's weights before tracing) and in float32 with
    the converter's fp16 cast."""
    stem = "decoder_" + weight.replace(".", "_")
    return stem, stem + "_to_fp16"


def _keep_blocks(blocks: dict[str, Blocks]):
    """A MIL graph pass: each named fp16 const becomes a ``constexpr_blockwise_shift_scale``
    of the given blocks (run after the converter's own quantisation, which would otherwise
    take the blocks' scales for weights and quantize them too)."""
    from coremltools.converters.mil import Builder
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass

    def replace(function, op, kept: Blocks) -> None:
        if tuple(op.outputs[0].shape) != kept.codes.shape:
            raise RuntimeError(f"{op.name}: shape {op.outputs[0].shape}, GGUF {kept.codes.shape}")
        data = kept.codes.astype(types.np_uint4_dtype if kept.bits == 4 else np.int8)
        # The blocks dequantize to the weight's own type: fp16, or float32 (--dtype fp32).
        real = np.float32 if op.outputs[0].dtype == types.fp32 else np.float16
        with function:
            var = Builder.constexpr_blockwise_shift_scale(
                data=data,
                scale=kept.scale.astype(real),
                offset=None if kept.offset is None else kept.offset.astype(real),
                before_op=op,
                name=op.name + "_gguf_blocks",
            )
        block = op.enclosing_block
        block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=var)
        block.remove_ops([op])

    class KeepBlocks(AbstractGraphPass):
        def apply(self, prog) -> None:
            for function in prog.functions.values():
                for op in list(function.operations):
                    if op.op_type == "const" and op.name in blocks:
                        replace(function, op, blocks[op.name])

    return KeepBlocks()


def _const_names(spec) -> list[str]:
    names = []
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            names += [op.outputs[0].name for op in block.operations if op.type == "const"]
    return names


def io_specs(package: Path) -> tuple[list[TensorSpec], list[TensorSpec], list[TensorSpec]]:
    """Inputs, outputs and states of a saved package, read from its spec (no macOS needed)."""
    spec = load_spec(package)
    desc = spec.description
    return (
        [_feature(f) for f in desc.input],
        [_feature(f) for f in desc.output],
        [_feature(f, state=True) for f in desc.state],
    )


def load_spec(package: Path):
    import coremltools as ct

    return ct.models.MLModel(str(package), skip_model_load=True).get_spec()


def program_ops(spec) -> set[str]:
    """Every op type in the ML Program's functions."""
    ops: set[str] = set()
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            ops.update(op.type for op in block.operations)
    return ops


def _feature(feature, state: bool = False) -> TensorSpec:
    array = feature.type.stateType.arrayType if state else feature.type.multiArrayType
    shape: list[int | str] = list(array.shape)
    ranges = array.shapeRange.sizeRanges
    enumerated = [list(s.shape) for s in array.enumeratedShapes.shapes]
    if ranges:  # flexible axes: name them by their range, e.g. "1..64"
        shape = [
            f"{r.lowerBound}..{r.upperBound}" if r.lowerBound != r.upperBound else r.lowerBound
            for r in ranges
        ]
    elif enumerated:  # enumerated axes: their sizes, e.g. "1|2|4|8|16"
        shape = [
            "|".join(map(str, sorted(set(axis)))) if len(set(axis)) > 1 else axis[0]
            for axis in zip(*enumerated, strict=True)
        ]
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType

    dtype = ArrayFeatureType.ArrayDataType.Name(array.dataType).lower()  # "float16"...
    return TensorSpec(feature.name, shape, dtype)


class StepRunner:
    """Runs the (eager or traced) Core ML wrapper through the Runner protocol, one slot.

    This is what can be checked on Linux: the module handed to the converter computes
    what the engine computes.
    """

    def __init__(
        self,
        step: torch.nn.Module,
        vocab_size: int,
        max_seq_len: int,
        chunk: int,
        sizes: list[int] | None = None,
    ):
        """``sizes``: the enumerated query lengths of a position step (None: range
        shapes, a causal mask per call)."""
        self.step = step
        self.sizes = sizes
        self.capabilities = Capabilities(
            "coreml-trace", 1, max_seq_len, vocab_size, torch.device("cpu"), chunk
        )

    @torch.no_grad()
    def prefill(self, slot: int, token_ids: list[int], start_pos: int) -> torch.Tensor:
        if not self.sizes:
            ids = torch.tensor([token_ids], dtype=torch.int32)
            mask = torch.from_numpy(causal_mask(start_pos, len(token_ids)))
            return self.step(ids, mask)[0].float()
        done = 0
        for size in split_query(len(token_ids), self.sizes):
            ids = torch.tensor([token_ids[done : done + size]], dtype=torch.int32)
            position = torch.tensor([start_pos + done], dtype=torch.int32)
            logits = self.step(ids, position)
            done += size
        return logits[0].float()

    def decode(self, slots: list[int], token_ids: list[int], positions: list[int]) -> torch.Tensor:
        return torch.stack(
            [self.prefill(s, [t], p) for s, t, p in zip(slots, token_ids, positions, strict=True)]
        )

    def release(self, slot: int) -> None:
        """Nothing to do: positions are overwritten before they are read."""


def package_constants(package: Path) -> dict[str, np.ndarray]:
    """Every constant tensor of a saved package by its MIL name (``each_constant``)."""
    return dict(each_constant(package))


def each_constant(package: Path) -> Iterator[tuple[str, np.ndarray]]:
    """The constant tensors of a saved package with their MIL names, one at a time, read on
    any platform; quantized ones dequantized as Core ML will.

    Each is read straight from the package's weight file, blob by blob, so a caller that
    copies each and lets it go holds one at a time (reading the whole program first held
    every weight of Qwen3-0.6B at once: perf/LOG.md run 48). The quantized weights our
    export writes (``constexpr_blockwise_shift_scale``: int8, int4 and a GGUF's blocks) are
    dequantized here; a package with any other ``constexpr_*`` op goes through
    coremltools' program reader, which holds every constant.
    """
    import coremltools as ct

    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    ops = [
        op
        for function in spec.mlProgram.functions.values()
        for op in function.block_specializations[function.opset].operations
    ]
    ours = all(
        op.type == SHIFT_SCALE and all(_held(bound.arguments[0]) for bound in op.inputs.values())
        for op in ops
        if op.type.startswith("constexpr_")
    )
    if not ours:
        yield from _program_constants(spec, model.weights_dir)
        return
    weights = Path(model.weights_dir)
    for op in ops:
        name = _op_name(op)
        if op.type == "const" and "val" in op.attributes:
            value = _read_value(op.attributes["val"], weights)
            if value is not None and value.dtype.kind == "f" and value.ndim:
                yield name, value
        elif op.type == SHIFT_SCALE:
            yield name, _shift_scale(op, weights)


# The dequantizing op of Core ML's linear quantization (int8, int4) and of a GGUF's blocks.
SHIFT_SCALE = "constexpr_blockwise_shift_scale"
_READS = {
    "FLOAT16": "read_fp16_data",
    "FLOAT32": "read_float_data",
    "INT8": "read_int8_data",
    "UINT8": "read_uint8_data",
    "INT4": "read_int4_data",
    "UINT4": "read_uint4_data",
}


def _op_name(op) -> str:
    """An op's MIL name (coremltools' reader names a constant so; a converter-made one's
    output may be named otherwise: ``op_161_to_fp16`` for ``var_161_to_fp16``)."""
    if "name" in op.attributes:
        names = op.attributes["name"].immediateValue.tensor.strings.values
        if names:
            return names[0]
    return op.outputs[0].name if op.outputs else ""


def _held(argument) -> bool:
    """Whether a shift-scale input is a value ``_read_value`` reads: a constant of a type
    it reads, in the weight file or held in the program (coremltools holds inputs under 10
    elements there, an integer one packed: those packages take coremltools' reader)."""
    from coremltools.proto import MIL_pb2

    if argument.name:
        return False
    value = argument.value
    if value.WhichOneof("value") == "blobFileValue":
        return MIL_pb2.DataType.Name(value.type.tensorType.dataType) in _READS
    return _read_value(value, Path()) is not None  # (held in the program: no file is read)


def _read_value(value, weights: Path) -> np.ndarray | None:
    """A value's tensor, from the weight file or held in the program; None for a type no
    weight has. A reader per blob: a reader maps its file and keeps every page it read
    resident until it goes."""
    from coremltools.libmilstoragepython import _BlobStorageReader
    from coremltools.proto import MIL_pb2

    tensor = value.type.tensorType
    kind = MIL_pb2.DataType.Name(tensor.dataType)
    shape = tuple(int(d.constant.size) for d in tensor.dimensions)
    where = value.WhichOneof("value")
    if kind not in _READS:
        return None
    if where == "blobFileValue":
        blob = value.blobFileValue
        reader = _BlobStorageReader(str(weights / Path(blob.fileName).name))
        data = getattr(reader, _READS[kind])(blob.offset)
        if kind == "FLOAT16":
            data = data.view(np.float16)
    elif where == "immediateValue":
        held = value.immediateValue.tensor
        if held.WhichOneof("value") == "floats":
            data = np.asarray(held.floats.values, dtype=np.float32)
        elif held.WhichOneof("value") == "bytes" and kind == "FLOAT16":
            data = np.frombuffer(held.bytes.values, dtype=np.float16)
        else:
            return None
    else:
        return None
    return data.reshape(shape)


def _shift_scale(op, weights: Path) -> np.ndarray:
    """``scale * (data - offset)``, each scale and offset over its block of ``data`` (the
    block along each axis is ``data``'s size over ``scale``'s), in the scale's dtype as
    Core ML computes it. Every input is one ``_held`` takes."""
    found = {
        key: _read_value(bound.arguments[0].value, weights) for key, bound in op.inputs.items()
    }
    data, scale, offset = found["data"], found["scale"], found.get("offset")
    blocks = [n // m for n, m in zip(data.shape, scale.shape, strict=True)]
    # Each axis split into (scale's size, block), the scale and offset broadcast over blocks.
    split = [size for pair in zip(scale.shape, blocks, strict=True) for size in pair]
    spread = tuple(slice(None) if i % 2 == 0 else None for i in range(2 * data.ndim))
    out = data.reshape(split).astype(scale.dtype)
    if offset is not None:
        out = out - offset[spread]
    return (scale[spread] * out).reshape(data.shape)


def _program_constants(spec, weights_dir: str) -> Iterator[tuple[str, np.ndarray]]:
    from coremltools.converters.mil.frontend.milproto.load import load as load_program

    program = load_program(spec, spec.specificationVersion, weights_dir)
    for function in program.functions.values():
        for op in function.operations:
            if op.op_type.startswith("constexpr_"):
                yield op.name, np.asarray(op.materialized_val_inference())
            elif op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray):
                yield op.name, op.outputs[0].val


# What the quantisers add to a weight's const name: int8/int4, a GGUF's kept blocks, none.
ENDS = ("_quantized", "_gguf_blocks", "")


def package_runner(package: Path, source: Checkpoint) -> StepRunner:
    """The source's decoder carrying the package's weights (as shipped: fp16, or int8 /
    int4 dequantized) in the wrapper that was traced, with an fp16 cache: what the package
    computes, except that the arithmetic is float32 here (fp16 on the device).

    The package's weights are written into ``source``'s tensors: a source that owns its
    memory (``export.build.load_any``) holds them once; one whose tensors map its file
    would copy each page written (perf/LOG.md runs 48-49)."""
    spec = load_spec(package)
    state = next(iter(spec.description.state)).type.stateType.arrayType
    seq_len = int(state.shape[3])
    query = next(f for f in spec.description.input if f.name == "input_ids").type.multiArrayType
    sizes = sorted({int(s.shape[1]) for s in query.enumeratedShapes.shapes}) or None
    chunk = max(sizes) if sizes else max(r.upperBound for r in query.shapeRange.sizeRanges)
    step = build_step(source.model, seq_len, enumerated=sizes is not None)
    tensors = dict(step.named_parameters()) | {
        name: t for name, t in step.named_buffers() if name not in STATE_NAMES
    }
    # Each constant the package may hold for a tensor, first name first.
    wanted: dict[str, tuple[int, str]] = {}
    for name in tensors:
        stem = name.replace(".", "_")
        names = [f"{base}{end}" for base in (stem, f"{stem}_to_fp16") for end in ENDS]
        for rank, const in enumerate(names):
            wanted.setdefault(const, (rank, name))
    found: dict[str, int] = {}  # tensor name -> the rank of the constant copied into it
    fp16 = False
    with torch.no_grad():
        for const, value in each_constant(package):  # (one at a time: each is let go)
            if const not in wanted:
                continue
            rank, name = wanted[const]
            if name in found and found[name] <= rank:
                continue  # (a name ranked before it was copied already)
            tensor = tensors[name]
            if tuple(value.shape) != tuple(tensor.shape):
                shape = tuple(tensor.shape)
                raise RuntimeError(f"{package}: {const} has shape {value.shape}, {name} {shape}")
            # Into the source's tensor: no second copy of the weights. (The export's source
            # owns its memory, ``load_any``: a tensor mapping its file privately would copy
            # every page it is written.)
            tensor.copy_(torch.from_numpy(value))
            found[name] = rank
            fp16 |= value.dtype == np.float16 and value.ndim >= 2
        for name, tensor in tensors.items():
            if name in found:
                continue
            if tensor.dim() >= 2:  # every matrix is in the package under its name
                stem = name.replace(".", "_")
                raise RuntimeError(f"{package}: no constant for {name} ({stem}*)")
            # fp16 weights: a package traced in fp16 (``export.build`` casts before tracing)
            # names its norm vectors as the converter's own constants, so they are not found
            # by name: they hold the source's vectors rounded to fp16 (read back and compared
            # on a tiny model).
            if fp16 and tensor.is_floating_point():
                tensor.copy_(tensor.half())
    return StepRunner(step, source.config.vocab_size, seq_len, int(chunk), sizes)
