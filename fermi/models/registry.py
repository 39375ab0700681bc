"""Architecture adapters: Hugging Face ``config.json`` -> :class:`ModelConfig`.

Each adapter is a small function named after the architecture it reads. An adapter may
also provide ``sanitize(weights)`` to fix a checkpoint's naming quirks (fused tensors,
extra buffers) before the weights are matched against the module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fermi.models.decoder import ModelConfig


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture (or one of its settings) is not supported."""


Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Adapter:
    architecture: str
    to_config: Callable[[dict], ModelConfig]
    sanitize: Callable[[Weights, ModelConfig], Weights] | None = None
    # Tensors a checkpoint may carry that the model does not use.
    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)


_ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    _ADAPTERS[adapter.architecture] = adapter
    return adapter


def supported_architectures() -> list[str]:
    _import_adapters()
    return sorted(_ADAPTERS)


def adapter_for(hf_config: dict, source: str = "config.json") -> Adapter:
    _import_adapters()
    names = hf_config.get("architectures") or []
    for name in names:
        if name in _ADAPTERS:
            return _ADAPTERS[name]
    found = ", ".join(names) if names else "none"
    raise UnsupportedModelError(
        f"{source}: architectures [{found}] not supported; "
        f"supported: {', '.join(sorted(_ADAPTERS))}"
    )


def _import_adapters() -> None:
    # Adapters register themselves on import; importing here keeps the registry the one
    # place that knows which modules exist.
    from fermi.models import gemma2, llama, phi3, qwen2, qwen3  # noqa: F401


def require(cfg: dict, key: str, source: str = "config.json"):
    """A config value that must be present, with an error that names it."""
    if key not in cfg:
        raise UnsupportedModelError(f"{source} has no {key!r}")
    return cfg[key]
