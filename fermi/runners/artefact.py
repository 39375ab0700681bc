"""Exported artefact folders: the manifest, its checks, and the runner it names.

An artefact folder (written by ``fermi export``) holds the model file(s), the tokenizer
and template files, and ``manifest.json``. Loading one never imports the exporters: the
ONNX and Core ML runtimes are imported only by the runner the manifest names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
import torch

from fermi.errors import ModelLoadError
from fermi.loading import (
    GenerationDefaults,
    check_tokenizer_fits,
    parse_dtype,
    read_generation_defaults,
    read_json,
)
from fermi.runners.base import Runner
from fermi.text.tokenizer import (
    CONFIG_FILE,
    TEMPLATE_FILE,
    TEMPLATE_JSON_FILE,
    TOKENIZER_FILE,
    Tokenizer,
)

MANIFEST_NAME = "manifest.json"
# 2: the ONNX graph takes per-layer past_key_values.N.key/value (GroupQueryAttention);
# Core ML packages record their compute units and checked numerics.
FORMAT_VERSION = 2
TARGETS = ("onnx", "coreml")
# The runner names ``runner=`` accepts for each target.
TARGET_RUNNERS = {"onnx": ("onnx",), "coreml": ("coreml",)}
# Every file load_artefact reads besides the model: one present on disk must be listed
# (and so checksummed) in the manifest, or a file dropped in after export would change the
# model unchecked (a chat_template.jinja rewrites every prompt).
LOADED_FILES = (
    "config.json",
    "generation_config.json",
    TOKENIZER_FILE,
    CONFIG_FILE,
    TEMPLATE_JSON_FILE,
    TEMPLATE_FILE,
)


class TensorSpec(msgspec.Struct, frozen=True):
    """A graph input, output or state: symbolic axes are named strings ("query")."""

    name: str
    shape: list[int | str]
    dtype: str


class CacheSpec(msgspec.Struct, frozen=True):
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str  # "float32" or "float16"


class Numerics(msgspec.Struct, frozen=True):
    """How closely the exported model follows its source on ``fermi export``'s fixed
    prompts: the source's greedy tokens are fed to both (teacher forcing), so every step
    compares the two on the same text."""

    checked: str  # what computed the exported side ("onnxruntime", "package weights ...")
    prompts: int
    steps: int  # greedy tokens per prompt
    greedy_equal: list[int]  # per prompt: leading greedy tokens equal to the source's
    top1_agreement: float  # share of steps whose most likely token is the source's
    max_logit_diff: float
    mean_logit_diff: float  # mean over steps of the step's max |logit diff|

    def summary(self) -> str:
        equal = sum(n == self.steps for n in self.greedy_equal)
        return (
            f"{equal}/{self.prompts} prompts keep all {self.steps} greedy tokens (leading "
            f"tokens equal: {', '.join(map(str, self.greedy_equal))}); top-1 agreement "
            f"{100 * self.top1_agreement:.1f}%; max |logit diff| {self.max_logit_diff:.2e}, "
            f"mean {self.mean_logit_diff:.2e}"
        )


# Sizes a manifest must give as they can be run (msgspec's error names the field).
Count = Annotated[int, msgspec.Meta(ge=1)]


class Manifest(msgspec.Struct, frozen=True):
    format_version: int
    target: str
    model_file: str
    source: str
    architecture: str
    dtype: str
    quantize: str
    max_seq_len: Annotated[int, msgspec.Meta(ge=2)]
    max_batch: Count
    prefill_chunk: Count
    vocab_size: Count
    cache: CacheSpec
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    states: list[TensorSpec]
    tools: dict[str, str]
    files: dict[str, str]  # relative path -> sha256 (every file except the manifest)
    created: str = ""
    # Core ML: the compute units the package was converted for (ALL, CPU_AND_NE, ...).
    compute_units: str = ""
    # Core ML for the Neural Engine: the enumerated query lengths (input_ids [1, n]) with
    # a position input; empty for range shapes (input_ids and causal_mask flexible).
    query_sizes: list[int] = []
    numerics: Numerics | None = None  # the export's check against its source


@dataclass
class Artefact:
    """A loaded artefact: what :func:`fermi.load` needs to build an engine."""

    folder: Path
    manifest: Manifest
    runner: Runner
    tokenizer: Tokenizer
    generation: GenerationDefaults


def is_artefact(folder: Path) -> bool:
    return (folder / MANIFEST_NAME).is_file()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path, verify_checksums: bool = True) -> Manifest:
    """Read and check ``manifest.json``: known format version, every listed file present
    and (unless ``verify_checksums`` is off) with the recorded sha256."""
    path = folder / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{folder} has no {MANIFEST_NAME}") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelLoadError(
            f"{path} has format_version {version!r}; this Fermi reads version "
            f"{FORMAT_VERSION} (re-export the model with this version of `fermi export`)"
        )
    try:
        manifest = msgspec.convert(raw, Manifest)
    except msgspec.ValidationError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    if manifest.target not in TARGETS:
        raise ModelLoadError(
            f"{path}: target {manifest.target!r} is not one of {', '.join(TARGETS)}"
        )
    model_file = manifest.model_file  # a file (.onnx) or a folder (.mlpackage)
    if not any(f == model_file or f.startswith(model_file + "/") for f in manifest.files):
        raise ModelLoadError(f"{path}: model_file {manifest.model_file!r} is not in 'files'")
    for name, expected in manifest.files.items():
        file = folder / name
        # Judged by the name, not where a symlink points: a Hugging Face cache snapshot
        # links every file to its blob store. The checksum below vouches for the content.
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise ModelLoadError(f"{path}: file {name!r} lies outside the artefact folder")
        if not file.is_file():
            raise ModelLoadError(f"artefact {folder} is missing {name} (listed in {MANIFEST_NAME})")
        if verify_checksums and sha256_file(file) != expected:
            raise ModelLoadError(
                f"artefact file {file} does not match its sha256 in {MANIFEST_NAME} "
                "(the file was changed or truncated; re-export or re-download it)"
            )
    for name in LOADED_FILES:  # (each one the manifest lists was checked above)
        if name not in manifest.files and (folder / name).exists():
            raise ModelLoadError(
                f"artefact {folder} has {name}, which {MANIFEST_NAME} does not list: the "
                "loader would read it unchecked (remove it, or re-export the model)"
            )
    return manifest


def load_artefact(
    folder: Path,
    runner: str | None = None,
    max_batch: int | None = None,
    max_seq_len: int | None = None,
    prefill_chunk: int | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> Artefact:
    """Check the manifest and build the runner it names (``runner`` overrides). ``device``
    picks onnxruntime's execution provider (cpu, the default, or cuda); a Core ML package
    takes none. ``dtype`` was fixed at export: another one is refused."""
    manifest = read_manifest(folder)
    exported = torch.float16 if manifest.dtype == "fp16" else torch.float32
    if dtype not in (None, "auto") and parse_dtype(dtype, torch.device("cpu")) != exported:
        raise ModelLoadError(
            f"artefact {folder} was exported in {manifest.dtype}; it cannot run in {dtype} "
            "(export again with --dtype, or load the source checkpoint)"
        )
    if manifest.target == "coreml" and device is not None:
        raise ModelLoadError(
            f"artefact {folder} is a Core ML package: Core ML picks its compute units "
            f"({manifest.compute_units or 'ALL'}) itself, so device {device!r} cannot apply"
        )
    allowed = TARGET_RUNNERS[manifest.target]
    name = runner or allowed[0]
    if name not in allowed:
        raise ModelLoadError(
            f"artefact {folder} was exported for {manifest.target}; runner {name!r} cannot run it "
            f"(use {' or '.join(allowed)}, or load the source checkpoint for torch runners)"
        )
    seq_len = max_seq_len or manifest.max_seq_len
    if not 2 <= seq_len <= manifest.max_seq_len:
        raise ValueError(
            f"max_seq_len must be between 2 and {manifest.max_seq_len} "
            f"(the length {folder} was exported for)"
        )
    batch = max_batch or manifest.max_batch
    if batch < 1:
        raise ValueError("max_batch must be at least 1")
    chunk = prefill_chunk or manifest.prefill_chunk
    if not 1 <= chunk <= manifest.prefill_chunk:
        raise ValueError(
            f"prefill_chunk must be between 1 and {manifest.prefill_chunk} (the longest chunk "
            f"{folder} was exported for), not {chunk}"
        )
    if manifest.target == "onnx":
        from fermi.runners.onnx import OnnxRunner

        built: Runner = OnnxRunner(folder, manifest, batch, seq_len, chunk, device or "cpu")
    else:
        from fermi.runners.coreml import CoreMLRunner

        built = CoreMLRunner(folder, manifest, batch, seq_len, chunk)
    tokenizer = Tokenizer.from_folder(folder)
    check_tokenizer_fits(
        tokenizer, manifest.vocab_size, folder / "tokenizer.json", "manifest.json's vocab_size"
    )
    hf_config = read_json(folder / "config.json")
    generation = read_generation_defaults(folder, hf_config, tokenizer)
    return Artefact(folder, manifest, built, tokenizer, generation)
