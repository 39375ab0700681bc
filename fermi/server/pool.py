"""Engine replicas behind one server, and least-loaded routing between them.

Each replica is a whole engine (weights, KV cache, scheduler thread) on its own device,
or several share one device (CPU, or one GPU in tests). A request goes to the replica
with the fewest unfinished requests; ties rotate so an idle pool still spreads work.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fermi.engine.api import Engine


class PoolConfigError(ValueError):
    """The requested replicas cannot be placed on this host."""


@dataclass
class Replica:
    index: int
    engine: Engine
    device: str
    requests_total: int = field(default=0)

    @property
    def load(self) -> int:
        return self.engine.load

    @property
    def warming(self) -> bool:
        """Whether the runner still compiles or captures shapes in idle time (a CUDA
        runner warmed with ``warmup="first"``): until then a request that arrives during
        one of those units waits for it, and a step that meets a shape not yet done
        compiles it first."""
        startup = getattr(self.engine.runner, "startup", None)
        return startup is not None and startup.complete_s is None


class EnginePool:
    def __init__(self, engines: Sequence[Engine], devices: Sequence[str]) -> None:
        if not engines:
            raise PoolConfigError("an engine pool needs at least one replica")
        self.replicas = [
            Replica(i, e, d) for i, (e, d) in enumerate(zip(engines, devices, strict=True))
        ]
        self._turn = itertools.count()
        self._lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        """Replica 0's engine: all replicas share model, tokenizer and limits."""
        return self.replicas[0].engine

    def pick(self) -> Replica:
        """The least-loaded replica; among equals, the next one in turn."""
        with self._lock:
            start = next(self._turn) % len(self.replicas)
            order = self.replicas[start:] + self.replicas[:start]
            replica = min(order, key=lambda r: r.load)
            replica.requests_total += 1
            return replica

    def close(self) -> None:
        for replica in self.replicas:
            replica.engine.close()


def parse_devices(text: str | None) -> list[str]:
    """``"0,1"`` or ``"cuda:0,cuda:1"`` -> ``["cuda:0", "cuda:1"]``; ``cpu`` stays ``cpu``."""
    if not text:
        return []
    out = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise PoolConfigError(f"--devices {text!r} has an empty entry")
        out.append(f"cuda:{item}" if item.isdigit() else item)
    return out


def plan_devices(
    pool: int | None, devices: Sequence[str], device: str | None, gpu_count: int
) -> list[str | None]:
    """The device of each replica (None: the loader's default device).

    ``--devices`` names one device per replica. Otherwise a pool on CUDA takes one GPU per
    replica and more replicas than GPUs is an error; on CPU the replicas share the device.
    """
    if devices:
        if pool is not None and pool != len(devices):
            raise PoolConfigError(
                f"--pool {pool} does not match --devices, which names {len(devices)} devices"
            )
        for name in devices:
            _check_device(name, gpu_count)
        return list(devices)
    n = 1 if pool is None else pool
    if n < 1:
        raise PoolConfigError(f"--pool must be at least 1, got {n}")
    on_cuda = device.startswith("cuda") if device else gpu_count > 0
    if not on_cuda or n == 1:
        return [device] * n
    if device not in (None, "cuda"):
        raise PoolConfigError(
            f"--pool {n} with --device {device}: name one device per replica with --devices"
        )
    if n > gpu_count:
        raise PoolConfigError(
            f"--pool {n} needs {n} GPUs (one replica per GPU) but this host has {gpu_count}; "
            "lower --pool, or share devices explicitly with --devices cuda:0,cuda:0"
        )
    return [f"cuda:{i}" for i in range(n)]


def _check_device(name: str, gpu_count: int) -> None:
    if name in ("cpu", "mps"):
        return
    if not name.startswith("cuda"):
        raise PoolConfigError(f"device {name!r} is not cpu, mps or cuda:N")
    index = name.partition(":")[2] or "0"
    if not index.isdigit():
        raise PoolConfigError(f"device {name!r} is not cpu, mps or cuda:N")
    if int(index) >= gpu_count:
        raise PoolConfigError(
            f"device {name} does not exist: this host has {gpu_count} CUDA device(s)"
        )


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def load_pool(
    model: str,
    devices: Sequence[str | None],
    *,
    dtype: str | None = None,
    max_seq_len: int | None = None,
    max_batch: int | None = None,
    runner: str | None = None,
    quantize: str | None = None,
    max_waiting: int | None = None,
    prefix_reuse: bool = True,
) -> EnginePool:
    """Load one engine per entry of ``devices`` (see :func:`plan_devices`)."""
    import fermi
    from fermi.cli import command_line_warmup

    warmup = command_line_warmup(len(devices))
    engines = []
    try:
        for device in devices:
            engines.append(
                fermi.load(
                    model,
                    device=device,
                    dtype=dtype,
                    max_seq_len=max_seq_len,
                    max_batch=max_batch,
                    runner=runner,
                    quantize=quantize,
                    prefix_reuse=prefix_reuse,
                    warmup=warmup,
                    **({} if max_waiting is None else {"max_waiting": max_waiting}),
                )
            )
    except BaseException:
        for engine in engines:
            engine.close()
        raise
    names = [str(e.runner.capabilities.device) for e in engines]
    return EnginePool(engines, names)
