"""``fermi export``: checkpoint in, artefact folder out, one named stage at a time."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from fermi.errors import FermiError
from fermi.hub import resolve
from fermi.loading import Checkpoint, load_folder
from fermi.runners.artefact import MANIFEST_NAME, CacheSpec, Manifest, TensorSpec

TARGETS = ("onnx", "coreml")
QUANTIZE = {"onnx": ("none", "int8"), "coreml": ("none", "int8", "int4")}
DEFAULT_DTYPE = {"onnx": "fp32", "coreml": "fp16"}
DEFAULT_CHUNK = {"onnx": 512, "coreml": 128}
# Tokenizer, template and config files an artefact carries (those the source has).
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
# The exported fp32 ONNX graph must reproduce the engine this closely (issue 4).
ONNX_FP32_TOLERANCE = 1e-3
VERIFY_PROMPT, VERIFY_STEPS = 8, 16

Progress = Callable[[str], None]


class ExportError(FermiError):
    """The export cannot be done as asked; the message says why."""


@dataclass(frozen=True)
class ExportOptions:
    model: str
    target: str
    out: Path
    dtype: str | None = None  # fp32 | fp16; None = the target's default
    max_seq_len: int | None = None  # None = the model's context, capped at 2048
    max_batch: int = 4
    quantize: str = "none"
    prefill_chunk: int | None = None
    verify: bool = True

    def resolved_dtype(self) -> str:
        return self.dtype or DEFAULT_DTYPE[self.target]


def check_options(options: ExportOptions) -> None:
    if options.target not in TARGETS:
        raise ExportError(f"target {options.target!r} is not one of {', '.join(TARGETS)}")
    if options.resolved_dtype() not in ("fp32", "fp16"):
        raise ExportError(f"dtype {options.dtype!r} is not one of fp32, fp16")
    allowed = QUANTIZE[options.target]
    if options.quantize not in allowed:
        raise ExportError(
            f"--quantize {options.quantize} is not available for {options.target} "
            f"(choose {', '.join(allowed)})"
        )
    if options.max_seq_len is not None and options.max_seq_len < 2:
        raise ExportError("max_seq_len must be at least 2")
    if options.max_batch < 1:
        raise ExportError("max_batch must be at least 1")
    if options.prefill_chunk is not None and options.prefill_chunk < 1:
        raise ExportError("prefill_chunk must be at least 1")
    out = options.out
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).exists():
        raise ExportError(
            f"--out {out} is not empty and holds no earlier export; choose an empty folder"
        )


class Stages:
    """Prints "[i/n] what ..." before a stage and its time after."""

    def __init__(self, names: list[str], progress: Progress) -> None:
        self.names, self.progress, self.done = names, progress, 0

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.done += 1
        self.progress(f"[{self.done}/{len(self.names)}] {name} ...")
        start = time.perf_counter()
        yield
        self.progress(f"      done in {time.perf_counter() - start:.1f}s")


def export_model(options: ExportOptions, progress: Progress = print) -> Manifest:
    """Build the artefact folder ``options.out`` and return its manifest."""
    check_options(options)
    target = options.target
    names = ["load checkpoint", f"convert to {target}"]
    if options.quantize != "none":
        names.append(f"quantize weights ({options.quantize})")
    if options.verify:
        names.append("verify against the torch engine")
    names += ["copy tokenizer and config files", "write manifest"]
    stages = Stages(names, progress)

    with stages.stage(names[0]):
        source = resolve(options.model)
        dtype = torch.float16 if options.resolved_dtype() == "fp16" else torch.float32
        # Core ML computes in fp16 itself; trace in fp32 so the converter sees full weights.
        load_dtype = torch.float32 if target == "coreml" else dtype
        checkpoint = load_folder(source, torch.device("cpu"), load_dtype)
    cfg = checkpoint.config
    seq_len = options.max_seq_len or min(cfg.max_position_embeddings, 2048)
    chunk = min(options.prefill_chunk or DEFAULT_CHUNK[target], seq_len)
    options.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=options.out, prefix=".staging-") as tmp:
        staging = Path(tmp)
        if target == "onnx":
            draft = _onnx(checkpoint, options, seq_len, chunk, staging, stages, progress)
        else:
            draft = _coreml(checkpoint, options, seq_len, chunk, staging, stages, progress)

    with stages.stage("copy tokenizer and config files"):
        for name in SIDE_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, options.out / name)
    with stages.stage("write manifest"):
        from export.manifest import finalize

        manifest = finalize(draft, options.out)
        total = sum((options.out / f).stat().st_size for f in manifest.files)
        progress(f"      {options.out}: {len(manifest.files)} files, {total / 1e6:.1f} MB")
    return manifest


def _draft(
    checkpoint: Checkpoint,
    options: ExportOptions,
    model_file: str,
    seq_len: int,
    chunk: int,
    cache_dtype: str,
    io: tuple[list[TensorSpec], list[TensorSpec], list[TensorSpec]],
) -> Manifest:
    cfg = checkpoint.config
    return Manifest(
        format_version=0,  # finalize() stamps the version with the checksums
        target=options.target,
        model_file=model_file,
        source=options.model,
        architecture=cfg.architecture,
        dtype=options.resolved_dtype(),
        quantize=options.quantize,
        max_seq_len=seq_len,
        max_batch=options.max_batch,
        prefill_chunk=chunk,
        vocab_size=cfg.vocab_size,
        cache=CacheSpec(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cache_dtype),
        inputs=io[0],
        outputs=io[1],
        states=io[2],
        tools={},
        files={},
    )


def _reference(options: ExportOptions, seq_len: int):
    """A fresh fp32 torch runner on the source checkpoint (the export mutated its copy)."""
    from fermi.runners.torch_eager import TorchRunner

    checkpoint = load_folder(resolve(options.model), torch.device("cpu"), torch.float32)
    return TorchRunner(checkpoint.model, 1, seq_len, prefill_chunk=seq_len)


def _onnx(checkpoint, options, seq_len, chunk, staging, stages, progress) -> Manifest:
    from export import onnx as onnx_export
    from fermi.runners.onnx import OnnxRunner

    raw = staging / "model.onnx"
    with stages.stage(f"convert to onnx (opset {onnx_export.OPSET}, torch.export)"):
        onnx_export.export_onnx(checkpoint.model, raw, seq_len)
    del checkpoint.model  # the verifier loads its own reference
    if options.quantize == "int8":
        with stages.stage("quantize weights (int8)"):
            onnx_export.quantize_int8(raw, options.out / "model.onnx")
    else:
        onnx_export.move_model(raw, options.out, "model.onnx")
    inputs, outputs = onnx_export.io_specs(options.out / "model.onnx")
    cache_dtype = "float16" if options.resolved_dtype() == "fp16" else "float32"
    draft = _draft(
        checkpoint, options, "model.onnx", seq_len, chunk, cache_dtype, (inputs, outputs, [])
    )
    if options.verify:
        with stages.stage("verify against the torch engine"):
            runner = OnnxRunner(options.out, draft, 1, seq_len, chunk)
            parity = _verify(options, seq_len, runner)
            progress(f"      onnxruntime vs torch: {parity.summary()}")
            strict = options.resolved_dtype() == "fp32" and options.quantize == "none"
            if strict and not (parity.tokens_equal and parity.max_logit_diff < ONNX_FP32_TOLERANCE):
                raise ExportError(
                    f"the exported ONNX graph does not reproduce the engine ({parity.summary()})"
                )
    return draft


def _coreml(checkpoint, options, seq_len, chunk, staging, stages, progress) -> Manifest:
    from export import coreml

    fp16 = options.resolved_dtype() == "fp16"
    with stages.stage("convert to coreml (torch.jit.trace, iOS18 ML Program)"):
        step = coreml.build_step(checkpoint.model, seq_len)
        traced = coreml.trace(step)
        model = coreml.convert(traced, step, seq_len, chunk, fp16)
    if options.quantize != "none":
        with stages.stage(f"quantize weights ({options.quantize})"):
            model = coreml.quantize(model, options.quantize)
    package = options.out / "model.mlpackage"
    if package.exists():
        shutil.rmtree(package)
    model.save(str(package))
    if options.verify:
        with stages.stage("verify against the torch engine"):
            # Core ML cannot run here; check the traced module the converter was given.
            runner = coreml.StepRunner(traced, checkpoint.config.vocab_size, seq_len, chunk)
            parity = _verify(options, seq_len, runner)
            progress(f"      traced module (fp16 cache) vs torch: {parity.summary()}")
    return _draft(
        checkpoint,
        options,
        "model.mlpackage",
        seq_len,
        chunk,
        "float16",
        coreml.io_specs(package),
    )


def _verify(options: ExportOptions, seq_len: int, runner):
    from export.verify import compare, sample_prompt

    reference = _reference(options, seq_len)
    steps = min(VERIFY_STEPS, seq_len - VERIFY_PROMPT)
    prompt = sample_prompt(reference.capabilities.vocab_size, VERIFY_PROMPT)
    return compare(reference, runner, prompt, steps)
