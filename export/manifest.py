"""Write ``manifest.json`` for an artefact folder (the format lives in fermi.runners.artefact)."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
from pathlib import Path

import msgspec

from fermi.runners.artefact import FORMAT_VERSION, MANIFEST_NAME, Manifest, sha256_file

TOOLS = ("fermi-infer", "torch", "onnx", "onnxscript", "onnxruntime", "coremltools")


def tool_versions() -> dict[str, str]:
    """Versions of the packages that built the artefact (those installed)."""
    found = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (a .mlpackage's inner files included)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}


def finalize(draft: Manifest, folder: Path) -> Manifest:
    """Fill in checksums, tool versions and the time, and write the manifest."""
    manifest = msgspec.structs.replace(
        draft,
        format_version=FORMAT_VERSION,
        files=checksums(folder),
        tools=tool_versions(),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    text = msgspec.json.format(msgspec.json.encode(manifest), indent=2)
    (folder / MANIFEST_NAME).write_bytes(text + b"\n")
    return manifest
