"""Resolve a model reference (local path or Hugging Face id) to files on disk."""

from __future__ import annotations

import os
from pathlib import Path

from fermi.errors import ModelLoadError

# Files a checkpoint folder may need; weights are fetched by pattern. A `fermi export`
# artefact (its manifest.json comes with "*.json") then gets exactly the files its manifest
# lists (model.onnx, model.onnx.data, model.mlpackage/..., README.md): patterns such as
# "*.onnx" would also pull the many ONNX variants some checkpoint repos carry.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
MANIFEST = "manifest.json"


# The values huggingface_hub reads as true in its own HF_HUB_OFFLINE (any case).
TRUE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})


def offline() -> bool:
    """``FERMI_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) forbids any network access; as
    huggingface_hub reads its variable, 1, on, yes and true mean on and anything else off
    (``FERMI_OFFLINE=false`` turned it on)."""
    return any(
        os.environ.get(v, "").strip().upper() in TRUE_VALUES
        for v in ("FERMI_OFFLINE", "HF_HUB_OFFLINE")
    )


def resolve(model: str | os.PathLike) -> Path:
    """A local folder or file as is; otherwise a Hugging Face repo id, downloaded once into
    the usual Hugging Face cache (or found there when offline)."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    name = str(model)
    from fermi.aliases import alias_path

    aliased = alias_path(name)
    if aliased is not None:
        return aliased
    if name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") != 1:
        raise ModelLoadError(f"model {name!r}: no such file or folder (and not a Hugging Face id)")
    return _snapshot(name)


def _snapshot(repo_id: str) -> Path:
    folder = _download(repo_id, HUB_PATTERNS)
    if (folder / MANIFEST).is_file():  # an exported artefact: the files its manifest lists
        folder = _download(repo_id, _listed_files(folder / MANIFEST))
    return folder


def _listed_files(manifest: Path) -> list[str]:
    import json

    try:
        files = json.loads(manifest.read_text(encoding="utf-8")).get("files")
    except (json.JSONDecodeError, AttributeError):
        files = None
    if not isinstance(files, dict):  # fermi.load reports the broken manifest itself
        return [MANIFEST]
    return [MANIFEST, *files]


def _download(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        if offline():
            folder = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
        else:
            folder = snapshot_download(repo_id, allow_patterns=patterns)
    except LocalEntryNotFoundError as exc:
        if offline():
            raise ModelLoadError(
                f"model {repo_id!r} is not in the Hugging Face cache and FERMI_OFFLINE/"
                "HF_HUB_OFFLINE forbids downloading it; download it once with network, or "
                "pass a local folder"
            ) from exc
        raise ModelLoadError(f"model {repo_id!r} could not be downloaded: {exc}") from exc
    except HFValidationError as exc:
        raise ModelLoadError(f"model {repo_id!r} is not a valid Hugging Face id: {exc}") from exc
    except Exception as exc:  # network errors, 401/404 from the hub
        raise ModelLoadError(f"model {repo_id!r} could not be downloaded: {exc}") from exc
    return Path(folder)
