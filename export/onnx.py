"""ONNX export: one graph for prefill and decode, in the layout the ecosystem runs.

Inputs (onnxruntime-genai's names, as Hugging Face exports use them):
  input_ids [batch_size, sequence_length] int64, attention_mask [batch_size,
  total_sequence_length] int64, position_ids [batch_size, sequence_length] int64,
  past_key_values.N.key / .value [batch_size, kv_heads, past_sequence_length, head_dim].
Outputs:
  logits [batch_size, 1, vocab] float32 (each row's last token),
  present.N.key / .value [batch_size, kv_heads, present_sequence_length, head_dim].

Each layer's attention is onnxruntime's GroupQueryAttention (:mod:`export.gqa`): the cache
grows by concatenation (past of P positions -> present of P + T) or, when the caller binds
past and present to one buffer of ``max_seq_len`` positions (onnxruntime-genai's
``past_present_share_buffer``, Fermi's runner), is written in place. ``README.md`` in the
artefact folder spells out the contract (``export/onnx_contract.py``).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from export.gguf_blocks import BLOCK, Blocks
from export.wrapper import OnnxStep
from fermi.models.decoder import Decoder
from fermi.runners.artefact import TensorSpec

# onnxruntime implements opset 18 throughout; newer opsets add nothing this graph uses.
OPSET = 18
MODEL_FILE = "model.onnx"
# onnx.TensorProto's element types the graph's inputs and outputs use.
_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64"}


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def export_onnx(decoder: Decoder, path: Path, max_seq_len: int) -> None:
    """Trace ``decoder`` (with torch.export) into ``path``; weights larger than 1 GiB go to
    a ``<name>.data`` file beside it.

    The decoder is used up: its tensors move to the meta device for the trace, which then
    makes no copy of a weight (the exporter's own capture held 1.7-3.9 GB beside Qwen3-0.6B's
    2.4 GB, ``perf/LOG.md`` run 41); the file is written from the tensors as they were."""
    from onnxscript import ir

    from export.gqa import translation_table

    cfg = decoder.cfg
    decoder.setup_cache(1, max_seq_len)  # the rope tables and windows; the graph has no cache
    # ... so the slot caches go: the trace's own (OnnxStep's) replace them during forward,
    # and a buffer that disappears mid-trace fails torch.export's non-strict capture, which
    # the exporter tries first (it then fell back to the strict one, twice as slow).
    for layer in decoder.model.layers:
        layer.self_attn.cache = None
    # The weights and the decoder's own tables; not the KV cache, which the graph replaces
    # with its inputs and which goes with the move to meta.
    tensors = {
        f"decoder.{name}": t.detach()
        for name, t in (
            *decoder.named_parameters(remove_duplicate=False),
            *decoder.named_buffers(recurse=False),
        )
    }
    decoder.to("meta")
    dtype = decoder.dtype
    layers, kv, dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    # Example sizes are distinct and > 1 so that no axis gets specialised to a constant.
    batch, query, past, total = 2, 3, 7, 10
    meta = torch.device("meta")
    example = (
        torch.zeros(batch, query, dtype=torch.long, device=meta),
        torch.ones(batch, total, dtype=torch.long, device=meta),
        torch.arange(total - query, total, device=meta).expand(batch, query).contiguous(),
        *(torch.zeros(batch, kv, past, dim, dtype=dtype, device=meta) for _ in range(2 * layers)),
    )
    b, q = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    m, p = torch.export.Dim("total_sequence_length"), torch.export.Dim("past_sequence_length")
    # The caches arrive as OnnxStep.forward's *past: one entry of the shapes' structure.
    dynamic = ({0: b, 1: q}, {0: b, 1: m}, {0: b, 1: q}, tuple({0: b, 2: p} for _ in example[3:]))
    # The exporter logs a warning per torchvision op it cannot register; none is used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            OnnxStep(decoder).eval(),
            example,
            dynamo=True,
            input_names=["input_ids", "attention_mask", "position_ids", *past_names(layers)],
            output_names=["logits", *present_names(layers)],
            dynamic_shapes=dynamic,
            custom_translation_table=translation_table(),
            opset_version=OPSET,
            optimize=False,  # (below, once the weights' transposes are lazy)
            verbose=False,
        )
        attach_weights(program.model.graph, tensors)
        fold_weight_transposes(program.model.graph)
        tidy(program.model)
    # Outputs get the names the README uses (the exporter invents some for sizes it
    # cannot relate to an input's).
    for value in program.model.graph.outputs:
        if value.name == "logits":
            value.shape = ir.Shape(["batch_size", 1, cfg.vocab_size])
        else:
            value.shape = ir.Shape(["batch_size", kv, "present_sequence_length", dim])
    program.save(str(path), external_data=_needs_external_data(decoder))
    # Whatever still holds the graph must not hold the weights with it (onnxscript's rewrite
    # rules, module-level objects, kept the last graph they matched when they ran): the
    # graph lets go of them here.
    for value in program.model.graph.initializers.values():
        value.const_value = None
    del program, tensors
    gc.collect()


def tidy(model) -> None:
    """What the exporter's ``ONNXProgram.optimize()`` does, less onnxscript's pattern
    rewrites: constant folding, then unused nodes, functions and opsets removed, constants
    made initializers, duplicates merged. The rewrites took 12 of the 45 s an export of
    SmolLM2-135M took, to remove 99 of the 1,268 nodes folding leaves (slices over a whole
    axis, multiplies and reshapes that change nothing), most of which onnxruntime removes
    itself when it loads the graph (a tiny model keeps 6, none of them per layer): the
    step time stayed within noise (``perf/LOG.md`` run 61)."""
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants_ir

    common.InlinePass()(model)
    for _ in range(2):  # folding can leave new constants for a second round
        folded = fold_constants_ir(model, onnx_shape_inference=True)
        common.RemoveUnusedNodesPass()(model)
        if not folded.modified:
            break
    for step in (
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    ):
        step(model)


def attach_weights(graph, tensors: dict[str, torch.Tensor]) -> None:
    """Give the initializers traced on the meta device the model's tensors (no copy). One
    tensor under two names (a tied lm_head, which the meta trace cannot tell from the
    embedding table) becomes one initializer."""
    from onnxscript import ir

    first: dict[tuple, ir.Value] = {}
    for name, value in list(graph.initializers.items()):
        if value.const_value is None or value.const_value.raw.device.type != "meta":
            continue
        tensor = tensors[name]
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if key in first:
            value.replace_all_uses_with(first[key])
            graph.initializers.pop(name)
            continue
        first[key] = value
        value.const_value = ir.Tensor(tensor.numpy(), name=name)


def fold_weight_transposes(graph) -> None:
    """Give each product's weight the layout the graph reads ([in, out]) without making
    it in memory: a Transpose of a 2-D initializer becomes an initializer whose value is
    computed from the model's tensor when the file is written, one weight at a time.

    The exporter's optimizer would fold those Transposes into new arrays, held beside the
    originals until the program is freed: a second copy of every linear weight."""
    from onnxscript import ir

    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        source = node.inputs[0]
        perm = node.attributes.get("perm")
        tensor = source.const_value if source is not None and source.is_initializer() else None
        if tensor is None or len(tensor.shape) != 2 or perm is None:
            continue
        if list(perm.as_ints()) != [1, 0]:
            continue
        if len(source.uses()) > 1:
            continue  # (a tied table: the file keeps one copy, onnxruntime transposes it)
        rows, cols = tensor.shape
        name = f"{source.name}.transposed"
        value = ir.Value(
            name=name,
            shape=ir.Shape([cols, rows]),
            type=ir.TensorType(tensor.dtype),
            const_value=ir.LazyTensor(
                functools.partial(_transposed, tensor, name),
                dtype=tensor.dtype,
                shape=ir.Shape([cols, rows]),
                name=name,
            ),
        )
        graph.register_initializer(value)
        node.outputs[0].replace_all_uses_with(value)
        graph.remove(node, safe=True)
        graph.initializers.pop(source.name)
        source.const_value = None  # (the lazy value holds the tensor)


def _transposed(tensor, name: str):
    from onnxscript import ir

    return ir.Tensor(np.ascontiguousarray(tensor.numpy().T), name=name)


def _needs_external_data(decoder: Decoder) -> bool:
    # A protobuf file cannot exceed 2 GiB; keep small models in one file.
    size = sum(p.numel() * p.element_size() for p in decoder.parameters())
    return size > 1 << 30


def quantize(source: Path, target: Path, bits: int, kept: dict[bytes, Blocks]) -> int:
    """Weight-only quantisation of the linear layers: onnxruntime's MatMulNBits, ``bits``
    per weight in blocks of 32 along the input (8: symmetric; 4: a zero point per block),
    float32 arithmetic. A weight in ``kept`` (a GGUF file's blocks, keyed by
    :func:`weight_key` of the weight as the graph stores it) becomes a MatMulNBits of
    those blocks as they are, at their own width. Returns how many weights kept blocks.

    Activations stay float. int8 of SmolLM2's float weights keeps the source's token on
    96.9% of the check's steps, int4 on 66.7% (perf/results/export_cpu.json)."""
    import onnx

    nbits = _nbits_module()
    model = onnx.load(str(source))
    count, exclude = _keep_blocks(model, kept) if kept else (0, [])
    symmetric = bits == 8
    config = nbits.DefaultWeightOnlyQuantConfig(
        block_size=BLOCK, is_symmetric=symmetric, bits=bits, op_types_to_quantize=("MatMul",)
    )
    quantizer = nbits.MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=BLOCK,
        is_symmetric=symmetric,
        algo_config=config,
        nodes_to_exclude=exclude,  # the kept Q4_1 blocks' float sums (see _keep_blocks)
    )
    quantizer.process()
    external = _size(source) > 1 << 30
    quantizer.model.save_model_to_file(str(target), use_external_data_format=external)
    return count


