"""``fermi export``: checkpoint in, artefact folder out, one named stage at a time.

The source is anything ``fermi.load`` accepts (a checkpoint folder, a Hugging Face id, a
``.gguf`` file, an alias). The artefact is built in a staging folder beside ``--out`` and
replaces it only when complete: a failed export leaves an earlier one as it was, and a
re-export keeps nothing of the last one.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import torch

from export.verify import agreement
from fermi.errors import FermiError
from fermi.hub import resolve
from fermi.loading import Checkpoint, load_folder
from fermi.memory import release_free_heap
from fermi.runners.artefact import MANIFEST_NAME, CacheSpec, Manifest, Numerics, TensorSpec

TARGETS = ("onnx", "coreml")
QUANTIZE = {"onnx": ("none", "int8", "int4"), "coreml": ("none", "int8", "int4")}
DEFAULT_DTYPE = {"onnx": "fp32", "coreml": "fp16"}
DEFAULT_CHUNK = {"onnx": 512, "coreml": 128}
# Cache slots a loaded artefact allocates unless asked: one on Apple, where every slot is a
# whole Core ML state (all layers x max_seq_len: 235 MB at Qwen3-0.6B, 2048 tokens, fp16)
# and a batched step is one predict per slot anyway.
DEFAULT_BATCH = {"onnx": 4, "coreml": 1}
# Core ML compute units a package can be converted for (the manifest records which); ALL
# leaves the choice to Core ML. ENUMERATED_UNITS get the fixed, enumerated shapes the Neural
# Engine runs (export/coreml.py).
COMPUTE_UNITS = ("ALL", "CPU_AND_GPU", "CPU_AND_NE", "CPU_ONLY")
ENUMERATED_UNITS = ("CPU_AND_NE",)
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
VERIFY_STEPS = 16
# A quantized export is reported loudly when fewer of its steps than this pick the
# source's token, on the same text (teacher-forced top-1 agreement over the check's
# prompts): below it, greedy output leaves the source's within a few tokens on most
# prompts. README "Export to device" gives the measured figures behind it.
AGREEMENT_FLOOR = 0.90
SOURCE_STAGE = "run the source on the check's prompts"
KEPT_NOTE = "weights keep the GGUF file's Q4_0/Q4_1/Q8_0 blocks as they are (not quantized again)"
CHECK_STAGE = "check the export against the source"


class ExportError(FermiError):
    """The export cannot be done as asked; the message says why."""


@dataclass(frozen=True)
class ExportOptions:
    model: str
    target: str
    out: Path
    dtype: str | None = None  # fp32 | fp16; None = the target's default
    max_seq_len: int | None = None  # None = the model's context, capped at 2048
    max_batch: int | None = None  # None = the target's default (DEFAULT_BATCH)
    quantize: str = "none"
    prefill_chunk: int | None = None
    verify: bool = True
    # Core ML: the compute units to convert for (export.coreml.COMPUTE_UNITS); None = ALL.
    # CPU_AND_NE gets the enumerated, fixed shapes the Neural Engine runs.
    compute_units: str | None = None

    def resolved_dtype(self) -> str:
        return self.dtype or DEFAULT_DTYPE[self.target]

    def resolved_batch(self) -> int:
        return self.max_batch or DEFAULT_BATCH[self.target]


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
    if options.max_batch is not None and options.max_batch < 1:
        raise ExportError("max_batch must be at least 1")
    if options.prefill_chunk is not None and options.prefill_chunk < 1:
        raise ExportError("prefill_chunk must be at least 1")
    if options.compute_units is not None:
        if options.target != "coreml":
            raise ExportError(
                f"--compute-units applies to Core ML packages, not {options.target} "
                "(onnxruntime picks its execution provider from --device at load)"
            )
        if options.compute_units not in COMPUTE_UNITS:
            raise ExportError(
                f"--compute-units {options.compute_units!r} is not one of "
                f"{', '.join(COMPUTE_UNITS)}"
            )
        if options.compute_units in ENUMERATED_UNITS:
            if options.prefill_chunk is not None and options.prefill_chunk < 2:
                raise ExportError(
                    f"--compute-units {options.compute_units} needs --prefill-chunk 2 or more "
                    "(its query lengths are enumerated shapes, and Core ML takes at least two)"
                )
            if options.max_seq_len is not None and options.max_seq_len < 3:
                raise ExportError(
                    f"--compute-units {options.compute_units} needs --max-seq-len 3 or more "
                    "(the prefill chunk, at least 2, must leave room for a token)"
                )
    out = options.out
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).exists():
        raise ExportError(
            f"--out {out} is not empty and holds no earlier export; choose an empty folder"
        )
    whole = out.resolve()
    if os.path.ismount(whole):
        raise ExportError(
            f"--out {out} is a mount point: an export replaces its folder whole, which a "
            "mount point cannot be; export into a folder inside it"
        )
    here = Path.cwd().resolve()
    if here == whole or whole in here.parents:
        raise ExportError(
            f"--out {out} holds the current folder, which the export would replace; "
            "run it from another folder"
        )


class Progress:
    """Export progress as lines: "[i/n] stage ...", its time, and notes (logs, tests)."""

    def __init__(self, write: Callable[[str], None] = print) -> None:
        self.write = write
        self.names: list[str] = []
        self.done = 0

    def start(self, names: list[str]) -> None:
        self.names, self.done = names, 0

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.done += 1
        self.write(f"[{self.done}/{len(self.names)}] {name} ...")
        began = time.perf_counter()
        yield
        self.write(f"      done in {time.perf_counter() - began:.1f}s")

    def note(self, text: str) -> None:
        self.write(f"      {text}")

    def close(self) -> None:
        """Nothing to finish for lines."""


class Bar(Progress):
    """Export progress as one bar over the stages (the CLI); notes print above it."""

    def start(self, names: list[str]) -> None:
        from tqdm import tqdm

        super().start(names)
        self.bar = tqdm(total=len(names), unit="stage", file=sys.stderr, leave=True)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.bar.set_description(name)
        yield
        self.bar.update(1)

    def note(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hold back what converters print (coremltools' progress bars, torch.onnx's steps):
    the export shows one bar of its own. On a failure the held text is shown."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held), contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue()[-4000:])
        raise


def export_model(
    options: ExportOptions, progress: Progress | Callable[[str], None] = print
) -> Manifest:
    """Build the artefact folder ``options.out`` and return its manifest."""
    check_options(options)
    report = progress if isinstance(progress, Progress) else Progress(progress)
    target = options.target
    names = ["load checkpoint"]
    if options.verify:
        names.append(SOURCE_STAGE)
    names.append(f"convert to {target}")
    if options.quantize != "none":
        names.append(f"quantize weights ({options.quantize})")
    if options.verify:
        names.append(CHECK_STAGE)
    names += ["write tokenizer, config and manifest"]
    report.start(names)
    out = options.out.resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = _staging_folder(out)
    except OSError as exc:  # (a read-only or special file system: before any work)
        raise ExportError(f"cannot write an export beside {out}: {exc.strerror}") from None
    try:
        with report.stage(names[0]):
            checkpoint = load_source(options)
        check_source(checkpoint, options)
        seq_len, chunk = _lengths(checkpoint, options)
        traces = None
        if options.verify:
            with report.stage(SOURCE_STAGE):
                traces = _reference_traces(options, checkpoint, seq_len)
        builder = _onnx if target == "onnx" else _coreml
        draft = builder(checkpoint, options, staging, report, seq_len, chunk, traces)
        with report.stage(names[-1]):
            write_side_files(checkpoint, staging)
            from export.manifest import finalize

            manifest = finalize(draft, staging)
        _share_like(staging)
        _replace(out, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        report.close()
        raise
    total = sum((out / f).stat().st_size for f in manifest.files)
    report.note(f"{options.out}: {len(manifest.files)} files, {total / 1e6:.1f} MB")
    report.close()
    return manifest


def _staging_folder(out: Path) -> Path:
    """A new folder beside ``out`` to build the export in, with the mode ``mkdir`` gives
    under the umask (``tempfile.mkdtemp``'s 0700 would keep another user, or a container,
    from reading the finished artefact; setting the umask to read it races other threads)."""
    while True:
        folder = out.parent / f".{out.name}.staging-{secrets.token_hex(6)}"
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder


def _share_like(root: Path) -> None:
    """Give everything under ``root`` the access ``root`` has (its mode came from the
    umask): coremltools writes ``model.mlpackage`` by copying a ``mkdtemp`` folder, whose
    0700 the copy keeps, so another user could not read the package inside a 0755 folder.
    Folders take ``root``'s mode, files the same without execute bits."""
    mode = stat.S_IMODE(root.stat().st_mode)
    for folder, subfolders, files in os.walk(root):
        for name in subfolders:
            (Path(folder) / name).chmod(mode)
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                path.chmod(mode & 0o666)


