"""CPU micro-benchmark: SmolLM2-135M's weight products, separate vs fused, and its lm_head.

Answers whether fusing q/k/v and gate/up (7 -> 4 products a layer) pays on this CPU for
one-row decode with fp16 weight storage (fp32 activations), and what the lm_head costs.
Random weights of the real shapes; 30 layers' worth per measurement.

Run from the repository root::

    .venv/bin/python perf/micro_cpu_products.py --out perf/results/cpu_products.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HIDDEN, INTER, Q, KV, VOCAB, LAYERS = 576, 1536, 576, 192, 49152, 30


def timed_ms(fn, repeats: int) -> float:
    for _ in range(repeats // 10):
        fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("perf/results/cpu_products.json"))
    parser.add_argument("--repeats", type=int, default=600)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1, 1, HIDDEN)
    w = {n: torch.randn(o, HIDDEN).half() for n, o in [("q", Q), ("k", KV), ("v", KV)]}
    w |= {n: torch.randn(INTER, HIDDEN).half() for n in ("gate", "up")}
    down, out = torch.randn(HIDDEN, INTER).half(), torch.randn(HIDDEN, Q).half()
    qkv, gate_up = torch.cat([w["q"], w["k"], w["v"]]), torch.cat([w["gate"], w["up"]])

    def lin(a, weight):
        return F.linear(a.half(), weight).float()

    def separate():
        q = lin(x, w["q"])
        lin(x, w["k"]), lin(x, w["v"]), lin(q, out)
        lin(F.silu(lin(x, w["gate"])) * lin(x, w["up"]), down)

    def fused():
        q, _, _ = lin(x, qkv).split([Q, KV, KV], -1)
        lin(q, out)
        g, u = lin(x, gate_up).split([INTER, INTER], -1)
        lin(F.silu(g) * u, down)

    rows = {}
    for name, fn in (("separate", separate), ("fused", fused)) * 2:  # interleaved twice
        rows.setdefault(name, []).append(round(timed_ms(fn, args.repeats) * LAYERS, 2))
    head = {}
    row = torch.randn(1, HIDDEN)
    for dtype in (torch.float16, torch.float32):
        weight = torch.randn(VOCAB, HIDDEN).to(dtype)
        head[str(dtype).removeprefix("torch.")] = round(
            timed_ms(lambda weight=weight: F.linear(row.to(weight.dtype), weight), 100), 2
        )
    result = {
        "command": f".venv/bin/python perf/micro_cpu_products.py --out {args.out}",
        "machine": {
            "cpu": platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        },
        "projections_ms_per_30_layers": rows,
        "lm_head_ms": head,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
