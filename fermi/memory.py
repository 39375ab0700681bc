"""How much memory a device has free, checked before large allocations (a model's weights,
its KV cache), so that a setting too large for the machine is a clear error instead of
an out-of-memory kill."""

from __future__ import annotations

import ctypes
import math
import mmap

import torch

from fermi.errors import ModelLoadError

GIB = 1 << 30


def size(n: int) -> str:
    """``n`` bytes for a person: 512 B, 3.0 KiB, 1.5 GiB."""
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def free_memory(device) -> int | None:
    """Bytes free for new tensors on ``device``: the GPU's free memory (on Apple's GPU what
    Metal recommends, less what is allocated), or on a CPU the kernel's MemAvailable bounded
    by the cgroup's limit (containers); None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    if device.type == "mps":
        # Apple's unified memory: what Metal recommends one process keeps, less what its
        # driver holds already (past that, macOS swaps instead of failing).
        return max(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory(), 0)
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


def require_free(need: int, device, what: str, advice: str) -> None:
    """Raise ModelLoadError when ``need`` bytes (``what``) exceed ``device``'s free memory."""
    free = free_memory(device)
    if free is None or need <= free:
        return
    raise ModelLoadError(f"{what} needs {size(need)} and {device} has {size(free)} free: {advice}")


def require_cache_fits(
    layers: int,
    kv_heads: int,
    head_dim: int,
    itemsize: int,
    max_batch: int,
    positions: int,
    device,
    length: str,
) -> None:
    """Refuse, before it is allocated, a KV cache (keys and values of ``layers`` layers,
    ``kv_heads`` x ``head_dim`` each, ``itemsize`` bytes a value) of ``max_batch`` x
    ``positions`` that ``device`` has not the free memory for; ``length`` says how the
    positions were asked for (``"max_seq_len 4096"``)."""
    per_token = 2 * layers * kv_heads * head_dim * itemsize
    what = f"the KV cache (max_batch {max_batch} x {length} x {size(per_token)} per token)"
    require_free(per_token * max_batch * positions, device, what, "lower max_seq_len or max_batch")


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero CPU tensor whose pages cost memory only once written: an anonymous mapping,
    which the kernel backs with zero pages on first touch (``torch.zeros`` writes, so makes
    resident, every page at once). For a KV cache sized for ``max_batch`` x ``max_seq_len``
    of which a chat uses a corner."""
    numel = math.prod(shape)
    if not hasattr(mmap, "MAP_PRIVATE") or numel == 0:  # Windows: no anonymous private mappings
        return torch.zeros(shape, dtype=dtype)
    # Private, not Python's default shared mapping: a forked child gets its own copy on
    # write instead of writing into the parent's cache.
    buffer = mmap.mmap(-1, numel * dtype.itemsize, flags=mmap.MAP_PRIVATE)
    # frombuffer keeps the mapping alive for as long as the tensor (or a view of it) lives.
    return torch.frombuffer(buffer, dtype=dtype, count=numel).view(shape)


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``): loading
    frees hundreds of MB of float copies of the weights, which glibc otherwise keeps
    resident for later allocations. Nothing where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
