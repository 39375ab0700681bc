"""onnxruntime with and without repacking the weights of its products (issue 21's export
memory; ``OnnxRunner(..., prepack=False)`` is what an export's check runs).

Two measurements:

- ``--models`` (ONNX files): resident memory of a fresh process once an
  ``InferenceSession`` has started (no inference run), and its peak, for each option set:
  Fermi's session options as they are, without prepacking, and without prepacking or graph
  optimisation. A file whose weights sit in an external data file is mapped by
  onnxruntime; repacking copies them.
- ``--artefact`` (an exported folder): the ONNX runner's decode step with and without
  prepacking, one thread, at contexts 64 and 1,024, interleaved rounds.

    fermi export --model smollm2-135m --target onnx --out /tmp/smol/onnx
    python -c "import onnx; m = onnx.load('/tmp/smol/onnx/model.onnx'); \\
        onnx.save_model(m, '/tmp/smol/ext/model.onnx', save_as_external_data=True, \\
        location='model.onnx.data', size_threshold=1024)"   # mkdir /tmp/smol/ext first
    PYTHONPATH=$PWD .venv/bin/python perf/onnx_prepack.py \\
        --models /tmp/smol/onnx/model.onnx /tmp/smol/ext/model.onnx \\
        --artefact /tmp/smol/onnx --out perf/results/cpu_onnx_prepack.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

OPTIONS = {
    "as Fermi's runtime runs it": {},
    "no prepacking (the export's check)": {"prepack": False},
    "no prepacking, no graph optimisation": {"prepack": False, "optimise": False},
}

SESSION = """
import json, resource, sys
import onnxruntime as ort
sys.path.insert(0, {root!r})
from fermi.runners.onnx import session_options

def rss():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) // 1024 for x in f if x.startswith("VmRSS"))

before = rss()
options = session_options(prepack={prepack})
if not {optimise}:
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
session = ort.InferenceSession({path!r}, options, providers=["CPUExecutionProvider"])
print(json.dumps({{"before_mb": before, "after_mb": rss(),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}}))
"""


def session_memory(path: Path) -> dict:
    out = {}
    for label, opts in OPTIONS.items():
        code = SESSION.format(
            root=str(ROOT),
            prepack=opts.get("prepack", True),
            optimise=opts.get("optimise", True),
            path=str(path),
        )
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        out[label] = json.loads(run.stdout.strip().splitlines()[-1])
        print(path, label, out[label], flush=True)
    return out


def decode_steps(folder: Path, rounds: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from bench_onnx_decode import prefill, step_times

    from fermi.runners.artefact import read_manifest
    from fermi.runners.onnx import OnnxRunner

    manifest = read_manifest(folder)
    seq = 1100
    runners = {
        "prepacked": OnnxRunner(folder, manifest, 1, seq, manifest.prefill_chunk, threads=1),
        "not prepacked": OnnxRunner(
            folder, manifest, 1, seq, manifest.prefill_chunk, threads=1, prepack=False
        ),
    }
    out = {}
    with torch.inference_mode():
        for context in (64, 1024):
            times: dict[str, list[float]] = {}
            for runner in runners.values():
                prefill(runner, context)
                step_times(runner, context, {}, "warm-up")
            for _ in range(rounds):
                for name, runner in runners.items():
                    step_times(runner, context, times, name)
            out[str(context)] = {
                name: {
                    "median_ms": round(1000 * statistics.median(t), 2),
                    "all_ms": [round(1000 * x, 2) for x in t],
                }
                for name, t in times.items()
            }
            print(context, {n: v["median_ms"] for n, v in out[str(context)].items()}, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", type=Path, nargs="*", default=[])
    p.add_argument("--artefact", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    result = {
        "command": " ".join(sys.argv),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "sessions": {str(m): session_memory(m) for m in args.models},
    }
    if args.artefact:
        result["decode"] = decode_steps(args.artefact, args.rounds)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
