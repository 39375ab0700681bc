"""The decoder's lean eager ops equal their textbook formulas."""

from __future__ import annotations

import pytest
import torch

from fermi.models.decoder import RMSNorm
from fermi.models.half_weights import fbgemm_available
from fermi.models.rope import RopeConfig, rope_tables, rotate


def textbook_rope(x, cos, sin, rot):
    """Rotate-half rope on x [..., D] with plain (unsigned) cos/sin [..., rot]."""
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_rotate_equals_rotate_half(partial):
    rope = RopeConfig(theta=10000.0, partial_rotary_factor=partial)
    head_dim, rot = 16, int(16 * partial)
    cos, signed_sin = rope_tables(rope, head_dim, 32)
    # The table's sin has its first half negated.
    plain_sin = torch.cat((-signed_sin[:, : rot // 2], signed_sin[:, rot // 2 :]), dim=-1)
    assert (plain_sin[:, : rot // 2] == plain_sin[:, rot // 2 :]).all()
    torch.manual_seed(0)
    positions = torch.tensor([[3, 4, 5], [20, 21, 22]])
    c, s, ps = cos[positions], signed_sin[positions], plain_sin[positions]  # [B, T, rot]
    x = torch.randn(2, 3, 4, head_dim)  # [B, T, H, D]
    expected = textbook_rope(x, c[:, :, None], ps[:, :, None], rot)
    torch.testing.assert_close(rotate(x, c[:, :, None], s[:, :, None]), expected)


def test_rms_norm_fused_path_equals_formula():
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.add_(torch.randn(64))
    x = torch.randn(3, 5, 64) * 4
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), norm.weight * h, rtol=1e-6, atol=1e-6)
    # Other dtypes keep the float32 computation with the product in the input dtype.
    xb = x.bfloat16()
    expected = norm.weight.bfloat16() * h.bfloat16()
    torch.testing.assert_close(norm.bfloat16()(xb), expected)


def test_unpacked_half_weight_linear_answers_fp16_for_few_rows_and_float32_otherwise():
    from torch import nn

    from fermi.models.half_weights import HalfWeightLinear

    torch.manual_seed(0)
    plain = nn.Linear(64, 32, bias=False)
    half = HalfWeightLinear(plain, [None], "plain")
    one, many = torch.randn(1, 1, 64), torch.randn(1, 9, 64)
    with torch.no_grad():
        out_one, out_many = half(one), half(many)
        assert out_one.dtype == torch.float16  # the fp16 kernel's output, uncast
        assert out_many.dtype == torch.float32  # prefill: float32 product on an upcast weight
        assert half(one.half()).dtype == torch.float16  # fp16 input taken as is
        torch.testing.assert_close(out_one.float(), plain(one), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(out_many, plain(many), rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(not fbgemm_available(), reason="FBGEMM (x86) packs the fp16 weights")
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 17, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_half_weight_linear_is_the_float_product_of_the_fp16_weight(rows, bias):
    """Every row count (batched decode, prefill) runs one float32 product of the fp16-rounded
    weight, answers float32, and leaves the stored weight as it was (no per-step copy)."""
    from torch import nn

    from fermi.models.half_weights import HalfWeightLinear

    torch.manual_seed(rows)
    plain = nn.Linear(96, 80, bias=bias)
    half = HalfWeightLinear(plain, [None], "fbgemm")
    assert half.packed and half.weight.dtype == torch.float16
    torch.testing.assert_close(half.weight, plain.weight.detach().half(), rtol=0, atol=0)
    for _ in range(2):  # fresh inputs each time, 3-D as the decoder passes them
        x = torch.randn(1, rows, 96)
        with torch.inference_mode():
            got = half(x)
        ref = x.double() @ plain.weight.detach().half().double().T
        if bias:
            ref = ref + plain.bias.detach().double()
        assert got.dtype == torch.float32 and got.shape == (1, rows, 80)
        # float32 accumulation over 96 products of values ~1: error ~1e-6 of the result.
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
        with torch.inference_mode():
            assert torch.equal(half(x.half()), half(x.half().float()))  # fp16 input converted


def test_rms_norm_of_fp16_input_with_float32_weight_is_float32():
    norm = RMSNorm(64, 1e-6, unit_offset=True)
    assert norm(torch.randn(1, 1, 64).half()).dtype == torch.float32


OPS_PACKED = 37


def test_cpu_fp16_decode_step_stays_at_41_ops_a_layer():
    """The eager CPU decode step (fp16 storage, fused projections) dispatches 41 aten ops a
    layer with unpacked fp16 weights, OPS_PACKED with FBGEMM's packed ones, views included
    (perf/notes_cpu_smollm2.md: per-op cost bounds this step), and none a layer in fermi's
    kernels (every layer is one call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fermi import native
    from fermi.models.decoder import Decoder
    from fermi.models.half_weights import use_half_weights
    from fermi.models.llama import llama_config

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    def ops_per_step(layers: int, layout: str) -> int:
        cfg = llama_config(
            {
                "vocab_size": 128,
                "hidden_size": 64,
                "intermediate_size": 96,
                "num_hidden_layers": layers,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "tie_word_embeddings": True,
            }
        )
        model = use_half_weights(Decoder(cfg).eval(), layout)
        model.setup_cache(max_batch=1, max_seq_len=32)
        assert model.use_native_rows() == (layout == "native")
        slots = torch.zeros(1, dtype=torch.long)
        with torch.inference_mode():
            model(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], slots, kv_len=3)
            Count.n = 0
            with Count():
                model(torch.tensor([[4]]), torch.tensor([[3]]), slots, 4, rows_are_slots=True)
        return Count.n

    assert ops_per_step(4, "plain") - ops_per_step(2, "plain") == 2 * 41
    if fbgemm_available():  # FBGEMM's products answer float32: the 4 casts go
        assert ops_per_step(4, "fbgemm") - ops_per_step(2, "fbgemm") == 2 * OPS_PACKED
    if native.available():
        assert ops_per_step(4, "native") == ops_per_step(2, "native") < 20
