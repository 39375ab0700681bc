"""Which decode-attention kernel compiles here: a tiny Qwen3 through each choice.

PYTHONPATH=$PWD python3 perf/probe_attention.py
"""

from __future__ import annotations

import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from fermi.loading import load_folder
from fermi.runners.torch_cuda import CudaGraphRunner
from tests.tiny import write_checkpoint

with TemporaryDirectory() as tmp:
    folder = write_checkpoint(Path(tmp) / "m", {}, seed=1)
    for kind in ("flex", "math"):
        torch._dynamo.reset()
        model = load_folder(folder, torch.device("cuda"), torch.bfloat16).model
        started = time.perf_counter()
        runner = CudaGraphRunner(model, 2, 512, decode_attention=kind, compile_cache=False)
        s = runner.startup
        print(f"{kind}: ran {s.decode_attention} in {time.perf_counter() - started:.1f}s")
        print(f"  notes: {s.notes}", flush=True)
