"""Pick a runner for a loaded checkpoint (or honour the caller's choice)."""

from __future__ import annotations

import functools
import os
import platform

import torch

from fermi import memory
from fermi.models.decoder import Decoder
from fermi.runners.base import Runner, warmup_scope
from fermi.runners.longrope import with_longrope

TORCH_RUNNERS = ("torch", "torch-cpu", "torch-cuda", "torch-eager", "torch-compile")


def default_device() -> torch.device:
    """The device a model loads on when none is asked for: an NVIDIA GPU (CUDA) when there
    is one, else the GPU of Apple silicon (torch's MPS backend), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if apple_silicon() and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device this machine has (None: :func:`default_device`); a
    ValueError naming it otherwise, rather than torch's error when the model is moved."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device {str(device)!r} is not a device torch knows (cpu, cuda, cuda:N, mps): {exc}"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device {str(device)!r}: this torch sees no CUDA GPU (a CPU-only build, or no "
                "driver); leave the device out, or pass cpu"
            )
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r}: there are {count} CUDA GPUs, 0..{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: torch's MPS backend is not available here")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(device)!r}: fermi runs models on cpu, cuda or mps")
    return dev


def check_runner_device(name: str | None, device: torch.device) -> None:
    """Refuse the CUDA runner asked for by name for a model that is not on a CUDA GPU, and
    an export's runner for a checkpoint (``fermi.load`` asks before the weights load;
    ``torch_runner`` for its direct callers)."""
    if name in ("onnx", "coreml"):
        raise ValueError(
            f"runner {name!r} runs a `fermi export` artefact folder, not a checkpoint: "
            f"export the model with `fermi export --target {name}` and load that folder "
            f"(a checkpoint runs on {', '.join(TORCH_RUNNERS)})"
        )
    if name == "torch-cuda" and device.type != "cuda":
        raise ValueError(
            f"runner 'torch-cuda' runs a model on a CUDA GPU, not on {device.type}: pass "
            "device='cuda' (or leave it out on a machine with one), or another runner"
        )


def apple_silicon() -> bool:
    """A Mac with an Apple M-series chip (MPS also runs on Intel Macs' GPUs, untested)."""
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def torch_runner(
    model: Decoder,
    name: str | None,
    max_batch: int,
    max_seq_len: int,
    prefill_chunk: int | None,
    warmup: str | bool = "full",
) -> Runner:
    """The eager runner anywhere; the compiled CUDA runner when on a CUDA device; the
    compiled CPU runner when asked for (``torch-compile``). ``warmup`` is the compiled
    runners' warm-up before the first request: "full" (every shape), "first" (what a
    first request needs; the rest while the engine idles) or False (none)."""
    warmup_scope(warmup)  # a bad value is refused before the cache is allocated
    device = model.device
    if name not in (None, *TORCH_RUNNERS):
        raise ValueError(f"runner {name!r} is not one of {', '.join(TORCH_RUNNERS)}")
    check_runner_device(name, device)
    compiled = name == "torch-compile"
    graphs = compiled or (device.type == "cuda" and name in (None, "torch", "torch-cuda"))
    check_cache_fits(model, max_batch, max_seq_len, device, compiled=compiled, graphs=graphs)
    if device.type == "cpu":  # the float copies the loader made of the weights are gone
        memory.release_free_heap()
        use_default_cpu_threads()
    if device.type == "cuda" and name in (None, "torch", "torch-cuda"):
        try:
            from fermi.runners.torch_cuda import CudaGraphRunner
        except ImportError:
            if name == "torch-cuda":  # asked for by name: not quietly the eager runner
                raise
            CudaGraphRunner = None
        if CudaGraphRunner is not None:
            runner = CudaGraphRunner(
                model, max_batch, max_seq_len, prefill_chunk=prefill_chunk, warmup=warmup
            )
            return with_longrope(runner, model)
    if name == "torch-compile":
        from fermi.runners.torch_cpu_compiled import CompiledCpuRunner

        compiled = CompiledCpuRunner(model, max_batch, max_seq_len, prefill_chunk, warmup=warmup)
        return with_longrope(compiled, model)
    from fermi.runners.torch_eager import DecodeThreads, TorchRunner

    runner = TorchRunner(model, max_batch, max_seq_len, prefill_chunk=prefill_chunk or 512)
    if device.type == "cpu":
        runner.threads = use_default_cpu_threads()
        if runner.threads is not None and model.native_rows and runner.threads[0] > 1:
            # A step in fermi's kernels wakes its threads once and spins between its
            # phases: all cores, or one fewer when a busy neighbour makes that slower,
            # chosen by timing (TorchRunner.decode_threads).
            cores = runner.threads[0]
            runner.decode_threads = DecodeThreads(cores, cores - 1)
    return with_longrope(runner, model)


@functools.cache  # decided once per process
def use_default_cpu_threads() -> tuple[int, int] | None:
    """The CPU's thread counts for prompt work and for decode steps, when fermi decides
    them (imported before torch, ``OMP_NUM_THREADS`` unset): torch's default (one a core)
    and one fewer (at least one). Sets torch's count to the decode one, once per process;
    the eager CPU runner switches to the prompt count around prefills (TorchRunner.threads).
    None when the caller decides.

    With ``OMP_WAIT_POLICY=PASSIVE`` (fermi's default) every parallel op wakes its threads,
    and a decode step is ~1,100 small ops: on the 2-core test machine (perf/LOG.md runs
    37-38) SmolLM2-135M's decode step took 20.6-32.3 ms on 2 threads and 16.5-21.9 on one,
    quiet or beside a busy process, while a 256-token prefill, a few large products, took
    241 ms on 2 threads against 343 on one (390 against 360 beside the busy process)."""
    import fermi

    if fermi.TORCH_FIRST or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = torch.get_num_threads()
    torch.set_num_threads(max(1, cores - 1))
    return cores, max(1, cores - 1)


def check_cache_fits(
    model: Decoder,
    max_batch: int,
    max_seq_len: int,
    device,
    compiled: bool = False,
    graphs: bool = False,
) -> None:
    """Refuse, before allocating it, a KV cache larger than the memory the device has
    free: on a CPU, a cache the kernel lets torch reserve but cannot back gets the process
    killed when it is first written, with no message. Counted in the dtype the runner will
    keep (``Decoder.planned_cache_dtype``; ``compiled``: the torch-compile runner) and over
    the positions it will allocate (``graphs``: a compiled runner's, which rounds up and
    keeps a spare position: ``torch_cuda.cache_positions``)."""
    cfg = model.cfg
    positions = max_seq_len
    if graphs:
        from fermi.runners.torch_cuda import cache_positions

        positions = cache_positions(max_seq_len)
    length = f"max_seq_len {max_seq_len}"
    if positions != max_seq_len:
        length = f"{positions} positions for {length}"
    memory.require_cache_fits(
        cfg.num_hidden_layers,
        cfg.num_key_value_heads,
        cfg.head_dim,
        model.planned_cache_dtype(compiled).itemsize,
        max_batch,
        positions,
        device,
        length,
    )
