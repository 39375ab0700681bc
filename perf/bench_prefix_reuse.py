"""Time to first token with and without automatic prefix reuse, on the CPU.

A chat UI or an agent sends the same long system prompt (here about 1,000 tokens) before
every question. With prefix reuse the engine keeps a finished request's KV cache and a
new request sharing that prefix prefills only its own question; without it, every
request prefills the whole prompt. Two engines on the same model, one with reuse and one
without, answer the same questions in alternating order; each request generates one
token, so its wall time is its time to first token. Medians per engine.

    .venv/bin/python perf/bench_prefix_reuse.py --out perf/results/cpu_prefix_reuse.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import fermi

SYSTEM = " ".join(
    f"Rule {i}: answer politely, cite the manual section {i}, and never invent a part number."
    for i in range(60)
)
QUESTIONS = [
    "How do I reset the device?",
    "What does the red light mean?",
    "Can I charge it overnight?",
    "Which cable fits the port?",
    "Is the battery replaceable?",
    "How loud is the fan?",
]


def ttft(engine, question: str) -> tuple[float, int, int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    started = time.perf_counter()
    out = engine.generate(messages=messages, max_tokens=1, temperature=0)
    return time.perf_counter() - started, out.usage.prompt_tokens, out.usage.cached_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    kw = {"device": "cpu", "max_seq_len": 2048, "max_batch": 4}
    engines = {
        "reuse": fermi.load(args.model, **kw),
        "no-reuse": fermi.load(args.model, **kw, prefix_reuse=False),
    }
    times: dict[str, list[float]] = {name: [] for name in engines}
    cached: dict[str, list[int]] = {name: [] for name in engines}
    prompt_tokens = 0
    for engine in engines.values():  # warm-up: the first request of each engine is cold
        ttft(engine, "Hello?")
    order = list(engines)
    for r in range(args.rounds):
        for question in QUESTIONS:
            for name in order:
                seconds, prompt_tokens, hit = ttft(engines[name], question)
                times[name].append(seconds)
                cached[name].append(hit)
            order.reverse()  # neither engine always runs first
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    result = {
        "command": "perf/bench_prefix_reuse.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "model": args.model,
        "prompt_tokens": prompt_tokens,
        "requests_per_engine": len(times["reuse"]),
        "ttft_ms": {},
    }
    for name in engines:
        ms = sorted(1000 * t for t in times[name])
        result["ttft_ms"][name] = {
            "median": round(statistics.median(ms), 1),
            "min": round(ms[0], 1),
            "max": round(ms[-1], 1),
            "median_cached_tokens": statistics.median(cached[name]),
        }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
