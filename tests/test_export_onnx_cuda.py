"""An fp16 ONNX export on onnxruntime's CUDA provider (needs onnxruntime-gpu and a GPU):
the cache buffers live on the GPU, bound in place, and the greedy tokens follow the CPU
provider's on the same graph."""

from __future__ import annotations

import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers(),
        reason="onnxruntime has no CUDA provider (pip install onnxruntime-gpu)",
    ),
]

import fermi  # noqa: E402
from export.build import ExportOptions, export_model  # noqa: E402
from export.verify import compare, sample_prompt  # noqa: E402
from fermi.runners.onnx import OnnxRunner  # noqa: E402
from tests.tiny import write_checkpoint  # noqa: E402

SEQ = 128


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_cuda")
    source = write_checkpoint(root / "ckpt", seed=3)
    options = ExportOptions(
        model=str(source), target="onnx", out=root / "art", dtype="fp16", max_seq_len=SEQ
    )
    return root / "art", export_model(options, progress=lambda _: None)


def test_cuda_provider_runs_the_fp16_graph_with_its_cache_on_the_gpu(exported):
    art, manifest = exported
    gpu = OnnxRunner(art, manifest, 2, SEQ, manifest.prefill_chunk, device="cuda")
    cpu = OnnxRunner(art, manifest, 2, SEQ, manifest.prefill_chunk)
    assert gpu.session.get_providers()[0] == "CUDAExecutionProvider"
    assert all(buffer.device.type == "cuda" for buffer in gpu.buffers)
    prompt = sample_prompt(manifest.vocab_size, 12, seed=5)
    parity = compare(cpu, gpu, prompt, steps=32)
    # fp16 on two providers: the logits differ in rounding only.
    assert parity.first_divergence is None or parity.first_divergence > 8, parity.summary()
    assert parity.max_logit_diff < 5e-2, parity.summary()


def test_fermi_load_with_device_cuda_uses_the_cuda_provider(exported):
    art, _ = exported
    with fermi.load(art, device="cuda") as engine:
        assert engine.capabilities.device.type == "cuda"
        out = engine.generate(prompt="hello", max_tokens=8, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 8


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_cuda_provider_runs_the_quantized_fp16_graphs(tmp_path_factory, scheme):
    """MatMulNBits on onnxruntime's CUDA provider: an int8 / int4 fp16 export gives the
    CPU provider's greedy tokens on the same graph, its cache bound on the GPU."""
    root = tmp_path_factory.mktemp(f"onnx_cuda_{scheme}")
    source = write_checkpoint(root / "ckpt", seed=3)
    options = ExportOptions(
        model=str(source),
        target="onnx",
        out=root / "art",
        dtype="fp16",
        max_seq_len=SEQ,
        quantize=scheme,
    )
    manifest = export_model(options, progress=lambda _: None)
    art = root / "art"
    gpu = OnnxRunner(art, manifest, 2, SEQ, manifest.prefill_chunk, device="cuda")
    cpu = OnnxRunner(art, manifest, 2, SEQ, manifest.prefill_chunk)
    assert gpu.session.get_providers()[0] == "CUDAExecutionProvider"
    # The layers' products are MatMulNBits (four a layer, two layers; the tied head stays
    # an fp16 MatMul), so the CUDA provider's n-bit kernels are what runs.
    import onnx

    graph = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    assert sum(node.op_type == "MatMulNBits" for node in graph.node) == 8
    assert all(buffer.device.type == "cuda" for buffer in gpu.buffers)
    prompt = sample_prompt(manifest.vocab_size, 12, seed=5)
    parity = compare(cpu, gpu, prompt, steps=32)
    assert parity.first_divergence is None or parity.first_divergence > 8, parity.summary()
    assert parity.max_logit_diff < 5e-2, parity.summary()


def test_an_fp32_export_on_cuda_is_refused_with_the_reason(tmp_path):
    source = write_checkpoint(tmp_path / "ckpt", seed=3)
    options = ExportOptions(
        model=str(source), target="onnx", out=tmp_path / "art", max_seq_len=SEQ, verify=False
    )
    export_model(options, progress=lambda _: None)
    with pytest.raises(fermi.ModelLoadError, match="export with --dtype fp16"):
        fermi.load(tmp_path / "art", device="cuda")
