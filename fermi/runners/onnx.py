"""Run an ONNX artefact with onnxruntime (CPU by default).

The graph takes each row's cache window (positions 0..P-1) as input and returns this
step's keys/values; this runner owns the cache (numpy, one row per slot) and stores the
new entries itself. A step therefore copies the live window in and only the new entries
out: its cost follows the live context, not ``max_seq_len``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fermi.errors import ModelLoadError
from fermi.runners.artefact import Manifest
from fermi.runners.base import Capabilities, Runner

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


class OnnxRunner(Runner):
    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        max_batch: int,
        max_seq_len: int,
        prefill_chunk: int,
        providers: list[str] | None = None,
        threads: int | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelLoadError(
                f"{folder} is an ONNX artefact; running it needs onnxruntime "
                "(pip install onnxruntime)"
            ) from None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:  # onnxruntime's default is one thread per physical core
            options.intra_op_num_threads = threads
        path = folder / manifest.model_file
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from None
        cache = manifest.cache
        dtype = _NUMPY_DTYPES[cache.dtype]
        shape = (cache.layers, max_batch, cache.kv_heads, max_seq_len, cache.head_dim)
        self.keys = np.zeros(shape, dtype=dtype)
        self.values = np.zeros(shape, dtype=dtype)
        self.capabilities = Capabilities(
            name="onnx",
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            vocab_size=manifest.vocab_size,
            device=torch.device("cpu"),
            prefill_chunk=prefill_chunk,
        )
        super().__init__()

    def _run(self, tokens: np.ndarray, positions: np.ndarray, slots: list[int], length: int):
        """Run rows ``slots`` over their first ``length`` cache positions."""
        if len(slots) == 1:  # a slice: one copy instead of a gather plus a copy
            s = slots[0]
            past_k = self.keys[:, s : s + 1, :, :length]
            past_v = self.values[:, s : s + 1, :, :length]
        else:
            past_k = self.keys[:, slots, :, :length]
            past_v = self.values[:, slots, :, :length]
        logits, new_k, new_v = self.session.run(
            None,
            {
                "input_ids": tokens,
                "position_ids": positions,
                "past_keys": np.ascontiguousarray(past_k),
                "past_values": np.ascontiguousarray(past_v),
            },
        )
        return logits, new_k, new_v

    def prefill(self, slot: int, token_ids: list[int], start_pos: int) -> torch.Tensor:
        n = len(token_ids)
        end = start_pos + n
        tokens = np.asarray([token_ids], dtype=np.int64)
        positions = np.arange(start_pos, end, dtype=np.int64)[None]
        logits, new_k, new_v = self._run(tokens, positions, [slot], end)
        self.keys[:, slot, :, start_pos:end] = new_k[:, 0]
        self.values[:, slot, :, start_pos:end] = new_v[:, 0]
        return torch.from_numpy(logits[0])

    def decode(self, slots: list[int], token_ids: list[int], positions: list[int]) -> torch.Tensor:
        slots, positions = list(slots), list(positions)
        tokens = np.asarray(token_ids, dtype=np.int64)[:, None]
        pos = np.asarray(positions, dtype=np.int64)[:, None]
        logits, new_k, new_v = self._run(tokens, pos, slots, max(positions) + 1)
        # Advanced indices on axes 1 and 3 put the batch axis first: [B, L, KV, D].
        self.keys[:, slots, :, positions] = new_k[:, :, :, 0].transpose(1, 0, 2, 3)
        self.values[:, slots, :, positions] = new_v[:, :, :, 0].transpose(1, 0, 2, 3)
        return torch.from_numpy(logits)
