"""The compiled runners' steps as ahead-of-time compiled packages (AOTInductor).

A compiled runner's warm start loads Inductor's artefacts from the compile cache but still
has Dynamo trace every frame again (seconds per frame: perf/LOG.md runs 42, 82). With
``FERMI_AOT=1`` the runner instead exports each kind of step once with ``torch.export``,
compiles it with ``torch._inductor.aoti_compile_and_package`` and keeps the packages in the
compile cache; a later start loads them (no Dynamo, no Inductor compile) and hands them the
model's own weights and KV cache as user-managed constants, so a package holds code only
and the runner keeps owning its tensors.

One package per kind of step, its sizes dynamic over the runner's buckets:

- ``decode1``: the one-row decode step (the fused row products where the runner uses
  them), any attended length;
- ``decode``: 2..max_batch rows, any attended length;
- ``prefill_causal`` / ``prefill_masked``: a prompt chunk of any bucketed length, starting
  a sequence (no mask) or after cached context;
- ``sample_plain`` / ``sample_filters`` (on CUDA): the sampler of the two warm variants,
  the sampling rows' tensors as inputs.

Every step of a process runs these packages whenever its CUDA graph was captured, so the
tokens do not depend on the order of captures. Packages launch the row products without
programmatic dependent launch: that launch is an opaque Python op (``fermi.models.gemv``),
which a package would call back into Python for (as it does the CPU's fp16 product, a
Python op too); untried on a GPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fermi.sampling import SampleOutput, SamplingBatch, sample

log = logging.getLogger(__name__)

FORMAT = 1  # the folder's layout; a folder of another is built again
STEPS = ("decode1", "decode", "prefill_causal", "prefill_masked")
SAMPLERS = {(False, False, -1): "sample_plain", (True, False, -1): "sample_filters"}
# The sampling rows' tensors a packaged sampler takes, in this order.
SAMPLING_FIELDS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "rep_penalty",
    "presence",
    "frequency",
    "seed",
    "step",
    "prompt_mask",
    "counts",
    "allowed",
)


FERMI_ROOT = Path(__file__).resolve().parent.parent


def source_digest(root: Path = FERMI_ROOT) -> str:
    """A digest of the code a package is compiled from (``root``'s model definition and
    kernels, its sampler and this module): part of the packages' key, so that a newer
    fermi never runs an older one's packages (Inductor's own caches key on the traced
    graph; a package is looked up before anything is traced)."""
    files = [*sorted((root / "models").glob("*.py")), root / "sampling.py", Path(__file__)]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def build_context(model: torch.nn.Module, device: torch.device) -> dict:
    """What a package's code depends on beyond the compile cache's key and the source: the
    form of the weights' kernels (``QuantLinear``'s layout is not in its quantization label:
    ``FERMI_NATIVE`` picks it) and, on CPU, what Inductor's C++ code specialises on: the
    vector ISA, the CPU it was compiled on (``-march=native``) and the thread count
    (``parallel_num_threads``: one thread compiles serial loops). Part of the packages' key,
    so that a package built in another set-up is never loaded into this one."""
    from fermi.models.half_weights import KernelLayer

    layouts = sorted({str(m.layout) for m in model.modules() if isinstance(m, KernelLayer)})
    context: dict = {"layouts": layouts}
    if device.type == "cpu":
        from torch._inductor import config as inductor_config
        from torch._inductor.utils import parallel_num_threads

        context |= {
            # What Inductor picks its ISA from (the CPU's flags below; pick_vec_isa itself
            # takes a second, compiling its probes)
            "isa": (os.environ.get("ATEN_CPU_CAPABILITY"), inductor_config.cpp.simdlen),
            "cpu": _cpu_identity(),
            "threads": parallel_num_threads(),
            "cpu_count": os.cpu_count(),
        }
    return context


def _cpu_identity() -> str:
    """The first CPU's model name and feature flags (``/proc/cpuinfo``), hashed."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        return platform.processor() or platform.machine()
    fields = [line.partition(":") for line in first.splitlines()]
    wanted = [v.strip() for k, _, v in fields if k.strip() in ("model name", "flags", "Features")]
    return hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:16]


CUDA_REFUSED = (
    "FERMI_AOT=1 is not offered on CUDA yet: on the GPU it was tried on (torch 2.11) loading "
    "any AOTInductor package crashed the process; the steps are compiled by torch.compile"
)


def aot_wanted() -> bool:
    """``FERMI_AOT=1``: the compiled runners run packaged steps (``0``, the default: Dynamo
    and Inductor's compile cache)."""
    value = os.environ.get("FERMI_AOT", "0").strip()
    if value not in ("0", "1"):
        raise ValueError(f"FERMI_AOT must be 0 or 1, got {value!r}")
    return value == "1"


