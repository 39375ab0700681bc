"""SmolLM2-135M decode on CPU: the step at 1 and 4 rows per weight format, the engine at 1
and 4 concurrent streams per runner, greedy agreement with float32, and resident memory.

1. Step (``Decoder.forward`` alone, 1 and 4 rows at position 130, interleaved rounds): the
   float32 model; int8 and int4 (the file's Q4_1 codes kept) ``QuantLinear`` layers; fp16
   storage plain (``use_half_weights(model, "plain")``: torch's fp16
   kernel up to 2 rows, the weight copied into a float32 buffer above); fp16 storage packed
   for FBGEMM (the default on x86 before fermi's kernels); fp16 storage in fermi's kernels'
   layout (``fermi.native``, the default where they build), one-row steps in one call.
2. Engine (``fermi.load("smollm2-135m")``, default fp16 storage, and per ``--quantize``),
   per ``--runners``
   (``torch-cpu``, ``torch-compile``), interleaved rounds: greedy decode tok/s of one
   request (first token to last) and the aggregate of 4 concurrent requests (tokens made
   after every request had its first, over that window). 128-token prompts, 64 new tokens,
   end of sequence ignored.
3. Greedy tokens of each runner against the float32 model's (``dtype="fp32"``), 4 prompts.

Run from the repository root (the machine is shared: ranges matter more than medians)::

    .venv/bin/python perf/bench_cpu_decode.py --out perf/results/cpu_decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))

from bench_cpu_quant import concurrent, fill_caches  # (concurrent: the same prompts)

import fermi
from fermi.aliases import alias_path
from fermi.gguf import load_gguf
from fermi.models.half_weights import use_half_cache, use_half_weights
from fermi.models.quant import QuantSpec

CPU = torch.device("cpu")


def prompt(vocab: int, seed: int, n: int = 128) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n,), generator=g).tolist()


def one(engine, new_tokens: int, seed: int) -> float:
    kw = {"max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    out = engine.generate(prompt_token_ids=prompt(engine.capabilities.vocab_size, seed), **kw)
    return (len(out.token_ids) - 1) / out.decode_time


@torch.inference_mode()
def step_times(rounds: int) -> dict[str, dict[str, list[float]]]:
    path = alias_path("smollm2-135m")
    assert path is not None

    def half(layout: str):
        return use_half_weights(load_gguf(path, CPU, "fp32").model, layout)

    models = {
        "fp32": load_gguf(path, CPU, "fp32").model,
        "fp16 plain": half("plain"),
        "fp16 packed (FBGEMM)": half("fbgemm"),
        "fp16 native (fermi.native)": half("native"),
        # (where fermi's kernels build, QuantLinear holds its codes in their panels)
        "int8 (QuantLinear)": load_gguf(path, CPU, "fp32", QuantSpec("int8")).model,
        "int4, Q4_1 codes kept (QuantLinear)": load_gguf(
            path, CPU, "fp32", QuantSpec("int4")
        ).model,
    }
    for model in models.values():
        # The KV cache as the engine keeps it: fp16 where fermi's kernels run the step
        # (use_half_cache, planned_cache_dtype), float32 for torch's ops.
        use_half_cache(model)
        model.setup_cache(4, 256, model.planned_cache_dtype())
        fill_caches(model)
        model.use_native_rows()  # (only the native layout takes it)
    times: dict[str, dict[str, list[float]]] = {n: {"1": [], "4": []} for n in models}
    for _ in range(rounds):
        for name, model in models.items():
            for rows in (1, 4):
                tokens = torch.full((rows, 1), 5)
                positions = torch.full((rows, 1), 130)
                started = time.perf_counter()
                model(tokens, positions, torch.arange(rows), 131, rows_are_slots=True)
                times[name][str(rows)].append(1e3 * (time.perf_counter() - started))
    return times


def agreement(engines: dict, reference, new_tokens: int, prompts: int) -> dict[str, str]:
    kw = {"max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    vocab = reference.capabilities.vocab_size
    refs = [
        reference.generate(prompt_token_ids=prompt(vocab, 1000 + i), **kw).token_ids
        for i in range(prompts)
    ]
    out = {}
    for name, engine in engines.items():
        same = total = 0
        for i, ref in enumerate(refs):
            got = engine.generate(prompt_token_ids=prompt(vocab, 1000 + i), **kw).token_ids
            # Tokens up to the first difference (after it the contexts differ).
            pairs = enumerate(zip(ref, got, strict=False))
            n = next((j for j, (a, b) in pairs if a != b), len(ref))
            same, total = same + n, total + len(ref)
        out[name] = f"{same}/{total} greedy tokens equal to fp32 before the first difference"
    return out


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--step-rounds", type=int, default=30)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--runners", nargs="+", default=["torch-cpu"])
    p.add_argument(
        "--quantize",
        nargs="+",
        default=["none"],
        choices=["none", "int8", "int4"],
        help="engines per runner: the default storage (none) and/or quantize=...",
    )
    p.add_argument("--skip-steps", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {
        "command": " ".join(sys.argv),
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads",
        "note": "shared machine: other jobs ran during the measurement (load averages below)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_before": os.getloadavg(),
    }
    if not args.skip_steps:
        steps = step_times(args.step_rounds)
        result["decode_step_ms"] = {
            name: {
                f"{rows} rows": {"min": round(min(v), 1), "median": round(statistics.median(v), 1)}
                for rows, v in by_rows.items()
            }
            for name, by_rows in steps.items()
        }
        print(json.dumps(result["decode_step_ms"]), flush=True)
    engines = {}
    for runner in args.runners:
        for scheme in args.quantize:
            name = runner if scheme == "none" else f"{runner} {scheme}"
            started = time.perf_counter()
            engines[name] = fermi.load(
                "smollm2-135m",
                device="cpu",
                runner=runner,
                max_batch=args.streams,
                max_seq_len=512,
                quantize=None if scheme == "none" else scheme,
            )
            one(engines[name], 8, 0)
            concurrent(engines[name], args.streams, 8, 0)
            startup = getattr(engines[name].runner, "startup", None)
            result.setdefault("load_s", {})[name] = {
                "load_and_warm_s": round(time.perf_counter() - started, 1),
                "compile_warmup_s": None if startup is None else round(startup.seconds, 1),
                "compile_cache_hit": None if startup is None else startup.cache_hit,
            }
            print(name, result["load_s"][name], flush=True)
    rates = {n: {"b1": [], "b4": []} for n in engines}
    for r in range(args.rounds):
        for name, engine in engines.items():
            rates[name]["b1"].append(one(engine, args.new_tokens, 10 + r))
            rates[name]["b4"].append(concurrent(engine, args.streams, args.new_tokens, 100 + r))
        print(f"round {r}: {json.dumps(rates)}", flush=True)
    result["decode_tok_s"] = {}
    for name in engines:
        b1, b4 = rates[name]["b1"], rates[name]["b4"]
        result["decode_tok_s"][name] = {
            "batch_1_median": round(statistics.median(b1), 1),
            "batch_1_all": [round(v, 1) for v in b1],
            f"{args.streams}_streams_aggregate_median": round(statistics.median(b4), 1),
            f"{args.streams}_streams_all": [round(v, 1) for v in b4],
            "ratio_of_medians": round(statistics.median(b4) / statistics.median(b1), 2),
        }
    result["load_average_after"] = os.getloadavg()
    reference = fermi.load("smollm2-135m", device="cpu", dtype="fp32", max_batch=1)
    result["greedy_vs_fp32"] = agreement(engines, reference, 32, 4)
    result["rss_mb_at_end"] = round(rss_mb())
    print(json.dumps(result, indent=1), flush=True)
    for engine in (*engines.values(), reference):
        engine.close()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