def _replace(out: Path, staging: Path) -> None:
    """Put the finished staging folder at ``out``; an earlier export there goes away only
    once the new one is in its place (if the move fails, the earlier one is put back)."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = out.parent / f".{out.name}.old-{secrets.token_hex(6)}"
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def load_source(options: ExportOptions) -> Checkpoint:
    """The source checkpoint on the CPU in the export's dtype (Core ML traces fp32; it
    computes in fp16 itself)."""
    fp16 = options.resolved_dtype() == "fp16" and options.target == "onnx"
    dtype = torch.float16 if fp16 else torch.float32
    return load_any(options.model, dtype)


def load_any(model: str, dtype: torch.dtype) -> Checkpoint:
    """Whatever ``fermi.load`` accepts, as plain ``nn.Linear`` modules in ``dtype``."""
    path = resolve(model)
    if path.suffix == ".gguf":
        from fermi.gguf import load_gguf

        # fp32 first: asked for fp16, load_gguf keeps fp16 storage with fp32 arithmetic
        # (its CPU speed path), which is not a graph to export.
        checkpoint = load_gguf(path, torch.device("cpu"), "fp32")
        checkpoint.model.to(dtype)
        return checkpoint
    if not path.is_dir():
        raise ExportError(f"{model}: {path} is neither a checkpoint folder nor a .gguf file")
    from fermi.runners.artefact import MANIFEST_NAME, is_artefact

    if is_artefact(path):
        raise ExportError(
            f"{model}: {path} is an exported artefact ({MANIFEST_NAME}), not a checkpoint; "
            "export from the checkpoint or .gguf file it was built from (its manifest's "
            "'source' names it)"
        )
    # (tensors of their own: the file's pages would count against the whole export)
    return load_folder(path, torch.device("cpu"), dtype, owned=True)


def check_source(checkpoint: Checkpoint, options: ExportOptions) -> None:
    """What the target cannot take, refused before any work."""
    head_dim = checkpoint.config.head_dim
    if options.target == "onnx" and head_dim % 8:
        raise ExportError(
            f"head_dim {head_dim} is not a multiple of 8, which onnxruntime's "
            "GroupQueryAttention (the graph's attention) needs"
        )


def write_side_files(checkpoint: Checkpoint, folder: Path) -> None:
    """The tokenizer, template and config files the artefact loads with: copied from a
    checkpoint folder, written from what a GGUF file holds."""
    source = checkpoint.folder
    if source.is_dir():
        for name in SIDE_FILES:
            if (source / name).is_file():  # (a symlink into a Hub cache's blobs is copied)
                shutil.copyfile(source / name, folder / name)
        return
    tokenizer = checkpoint.tokenizer
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "add_bos_token": tokenizer.add_bos,
        "chat_template": tokenizer.chat_template,
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "config.json", checkpoint.hf_config)
    generation = checkpoint.generation
    gen = {"eos_token_id": list(generation.eos_token_ids)}
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        if getattr(generation, key) is not None:
            gen[key] = getattr(generation, key)
    _write_json(folder / "generation_config.json", gen)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


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
        max_batch=options.resolved_batch(),
        prefill_chunk=chunk,
        vocab_size=cfg.vocab_size,
        cache=CacheSpec(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cache_dtype),
        inputs=io[0],
        outputs=io[1],
        states=io[2],
        tools={},
        files={},
    )


def _lengths(checkpoint: Checkpoint, options: ExportOptions) -> tuple[int, int]:
    seq_len = options.max_seq_len or min(checkpoint.config.max_position_embeddings, 2048)
    chunk = min(options.prefill_chunk or DEFAULT_CHUNK[options.target], seq_len)
    return seq_len, chunk


def _reference_traces(options: ExportOptions, checkpoint: Checkpoint, seq_len: int):
    """The source's greedy continuations of the check's prompts, in float32: on the loaded
    checkpoint itself when it is float32 (the export reuses it: ``setup_cache`` replaces
    the runner's cache), else on a fresh copy freed before the export goes on."""
    from export.verify import PROMPTS, reference
    from fermi.runners.torch_eager import TorchRunner

    model = checkpoint.model
    if model.dtype != torch.float32:
        model = load_any(options.model, torch.float32).model
    # Prompts cut to leave a position for a step where the context is shorter than them.
    prompts = [checkpoint.tokenizer.encode(p)[: seq_len - 1] for p in PROMPTS]
    longest = max(map(len, prompts))
    steps = max(1, min(VERIFY_STEPS, seq_len - longest))
    # A cache as long as the check's longest text, not the artefact's context (at 2048
    # positions Qwen3-0.6B's float32 cache alone is 470 MB).
    length = min(seq_len, longest + steps)
    runner = TorchRunner(model, 1, length, prefill_chunk=length)
    traces = reference(runner, prompts, steps)
    del runner, model
    gc.collect()
    release_free_heap()
    return traces


def _onnx(checkpoint, options, staging, report, seq_len, chunk, traces) -> Manifest:
    from export import onnx as onnx_export
    from export import onnx_contract
    from fermi.runners.onnx import OnnxRunner

    cfg = checkpoint.config
    kept = {}
    if options.quantize != "none":  # a GGUF source's blocks, found by the weights' bytes
        for name, blocks in gguf_blocks(options.model, cfg).items():
            kept[onnx_export.weight_key(checkpoint.model.get_parameter(name))] = blocks
    raw = staging / ".raw" / onnx_export.MODEL_FILE
    raw.parent.mkdir()
    with report.stage(f"convert to onnx (opset {onnx_export.OPSET}, torch.export)"), quiet():
        onnx_export.export_onnx(checkpoint.model, raw, seq_len)
    checkpoint.model = None
    gc.collect()
    release_free_heap()  # (the next stage's peak would stack on glibc's kept pages)
    if options.quantize != "none":
        bits = 8 if options.quantize == "int8" else 4
        with report.stage(f"quantize weights ({options.quantize})"), quiet():
            count = onnx_export.quantize(raw, staging / onnx_export.MODEL_FILE, bits, kept)
        if count:
            report.note(f"{count} {KEPT_NOTE}")
    else:
        onnx_export.move_model(raw, staging, onnx_export.MODEL_FILE)
    shutil.rmtree(raw.parent)
    inputs, outputs = onnx_export.io_specs(staging / onnx_export.MODEL_FILE)
    cache_dtype = "float16" if options.resolved_dtype() == "fp16" else "float32"
    tok = checkpoint.tokenizer
    config = onnx_contract.genai_config(
        cfg, checkpoint.generation, tok.bos_token_id, seq_len, onnx_export.MODEL_FILE
    )
    text = onnx_contract.readme(cfg, options.model, cache_dtype, seq_len, options.quantize)
    onnx_contract.write(staging, config, text)
    draft = _draft(
        checkpoint,
        options,
        onnx_export.MODEL_FILE,
        seq_len,
        chunk,
        cache_dtype,
        (inputs, outputs, []),
    )
    if traces is not None:
        with report.stage(CHECK_STAGE):
            # Without repacking, onnxruntime reads a large model's weights from the mapped
            # external data file instead of holding a packed copy beside them.
            runner = OnnxRunner(staging, draft, 1, seq_len, chunk, prepack=False)
            numerics = agreement(traces, runner, "onnxruntime (CPU)")
            del runner
            report.note(f"onnxruntime vs the source: {numerics.summary()}")
            strict = options.resolved_dtype() == "fp32" and options.quantize == "none"
            if strict and not _exact(numerics):
                raise ExportError(
                    f"the exported ONNX graph does not reproduce the engine ({numerics.summary()})"
                )
            _warn_if_far(numerics, options, report)
        draft = msgspec.structs.replace(draft, numerics=numerics)
    return draft


def gguf_blocks(model: str, cfg) -> dict:
    """A GGUF source's quantized blocks that a Core ML package can keep (none for others)."""
    path = resolve(model)
    if path.suffix != ".gguf":
        return {}
    from export.gguf_blocks import model_blocks

    return model_blocks(path, cfg)


def _exact(numerics: Numerics) -> bool:
    return (
        all(n == numerics.steps for n in numerics.greedy_equal)
        and numerics.max_logit_diff < ONNX_FP32_TOLERANCE
    )


def _warn_if_far(numerics: Numerics, options: ExportOptions, report: Progress) -> None:
    if numerics.top1_agreement < AGREEMENT_FLOOR:
        report.note(
            f"WARNING: the {options.quantize if options.quantize != 'none' else options.target} "
            f"export follows its source on only {100 * numerics.top1_agreement:.1f}% of "
            f"steps (floor {100 * AGREEMENT_FLOOR:.0f}%): its output will differ from the "
            "source's within a few tokens; export without --quantize, or with a milder one"
        )


def _coreml(checkpoint, options, staging, report, seq_len, chunk, traces) -> Manifest:
    from export import coreml

    fp16 = options.resolved_dtype() == "fp16"
    units = options.compute_units or "ALL"
    enumerated = units in ENUMERATED_UNITS
    if enumerated and chunk < 2:  # (a context of 2 leaves a chunk of 1)
        raise ExportError(f"--compute-units {units} needs a prefill chunk of 2 or more")
    if enumerated and not fp16:
        report.note(
            f"WARNING: --compute-units {units} with --dtype fp32: the Neural Engine computes "
            "in fp16 only, so Core ML will run this package on the CPU"
        )
    shapes = "enumerated shapes" if enumerated else "range shapes"
    with report.stage(f"convert to coreml (torch.jit.trace, iOS18 ML Program, {shapes})"), quiet():
        if fp16 and coreml.cast_for_trace(checkpoint.model):
            gc.collect()
            release_free_heap()
        step = coreml.build_step(checkpoint.model, seq_len, enumerated)
        traced = coreml.trace(step)
        model = coreml.convert(traced, step, seq_len, chunk, fp16, units)
        del traced, step
        checkpoint.model = None
        gc.collect()
    if options.quantize != "none":
        kept = gguf_blocks(options.model, checkpoint.config)
        with report.stage(f"quantize weights ({options.quantize})"), quiet():
            model = coreml.quantize(model, options.quantize, kept)
        if kept:
            report.note(f"{len(kept)} {KEPT_NOTE}")
    package = staging / "model.mlpackage"
    with quiet():
        model.save(str(package))
    del model
    gc.collect()
    release_free_heap()  # (the check's peak would stack on glibc's kept pages)
    numerics = None
    if traces is not None:
        with report.stage(CHECK_STAGE), quiet():
            runner = coreml.package_runner(package, load_any(options.model, torch.float32))
            numerics = agreement(traces, runner, coreml.CHECKED)
            del runner
        report.note(f"Core ML package weights vs the source: {numerics.summary()}")
        _warn_if_far(numerics, options, report)
    draft = _draft(
        checkpoint, options, "model.mlpackage", seq_len, chunk, "float16", coreml.io_specs(package)
    )
    sizes = coreml.query_sizes(chunk) if enumerated else []
    return msgspec.structs.replace(draft, numerics=numerics, compute_units=units, query_sizes=sizes)
