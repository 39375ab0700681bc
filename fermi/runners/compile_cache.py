"""Compile artefacts on disk, so a second start on the same machine skips Inductor.

``torch.compiler.save_cache_artifacts`` bundles everything compiled in this process (FX graphs,
AOTAutograd entries, Triton kernels, autotuning results); ``load_cache_artifacts`` puts them back
into the local caches before the first compile. One bundle per key: the model's shape, dtype,
cache and batch sizes, torch version and GPU, so a bundle is never offered to another setup.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch

from fermi.cache_dirs import user_cache

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``FERMI_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/fermi/compile`` (``~/.cache/...``)."""
    return user_cache("FERMI_COMPILE_CACHE", "compile")


def device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} sm{props.major}{props.minor} {props.multi_processor_count}sm"


def cache_key(model_config: object, dtype: torch.dtype, device: torch.device, **shapes) -> str:
    """A short hash of everything that changes the compiled code."""
    config = dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else {}
    blob = json.dumps(
        {
            "config": config,
            "dtype": str(dtype),
            "shapes": shapes,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "device": device_tag(device),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class CompileCache:
    """The artefact bundle for one key: ``load()`` before compiling, ``save()`` after.

    A warm-up that leaves shapes to idle time (``warmup="first"``) saves a partial bundle
    once the first request can run (``save(complete=False)``) and the whole one when the
    idle warm-up is done; a later start loads the whole one when there is one. A loaded
    bundle is not rewritten, except a partial one by a whole one."""

    def __init__(self, key: str, root: Path | None = None) -> None:
        self.path = (root or cache_root()) / f"{key}.bin"
        self.partial = self.path.with_suffix(".part.bin")
        self.loaded: Path | None = None

    def load(self) -> bool:
        for path in (self.path, self.partial):
            if not path.exists():
                continue
            try:
                torch.compiler.load_cache_artifacts(path.read_bytes())
            except Exception as exc:  # a stale or truncated bundle only costs a cold compile
                log.warning("ignoring compile cache %s: %s", path, exc)
                continue
            self.loaded = path
            return True
        return False

    def save(self, complete: bool = True) -> None:
        if self.loaded == self.path or (self.loaded is not None and not complete):
            return
        target = self.path if complete else self.partial
        try:
            saved = torch.compiler.save_cache_artifacts()
            if saved is None:
                return
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(saved[0])
            tmp.replace(target)  # atomic: a concurrent start never reads half a file
            if complete:
                self.partial.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not write compile cache %s: %s", target, exc)
