"""int8/int4 weights on CUDA: the Triton kernels against their references at Qwen3 shapes,
and the compiled graph runner with a quantized model. Skipped without CUDA and Triton."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fermi.models import gemv as G
from fermi.models import quant as Q
from tests.test_row_kernels import LAUNCHES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not G.available(), reason="needs CUDA and Triton"),
]


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def weights(n: int, k: int) -> tuple[torch.Tensor, Q.QuantizedWeight, Q.QuantizedWeight]:
    g = torch.Generator(device="cuda").manual_seed(n + k)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
    return w, Q.quantize_int8(w), Q.quantize_int4(w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(37, 96), (4096, 2560), (2048, 6144), (1000, 3072)])
@LAUNCHES
def test_fused_int8_and_int4_row_kernels_equal_the_reference(dtype, n, k, pdl):
    _, q8, q4 = weights(n, k)
    g = torch.Generator(device="cuda").manual_seed(1)
    kw = {"device": "cuda", "dtype": dtype, "generator": g}
    x, x2 = torch.randn(1, k, **kw), torch.randn(1, 2 * k, **kw)
    norm_w, bias, res = torch.rand(k, **kw) + 0.5, torch.randn(n, **kw), torch.randn(1, n, **kw)
    cases = [
        ({}, x),
        ({"norm_weight": norm_w, "eps": 1e-5}, x),
        ({"bias": bias, "norm_weight": norm_w}, x),
        ({"residual": res}, x),
        ({"act": G.ACT_SILU_MUL, "residual": res, "bias": bias}, x2),
    ]
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2
    for q in (q8, q4):
        layer = Q.QuantLinear(q, None, "cuda", dtype)
        ref_w = Q.device_precision(q, "cuda").dequantize(dtype)
        for extra, inp in cases:
            fused = dict(extra)
            b = fused.pop("bias", None)
            layer.bias = b
            got = layer.row(inp, **fused, pdl=pdl)
            want = G.gemv_reference(inp, ref_w, b, **fused)
            assert rel(got, want) <= tol, (q.scheme, extra.keys())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 8, 16, 17, 300])
def test_quantized_linear_on_cuda_equals_the_reference_for_every_row_count(dtype, rows):
    """16 rows and fewer: the few-row kernel; more: dequantize + cuBLAS."""
    _, q8, q4 = weights(2048, 2560)
    g = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 2560, device="cuda", dtype=dtype, generator=g)
    bias = torch.randn(2048, device="cuda", dtype=dtype, generator=g)
    for q in (q8, q4):
        layer = Q.QuantLinear(q, bias, "cuda", dtype)
        want = F.linear(x.float(), Q.device_precision(q, "cuda").dequantize(), bias.float())
        # fp32: cuBLAS may run TF32 where a test enabled it; 16-bit: the dequantized
        # weights and the output are rounded.
        tol = 2e-3 if dtype == torch.float32 else 2e-2
        assert rel(layer(x), want) <= tol, q.scheme


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("scheme", "group", "n", "k"), [
    ("int4", 32, 6144, 4096), ("int4", 32, 1000, 3104), ("int4", 64, 37, 2176),
    ("int4", 128, 4100, 384), ("int8", 0, 4096, 12288), ("int8", 0, 37, 200),
])  # fmt: skip
def test_the_dequantize_kernel_writes_the_weight_torch_computes(dtype, scheme, group, n, k):
    """Prefill's weight for cuBLAS: the Triton kernel against torch's operations on the
    same CUDA layout, every value written (the output poisoned first), within one rounding
    of the dtype (a fused multiply-add rounds once where torch rounds twice)."""
    from fermi.models import quant_mm as QM

    g = torch.Generator(device="cuda").manual_seed(n + k + group)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
    q = Q.quantize_int4(w, group) if scheme == "int4" else Q.quantize_int8(w)
    layer = Q.QuantLinear(q, None, "cuda", dtype)
    out = torch.full((n, k), float("nan"), device="cuda", dtype=dtype)
    QM.launch_dequantize(layer.codes, layer.scales, layer.mins, out)
    want = QM.dequantize_torch(layer.codes, layer.scales, layer.mins, dtype)
    ulp = {torch.float32: 1.2e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert rel(out, want) <= ulp
    if dtype != torch.float32:  # a float32 rounding apart moves few 16-bit values
        assert float((out != want).float().mean()) < 0.01
    assert torch.equal(QM.dequantize(layer.codes, layer.scales, layer.mins, dtype), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize(("n", "k"), [(96, 2688), (4100, 640)])
@LAUNCHES
def test_int4_groups_of_64_and_128_in_the_row_and_few_row_kernels(dtype, group, n, k, pdl):
    """Every int4 group size through the one-row kernel and the few-row kernel (whose codes
    are cut [BLOCK_N, GROUPS, HALF] by group), with K not a multiple of either kernel's
    block and N not a multiple of its rows; perf/LOG.md run 64 swept group 32 only."""
    g = torch.Generator(device="cuda").manual_seed(group + n)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
    w += (
        torch.randn(n, k // group, 1, device="cuda", generator=g)
        .repeat_interleave(group, dim=2)
        .view(n, k)
        * 0.02
    )  # offsets per group: each group's minimum matters
    q = Q.quantize_int4(w, group)
    bias = torch.randn(n, device="cuda", dtype=dtype, generator=g)
    layer = Q.QuantLinear(q, bias, "cuda", dtype)
    ref_w = Q.device_precision(q, "cuda").dequantize()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for rows in (1, 3, 16):
        x = torch.randn(rows, k, device="cuda", dtype=dtype, generator=g)
        want = F.linear(x.float(), ref_w, bias.float())
        assert rel(layer(x), want) <= (2e-3 if dtype == torch.float32 else tol), rows
    x = torch.randn(1, k, device="cuda", dtype=dtype, generator=g)
    want = F.linear(x.float(), ref_w, bias.float())
    assert rel(layer.row(x, pdl=pdl), want) <= tol


def test_cuda_and_cpu_layers_of_one_weight_agree():
    _, q8, q4 = weights(512, 1024)
    x = torch.randn(4, 1024)
    for q in (q8, q4):
        cpu = Q.QuantLinear(q.to("cpu"), None, "cpu", torch.float32)(x)
        cuda = Q.QuantLinear(q, None, "cuda", torch.float32)(x.cuda()).cpu()
        assert rel(cpu, cuda) < 1e-2  # CPU runs bf16 activations


def test_quant_linear_is_traced_as_one_opaque_op_without_recompiles():
    _, q8, _ = weights(256, 512)
    layer = Q.QuantLinear(q8, None, "cuda", torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    from torch._dynamo.utils import counters

    before = int(counters["stats"]["unique_graphs"])
    for rows in (1, 4, 16, 17, 64):
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        assert rel(compiled(x), layer(x)) < 1e-2
    # One row compiles apart (Dynamo specialises sizes 0 and 1), then one dynamic graph
    # serves 4..64 rows across the few-row/cuBLAS switch.
    assert int(counters["stats"]["unique_graphs"]) - before <= 2


@pytest.mark.parametrize("scheme", Q.SCHEMES)
def test_compiled_runner_with_a_quantized_model_equals_it_eager(tmp_path, scheme):
    """The graph runner (fused row products, few-row kernel, dequantize for prefill) against
    the same quantized weights run eagerly without row products: same greedy tokens, logits
    within bf16-level differences."""
    from fermi.loading import load_folder
    from fermi.runners.torch_cuda import CudaGraphRunner
    from tests.tiny import write_checkpoint

    folder = write_checkpoint(tmp_path / "qwen3", {}, seed=3)
    device = torch.device("cuda")
    spec = Q.QuantSpec(scheme)
    results = []
    for compiled in (True, False):
        model = load_folder(folder, device, torch.float32, spec).model
        runner = CudaGraphRunner(
            model,
            2,
            300,
            32,
            backend="inductor" if compiled else None,
            use_graphs=compiled,
            row_kernels=compiled,
            compile_cache=False,
        )
        assert runner.row_kernels is compiled
        logits = [runner.prefill(0, [5, 9, 14, 3, 7], 0)]
        for step in range(8):
            token = int(logits[-1].argmax())
            logits.append(runner.decode([0], [token], [5 + step])[0])
        two = runner.decode([0, 1], [3, 4], [13, 0])  # the few-row kernel
        results.append((torch.stack(logits), two))
    assert rel(results[0][0], results[1][0]) < 1e-3
    assert rel(results[0][1], results[1][1]) < 1e-3


def test_engine_on_the_gpu_generates_with_quantize(tmp_path):
    import fermi
    from tests.tiny import write_checkpoint

    folder = write_checkpoint(tmp_path / "qwen3", {}, seed=5)
    for scheme in Q.SCHEMES:
        with fermi.load(folder, device="cuda", dtype="bf16", quantize=scheme, max_batch=2) as e:
            assert e.capabilities.name == "torch-cuda"
            out = e.generate(prompt="hello", max_tokens=6, temperature=0, ignore_eos=True)
            assert len(out.token_ids) == 6
