"""Decode speed of SmolLM2-135M-Instruct on CPU with each weight scheme, through the engine.

Loads the packaged Q4_1 GGUF once per scheme (fp16 weight storage, today's default;
int8; int4 with the file's codes kept) and, in interleaved rounds (every scheme once per
round), measures greedy decode tok/s of one request (first token to last), its time to
first token (the prefill), and the aggregate of 4 concurrent requests (tokens after every
request had its first, over that window). 128-token prompts, 64 new tokens, end of
sequence ignored. Medians and ranges over rounds. Then, steadier under a shared machine's
noise, the decode step alone (``Decoder.forward``, 1 and 4 rows at position 130, each
scheme in turn, 30 rounds): minimum and median.

    python perf/bench_cpu_quant.py --threads 2 --out perf/results/cpu_quant_decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))

import fermi

SCHEMES = {"fp16 storage": None, "int8": "int8", "int4": "int4"}


def prompt(engine, seed: int, n: int = 128) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, engine.capabilities.vocab_size - 100, (n,), generator=g).tolist()


def one(engine, new_tokens: int, seed: int) -> tuple[float, float]:
    """(decode tok/s, time to first token in ms) of one request."""
    kw = {"max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    out = engine.generate(prompt_token_ids=prompt(engine, seed), **kw)
    return (len(out.token_ids) - 1) / out.decode_time, 1e3 * out.time_to_first_token


def concurrent(engine, streams: int, new_tokens: int, seed: int) -> float:
    """Aggregate decode tok/s of ``streams`` concurrent requests: the tokens that arrived
    after every request had its first, over the time from then to the last token. Each
    token is counted by when its delta arrived (a request's pace is uneven: its steps share
    the batch with the others' prefill chunks until every prompt is in)."""
    arrivals: list[list[tuple[float, int]]] = [[] for _ in range(streams)]
    kw = {"max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}

    def run(i: int) -> None:
        for delta in engine.stream(prompt_token_ids=prompt(engine, seed + i), **kw):
            if delta.token_ids:
                arrivals[i].append((time.perf_counter(), len(delta.token_ids)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = max(a[0][0] for a in arrivals)
    last = max(a[-1][0] for a in arrivals)
    produced = sum(n for a in arrivals for at, n in a if at > first)
    return produced / (last - first)


@torch.inference_mode()
def fill_caches(model) -> None:
    """Writes every position of ``model``'s KV caches (random values, as a decode step's
    keys and values are). A CPU cache starts as an anonymous mapping whose unwritten pages
    are the kernel's one zero page: a step timed over them reads the same 4 KB again and
    again from L1, not the cache's bytes from memory (every step benchmark before run 73
    did, at position 130)."""
    from fermi.models.cache import KVCache

    g = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, KVCache):
            for buffer in (module.k, module.v):
                buffer.copy_(torch.randn(buffer.shape, generator=g, dtype=buffer.dtype))


@torch.inference_mode()
def step_times(rounds: int) -> dict[str, dict[str, list[float]]]:
    """Milliseconds of one decode step (1 and 4 rows) per scheme, interleaved."""
    from fermi.aliases import alias_path
    from fermi.gguf import load_gguf
    from fermi.models.quant import QuantSpec

    path = alias_path("smollm2-135m")
    assert path is not None
    models = {
        name: load_gguf(path, torch.device("cpu"), None, QuantSpec.parse(q)).model
        for name, q in SCHEMES.items()
    }
    times: dict[str, dict[str, list[float]]] = {n: {"1": [], "4": []} for n in models}
    for model in models.values():
        model.setup_cache(4, 256)
        fill_caches(model)
    for _ in range(rounds):
        for name, model in models.items():
            for rows in (1, 4):
                tokens = torch.full((rows, 1), 5)
                positions = torch.full((rows, 1), 130)
                started = time.perf_counter()
                model(tokens, positions, torch.arange(rows), 131, rows_are_slots=True)
                times[name][str(rows)].append(1e3 * (time.perf_counter() - started))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    engines = {
        name: fermi.load("smollm2-135m", quantize=q, max_batch=args.streams, max_seq_len=512)
        for name, q in SCHEMES.items()
    }
    rates: dict[str, dict[str, list[float]]] = {
        n: {"b1": [], "b4": [], "ttft": []} for n in engines
    }
    for engine in engines.values():  # warm-up
        one(engine, 8, 0)
        concurrent(engine, args.streams, 8, 0)
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for name, engine in engines.items():
            rate, ttft = one(engine, args.new_tokens, 10 + r)
            rates[name]["b1"].append(rate)
            rates[name]["ttft"].append(ttft)
            rates[name]["b4"].append(concurrent(engine, args.streams, args.new_tokens, 100 + r))
        print(f"round {r}: " + ", ".join(f"{n} {v['b1'][-1]:.1f}" for n, v in rates.items()))
    result = {
        "command": " ".join(sys.argv),
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}), {args.threads} threads",
        "note": "shared machine: other jobs ran during the measurement (load averages "
        "below); schemes interleaved in every round",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "workload": f"128-token prompt, {args.new_tokens} new tokens, greedy; "
        f"batch {args.streams} = {args.streams} concurrent requests",
        "decode_tok_s": {},
    }
    steps = step_times(30)
    result["decode_step_ms"] = {
        name: {
            f"{rows} rows": {"min": round(min(v), 1), "median": round(statistics.median(v), 1)}
            for rows, v in by_rows.items()
        }
        for name, by_rows in steps.items()
    }
    print(result["decode_step_ms"], flush=True)
    for name, engine in engines.items():
        report = engine.runner.model.quantization
        b1, b4 = rates[name]["b1"], rates[name]["b4"]
        result["decode_tok_s"][name] = {
            "batch_1_median": round(statistics.median(b1), 1),
            "batch_1_range": [round(min(b1), 1), round(max(b1), 1)],
            f"batch_{args.streams}_aggregate_median": round(statistics.median(b4), 1),
            f"batch_{args.streams}_range": [round(min(b4), 1), round(max(b4), 1)],
            "ttft_ms_median (128-token prompt)": round(statistics.median(rates[name]["ttft"]), 1),
            "quantization": None if report is None else report.summary(),
        }
        print(name, result["decode_tok_s"][name], flush=True)
        engine.close()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
