"""Run an ONNX artefact with onnxruntime (CPU, or CUDA where onnxruntime has it).

The graph (``export/onnx.py``) takes each layer's cache as ``past_key_values.N.key/value``
and returns ``present.N.key/value``; its attention (onnxruntime's GroupQueryAttention)
writes the step's entries into the present cache. This runner keeps one buffer per layer
and kind, [max_batch, kv_heads, max_seq_len, head_dim] (torch tensors on the runner's
device), and binds it as both past and present (IO binding): the node then writes the new
entries in place and attends over each row's live length, so a step costs what its new
tokens and their attention cost, not a copy of the cache (onnxruntime-genai's
``past_present_share_buffer``).

A step runs rows that are consecutive slots, whose buffers rows are one contiguous block;
a decode over scattered slots runs once per run of consecutive slots. The runner moves
slots (``moves_slots``), so the engine keeps running sequences in the lowest slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fermi import memory
from fermi.errors import ModelLoadError
from fermi.runners.artefact import Manifest
from fermi.runners.base import Capabilities, Runner

_DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16)}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def session_options(threads: int | None = None, spinning: bool = False, prepack: bool = True):
    """onnxruntime session options for a process that runs torch too: ``threads`` intra-op
    threads (None: onnxruntime's default, one per physical core), and no spin-waiting
    between ops unless ``spinning`` (spinning threads keep the cores busy while torch
    samples; perf/bench_onnx_decode.py measures both). ``prepack=False`` keeps onnxruntime
    from repacking the weights of its products into buffers of its own: weights in an
    external data file are then read where the file is mapped, not held twice (SmolLM2-135M's
    weights in an external file: a started session adds 532 MB with repacking, 127 MB
    without), at 1-7% of a decode step's time (perf/LOG.md run 65)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def providers_for(device: torch.device, folder: Path) -> list[str]:
    """onnxruntime's execution providers for ``device``; a device onnxruntime cannot use
    here is an error, never a silent fall back to the CPU."""
    import onnxruntime as ort

    if device.type not in PROVIDERS:
        raise ModelLoadError(
            f"{folder} is an ONNX artefact: device {str(device)!r} is not one onnxruntime "
            f"runs it on here (choose {' or '.join(PROVIDERS)})"
        )
    wanted = PROVIDERS[device.type]
    if wanted not in ort.get_available_providers():
        raise ModelLoadError(
            f"{folder} is an ONNX artefact and device {device.type!r} was asked for, but this "
            f"onnxruntime has no {wanted} (it has {', '.join(ort.get_available_providers())}); "
            "install onnxruntime-gpu for CUDA, or run on the CPU"
        )
    return [wanted] if device.type == "cpu" else [wanted, PROVIDERS["cpu"]]


class OnnxRunner(Runner):
    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        max_batch: int,
        max_seq_len: int,
        prefill_chunk: int,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        spinning: bool = False,
        prepack: bool = True,
    ) -> None:
        """``prepack``: see :func:`session_options` (off for an export's check, where memory
        matters more than a few prompts' speed)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelLoadError(
                f"{folder} is an ONNX artefact; running it needs onnxruntime "
                "(pip install onnxruntime)"
            ) from None
        device = torch.device(device)
        providers = providers_for(device, folder)
        if device.type == "cuda" and manifest.cache.dtype != "float16":
            raise ModelLoadError(
                f"{folder} was exported in {manifest.dtype}; onnxruntime's CUDA attention "
                "(GroupQueryAttention) takes fp16: export with --dtype fp16 to run on CUDA"
            )
        if device.type == "cuda":
            index = device.index or 0
            providers = [(providers[0], {"device_id": index}), providers[1]]
        # The cache is refused before the session loads and before it is allocated
        # (zero-filled, so resident at once): one the machine cannot hold would otherwise end
        # in an allocation error, or in the OOM killer.
        cache = manifest.cache
        memory.require_cache_fits(
            cache.layers,
            cache.kv_heads,
            cache.head_dim,
            _DTYPES[cache.dtype][0].itemsize,
            max_batch,
            max_seq_len,
            device,
            f"max_seq_len {max_seq_len}",
        )
        path = folder / manifest.model_file
        try:
            self.session = ort.InferenceSession(
                str(path), session_options(threads, spinning, prepack), providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from None
        used = self.session.get_providers()[0]
        if used != PROVIDERS[device.type]:  # onnxruntime falls back silently; we do not
            raise ModelLoadError(
                f"onnxruntime could not start {PROVIDERS[device.type]} for {path} (it chose "
                f"{used}); check the CUDA and cuDNN libraries onnxruntime-gpu needs"
            )
        _check_graph(self.session, manifest, folder)
        torch_dtype, self._np_dtype = _DTYPES[cache.dtype]
        shape = (max_batch, cache.kv_heads, max_seq_len, cache.head_dim)
        self._kinds = [
            (f"past_key_values.{i}.{kind}", f"present.{i}.{kind}")
            for i in range(cache.layers)
            for kind in ("key", "value")
        ]
        self.buffers = [torch.zeros(shape, dtype=torch_dtype, device=device) for _ in self._kinds]
        self._device = device
        self._where = ("cuda", device.index or 0) if device.type == "cuda" else ("cpu", 0)
        self._bindings: dict[tuple[int, int], object] = {}
        self.capabilities = Capabilities(
            name="onnx",
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            vocab_size=manifest.vocab_size,
            device=device,
            prefill_chunk=prefill_chunk,
            moves_slots=True,
        )
        super().__init__()

    def _binding(self, first: int, rows: int):
        """An IO binding with past and present of every layer bound to buffer rows
        ``first .. first + rows - 1`` (made once per block of rows)."""
        binding = self._bindings.get((first, rows))
        if binding is None:
            binding = self.session.io_binding()
            kind, index = self._where
            for (past, present), buffer in zip(self._kinds, self.buffers, strict=True):
                block = buffer[first : first + rows]
                shape = list(block.shape)
                binding.bind_input(past, kind, index, self._np_dtype, shape, block.data_ptr())
                binding.bind_output(present, kind, index, self._np_dtype, shape, block.data_ptr())
            self._bindings[(first, rows)] = binding
        return binding

    def _run(self, first: int, tokens: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        """Run rows ``first ..`` (one per row of ``tokens`` [rows, T], at ``positions``
        [rows, T]); return the logits of each row's last token [rows, vocab]."""
        rows = tokens.shape[0]
        binding = self._binding(first, rows)
        lengths = positions[:, -1] + 1
        mask = (np.arange(int(lengths.max()))[None] < lengths[:, None]).astype(np.int64)
        binding.bind_cpu_input("input_ids", tokens)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("position_ids", positions)
        logits = torch.empty(rows, 1, self.capabilities.vocab_size, device=self._device)
        kind, index = self._where
        shape = list(logits.shape)
        binding.bind_output("logits", kind, index, np.float32, shape, logits.data_ptr())
        self.session.run_with_iobinding(binding)
        return logits[:, 0]

    def prefill(self, slot: int, token_ids: Sequence[int], start_pos: int) -> torch.Tensor:
        tokens = np.asarray([token_ids], dtype=np.int64)
        positions = np.arange(start_pos, start_pos + len(token_ids), dtype=np.int64)[None]
        return self._run(slot, tokens, positions)[0]

    def decode(
        self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]
    ) -> torch.Tensor:
        if list(slots) == list(range(slots[0], slots[0] + len(slots))):  # the usual step
            tokens = np.asarray(token_ids, dtype=np.int64)[:, None]
            pos = np.asarray(positions, dtype=np.int64)[:, None]
            return self._run(slots[0], tokens, pos)
        order = sorted(range(len(slots)), key=lambda row: slots[row])
        out = torch.empty(len(slots), self.capabilities.vocab_size, device=self._device)
        start = 0
        for end in range(1, len(order) + 1):  # one run per block of consecutive slots
            if end < len(order) and slots[order[end]] == slots[order[end - 1]] + 1:
                continue
            rows = order[start:end]
            tokens = np.asarray([[token_ids[r]] for r in rows], dtype=np.int64)
            pos = np.asarray([[positions[r]] for r in rows], dtype=np.int64)
            out[rows] = self._run(slots[rows[0]], tokens, pos)
            start = end
        return out

    def move_slot(self, src: int, dst: int, length: int) -> None:
        for buffer in self.buffers:
            buffer[dst, :, :length] = buffer[src, :, :length]


