"""Qwen2, Phi-3 (LongRoPE), Gemma 2, Gemma 3, SmolLM3 and Granite export to ONNX and
convert to Core ML, and the exported graphs reproduce the torch engine past the Gemmas'
and SmolLM3's windows and Phi-3's rope switch."""

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
from tests import (
    test_arch_gemma2,
    test_arch_gemma3,
    test_arch_granite,
    test_arch_phi3,
    test_arch_qwen2,
    test_arch_smollm3,
)
from tests.tiny import write_checkpoint_for


def write_gemma3_short(root, _name=None):
    """Gemma 3 with three layers (sliding, sliding, global): both rope tables and the window,
    at half the export time of the parity tests' six layers."""
    config = {**test_arch_gemma3.GEMMA3_BASE, "num_hidden_layers": 3}
    return write_checkpoint_for(root / "gemma3", config, seed=3)


SEQ = 64
# 20 prompt tokens + 40 steps: past Gemma's 8-token window and Phi-3's switch at 32.
PROMPT, STEPS = 20, 40
SOURCES = {
    "qwen2": (test_arch_qwen2.write, "sliding"),
    "phi3": (test_arch_phi3.write, "longrope"),
    "gemma2": (test_arch_gemma2.write, "gemma2"),
    "gemma3": (write_gemma3_short, None),
    "smollm3": (test_arch_smollm3.write, "sliding"),  # NoPE layers, window 8 on them
    "granite": (test_arch_granite.write, "untied_biases"),  # the four multipliers
}


ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "granite": "GraniteForCausalLM",
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    return {arch: write(root / arch, name) for arch, (write, name) in SOURCES.items()}


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
    # What an fp16 export converts: the decoder cast to fp16 before the trace, where the
    # export casts (``cast_for_trace``; Granite's query scale keeps float32).
    half = load_folder(sources[arch], torch.device("cpu"), torch.float32).model
    if coreml.cast_for_trace(half):
        step = coreml.build_step(half, SEQ)
        mlmodel = coreml.convert(coreml.trace(step), step, SEQ, 16, compute_fp16=True)
        assert mlmodel.get_spec().WhichOneof("Type") == "mlProgram"
