"""Pick a runner for a loaded checkpoint (or honour the caller's choice)."""

from __future__ import annotations

import torch

from fermi.errors import ModelLoadError
from fermi.models.decoder import Decoder
from fermi.runners.base import Runner
from fermi.runners.longrope import with_longrope

TORCH_RUNNERS = ("torch", "torch-cpu", "torch-cuda", "torch-eager")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def torch_runner(
    model: Decoder,
    name: str | None,
    max_batch: int,
    max_seq_len: int,
    prefill_chunk: int | None,
) -> Runner:
    """The eager runner anywhere; the compiled CUDA runner when on a CUDA device."""
    device = model.model.embed_tokens.weight.device
    if name not in (None, *TORCH_RUNNERS):
        raise ValueError(f"runner {name!r} is not one of {', '.join(TORCH_RUNNERS)}")
    check_cache_fits(model, max_batch, max_seq_len, device)
    if device.type == "cuda" and name in (None, "torch", "torch-cuda"):
        try:
            from fermi.runners.torch_cuda import CudaGraphRunner
        except ImportError:
            CudaGraphRunner = None
        if CudaGraphRunner is not None:
            runner = CudaGraphRunner(model, max_batch, max_seq_len, prefill_chunk=prefill_chunk)
            return with_longrope(runner, model)
    from fermi.runners.torch_eager import TorchRunner

    runner = TorchRunner(model, max_batch, max_seq_len, prefill_chunk=prefill_chunk or 512)
    return with_longrope(runner, model)


GIB = 1 << 30


def check_cache_fits(model: Decoder, max_batch: int, max_seq_len: int, device) -> None:
    """Refuse, before allocating it, a KV cache larger than the memory the device has
    free: on a CPU, a cache the kernel lets torch reserve but cannot back gets the process
    killed when it is first written, with no message."""
    cfg = model.cfg
    itemsize = model.model.embed_tokens.weight.element_size()
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize
    need = per_token * max_batch * max_seq_len
    free = free_memory(device)
    if free is None or need <= free:
        return
    raise ModelLoadError(
        f"the KV cache needs {need / GIB:.1f} GiB (max_batch {max_batch} x max_seq_len "
        f"{max_seq_len} x {per_token // 1024} KiB per token) and {device} has "
        f"{free / GIB:.1f} GiB free: lower max_seq_len or max_batch"
    )


def free_memory(device) -> int | None:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or on a CPU the
    kernel's MemAvailable bounded by the cgroup's limit (containers); None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    if device.type != "cpu":
        return None
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                used = int(f.read().strip())
            with open("/sys/fs/cgroup/memory.stat") as f:
                stat = dict(line.split() for line in f if line.count(" ") == 1)
            # Page cache (the memory-mapped weights among it) is counted as used, but the
            # kernel gives it back under pressure.
            used -= int(stat.get("file", 0))
            room = max(int(limit) - used, 0)
            free = room if free is None else min(free, room)
    except (OSError, ValueError):
        pass
    return free