def _check_graph(session, manifest: Manifest, folder: Path) -> None:
    """The graph's inputs and outputs against what manifest.json says of them: a manifest
    edited by hand (or paired with another export's graph) failed at the first step, in
    onnxruntime's words, instead of at load."""
    where = f"{folder / 'manifest.json'}"
    cache = manifest.cache
    inputs = {i.name: i.shape for i in session.get_inputs()}
    layers = sum(1 for name in inputs if name.startswith("past_key_values.")) // 2
    if layers != cache.layers:
        raise ModelLoadError(
            f"{where}: cache.layers is {cache.layers}, but {manifest.model_file} takes the "
            f"caches of {layers} layers (re-export the model, or restore the manifest)"
        )
    for name, shape in inputs.items():
        if not name.startswith("past_key_values."):
            continue
        for field, axis in (("kv_heads", 1), ("head_dim", 3)):
            size = shape[axis] if len(shape) == 4 else None
            if isinstance(size, int) and size != getattr(cache, field):
                raise ModelLoadError(
                    f"{where}: cache.{field} is {getattr(cache, field)}, but "
                    f"{manifest.model_file}'s {name} has {size}"
                )
    for output in session.get_outputs():
        vocab = output.shape[-1] if output.name == "logits" and output.shape else None
        if isinstance(vocab, int) and vocab != manifest.vocab_size:
            raise ModelLoadError(
                f"{where}: vocab_size is {manifest.vocab_size}, but {manifest.model_file} "
                f"writes logits over {vocab} tokens"
            )
