"""ONNX vs torch decode on the CPU at contexts 64 / 1024 / 2000 (SmolLM2-135M).

One decode step of batch 1 at each context, through the Runner API, for: the ONNX
artefact (onnxruntime, cache bound in place), the torch-cpu runner as ``fermi.load``
builds it for the alias (fp16 weight storage, float32 arithmetic) and the torch-cpu runner
in float32 (the ONNX graph's precision). Runners are timed interleaved, round after round,
so that load from other jobs on the machine falls on all of them alike; the figure is the
median step time. Then onnxruntime with and without spin-waiting, as the engine runs it
(Engine.generate, sampling in torch between steps), interleaved too.

    fermi export --model smollm2-135m --target onnx --out /tmp/smol/onnx
    fermi export --model smollm2-135m --target onnx --out /tmp/smol/onnx-int4 --quantize int4
    PYTHONPATH=$PWD nice -n 10 .venv/bin/python perf/bench_onnx_decode.py \\
        --artefact /tmp/smol/onnx --also /tmp/smol/onnx-int4 \\
        --out perf/results/cpu_onnx_decode.json
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

CONTEXTS = (64, 1024, 2000)
ROUNDS, STEPS = 7, 8


def step_times(runner, context: int, rounds: dict[str, list[float]], name: str) -> None:
    """Time STEPS decode steps at positions context .. context + STEPS - 1 (the cache
    holds ``context`` positions before the first); append the mean step time."""
    token = 42
    start = time.perf_counter()
    for i in range(STEPS):
        logits = runner.decode([0], [token], [context + i])
        token = int(logits[0].argmax())
    rounds.setdefault(name, []).append((time.perf_counter() - start) / STEPS)


def prefill(runner, context: int) -> None:
    import torch

    ids = torch.randint(0, 40000, (context,), generator=torch.Generator().manual_seed(0))
    chunk = runner.capabilities.prefill_chunk
    for start in range(0, context, chunk):
        runner.prefill(0, ids[start : start + chunk].tolist(), start)


def engine_rate(engine, tokens: int) -> float:
    start = time.perf_counter()
    out = engine.generate(
        prompt="Tell me a story.", max_tokens=tokens, temperature=0, ignore_eos=True
    )
    return len(out.token_ids) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--artefact", type=Path, required=True, help="ONNX export of the model (its spin test)"
    )
    parser.add_argument(
        "--also", type=Path, nargs="*", default=[], help="more ONNX exports to time (int8, int4)"
    )
    parser.add_argument("--model", default="smollm2-135m", help="the artefact's source")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch and onnxruntime threads (default: theirs)"
    )
    args = parser.parse_args()

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    import fermi
    from fermi.engine.api import Engine
    from fermi.runners.artefact import load_artefact, read_manifest
    from fermi.runners.onnx import OnnxRunner

    seq = max(CONTEXTS) + STEPS + 1
    art = load_artefact(args.artefact, max_batch=1, max_seq_len=seq)
    manifest = art.manifest
    chunk = manifest.prefill_chunk
    onnx = OnnxRunner(args.artefact, manifest, 1, seq, chunk, threads=args.threads)
    torch_default = fermi.load(args.model, runner="torch-cpu", max_batch=1, max_seq_len=seq)
    torch_fp32 = fermi.load(
        args.model, runner="torch-cpu", dtype="fp32", max_batch=1, max_seq_len=seq
    )
    runners = {
        f"onnx {manifest.dtype} {manifest.quantize} (onnxruntime CPU, cache in place)": onnx,
        **{
            f"onnx {m.dtype} {m.quantize} (onnxruntime CPU, cache in place)": OnnxRunner(
                folder, m, 1, seq, m.prefill_chunk, threads=args.threads
            )
            for folder in args.also
            for m in [read_manifest(folder)]
        },
        "torch-cpu, fermi.load default (fp16 weights, fp32 math)": torch_default.runner,
        "torch-cpu fp32": torch_fp32.runner,
    }
    load_before = os.getloadavg()
    decode: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for context in CONTEXTS:
            rounds: dict[str, list[float]] = {}
            for runner in runners.values():
                prefill(runner, context)
                step_times(runner, context, {}, "warm-up")
            for _ in range(ROUNDS):
                for name, runner in runners.items():
                    step_times(runner, context, rounds, name)
            decode[str(context)] = {
                name: round(1000 * statistics.median(times), 2) for name, times in rounds.items()
            }
            print(context, decode[str(context)], flush=True)
    ratios = {
        name: round(decode[str(CONTEXTS[-1])][name] / decode[str(CONTEXTS[0])][name], 3)
        for name in runners
    }
    print("context 2000 / context 64:", ratios, flush=True)

    # Spin-waiting: the same graph through the engine (torch samples between steps).
    spin_runner = OnnxRunner(
        args.artefact, manifest, 1, seq, chunk, threads=args.threads, spinning=True
    )
    engines = {
        "allow_spinning=0 (Fermi's default)": Engine(onnx, art.tokenizer, art.generation, "onnx"),
        "allow_spinning=1 (onnxruntime's default)": Engine(
            spin_runner, art.tokenizer, art.generation, "onnx-spin"
        ),
    }
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        engine_rate(engine, 8)
    for _ in range(5):
        for name, engine in engines.items():
            rates[name].append(engine_rate(engine, 64))
    spinning = {name: round(statistics.median(r), 1) for name, r in rates.items()}
    print("engine tok/s:", spinning, flush=True)
    for engine in (*engines.values(), torch_default, torch_fp32):
        engine.close()

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "onnxruntime_threads": args.threads or "onnxruntime's default (physical cores)",
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "note": "shared 2-core VM: other jobs ran meanwhile; runners timed interleaved",
        },
        "model": args.model,
        "artefact": {"dtype": manifest.dtype, "quantize": manifest.quantize},
        "decode_ms_per_step_batch1": decode,
        "context_2000_over_64": ratios,
        "engine_tok_s_64_tokens": spinning,
        "rounds": ROUNDS,
        "steps_per_round": STEPS,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
