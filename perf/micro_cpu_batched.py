"""CPU micro-benchmark: one decode step's weight products at 1-64 rows, per weight format.

Answers which half-precision weight format keeps batched CPU decode batching: a step of B
streams multiplies B rows by every weight once, so the step should cost little more at 4
rows than at 1. SmolLM2-135M's fused shapes (30 layers of qkv 960x576, o 576x576, gate_up
3072x576, down 576x1536, then the 49152x576 head), random weights, every format timed on
the same rows, interleaved, several rounds (the machine is shared: the spread is reported).

Formats: ``fp32`` (F.linear, float32 weights: 2x the bytes); ``fp16`` (F.linear on fp16
weights and an fp16 input: what HalfWeightLinear runs for <= 2 rows); ``fp16-upcast``
(copy the fp16 weight into a float32 scratch buffer, then fp32: what it runs above 2
rows); ``fbgemm-fp16`` (FBGEMM's packed fp16 weight, fp32 activations and accumulation);
``bf16`` (F.linear on bf16 weights and input, oneDNN).

Run from the repository root::

    .venv/bin/python perf/micro_cpu_batched.py --out perf/results/cpu_batched_products.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

HIDDEN, INTER, QKV, VOCAB, LAYERS = 576, 1536, 960, 49152, 30
SHAPES = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)]


def step_weights() -> list[torch.Tensor]:
    torch.manual_seed(0)
    ws = [torch.randn(o, i) * 0.05 for _ in range(LAYERS) for o, i in SHAPES]
    return [*ws, torch.randn(VOCAB, HIDDEN) * 0.05]


def formats(ws: list[torch.Tensor]) -> dict:
    """Each format as (prepared weights, product(x, prepared) -> y)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FBGEMM's fp16 entry points warn they are deprecated
        packed = [torch.fbgemm_pack_gemm_matrix_fp16(w) for w in ws]
    zeros = {w.shape[0]: torch.zeros(w.shape[0]) for w in ws}
    half = [w.half() for w in ws]
    scratch = torch.empty(max(w.numel() for w in ws))

    def upcast(x, w):
        buf = scratch[: w.numel()].view(w.shape).copy_(w)
        return F.linear(x, buf)

    def fbgemm(x, p, n):
        return torch.fbgemm_linear_fp16_weight_fp32_activation(x, p, zeros[n])

    return {
        "fp32": (ws, lambda x, w: F.linear(x, w)),
        "fp16": (half, lambda x, w: F.linear(x.half(), w)),
        "fp16-upcast": (half, upcast),
        "fbgemm-fp16": (
            list(zip(packed, [w.shape[0] for w in ws], strict=True)),
            lambda x, p: fbgemm(x, *p),
        ),
        "bf16": ([w.bfloat16() for w in ws], lambda x, w: F.linear(x.bfloat16(), w)),
    }


def step_ms(weights, product, rows: int, repeats: int) -> float:
    xs = {w: torch.randn(rows, n) for w, n in ((HIDDEN, HIDDEN), (INTER, INTER))}
    ins = [xs[INTER] if i % 4 == 3 and i < 4 * LAYERS else xs[HIDDEN] for i in range(len(weights))]

    def step():
        for x, w in zip(ins, weights, strict=True):
            product(x, w)

    step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("perf/results/cpu_batched_products.json"))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ws = step_weights()
    fmts = formats(ws)
    del ws
    times: dict[str, dict[int, list[float]]] = {name: {r: [] for r in args.rows} for name in fmts}
    for _ in range(args.rounds):
        for rows in args.rows:
            for name, (weights, product) in fmts.items():
                reps = args.repeats if rows < 64 or name != "fp16" else 1
                times[name][rows].append(round(step_ms(weights, product, rows, reps), 2))
    table = {
        name: {r: {"median": statistics.median(v), "all": v} for r, v in per.items()}
        for name, per in times.items()
    }
    for name, per in table.items():
        print(f"{name:12s}", "  ".join(f"{r}:{v['median']:7.1f}" for r, v in per.items()))
    result = {
        "command": f".venv/bin/python perf/micro_cpu_batched.py --out {args.out}",
        "what": "ms for one decode step's weight products (SmolLM2-135M fused shapes), by rows",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        },
        "step_ms": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
