"""Checkpoint folders in, ready modules out.

A folder holds ``config.json``, ``model.safetensors`` (or a sharded
``model.safetensors.index.json``), ``tokenizer.json``, and optionally
``tokenizer_config.json`` and ``generation_config.json``. Every problem is reported with
the file or tensor it concerns.

An embedding checkpoint (Qwen3-Embedding) is the same decoder without its use for text:
sentence-transformers' ``modules.json`` and ``1_Pooling/config.json`` beside it say how a
vector is pooled, and its weights are the bare backbone (``embed_tokens.weight``, not
``model.embed_tokens.weight``; no ``lm_head``). :func:`embedding_spec` reads that.
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass, field, replace
from math import prod
from pathlib import Path

import torch
from safetensors import safe_open
from torch.overrides import TorchFunctionMode

from fermi import memory
from fermi.errors import ModelLoadError
from fermi.jsonfile import read_json_object as read_json
from fermi.models.decoder import Decoder, ModelConfig, projection_parts
from fermi.models.quant import (
    QuantizedWeight,
    QuantReport,
    QuantSpec,
    build_linear,
    cpu_layout,
)
from fermi.models.registry import Adapter, UnsupportedModelError, adapter_for
from fermi.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)
X86_MACHINES = ("x86_64", "amd64")  # platform.machine() of x86 CPUs (Linux, Windows)


@dataclass(frozen=True)
class GenerationDefaults:
    """Defaults from ``generation_config.json`` (a request's own values win)."""

    eos_token_ids: tuple[int, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    do_sample: bool | None = None


@dataclass(frozen=True)
class EmbeddingSpec:
    """An embedding checkpoint: its vector is the final hidden state at the input's last
    token, L2-normalised (the only pooling loaded; see :func:`embedding_spec`)."""

    hidden_size: int  # the vector's length, and the most ``dimensions`` may keep
    source: str  # what made the folder an embedding checkpoint, for messages
    # Whether it has an lm_head of its own (stored, or tied to the embeddings by its
    # config) and so can generate text too.
    generates: bool


@dataclass
class Checkpoint:
    """Everything loaded from one model folder."""

    folder: Path
    model: Decoder
    config: ModelConfig
    hf_config: dict
    tokenizer: Tokenizer
    generation: GenerationDefaults
    extra: dict = field(default_factory=dict)
    embedding: EmbeddingSpec | None = None  # set for an embedding checkpoint


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA; fp16 on Apple's MPS (bf16 there needs macOS 14); fp32 on a CPU."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.float16 if device.type == "mps" else torch.float32


def check_tokenizer_fits(tokenizer: Tokenizer, vocab_size: int, source: Path, rows: str) -> None:
    """Refuse a tokenizer that can produce an id the model has no row for: every prompt
    with that token failed at request time, and a huge id made the grammar compiler's
    view of the tokenizer allocate gigabytes (an abort, not an exception)."""
    largest, token = tokenizer.largest_id()
    if largest >= vocab_size:
        raise ModelLoadError(
            f"{source}: token {token!r} has id {largest}, past the model's vocabulary of "
            f"{vocab_size} ({rows})"
        )


def parse_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if name is None or name == "auto":
        return default_dtype(device)
    if isinstance(name, torch.dtype):  # the same three as the names, whichever spelling
        if name not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                f"dtype {name} is not one of torch.float32, torch.float16, torch.bfloat16"
            )
        dtype = name
    else:
        dtype = _named_dtype(name)
    if dtype == torch.bfloat16 and device.type == "mps" and not _mps_has_bf16():
        raise ValueError("bf16 on Apple's GPU (mps) needs macOS 14 or later: use fp16 there")
    return dtype


def _mps_has_bf16() -> bool:
    return torch.backends.mps.is_macos_or_newer(14, 0)


def _named_dtype(name: str) -> torch.dtype:
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if name not in table:
        raise ValueError(f"dtype {name!r} is not one of auto, {', '.join(table)}")
    return table[name]


def load_folder(
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    quantize: QuantSpec | None = None,
    *,
    owned: bool = False,
) -> Checkpoint:
    """Load a Hugging Face style checkpoint folder; ``quantize`` quantizes its linear layers
    (:mod:`fermi.models.quant`). ``owned``: see :func:`materialize`."""
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a model folder")
    hf_config = read_json(folder / "config.json")
    try:
        adapter = adapter_for(hf_config, str(folder / "config.json"))
    except UnsupportedModelError as exc:
        raise ModelLoadError(str(exc)) from None
    try:
        config = adapter.to_config(hf_config)
    except UnsupportedModelError as exc:  # its message starts "config.json: <field> ..."
        raise ModelLoadError(f"model folder {folder}: {exc}") from None
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.exists():
        raise ModelLoadError(f"model folder {folder} has no tokenizer.json")
    tokenizer = Tokenizer.from_folder(folder)
    check_tokenizer_fits(tokenizer, config.vocab_size, tokenizer_file, "config.json's vocab_size")
    located = read_safetensors(folder)
    if adapter.rename is not None:  # before any tensor is read: unread ones cost nothing
        renamed = ((adapter.rename(name), where) for name, where in located.items())
        located = {name: where for name, where in renamed if name is not None}
    weights, bare = backbone_prefixed(located)
    embedding = embedding_spec(folder, config, bare, has_head="lm_head.weight" in weights)
    if embedding is not None and not embedding.generates:
        # The decoder keeps its one shape: the embedding matrix stands in for the missing
        # lm_head. Its logits mean nothing, and the engine refuses to generate with it.
        config = replace(config, tie_word_embeddings=True)
    model = build_model(config, adapter, weights, device, dtype, str(folder), quantize, owned=owned)
    if device.type == "cpu" and quantize is not None:
        from fermi.models.half_weights import use_half_cache, use_half_embedding

        use_half_embedding(model)  # (the layers read 8 bits or fewer: the table 16)
        use_half_cache(model)  # (and the KV cache)
    generation = read_generation_defaults(folder, hf_config, tokenizer)
    return Checkpoint(folder, model, config, hf_config, tokenizer, generation, embedding=embedding)


def backbone_prefixed(
    located: dict[str, tuple[Path, str]],
) -> tuple[dict[str, tuple[Path, str]], bool]:
    """The tensors under the decoder's names, and whether the checkpoint stores the bare
    backbone (a transformers ``Qwen3Model``, as Qwen3-Embedding does: ``layers.0...``
    where a causal LM has ``model.layers.0...``), whose names then get the prefix."""
    if "embed_tokens.weight" not in located or "model.embed_tokens.weight" in located:
        return located, False
    named = {k if k.startswith("lm_head.") else f"model.{k}": v for k, v in located.items()}
    return named, True


POOLING_MODULE = "sentence_transformers.models.Pooling"


def embedding_spec(
    folder: Path, config: ModelConfig, bare: bool, has_head: bool
) -> EmbeddingSpec | None:
    """Whether ``folder`` is an embedding checkpoint, and which.

    sentence-transformers' files decide when present: ``modules.json`` names the pooling
    module's folder, whose ``config.json`` must pool the last token
    (``pooling_mode_lasttoken``, Qwen3-Embedding's); any other pooling is refused rather
    than loaded as a chat model. Without them, bare backbone weights with no ``lm_head``
    (``backbone_prefixed``) are one too: that is what an embedding checkpoint stores.
    """
    generates = has_head or config.tie_word_embeddings
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        if bare and not has_head:
            source = "its weights are a bare backbone without an lm_head"
            return EmbeddingSpec(config.hidden_size, source, generates)
        return None
    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{modules_path} is not valid JSON: {exc}") from None
    except (RecursionError, ValueError) as exc:
        raise ModelLoadError(f"{modules_path} cannot be read: {type(exc).__name__}") from None
    if not isinstance(modules, list):
        raise ModelLoadError(f"{modules_path} is not a list of modules")
    pooling = [m for m in modules if isinstance(m, dict) and m.get("type") == POOLING_MODULE]
    if not pooling:
        return None
    pooling_path = folder / str(pooling[0].get("path", "")) / "config.json"
    pooling_config = read_json(pooling_path)
    modes = sorted(
        key.removeprefix("pooling_mode_")
        for key, value in pooling_config.items()
        if key.startswith("pooling_mode_") and value is True
    )
    if modes != ["lasttoken"]:
        raise ModelLoadError(
            f"{pooling_path}: pooling {' + '.join(modes) or 'none'} is not supported; "
            "Fermi pools the last token (pooling_mode_lasttoken, as Qwen3-Embedding does)"
        )
    dimension = pooling_config.get("word_embedding_dimension", config.hidden_size)
    if dimension != config.hidden_size:
        raise ModelLoadError(
            f"{pooling_path}: word_embedding_dimension {dimension} is not the model's "
            f"hidden_size {config.hidden_size}"
        )
    relative = pooling_path.relative_to(folder)
    return EmbeddingSpec(config.hidden_size, f"{relative} pools the last token", generates)


def read_safetensors(folder: Path) -> dict[str, tuple[Path, str]]:
    """Map every tensor name to (file, name) without reading the data yet."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index} has no 'weight_map'")
        for key, value in weight_map.items():
            # A shard is a file of this folder: not a number, not a path elsewhere.
            part = Path(value) if isinstance(value, str) else None
            if part is None or part.is_absolute() or ".." in part.parts or not value:
                raise ModelLoadError(
                    f"{index}: weight_map[{key!r}] = {value!r} is not a file name in the folder"
                )
        files = sorted(set(weight_map.values()))
    elif single.exists():
        files = [single.name]
    else:
        exported = [n for n in ("model.onnx", "model.mlpackage") if (folder / n).exists()]
        if exported:  # (an artefact is recognised by its manifest, which is missing)
            raise ModelLoadError(
                f"{folder} holds {exported[0]} but no manifest.json: a fermi export is loaded "
                "through its manifest, which lists and checks its files; export it again"
            )
        raise ModelLoadError(
            f"model folder {folder} has no model.safetensors or model.safetensors.index.json"
        )
    located: dict[str, tuple[Path, str]] = {}
    for name in files:
        path = folder / name
        if not path.exists():
            raise ModelLoadError(f"model folder {folder} has no {name} (listed in {index.name})")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    located[key] = (path, key)
        except Exception as exc:  # safetensors raises its own error types
            raise ModelLoadError(f"{path} is not a readable safetensors file: {exc}") from None
    return located


def materialize(
    located: dict[str, tuple[Path, str]], owned: bool = False
) -> dict[str, torch.Tensor]:
    """Read every tensor, under the name it is located by (``backbone_prefixed`` may have
    renamed it from the name in its file).

    The tensors map their file (privately: no copy, and pages shared with the page cache)
    unless ``owned``: then each is copied out of a mapping of its own, let go at once. A
    mapping's pages that were read count in the process's resident memory for as long as
    any tensor maps the file, including those read once and copied (a fused projection's
    parts): for a process that holds the model a long time and through other large work
    (an export: a trace, a conversion, a check), 1.2 GB of Qwen3-0.6B's float32 file
    (perf/LOG.md run 49)."""
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (path, key) in located.items():
        by_file.setdefault(path, []).append((name, key))
    for path, names in by_file.items():
        if owned:
            for name, key in names:
                with safe_open(path, framework="pt") as f:
                    out[name] = f.get_tensor(key).clone()
            continue
        with safe_open(path, framework="pt") as f:
            for name, key in names:
                out[name] = f.get_tensor(key)
    return out


Weights = dict[str, tuple[Path, str]] | dict[str, torch.Tensor | QuantizedWeight]


# Besides the projections: what build_model's linear_dtype applies to.
HALVED = ("lm_head.weight", "model.embed_tokens.weight")


def build_model(
    config: ModelConfig,
    adapter: Adapter,
    weights: Weights,
    device: torch.device,
    dtype: torch.dtype,
    source: str,
    quantize: QuantSpec | None = None,
    linear_dtype: torch.dtype | None = None,
    *,
    owned: bool = False,
    consume: bool = False,
) -> Decoder:
    """Create the decoder without initialising it, then assign the checkpoint's tensors
    (``owned``: see :func:`materialize`). ``consume``: the caller hands ``weights`` (tensors
    it made, as ``fermi.gguf`` reads them) over: the dict is emptied at once and the load
    holds the tensors alone, letting each go as the model takes it, so the parts of a fused
    or quantized layer go once it is built instead of at the end of the load. (A mapping
    of files is materialized into new tensors either way, and is left as it was.)

    ``linear_dtype``: the linear layers' weights (``*_proj.weight``, ``lm_head.weight``)
    and the embedding table in this dtype instead of ``dtype``; for a CPU load whose
    ``use_half_weights`` and ``use_half_embedding`` store them in fp16 next, they never
    exist in float32 (a tied head shares the fp16 table until it is packed).

    With ``quantize``, the linear layers it names become ``QuantLinear``s: a part already
    quantized in the target scheme (a :class:`QuantizedWeight`, as ``fermi.gguf`` reads
    llama.cpp's 4-bit blocks) keeps its codes; the others are quantized from their float
    values. ``model.quantization`` reports which and at what error.
    """
    tensors = {
        k: (v if isinstance(v, torch.Tensor | QuantizedWeight) else None)
        for k, v in weights.items()
    }
    if any(v is None for v in tensors.values()):
        tensors = materialize(weights, owned)  # type: ignore[arg-type]
    elif consume:
        weights.clear()  # (``tensors`` holds them alone now, and lets each go as it is used)
    if adapter.sanitize is not None:
        tensors = adapter.sanitize(tensors, config)
    with torch.device("meta"), _SkipInit():
        model = Decoder(config)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        tensors.pop("lm_head.weight", None)
    # Each model tensor as the checkpoint names it: its parts, for a fused projection the
    # checkpoint stores apart, so that every check below names a tensor of the files.
    parts = {name: checkpoint_parts(name, ref, config, tensors) for name, ref in expected.items()}
    wanted = {part: shape for name_parts in parts.values() for part, shape in name_parts}
    missing = [k for k in wanted if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{source}: tensor {missing[0]!r} is missing{more}")
    unexpected = [
        k for k in tensors if k not in wanted and not k.endswith(adapter.ignored_suffixes)
    ]
    if unexpected:
        raise ModelLoadError(
            f"{source}: unexpected tensor {unexpected[0]!r} for {config.architecture} "
            "(does config.json match the weights?)"
        )
    for name, shape in wanted.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelLoadError(
                f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                f"config.json implies {shape}"
            )
        stored = tensors[name]
        if isinstance(stored, torch.Tensor) and not stored.dtype.is_floating_point:
            # (cast silently before: a bool norm read as 1.0, U8 embeddings as 0..255)
            raise ModelLoadError(
                f"{source}: tensor {name!r} is stored as {stored.dtype}; a weight is a "
                "floating-point tensor"
            )
    # The weights as the model holds them (on the device, in dtype or quantized): refused
    # before any is copied when they cannot fit.
    need = sum(prod(shape) for shape in wanted.values()) * dtype.itemsize
    targets: dict[str, str] = {}
    if quantize is not None:
        targets = quantize.targets(config.num_hidden_layers)
        for module, scheme in targets.items():
            ref = expected.get(f"{module}.weight")  # None for a tied lm_head
            n, k = (config.vocab_size, config.hidden_size) if ref is None else ref.shape
            if scheme == "int4" and k % quantize.group:
                raise ValueError(
                    f"{source}: cannot quantize {module} to int4: its input size {k} is no "
                    f"multiple of the group size {quantize.group}"
                )
            # The quantized weight replaces its float bytes (a tied head adds its own).
            need += quantize.nbytes(scheme, n, k) - (0 if ref is None else n * k * dtype.itemsize)
    memory.require_free(need, device, f"{source}: its weights in {dtype}", DTYPE_ADVICE)
    state = {}
    quantized: dict[str, list] = {}
    for i, (name, name_parts) in enumerate(parts.items()):
        if owned and i % 8 == 7:  # (the parts let go sit in glibc's heap: LOG run 49)
            memory.release_free_heap()
        module, _, kind = name.rpartition(".")
        if kind == "weight" and module in targets:
            quantized[module] = [tensors.pop(part) for part, _ in name_parts]
            continue
        to = dtype
        halved = name.endswith("_proj.weight") or name in HALVED
        if linear_dtype is not None and halved:
            to = linear_dtype
        # (popped: a part copied into a fused tensor, or cast, is let go before the next)
        loaded = [_float(tensors.pop(part)).to(device=device, dtype=to) for part, _ in name_parts]
        state[name] = loaded[0] if len(loaded) == 1 else torch.cat(loaded)
    if "lm_head" in targets and config.tie_word_embeddings:
        quantized["lm_head"] = [state["model.embed_tokens.weight"]]
    elif config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    report = QuantReport(quantize, [], {}, 0) if quantize is not None else None
    while quantized:  # (each layer's parts let go as it is built)
        module, module_parts = next(iter(quantized.items()))
        del quantized[module]
        assert quantize is not None and report is not None  # targets are empty without
        bias = state.pop(f"{module}.bias", None)
        layer, error, rounding = build_linear(
            module_parts, targets[module], quantize, bias, device, dtype
        )
        model.set_submodule(module, layer)
        report.nbytes += layer.nbytes
        if error is None:
            report.kept.append(module)
            if rounding > 0:
                report.rounded[module] = rounding
        else:
            report.errors[module] = error
    if owned:
        memory.release_free_heap()
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings and "lm_head" not in targets:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.quantization = report
    if report is not None and torch.device(device).type == "cpu":
        note = quantized_cpu_note()
        if note is not None:
            log.warning(note)
    return model.eval().requires_grad_(False)


def quantized_cpu_note() -> str | None:
    """What a quantized CPU load should say of this CPU: on an x86 CPU whose best kernels
    are AVX2 (no AVX-512), torch's int8/int4 products take bf16 activations it has no
    instructions for and run no faster than fp16 storage (``perf/LOG.md`` run 55). None
    elsewhere (AVX-512 CPUs ran them 1.3-1.6x faster than fp16; others are not measured),
    and wherever fermi's own kernels run them instead (``fermi.models.quant.cpu_layout``)."""
    if cpu_layout() == "native":
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "DEFAULT") or platform.machine().lower() not in X86_MACHINES:
        return None
    return (
        f"this CPU's best kernels are {capability} (no AVX-512): torch's int8/int4 products "
        "run no faster than fp16 storage on it, so quantizing saves memory here, not time"
    )


def _float(tensor: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    return tensor.dequantize() if isinstance(tensor, QuantizedWeight) else tensor


DTYPE_ADVICE = "choose a smaller dtype (bf16 or fp16) or a smaller model"


def checkpoint_parts(
    name: str, ref: torch.Tensor, config: ModelConfig, tensors: dict[str, torch.Tensor]
) -> list[tuple[str, tuple[int, ...]]]:
    """The checkpoint tensors (name, shape) that make model tensor ``name``: itself, or,
    for a fused projection (``projection_parts``) the checkpoint does not store fused
    (Phi-3 does), its separate projections, whose rows are concatenated in this order."""
    shape = tuple(ref.shape)
    module, _, kind = name.rpartition(".")  # kind: "weight" or "bias"
    if name not in tensors:
        for fused, separate in projection_parts(config).items():
            if module.endswith("." + fused):
                prefix = module.removesuffix(fused)
                return [(f"{prefix}{part}.{kind}", (rows, *shape[1:])) for part, rows in separate]
    return [(name, shape)]


class _SkipInit(TorchFunctionMode):
    """Skip the random init of parameters the checkpoint replaces at once. On the meta
    device nn.Embedding's normal_ runs through torch._refs, which imports torch._dynamo:
    1-2.5 s of a 2-core CPU's load time, for nothing (a mode is local to this thread)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in ("normal_", "uniform_", "kaiming_uniform_"):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def _check_sampling_defaults(path: Path, gen: dict) -> None:
    """The sampling values of ``generation_config.json``, checked as a request's are, at
    load and naming the file: a bad one ("temperature": "hot") loaded, then failed every
    request with a message that named neither, as if the caller's own value were wrong."""
    from fermi.sampling import SamplingParams

    for name, kind in (
        ("temperature", float),
        ("top_p", float),
        ("top_k", int),
        ("min_p", float),
        ("repetition_penalty", float),
    ):
        value = gen.get(name)
        if value is None:
            continue
        # As the request builder reads them (float(), int()): 50.0 and "0.7" have loaded
        # and worked; a value that reads as no number, or a top_k of 1.5, has not.
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError, OverflowError):
            number = None
        whole = number is not None and number.is_integer()
        if kind is int and isinstance(value, str):  # (int("50.0") fails where it is read)
            whole = whole and value.strip().lstrip("+-").isdigit()
        if number is None or (kind is int and not whole):
            wanted = "an integer" if kind is int else "a number"
            raise ModelLoadError(f"{path}: {name} must be {wanted}, not {value!r}")
        try:
            SamplingParams(**{name: kind(number)}).validate()
        except ValueError as exc:
            raise ModelLoadError(f"{path}: {exc}") from None
    if gen.get("do_sample") is not None and not isinstance(gen["do_sample"], bool):
        raise ModelLoadError(f"{path}: do_sample must be true or false, not {gen['do_sample']!r}")


def read_generation_defaults(
    folder: Path, hf_config: dict, tokenizer: Tokenizer
) -> GenerationDefaults:
    path = folder / "generation_config.json"
    gen = read_json(path) if path.exists() else {}
    eos: list[int] = []
    vocab = hf_config.get("vocab_size")
    for name, source in (("generation_config.json", gen), ("config.json", hf_config)):
        given = source.get("eos_token_id")
        for value in given if isinstance(given, list) else [given]:
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ModelLoadError(
                    f"{folder / name}: eos_token_id must be a token id or a list of them, "
                    f"not {value!r}"
                )
            if value < 0 or (isinstance(vocab, int) and value >= vocab):
                raise ModelLoadError(
                    f"{folder / name}: eos_token_id {value} is not a token id of this model "
                    f"(vocab_size {vocab})"
                )
            if value not in eos:
                eos.append(value)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    _check_sampling_defaults(path, gen)
    return GenerationDefaults(
        eos_token_ids=tuple(eos),
        temperature=gen.get("temperature"),
        top_p=gen.get("top_p"),
        top_k=gen.get("top_k"),
        min_p=gen.get("min_p"),
        repetition_penalty=gen.get("repetition_penalty"),
        do_sample=gen.get("do_sample"),
    )
