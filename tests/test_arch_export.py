"""Qwen2, Phi-3 (LongRoPE) and Gemma 2 export to ONNX and convert to Core ML, and the
exported graphs reproduce the torch engine past Gemma's window and Phi-3's rope switch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from export.build import ExportOptions, export_model
from export.verify import compare, sample_prompt
from fermi.loading import load_folder
from fermi.runners.onnx import OnnxRunner
from fermi.runners.torch_eager import TorchRunner
from tests import test_arch_gemma2, test_arch_phi3, test_arch_qwen2

SEQ = 64
# 20 prompt tokens + 40 steps: past Gemma's 8-token window and Phi-3's switch at 32.
PROMPT, STEPS = 20, 40
SOURCES = {
    "qwen2": (test_arch_qwen2.write, "sliding"),
    "phi3": (test_arch_phi3.write, "longrope"),
    "gemma2": (test_arch_gemma2.write, "gemma2"),
}

ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    return {arch: write(root, name) for arch, (write, name) in SOURCES.items()}


def torch_runner(folder) -> TorchRunner:
    model = load_folder(folder, torch.device("cpu"), torch.float32).model
    return TorchRunner(model, 1, SEQ, prefill_chunk=SEQ)


@pytest.mark.parametrize("arch", list(SOURCES))
def test_onnx_export_reproduces_the_engine(sources, tmp_path, arch):
    options = ExportOptions(
        model=str(sources[arch]), target="onnx", out=tmp_path / "art", max_seq_len=SEQ,
        max_batch=1, verify=False,
    )  # fmt: skip
    manifest = export_model(options, progress=lambda _: None)
    assert manifest.architecture == ARCHITECTURES[arch]
    onnx = OnnxRunner(tmp_path / "art", manifest, 1, SEQ, manifest.prefill_chunk)
    prompt = sample_prompt(manifest.vocab_size, PROMPT, seed=7)
    parity = compare(torch_runner(sources[arch]), onnx, prompt, STEPS)
    assert parity.tokens_equal, parity.summary()
    assert parity.max_logit_diff < 1e-3


@pytest.mark.parametrize("arch", list(SOURCES))
def test_coreml_conversion_succeeds_and_its_traced_module_matches(sources, arch):
    pytest.importorskip("coremltools")
    from export import coreml

    model = load_folder(sources[arch], torch.device("cpu"), torch.float32).model
    step = coreml.build_step(model, SEQ)
    traced = coreml.trace(step)
    mlmodel = coreml.convert(traced, step, SEQ, 16, compute_fp16=True)
    assert mlmodel.get_spec().WhichOneof("Type") == "mlProgram"
    # Core ML cannot run on Linux: check the module the converter was given (fp16 cache).
    runner = coreml.StepRunner(traced, model.cfg.vocab_size, SEQ, 16)
    prompt = sample_prompt(model.cfg.vocab_size, PROMPT, seed=7)
    parity = compare(torch_runner(sources[arch]), runner, prompt, STEPS)
    assert parity.tokens_equal, parity.summary()
    assert parity.max_logit_diff < 1e-2
