"""Fermi Infer: a compiled-graph inference engine for small language models."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fermi.errors import FermiError, ModelLoadError, RequestError

# On a Mac, an op torch's MPS backend lacks runs on the CPU instead of raising. torch reads
# this once, when it is first imported: a program that imports torch before fermi sets it
# itself (README, "Apple silicon").
if sys.platform == "darwin" and "torch" not in sys.modules:
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
# OpenMP's threads spin at each barrier by default: on a CPU shared with other work (a
# laptop's browser, a server's tokenizer threads) a spinning thread waits on a core someone
# else holds. SmolLM2's decode step with 2 threads on the 2-core test machine under load:
# median 500 ms spinning against 27 ms passive (perf/LOG.md run 24). Passive threads cost a
# wake-up at every parallel op instead, so the CPU runner also leaves a core to the rest
# of the process (fermi.runners.select.use_default_cpu_threads, run 37). Read once, when
# torch is first imported (README, "CPU performance"): a program that imports torch first
# keeps torch's own defaults for both.
TORCH_FIRST = "torch" in sys.modules
if not TORCH_FIRST:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if TYPE_CHECKING:
    import torch

    from fermi.engine.api import Engine
    from fermi.engine.requests import SamplingSettings
    from fermi.engine.types import Completion, Delta, Usage
    from fermi.sampling import SamplingParams

# Heavy modules (torch, the engine) load on first use, so `fermi --help` stays fast.
_LAZY = {
    "Engine": "fermi.engine.api",
    "SamplingParams": "fermi.sampling",
    "Completion": "fermi.engine.types",
    "Delta": "fermi.engine.types",
    "Usage": "fermi.engine.types",
    "SamplingSettings": "fermi.engine.requests",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fermi' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL",
    "Completion",
    "Delta",
    "Engine",
    "FermiError",
    "ModelLoadError",
    "RequestError",
    "SamplingParams",
    "SamplingSettings",
    "Usage",
    "load",
]
__version__ = "0.1.0"

DEFAULT_MODEL = "Qwen/Qwen3-1.7B"


def default_model() -> str:
    return os.environ.get("FERMI_MODEL") or DEFAULT_MODEL


def load(
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    max_seq_len: int | None = None,
    max_batch: int | None = None,
    runner: str | None = None,
    prefill_chunk: int | None = None,
    max_waiting: int = 1024,
    prefix_reuse: bool = True,
    quantize: str | None = None,
    warm_grammars: bool = True,
    warmup: str | bool | None = None,
) -> Engine:
    """Load a model and return an :class:`Engine`.

    ``model`` is a Hugging Face id, a checkpoint folder, a ``.gguf`` file, an alias such as
    ``smollm2-135m`` (``fermi.aliases``), or ``FERMI_MODEL`` /
    Qwen/Qwen3-1.7B when omitted. ``device`` defaults to CUDA when there is a GPU, else to
    Apple silicon's GPU (``mps``), else to the CPU; ``dtype`` to bf16 on CUDA, fp16 on
    ``mps`` and fp32 on CPU (a quantized GGUF file: fp16 weight storage, float32
    arithmetic). On CPU, weights stored in 16 bits or fewer (fp16 storage, ``quantize``)
    keep the KV cache in fp16 as well where fermi's kernels run the decode step
    (``fermi.models.half_weights.use_half_cache``); ``dtype="fp32"`` keeps it float32.
    ``max_seq_len`` defaults to the model's context capped at 4096 (an exported artefact:
    the length it was exported for); ``max_batch`` to 8 (an artefact: its own, 4 unless
    exported with another).
    ``max_waiting`` requests may queue for a slot beyond those; ``submit`` refuses more.
    ``prefix_reuse=False`` frees a slot's cache when its request ends instead of keeping it
    for a later prompt that starts the same way. An embedding checkpoint (Qwen3-Embedding)
    loads as one: ``Engine.embed`` serves it.

    ``quantize="int8"`` or ``"int4"`` stores the decoder layers' linear weights in 8 bits
    (one scale per output row) or 4 bits (groups of 32 with a scale and a minimum), and the
    lm_head in int8; activations keep ``dtype`` (``fermi.models.quant``). A GGUF file's 4-bit
    blocks (Q4_0, Q4_1, Q4_K) load as int4 with their codes as stored.

    ``warm_grammars`` builds the grammar compiler's view of the tokenizer once the engine
    has idled half a second, so that the first request with a JSON schema, tools or a
    grammar does not wait for it (0.3 s for a 49k vocabulary, seconds for 152k); it holds
    ~56 MB for SmolLM2-135M. ``False`` (the CLI's ``chat`` and ``generate``, which never
    constrain) builds it at the first such request instead.

    ``warmup`` is what a compiled runner (``torch-cuda``, ``torch-compile``) compiles and
    captures before ``load`` returns: ``"full"`` (the default, or ``FERMI_WARMUP``) every
    shape, so that no step ever waits for a compile; ``"first"`` what a first request
    needs, the rest on the engine's thread while it idles (or when a step first needs
    it). The command line's engines take ``"first"``. In a process of your own, take it
    only when nothing else uses the GPU meanwhile: a CUDA graph captured on the engine's
    thread forbids other threads' allocations while it is captured. ``False``: no warm-up.
    """
    from fermi.engine.api import Engine
    from fermi.hub import resolve
    from fermi.loading import load_folder, parse_dtype
    from fermi.models.quant import QuantSpec
    from fermi.runners.select import check_runner_device, resolve_device, torch_runner

    spec = QuantSpec.parse(quantize)  # a bad value is refused before anything loads
    for name, value, least in (
        ("max_batch", max_batch, 1),
        ("max_seq_len", max_seq_len, 2),
        ("prefill_chunk", prefill_chunk, 1),
        ("max_waiting", max_waiting, 0),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be an integer, not {value!r}")
        if value is not None and value < least:
            raise ValueError(f"{name} must be at least {least}, not {value}")
    for name, flag in (("prefix_reuse", prefix_reuse), ("warm_grammars", warm_grammars)):
        if not isinstance(flag, bool):  # ("no" would read as true)
            raise ValueError(f"{name} must be True or False, not {flag!r}")
    if warmup is not None:  # refused here for an artefact too, which has no warm-up to pick
        from fermi.runners.base import warmup_scope

        warmup_scope(warmup)
    name = str(model) if model is not None else default_model()
    if not name.strip():
        raise ValueError("model is empty: name a Hugging Face id, folder, .gguf file or alias")
    path = resolve(name)
    if (path / "manifest.json").is_file():  # a `fermi export` artefact: its runner decides
        if spec is not None:
            raise ValueError(
                f"quantize={quantize!r} applies to checkpoints run by torch; {path} is an "
                "exported artefact whose weights were fixed when it was built"
            )
        from fermi.runners.artefact import load_artefact

        art = load_artefact(
            path,
            runner,
            max_batch,
            max_seq_len,
            prefill_chunk,
            None if device is None else str(device),
            dtype,
        )
        return Engine(
            art.runner,
            art.tokenizer,
            art.generation,
            _display_name(name, path),
            max_waiting=max_waiting,
            prefix_reuse=prefix_reuse,
            warm_grammars=warm_grammars,
        )
    dev = resolve_device(device)
    check_runner_device(runner, dev)  # before the weights load
    if path.suffix == ".gguf":  # a llama.cpp file (the packaged aliases are GGUF too)
        from fermi.gguf import load_gguf

        ckpt = load_gguf(path, dev, dtype, spec)
    else:
        # On the CPU the engine computes from the loaded tensors for its whole life: tensors
        # of their own, not a mapping of the file, whose pages (the parts of each fused
        # projection, then every page read) would count beside them: Qwen3-0.6B in float32
        # held 3.7 GB after a request, mapped, for 2.4 GB of weights (perf/LOG.md run 50).
        ckpt = load_folder(path, dev, parse_dtype(dtype, dev), spec, owned=dev.type == "cpu")
    seq_len = max_seq_len or min(ckpt.config.max_position_embeddings, 4096)
    if seq_len < 2:  # (a max_seq_len given is checked above: this is the model's own)
        raise ModelLoadError(
            f"{path}: the model's context (max_position_embeddings, or a GGUF's "
            f"context_length) is {seq_len} token; at least 2 are needed (or pass max_seq_len)"
        )
    warm = warmup if warmup is not None else warmup_from_env("full")
    run = torch_runner(ckpt.model, runner, max_batch or 8, seq_len, prefill_chunk, warm)
    return Engine(
        run,
        ckpt.tokenizer,
        ckpt.generation,
        model_name=_display_name(name, path),
        max_waiting=max_waiting,
        prefix_reuse=prefix_reuse,
        embedding=ckpt.embedding,
        warm_grammars=warm_grammars,
    )


def _display_name(name: str, path: Path) -> str:
    return path.name if Path(name).expanduser().exists() else name


def warmup_from_env(default: str) -> str:
    """``FERMI_WARMUP`` when set (checked here, naming the variable), else ``default``."""
    from fermi.runners.base import WARMUP_SCOPES

    value = os.environ.get("FERMI_WARMUP")
    if not value:
        return default
    if value not in WARMUP_SCOPES:
        raise ValueError(f"FERMI_WARMUP must be one of {', '.join(WARMUP_SCOPES)}, not {value!r}")
    return value
