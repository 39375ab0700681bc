"""Shared checks of the graph runner (``CudaGraphRunner``) against the eager runner on the
same checkpoint, for the architecture tests: on CPU uncompiled (its padding, bucketing and
one-row paths), on CUDA compiled and captured (tests/test_cuda_archs.py)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fermi.loading import load_folder
from fermi.runners.base import Runner
from fermi.runners.torch_eager import TorchRunner

MAX_BATCH, MAX_SEQ, CHUNK = 4, 300, 16


def eager_runner(folder: Path) -> TorchRunner:
    model = load_folder(folder, torch.device("cpu"), torch.float32).model
    return TorchRunner(model, MAX_BATCH, MAX_SEQ, prefill_chunk=CHUNK)


def _worse(worst: float, diff: float) -> float:
    """The larger difference; NaN counts as infinite (``max(0.0, nan)`` is 0.0, which
    would let a runner that returns NaN logits pass)."""
    return math.inf if math.isnan(diff) else max(worst, diff)


def max_runner_difference(runner: Runner, ref: Runner, steps: int = 10) -> float:
    """Largest |logit difference| over chunked prefills of three slots (one idle, so its
    row is padding in the batched steps) and ``steps`` batched greedy decode steps; each
    slot's prompt runs well past an 8-token window."""
    vocab = runner.capabilities.vocab_size
    g = torch.Generator().manual_seed(0)
    lengths = {0: 7, 1: 45, 3: 30}
    worst = 0.0
    last, pos = {}, {}
    for slot, n in lengths.items():
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        for start in range(0, n, CHUNK):
            a = runner.prefill(slot, ids[start : start + CHUNK], start).float().cpu()
            b = ref.prefill(slot, ids[start : start + CHUNK], start)
            worst = _worse(worst, (a - b).abs().max().item())
        last[slot], pos[slot] = int(b.argmax()), n
    slots = sorted(lengths)
    for _ in range(steps):
        toks, where = [last[s] for s in slots], [pos[s] for s in slots]
        a = runner.decode(slots, toks, where).float().cpu()
        b = ref.decode(slots, toks, where)
        worst = _worse(worst, (a - b).abs().max().item())
        # Batch 1 too: the one-row products (where the model takes them) run only there.
        one = runner.decode([1], [last[1]], [pos[1]]).float().cpu()
        worst = _worse(worst, (one - ref.decode([1], [last[1]], [pos[1]])).abs().max().item())
        pos[1] += 1
        for i, s in enumerate(slots):
            last[s], pos[s] = int(b[i].argmax()), pos[s] + 1
    return worst
