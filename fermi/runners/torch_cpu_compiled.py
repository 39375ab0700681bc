"""The decoder on CPU, compiled by Inductor's C++ backend (runner ``torch-compile``).

The graph runner (``fermi.runners.torch_cuda.CudaGraphRunner``) without CUDA graphs: each
decoder layer compiled once with dynamic shapes, serving every batch bucket (1, 2, 4, ...,
``max_batch``), attended-length bucket and prefill chunk bucket; Inductor fuses the glue
between the weight products (norms, rope, residual adds, silu * up) into C++ loops, and the
products stay FBGEMM's fp16 kernel (``fermi.models.half_weights``) or torch's float32 one.
Warm-up runs every bucket once and writes Inductor's artefacts to the compile cache
(``fermi.runners.compile_cache``), so a second start skips the C++ compiles.

Opt-in: on the 2-core machine of perf/LOG.md it is not faster than the eager runner at
batch 1 and 4, and a first start compiles for minutes.
"""

from __future__ import annotations

import dataclasses

from fermi.models.decoder import Decoder
from fermi.runners.base import warmup_scope
from fermi.runners.torch_cuda import CudaGraphRunner

NAME = "torch-compile"


class CompiledCpuRunner(CudaGraphRunner):
    def __init__(
        self,
        model: Decoder,
        max_batch: int,
        max_seq_len: int,
        prefill_chunk: int | None = None,
        *,
        warmup: bool | str = True,
        compile_cache: bool = True,
    ) -> None:
        device = model.device
        if device.type != "cpu":
            raise ValueError(
                f"runner {NAME!r} compiles for the CPU; the model is on {device} "
                "(on CUDA the default runner, torch-cuda, is compiled)"
            )
        # Its graphs run torch's attention, which would widen a whole fp16 cache
        # (use_half_cache) into float32 every step: the cache stays in the model's dtype
        # here (planned_cache_dtype, which check_cache_fits counted).
        if model.planned_cache_dtype(compiled=True) == model.dtype:
            model.cache_dtype = None
        super().__init__(
            model,
            max_batch,
            max_seq_len,
            prefill_chunk or 512,
            backend="inductor",
            use_graphs=False,
            warmup=False,
        )
        self.capabilities = dataclasses.replace(self.capabilities, name=NAME)
        scope = warmup_scope(warmup)
        if scope is not None:
            self.warmup(compile_cache=compile_cache, scope=scope)
