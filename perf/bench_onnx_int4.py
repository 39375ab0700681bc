"""Decode step time of ONNX artefacts against the torch-cpu runner (SmolLM2-135M, CPU).

Each ``--artefact LABEL=FOLDER`` (``fermi export`` output) and the torch-cpu runner as
``fermi.load`` builds the alias, with and without ``quantize="int4"``, decode one token
at a time at context 64 (batch 1, greedy), round after round, interleaved, so that load
from other jobs falls on all alike. The figure is the median over rounds of the mean step
time of 8 steps.

Written for perf/LOG.md run 34: a GGUF's Q4_1 blocks kept with float zero points (the
export before that run) against the fast form, and onnxruntime's own int4 quantization::

    fermi export --model smollm2-135m --target onnx --out /tmp/smol/onnx-int4 --quantize int4
    .venv/bin/python perf/bench_onnx_int4.py --artefact kept=/tmp/smol/onnx-int4 \\
        --out perf/results/cpu_onnx_int4.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_onnx_decode import STEPS, prefill, step_times

CONTEXT = 64


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--artefact", action="append", default=[], help="LABEL=FOLDER")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch

    import fermi

    engines = {}
    for spec in args.artefact:
        label, _, folder = spec.partition("=")
        engines[f"onnx {label}"] = fermi.load(folder, max_batch=1)
    engines["torch-cpu (fp16 weights)"] = fermi.load(args.model, runner="torch-cpu", max_batch=1)
    engines["torch-cpu int4"] = fermi.load(
        args.model, runner="torch-cpu", quantize="int4", max_batch=1
    )
    load_before = os.getloadavg()
    rounds: dict[str, list[float]] = {}
    with torch.inference_mode():
        for engine in engines.values():
            prefill(engine.runner, CONTEXT)
        for _ in range(args.rounds):
            for name, engine in engines.items():
                step_times(engine.runner, CONTEXT, rounds, name)
    result = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "context": CONTEXT,
        "steps_per_round": STEPS,
        "rounds": args.rounds,
        "decode_ms_per_step": {
            name: {
                "median": round(1e3 * statistics.median(v), 2),
                "min": round(1e3 * min(v), 2),
                "max": round(1e3 * max(v), 2),
            }
            for name, v in rounds.items()
        },
    }
    for engine in engines.values():
        engine.close()
    print(json.dumps(result["decode_ms_per_step"], indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