class _Decode(torch.nn.Module):
    """The model's decode step; the attended length is the length of ``kv`` (a view of the
    runner's length marker), so that export makes it a dynamic size."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, tokens, positions, rows, kv):
        return self.m(tokens, positions, rows, kv.shape[0], rows_are_slots=True)


class _Prefill(torch.nn.Module):
    """The model's prefill of one chunk (``causal``: it starts its sequence), the attended
    length as in :class:`_Decode`."""

    def __init__(self, model: torch.nn.Module, causal: bool) -> None:
        super().__init__()
        self.m, self.causal = model, causal

    def forward(self, tokens, positions, slot, last, kv):
        return self.m(tokens, positions, slot, kv.shape[0], last_index=last, causal=self.causal)


class _Sampler(torch.nn.Module):
    """``sample`` for one static variant, every sampling tensor an input (a buffer would be
    folded into the package's code as the value it had when exported)."""

    def __init__(self, vocab_size: int, variant: tuple) -> None:
        super().__init__()
        self.vocab_size, self.variant = vocab_size, variant

    def forward(self, logits: torch.Tensor, rows: torch.Tensor, fields: tuple):
        batch = _Fields(self.vocab_size, fields)
        filters, penalties, logprobs = self.variant
        out = sample(
            logits,
            batch,  # type: ignore[arg-type]  (the attributes sample reads)
            rows,
            use_filters=filters,
            use_penalties=penalties,
            want_logprobs=logprobs,
        )
        return tuple(t for t in out if t is not None)


class _Fields:
    def __init__(self, vocab_size: int, fields: tuple) -> None:
        self.vocab_size = vocab_size
        for name, tensor in zip(SAMPLING_FIELDS, fields, strict=True):
            setattr(self, name, tensor)


class StepPackages:
    """The packages of one runner set-up, in ``folder`` (named by the compile cache's key of
    its model, sizes, kernels, torch and GPU). Each is loaded on its step's first use, and
    built first if the folder lacks it: a ``warmup="first"`` start builds what a first
    request needs, and the rest is built while the engine idles (or by the step that
    first meets it), as the compiles of the Dynamo path are."""

    def __init__(self, runner, folder: Path) -> None:
        self.runner = runner
        self.folder = folder
        self.built: dict[str, float] = {}  # seconds per package this process built
        self._loaded: dict[str, Callable] = {}
        # Its views give a package the attended length (see _Decode).
        self.marker = torch.empty(runner.cache_len, dtype=torch.int8, device=runner.device)
        self._state: dict[str, torch.Tensor] | None = None

    # -- building ---------------------------------------------------------------------

    def _usable_folder(self) -> None:
        """Make ``folder`` one of this layout: another layout's is emptied."""
        manifest = self.folder / "manifest.json"
        try:
            if json.loads(manifest.read_text()).get("format") == FORMAT:
                return
        except (OSError, ValueError, AttributeError):
            pass
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = manifest.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"format": FORMAT, "torch": torch.__version__}))
        tmp.replace(manifest)

    def build(self, name: str) -> float:
        """Export and compile one package into the folder (written under another name and
        moved into place: a concurrent start never loads half a file). Returns seconds."""
        from torch._inductor import aoti_compile_and_package

        module, args, dims = self._export_args(name)
        started = time.perf_counter()
        tmp = self.folder / f"{name}.tmp{os.getpid()}.pt2"
        with torch.inference_mode(False), torch.no_grad():
            exported = torch.export.export(module, args, dynamic_shapes=dims)
            configs = {
                "aot_inductor.package_constants_in_so": False,  # code only
                # Every buffer a constant the runner hands over: by default Inductor inlines
                # a 1-d tensor of up to 8 elements as its value at build time (a fp16 or
                # quantized layer's ``_handle``, LongRoPE's per-slot ``rope_long`` marks).
                "always_keep_tensor_constants": True,
            }
            aoti_compile_and_package(exported, package_path=str(tmp), inductor_configs=configs)
        tmp.replace(self.folder / f"{name}.pt2")
        seconds = self.built[name] = time.perf_counter() - started
        log.info("packaged %s in %.1f s", name, seconds)
        return seconds

    def _export_args(self, name: str) -> tuple[torch.nn.Module, tuple, tuple]:
        from torch.export import Dim

        r = self.runner
        model, chunk, auto = r.model, r.chunk, Dim.AUTO
        kv = {0: auto(min=r.kv_sizes[0], max=r.kv_sizes[-1])}
        small_kv = self.marker[: r.kv_sizes[0]]
        io, pio = r._io, r._pio
        b = r.batch_sizes[1] if len(r.batch_sizes) > 1 else 2
        if name == "decode1":
            return (
                _Decode(model),
                (io[0, :1], io[1, :1], r._rows[:1], small_kv),
                (
                    None,
                    None,
                    None,
                    kv,
                ),
            )
        if name == "decode":
            rows = {0: auto(min=2, max=max(2, r.max_batch))}
            return (
                _Decode(model),
                (io[0, :b], io[1, :b], r._rows[:b], small_kv),
                (
                    rows,
                    rows,
                    rows,
                    kv,
                ),
            )
        if name in ("prefill_causal", "prefill_masked"):
            t = r.chunk_sizes[0]
            length = {1: auto(min=r.chunk_sizes[0], max=chunk)}
            args = (
                pio[:t].view(1, t),
                pio[chunk : chunk + t].view(1, t),
                pio[2 * chunk : 2 * chunk + 1],
                pio[2 * chunk + 1 : 2 * chunk + 2],
                small_kv,
            )
            module = _Prefill(model, name == "prefill_causal")
            return module, args, (length, length, None, None, kv)
        variant = next(v for v, n in SAMPLERS.items() if n == name)
        vocab = model.cfg.vocab_size
        fields = tuple(getattr(r.sampling, field) for field in SAMPLING_FIELDS)
        b = min(b, r.max_batch)
        width = {0: auto(min=1, max=r.max_batch)}
        args = (torch.zeros(b, vocab, device=r.device), r._rows[:b], fields)
        return _Sampler(vocab, variant), args, (width, width, (None,) * len(fields))

    # -- loading ----------------------------------------------------------------------

    def get(self, name: str) -> Callable:
        """The loaded package ``name``, built first if the folder lacks it; a step's
        package gets the model's weights and cache as its constants."""
        package = self._loaded.get(name)
        if package is not None:
            return package
        from torch._inductor import aoti_load_package

        self._usable_folder()
        path = self.folder / f"{name}.pt2"
        if not path.is_file():
            with _no_duck_shapes():
                self.build(name)
        try:
            package = aoti_load_package(str(path))
        except Exception as exc:  # a truncated or foreign file: built again, once
            log.warning("rebuilding %s, which did not load: %s: %s", path, type(exc).__name__, exc)
            path.unlink(missing_ok=True)
            with _no_duck_shapes():
                self.build(name)
            package = aoti_load_package(str(path))
        if name in STEPS:
            if self._state is None:
                model = self.runner.model
                self._state = dict(model.state_dict(keep_vars=True)) | dict(model.named_buffers())
            constants = {}
            for fqn in package.get_constant_fqns():
                tensor = self._state.get(fqn.removeprefix("m."))
                if tensor is None:
                    raise RuntimeError(f"{path} needs {fqn}, which the model lacks")
                constants[fqn] = tensor.detach()
            package.load_constants(constants, check_full_update=True, user_managed=True)
        self._loaded[name] = package
        return package

    # -- running ----------------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        kv_len: int,
        rows_are_slots: bool = False,
        last_only: bool = True,
        last_index: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """``Decoder.forward`` for the runner's two step shapes (its decode and prefill
        bodies), through the packages."""
        kv = self.marker[:kv_len]
        if last_index is not None:
            name = "prefill_causal" if causal else "prefill_masked"
            return self.get(name)(tokens, positions, slots, last_index, kv)
        if not rows_are_slots or not last_only:
            raise ValueError("packaged steps serve the runner's decode and prefill steps only")
        name = "decode1" if tokens.shape[0] == 1 else "decode"
        return self.get(name)(tokens, positions, slots, kv)

    def sampler(self, variant: tuple) -> Callable | None:
        """The packaged sampler of ``variant``, or None (the runner's eager one then). On
        CPU none: Inductor's C++ code generation takes ~80 s for each sampler there (its
        vocabulary-wide noise hash; perf/LOG.md run 84), and the eager sampler draws the
        same tokens (integer noise, elementwise arithmetic, exact argmax)."""
        name = SAMPLERS.get(variant)
        if name is None or self.runner.device.type != "cuda":
            return None

        def run(logits: torch.Tensor, batch: SamplingBatch, rows: torch.Tensor) -> SampleOutput:
            fields = tuple(getattr(batch, field) for field in SAMPLING_FIELDS)
            (tokens,) = self.get(name)(logits, rows, fields)
            return SampleOutput(tokens, None, None, None)

        return run


def _no_duck_shapes():
    """One symbol per dynamic size (as the runner's compiles: see torch_cuda)."""
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(use_duck_shape=False)
