"""``group_query_attention``: the torch op that becomes onnxruntime's GroupQueryAttention.

The ONNX graph's attention is onnxruntime's ``com.microsoft.GroupQueryAttention`` node, as in
the graphs onnxruntime-genai's model builder writes: it appends (or writes in place) this
step's keys and values into the layer's present cache and attends over each row's live
length, so a caller that binds past and present to one buffer pays per step only for the
new tokens and the attention itself. Its semantics, as the export uses them:

- query [B, T, H*D], key/value [B, T, Hkv*D] (rope already applied), past_key/past_value
  [B, Hkv, P, D], attention_mask [B, M] (int64, row b has L_b leading ones: its length
  after this step).
- The node derives seqlens_k = sum(mask, 1) - 1 and total_sequence_length = M; the new
  entries of row b go to positions L_b - T .. L_b - 1 of present [B, Hkv, max(M, P), D],
  whose first P positions are past (the same memory when the caller shares the buffer).
- Query t of row b attends causally over keys 0 .. L_b - T + t (within the window).

Here the op exists only to be exported: torch traces it through its fake (shape) function,
and the translation table below writes the node. It does not run in torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

OP_NAME = "fermi_export::group_query_attention"


@torch.library.custom_op(OP_NAME, mutates_args=())
def group_query_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    past_key: Tensor,
    past_value: Tensor,
    attention_mask: Tensor,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
    softcap: float,
    local_window_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    raise NotImplementedError(
        "group_query_attention runs only inside an exported ONNX graph (onnxruntime's "
        "GroupQueryAttention); torch traces it for export and never runs it"
    )


@group_query_attention.register_fake
def _shapes(query, key, value, past_key, past_value, attention_mask, *attributes):
    # The present length is max(M, P): a size of its own (named when the graph is saved).
    present = torch.library.get_ctx().new_dynamic_size()
    batch, kv_heads, _, head_dim = past_key.shape
    return (
        query.new_empty(query.shape),
        past_key.new_empty(batch, kv_heads, present, head_dim),
        past_value.new_empty(batch, kv_heads, present, head_dim),
    )


def _schema():
    """The node's signature as the exporter needs it (onnx registers no com.microsoft
    schemas); only the inputs and attributes the export passes."""
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    attribute = OpSchema.Attribute
    return OpSchema(
        "GroupQueryAttention",
        "com.microsoft",
        1,
        inputs=[
            param("query", "T"),
            param("key", "T"),
            param("value", "T"),
            param("past_key", "T"),
            param("past_value", "T"),
            param("seqlens_k", "M"),
            param("total_sequence_length", "M"),
        ],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)"], "activations and cache"),
            ("M", ["tensor(int32)"], "lengths"),
        ],
        attributes=[
            attribute("num_heads", OpSchema.AttrType.INT, "query heads"),
            attribute("kv_num_heads", OpSchema.AttrType.INT, "key/value heads"),
            attribute("scale", OpSchema.AttrType.FLOAT, "score scale"),
            attribute("softcap", OpSchema.AttrType.FLOAT, "score soft cap (0: none)"),
            attribute("local_window_size", OpSchema.AttrType.INT, "-1: no window"),
        ],
    )


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: the op -> the node, with the
    lengths computed from the attention mask (as onnxruntime-genai's graphs do)."""
    import onnxscript
    from onnxscript import ir
    from onnxscript import opset18 as op
    from onnxscript.values import Op

    node = Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention", _schema())

    def translate(
        query,
        key,
        value,
        past_key,
        past_value,
        attention_mask,
        num_heads: int,
        kv_num_heads: int,
        scale: float,
        softcap: float,
        local_window_size: int,
    ):
        one = op.Constant(value_ints=[1])
        lengths = op.ReduceSum(attention_mask, one, keepdims=0)
        seqlens_k = op.Cast(op.Sub(lengths, op.Constant(value_int=1)), to=ir.DataType.INT32)
        width = op.Gather(op.Shape(attention_mask), op.Constant(value_int=1), axis=0)
        total = op.Cast(width, to=ir.DataType.INT32)
        return node(
            query,
            key,
            value,
            past_key,
            past_value,
            seqlens_k,
            total,
            num_heads=num_heads,
            kv_num_heads=kv_num_heads,
            scale=scale,
            softcap=softcap,
            local_window_size=local_window_size,
        )

    return {torch.ops.fermi_export.group_query_attention.default: translate}
