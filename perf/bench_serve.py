"""Load generator for ``fermi serve``: what serving users compare, and the HTTP layer's cost.

    .venv/bin/python perf/bench_serve.py [--model FOLDER] [--interfaces rsgi,asgi]

For each Granian interface it starts a real ``fermi serve`` process and measures:
- streaming chat at concurrency 1/8/32: TTFT, TPOT, inter-token latency (median, p99),
  output tokens/s and requests/s;
- small-request throughput: ``GET /v1/models`` (HTTP only) and 1-token chat completions;
- the server's overhead per streamed token: the same seeded generation through HTTP and
  through the Python API (``Engine.astream``) in one run, alternating, medians compared.

The default model is tests/tiny.py's random Qwen3 (tiny on purpose: the engine's own time per
token is small, so the HTTP layer's share shows). The client is a minimal asyncio HTTP/1.1
reader so that client cost stays small next to the server's. Results go to
perf/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import fermi  # noqa: E402
from tests.serving import running_server, thinking_checkpoint  # noqa: E402

MESSAGES = [{"role": "user", "content": "Tell me about the quick brown fox."}]
SEQ_LEN = 1024
MAX_BATCH = 32


class Stream:
    """One streamed response: arrival time of every content event, and the usage."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.events: list[float] = []
        self.completion_tokens = 0

    @property
    def ttft(self) -> float:
        return self.events[0] - self.start

    @property
    def e2e(self) -> float:
        return self.events[-1] - self.start

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.events, self.events[1:], strict=False)]

    @property
    def tpot(self) -> float:
        return (self.events[-1] - self.events[0]) / max(1, self.completion_tokens - 1)


async def _read_chunked(reader: asyncio.StreamReader):
    """Yield the pieces of a chunked HTTP body."""
    while True:
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            await reader.readline()
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


async def request(port: int, path: str, body: dict | None, stream: Stream | None = None) -> bytes:
    """POST ``body`` (or GET when None) on a fresh connection; for SSE fill ``stream``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode() if body is not None else b""
    method = "POST" if body is not None else "GET"
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    if not head.startswith("http/1.1 200"):
        raise RuntimeError(f"{path}: {head.splitlines()[0]}")
    try:
        if "transfer-encoding: chunked" not in head:
            length = int(head.split("content-length:")[1].split("\r\n")[0])
            return await reader.readexactly(length)
        buffer = b""
        async for piece in _read_chunked(reader):
            now = time.perf_counter()
            buffer += piece
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                data = event.removeprefix(b"data: ")
                if data == b"[DONE]" or stream is None:
                    continue
                chunk = json.loads(data)
                if chunk.get("usage"):
                    stream.completion_tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    stream.events.append(now)
        return b""
    finally:
        writer.close()


def chat_body(max_tokens: int, seed: int, stream: bool) -> dict:
    return {
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "seed": seed,
        "ignore_eos": True,
        "stream": stream,
        "stream_options": {"include_usage": True},
        "thinking": "off",
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(value: float) -> float:
    return round(value * 1e3, 3)


async def load_test(port: int, concurrency: int, requests: int, max_tokens: int) -> dict:
    queue = list(range(requests))
    done: list[Stream] = []

    async def worker() -> None:
        while queue:
            seed = queue.pop()
            stream = Stream()
            await request(port, "/v1/chat/completions", chat_body(max_tokens, seed, True), stream)
            done.append(stream)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    gaps = [g for s in done for g in s.gaps()]
    tokens = sum(s.completion_tokens for s in done)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "max_tokens": max_tokens,
        "ttft_ms": {"median": ms(pct([s.ttft for s in done], 0.5)),
                    "p99": ms(pct([s.ttft for s in done], 0.99))},
        "tpot_ms": {"median": ms(pct([s.tpot for s in done], 0.5)),
                    "p99": ms(pct([s.tpot for s in done], 0.99))},
        "itl_ms": {"median": ms(pct(gaps, 0.5)), "p99": ms(pct(gaps, 0.99))},
        "output_tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(requests / wall, 2),
    }  # fmt: skip


async def small_requests(port: int, concurrency: int, requests: int) -> dict:
    async def run(path: str, body: dict | None) -> float:
        queue = list(range(requests))

        async def worker() -> None:
            while queue:
                seed = queue.pop()
                await request(port, path, body if body is None else {**body, "seed": seed})

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return round(requests / (time.perf_counter() - start), 1)

    return {
        "concurrency": concurrency,
        "models_get_per_s": await run("/v1/models", None),
        "chat_1_token_per_s": await run("/v1/chat/completions", chat_body(1, 0, False)),
    }


async def overhead(port: int, engine, max_tokens: int, repeats: int) -> dict:
    """Per-token decode time of one seeded stream via HTTP minus via the Python API."""
    http_tpot, api_tpot = [], []
    for rep in range(repeats):
        stream = Stream()
        await request(port, "/v1/chat/completions", chat_body(max_tokens, rep, True), stream)
        http_tpot.append(stream.tpot)
        times = []
        async for delta in engine.astream(
            messages=MESSAGES, max_tokens=max_tokens, seed=rep, ignore_eos=True, thinking="off"
        ):
            if delta.text:
                times.append(time.perf_counter())
        api_tpot.append((times[-1] - times[0]) / (max_tokens - 1))
    http_med, api_med = statistics.median(http_tpot), statistics.median(api_tpot)
    return {
        "max_tokens": max_tokens,
        "repeats": repeats,
        "http_tpot_us": round(http_med * 1e6, 1),
        "python_api_tpot_us": round(api_med * 1e6, 1),
        "overhead_per_token_us": round((http_med - api_med) * 1e6, 1),
    }


def machine() -> dict:
    return {
        "cpu": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="[default: tiny random Qwen3]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--interfaces", default="rsgi,asgi")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=64, help="streams per load level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--overhead-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "perf/results/serve.json")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fermi-bench-serve-"))
    model = args.model or thinking_checkpoint(tmp / "tiny", max_positions=SEQ_LEN)
    engine = fermi.load(model, device=args.device, max_seq_len=SEQ_LEN, max_batch=MAX_BATCH)
    results = {
        "benchmark": "fermi serve: streaming load, small requests, HTTP overhead per token",
        "model": str(args.model) if args.model else "tests/tiny.py random Qwen3 (tiny)",
        "runner": engine.capabilities.name,
        "device": args.device,
        "machine": machine(),
        "interfaces": {},
    }
    for interface in args.interfaces.split(","):
        serve_args = ["--interface", interface, "--device", args.device]
        serve_args += ["--max-seq-len", str(SEQ_LEN)]
        serve_args += ["--max-batch", str(MAX_BATCH)]
        with running_server(model, *serve_args, log=tmp / f"{interface}.log") as base:
            port = int(base.rsplit(":", 1)[1])

            async def run_all(port=port) -> dict:
                await load_test(port, 1, 4, 8)  # warm-up
                levels = [
                    await load_test(port, int(c), args.requests, args.max_tokens)
                    for c in args.concurrency.split(",")
                ]
                small = await small_requests(port, 8, 400)
                cost = await overhead(port, engine, args.overhead_tokens, args.repeats)
                return {"streaming": levels, "small_requests": small, "overhead": cost}

            results["interfaces"][interface] = asyncio.run(run_all())
        print(interface, json.dumps(results["interfaces"][interface], indent=1))
    engine.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
