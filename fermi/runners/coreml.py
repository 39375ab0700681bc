"""Run a stateful Core ML artefact (macOS 15+ / iOS 18+ only).

The package is a batch-1 model whose KV cache is Core ML state; this runner makes one
state per slot, so a batched decode step is one ``predict`` per running slot. A package
with range shapes takes a causal mask whose width is the attended length, so a step costs
what the live context costs; a Neural Engine package (``Manifest.query_sizes``) takes the
first position instead and only its enumerated query lengths, so a prompt chunk goes in
as a run of them (largest first).
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import numpy as np
import torch

from fermi.errors import ModelLoadError
from fermi.runners.artefact import Manifest
from fermi.runners.base import Capabilities, Runner


def coreml_unavailable_reason() -> str | None:
    """Why Core ML models cannot run here, or None when they can."""
    if sys.platform != "darwin":
        return f"Core ML runs only on macOS 15+ (this is {sys.platform})"
    release = platform.mac_ver()[0]
    major = int(release.split(".")[0]) if release else 0
    if major < 15:
        return f"stateful Core ML models need macOS 15+ (this is macOS {release or 'unknown'})"
    return None


def split_query(count: int, sizes: list[int]) -> list[int]:
    """``count`` tokens as a run of the enumerated ``sizes`` (largest first; sizes hold 1),
    e.g. 100 tokens of [1, 2, 4, ..., 64] -> [64, 32, 4]."""
    check_query_sizes(sizes)
    parts, left = [], count
    for size in sorted(sizes, reverse=True):
        while left >= size:
            parts.append(size)
            left -= size
    return parts


def check_query_sizes(sizes: list[int], chunk: int | None = None) -> None:
    """ValueError unless ``sizes`` are positive, hold 1 (so any count splits into them)
    and, with ``chunk``, none is above it."""
    if not sizes or 1 not in sizes or any(not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"query sizes {sizes} must be positive whole numbers and include 1")
    if chunk is not None and max(sizes) > chunk:
        raise ValueError(f"query sizes {sizes} go past the prefill chunk {chunk}")


def causal_mask(start: int, count: int) -> np.ndarray:
    """Additive fp16 mask [1, 1, count, start + count]: query i sees keys 0..start+i."""
    end = start + count
    query = np.arange(start, end)[:, None]
    key = np.arange(end)[None, :]
    mask = np.where(key <= query, 0.0, -np.inf).astype(np.float16)
    return mask[None, None]


class CoreMLRunner(Runner):
    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        max_batch: int,
        max_seq_len: int,
        prefill_chunk: int,
        compute_units: str | None = None,
    ) -> None:
        reason = coreml_unavailable_reason()
        if reason is not None:
            raise ModelLoadError(
                f"{folder} is a Core ML artefact: {reason}; "
                "export with --target onnx to run it here"
            )
        import coremltools as ct

        path = folder / manifest.model_file
        # The units it was converted for, unless asked otherwise.
        units = compute_units or manifest.compute_units or "ALL"
        try:
            self.model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, units))
        except Exception as exc:  # Core ML raises its own exception types
            raise ModelLoadError(f"Core ML cannot load {path}: {exc}") from None
        self.sizes = list(manifest.query_sizes)
        if self.sizes:
            try:
                check_query_sizes(self.sizes, manifest.prefill_chunk)
            except ValueError as exc:
                raise ModelLoadError(f"{folder}: manifest.json query_sizes: {exc}") from None
        self.states = [self.model.make_state() for _ in range(max_batch)]
        self.capabilities = Capabilities(
            name="coreml",
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            vocab_size=manifest.vocab_size,
            device=torch.device("cpu"),
            prefill_chunk=prefill_chunk,
            # Never run on a Mac by our tests yet: a reused slot's state is not relied on.
            keeps_cache=False,
        )
        super().__init__()

    def _step(self, slot: int, token_ids: list[int], start_pos: int) -> np.ndarray:
        if not self.sizes:
            inputs = {
                "input_ids": np.asarray([token_ids], dtype=np.int32),
                "causal_mask": causal_mask(start_pos, len(token_ids)),
            }
            out = self.model.predict(inputs, state=self.states[slot])
            return np.asarray(out["logits"], dtype=np.float32)[0]
        done = 0
        for size in split_query(len(token_ids), self.sizes):
            inputs = {
                "input_ids": np.asarray([token_ids[done : done + size]], dtype=np.int32),
                "position": np.asarray([start_pos + done], dtype=np.int32),
            }
            out = self.model.predict(inputs, state=self.states[slot])
            done += size
        return np.asarray(out["logits"], dtype=np.float32)[0]

    def prefill(self, slot: int, token_ids: list[int], start_pos: int) -> torch.Tensor:
        return torch.from_numpy(self._step(slot, token_ids, start_pos))

    def decode(self, slots: list[int], token_ids: list[int], positions: list[int]) -> torch.Tensor:
        rows = [self._step(s, [t], p) for s, t, p in zip(slots, token_ids, positions, strict=True)]
        return torch.from_numpy(np.stack(rows))
