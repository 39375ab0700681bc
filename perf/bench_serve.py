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
import contextlib
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


async def small_requests(port: int, concurrency: int, requests: int) -> dict[str, float]:
    """Requests/s (bound by this Python client as much as by the server) and the server
    worker's CPU time per request, of ``GET /v1/models`` and of 1-token chat completions."""
    worker_pid = server_worker_pid(port)

    async def run(path: str, body: dict | None) -> tuple[float, float]:
        queue = list(range(requests))

        async def worker() -> None:
            while queue:
                seed = queue.pop()
                await request(port, path, body if body is None else {**body, "seed": seed})

        start, cpu = time.perf_counter(), process_cpu_seconds(worker_pid)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        return requests / wall, (process_cpu_seconds(worker_pid) - cpu) / requests * 1e6

    get_rate, get_cpu = await run("/v1/models", None)
    chat_rate, chat_cpu = await run("/v1/chat/completions", chat_body(1, 0, False))
    return {
        "models_get_per_s": get_rate,
        "models_get_server_cpu_us": get_cpu,
        "chat_1_token_per_s": chat_rate,
        "chat_1_token_server_cpu_us": chat_cpu,
    }


def server_worker_pid(port: int) -> int:
    """The Granian worker (the process that runs the engine) of the server on ``port``."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            procs[int(entry.name)] = (ppid, cmd)
    mains = [pid for pid, (_, cmd) in procs.items() if f"--port {port} " in cmd + " "]
    workers = [p for p, (pp, cmd) in procs.items() if pp in mains and "spawn_main" in cmd]
    if len(workers) != 1:
        raise RuntimeError(f"cannot find the server worker on port {port}")
    return workers[0]


def _cpu_seconds(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    return _cpu_seconds(Path(f"/proc/{pid}/stat"))


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = _cpu_seconds(task / "stat")
        except OSError:
            continue
    return out


def http_layer_cpu(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds of every server thread but the busiest, which is the engine's scheduler
    (with one torch thread, the model runs on it): the HTTP layer's own cost."""
    spent = {tid: t - before.get(tid, 0.0) for tid, t in after.items()}
    return sum(spent.values()) - max(spent.values())


async def overhead(ports: dict[str, int], engine, max_tokens: int, repeats: int) -> dict:
    """The same seeded streams through each server and through the Python API, in turns.

    Wall-clock time per token is compared as medians; on a busy machine the difference is
    mostly noise. CPU time per token compares each server worker's CPU time with this
    process's own while it runs the engine alone (the Python API path)."""
    workers = {name: server_worker_pid(port) for name, port in ports.items()}
    tpot: dict[str, list[float]] = {name: [] for name in [*ports, "python_api"]}
    cpu = dict.fromkeys(tpot, 0.0)
    api_loop_cpu = 0.0  # this thread's share: what any asyncio consumer of the engine pays
    # Only one server streams at a time, so each server's threads work for its own streams.
    threads_before = {name: thread_cpu_seconds(pid) for name, pid in workers.items()}
    for rep in range(repeats):
        for name, port in ports.items():
            stream = Stream()
            before = process_cpu_seconds(workers[name])
            await request(port, "/v1/chat/completions", chat_body(max_tokens, rep, True), stream)
            cpu[name] += process_cpu_seconds(workers[name]) - before
            tpot[name].append(stream.tpot)
        times = []
        before, loop_before = time.process_time(), time.thread_time()
        async for delta in engine.astream(
            messages=MESSAGES, max_tokens=max_tokens, seed=rep, ignore_eos=True, thinking="off"
        ):
            if delta.text:
                times.append(time.perf_counter())
        cpu["python_api"] += time.process_time() - before
        api_loop_cpu += time.thread_time() - loop_before
        tpot["python_api"].append((times[-1] - times[0]) / (max_tokens - 1))
    layer = {
        n: http_layer_cpu(threads_before[n], thread_cpu_seconds(p)) for n, p in workers.items()
    }
    tokens = repeats * max_tokens
    api_tpot = statistics.median(tpot["python_api"])
    api_cpu = cpu["python_api"] / tokens
    api = {
        "tpot_us": round(api_tpot * 1e6, 1),
        "cpu_per_token_us": round(api_cpu * 1e6, 1),
        "event_loop_cpu_per_token_us": round(api_loop_cpu / tokens * 1e6, 1),
    }
    out: dict = {"max_tokens": max_tokens, "repeats": repeats, "python_api": api}
    for name in ports:
        med, per_token = statistics.median(tpot[name]), cpu[name] / tokens
        out[name] = {
            "tpot_us": round(med * 1e6, 1),
            "cpu_per_token_us": round(per_token * 1e6, 1),
            "overhead_per_token_us": round((med - api_tpot) * 1e6, 1),
            "cpu_overhead_per_token_us": round((per_token - api_cpu) * 1e6, 1),
            "http_layer_cpu_per_token_us": round(layer[name] / tokens * 1e6, 1),
        }
    return out


def machine() -> dict:
    return {
        "cpu": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


async def measure(ports: dict[str, int], engine, args: argparse.Namespace) -> dict:
    for port in ports.values():
        await load_test(port, 1, 4, 8)  # warm-up
    streaming = {
        name: [
            await load_test(port, int(c), args.requests, args.max_tokens)
            for c in args.concurrency.split(",")
        ]
        for name, port in ports.items()
    }
    # Small requests: the interfaces take turns, so a busy spell hits both alike.
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in ports}
    for _ in range(args.rounds):
        for name, port in ports.items():
            rounds[name].append(await small_requests(port, 8, 200))
    small = {
        name: {key: round(statistics.median(r[key] for r in runs), 1) for key in runs[0]}
        | {"concurrency": 8, "rounds": args.rounds}
        for name, runs in rounds.items()
    }
    cost = await overhead(ports, engine, args.overhead_tokens, args.repeats)
    return {"streaming": streaming, "small_requests": small, "overhead": cost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="[default: tiny random Qwen3]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of every engine (1: no thread-pool spinning in the CPU times)",
    )
    parser.add_argument("--interfaces", default="rsgi,asgi")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=64, help="streams per load level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--overhead-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="overhead streams per path")
    parser.add_argument("--rounds", type=int, default=5, help="small-request rounds")
    parser.add_argument("--out", type=Path, default=ROOT / "perf/results/serve.json")
    args = parser.parse_args()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the servers inherit it
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="fermi-bench-serve-"))
    model = args.model or thinking_checkpoint(tmp / "tiny", max_positions=SEQ_LEN)
    engine = fermi.load(model, device=args.device, max_seq_len=SEQ_LEN, max_batch=MAX_BATCH)
    results = {
        "benchmark": "fermi serve: streaming load, small requests, HTTP overhead per token",
        "model": str(args.model) if args.model else "tests/tiny.py random Qwen3 (tiny)",
        "runner": engine.capabilities.name,
        "device": args.device,
        "machine": machine(),
    }
    interfaces = args.interfaces.split(",")
    with contextlib.ExitStack() as stack:
        ports = {}
        for interface in interfaces:
            serve_args = ["--interface", interface, "--device", args.device]
            serve_args += ["--max-seq-len", str(SEQ_LEN), "--max-batch", str(MAX_BATCH)]
            log = tmp / f"{interface}.log"
            base = stack.enter_context(running_server(model, *serve_args, log=log))
            ports[interface] = int(base.rsplit(":", 1)[1])
        results.update(asyncio.run(measure(ports, engine, args)))
    engine.close()
    print(json.dumps({k: v for k, v in results.items() if k != "streaming"}, indent=1))
    engine.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