def _nbits_module():
    """onnxruntime's MatMulNBits quantizer module, imported without the INFO-level root
    logging its import switches on for the whole process (and its per-node lines)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)
    return matmul_nbits_quantizer


def weight_key(weight: torch.Tensor) -> bytes:
    """What identifies a linear weight [out, in] in the graph: the digest of its bytes as
    the exported MatMul stores it ([in, out], contiguous)."""
    return hashlib.sha1(weight.detach().T.contiguous().numpy().tobytes()).digest()


def _keep_blocks(model, kept: dict[bytes, Blocks]) -> tuple[int, list[str]]:
    """Replace each MatMul whose weight is in ``kept`` by a MatMulNBits of its blocks;
    returns how many, and the names of the float MatMuls added (not to be quantized).

    onnxruntime's fast MatMulNBits kernels take integer zero points only; with float zero
    points it dequantizes every weight at every call (SmolLM2-135M from its Q4_1 file:
    85-123 ms a decode step, against 13-17 ms for the same layers quantized by
    onnxruntime, ``perf/LOG.md`` run 34). So each block keeps its codes and scale, and:

    - Q4_0 (d * (q - 8)) and Q8_0 (d * q, codes shifted to q + 128) are MatMulNBits'
      default zero point (8, 128): no zero point input at all, exactly;
    - Q4_1 (d * q + m) is d * (q - 8) plus (m + 8d) per block: the product of the blocks'
      sums of x with those numbers, one small float MatMul ([K/32, N]: a quarter of the
      codes' bytes) added to the node's output. Exact but for float32 rounding.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in [*graph.value_info, *graph.input]
        if v.type.tensor_type.HasField("shape")
    }
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    nodes, dropped, count, added = [], set(), 0, []
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        array = numpy_helper.to_array(weight) if weight is not None else None
        blocks = kept.get(hashlib.sha1(array.tobytes()).digest()) if array is not None else None
        x, rank = node.input[0], ranks.get(node.input[0])
        if blocks is None or (blocks.minimum is not None and rank is None):
            nodes.append(node)  # (a Q4_1 weight whose input's rank the graph does not say)
            continue
        rows, cols = blocks.codes.shape  # [out, in] = N, K
        codes = blocks.codes.astype(np.int16) + (128 if blocks.bits == 8 else 0)
        codes = codes.astype(np.uint8)
        if blocks.bits == 4:  # two codes a byte, the even one in the low nibble
            codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
        dtype = array.dtype
        stem = node.input[1]
        scale = blocks.scale.astype(np.float32)
        tensors = [
            numpy_helper.from_array(codes.reshape(rows, cols // BLOCK, -1), f"{stem}_blocks"),
            numpy_helper.from_array(scale.astype(dtype), f"{stem}_scales"),
        ]
        graph.initializer.extend(tensors)
        out = list(node.output)
        minimum = blocks.minimum is not None  # Q4_1 (Q4_0 sits at the default 8)
        if minimum:
            assert blocks.minimum is not None and rank is not None
            out = [f"{node.output[0]}_codes"]
            extra = blocks.minimum + 8.0 * scale  # d * q + m = d * (q - 8) + (m + 8d)
            shape = np.array([0] * (rank - 1) + [cols // BLOCK, BLOCK], dtype=np.int64)
            consts = [
                numpy_helper.from_array(extra.T.astype(dtype).copy(), f"{stem}_block_offsets"),
                numpy_helper.from_array(shape, f"{stem}_block_shape"),
                numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{stem}_last_axis"),
            ]
            graph.initializer.extend(consts)
            name = node.name or stem
            added.append(f"{name}_offsets")
            nodes += [
                helper.make_node(
                    "Reshape", [x, consts[1].name], [f"{stem}_x_blocks"], name=f"{name}_blocks"
                ),
                helper.make_node(
                    "ReduceSum",
                    [f"{stem}_x_blocks", consts[2].name],
                    [f"{stem}_x_sums"],
                    name=f"{name}_sums",
                    keepdims=0,
                ),
                helper.make_node(
                    "MatMul",
                    [f"{stem}_x_sums", consts[0].name],
                    [f"{stem}_offsets_out"],
                    name=f"{name}_offsets",
                ),
            ]
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [x, *(t.name for t in tensors)],
                out,
                name=node.name,
                domain="com.microsoft",
                K=cols,
                N=rows,
                bits=blocks.bits,
                block_size=BLOCK,
            )
        )
        if minimum:
            nodes.append(
                helper.make_node(
                    "Add",
                    [out[0], f"{stem}_offsets_out"],
                    list(node.output),
                    name=f"{node.name or stem}_add_offsets",
                )
            )
        if users[stem] == 1:
            dropped.add(stem)
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    remaining = [init for init in graph.initializer if init.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(remaining)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return count, added


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def move_model(source: Path, target_dir: Path, name: str) -> None:
    """Move an exported model (and its external data file, if any) into ``target_dir``."""
    shutil.move(source, target_dir / name)
    data = source.with_name(source.name + ".data")
    if data.exists():
        # The graph refers to its data file by name; keep the name it was saved with.
        shutil.move(data, target_dir / data.name)


def io_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs as the file declares them (read without its weights:
    an onnxruntime session here cost a Qwen3-0.6B export 2.8 GB for two lists)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(value) -> TensorSpec:
        kind = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in kind.shape.dim]
        return TensorSpec(value.name, shape, _ONNX_DTYPES.get(kind.elem_type, str(kind.elem_type)))

    return [spec(v) for v in graph.input], [spec(v) for v in graph.output]
