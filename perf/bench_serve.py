"""Load generator for ``fermi serve``: what serving users compare, and the HTTP layer's cost.

    .venv/bin/python perf/bench_serve.py [--model FOLDER] [--interfaces rsgi,asgi]
    .venv/bin/python perf/bench_serve.py --overhead-only --repeats 15   # the overhead alone
    .venv/bin/python perf/bench_serve.py --api-only --repeats 25        # Python API vs engine

For each Granian interface it starts a real ``fermi serve`` process and measures:
- streaming chat at concurrency 1/8/32: TTFT, TPOT, inter-token latency (median, p99),
  output tokens/s and requests/s;
- small-request throughput: ``GET /v1/models`` (HTTP only) and 1-token chat completions;
- the server's overhead per streamed token: the same seeded generation (256 tokens,
  ignore_eos) through each server, through the Python API (``Engine.astream``, which wakes
  its event loop once per token) and through the bare engine (a sink that only notes the
  time: no consumer at all), in rounds whose order rotates. Per stream: wall time per token
  (steady state: first content event to ``[DONE]`` over the tokens after the first; and
  whole stream: request to ``[DONE]`` over all tokens) and CPU time per token of the process
  that runs the engine, split into the engine thread, the event-loop thread and the rest
  (Granian's Rust runtime), read exactly from /proc/PID/task/*/schedstat. The overhead is
  the median over rounds of (server - baseline) within a round, against both baselines.
  This client is a blocking socket that notes only the time and size of each ``recv``
  while the stream runs (events are parsed afterwards), so on 2 shared cores it takes as
  little CPU from the server as a client can.

The default model is tests/tiny.py's random Qwen3 (tiny on purpose: the engine's own time per
token is small, so the HTTP layer's share shows). The load-test client is a minimal asyncio
HTTP/1.1 reader. Results go to perf/results/serve.json (``--out``); perf/notes_serve.md
reads them.

``--api-only`` starts no server: it compares the Python API with the bare engine alone, in
the same rotating rounds, together with ``api_per_token_wake``, a copy of the Python API's
hand-off before perf/notes_serve.md section 5 (a thread-safe call and an ``asyncio.Queue``
put per delta, ``astream`` over ``astream_request``), so the old and the new hand-off are
compared within each round too. ``--api-streams N`` runs N such streams at once on the one
event loop per path and round (per-token figures then over all N streams' tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import fermi  # noqa: E402
import tests.serving as serving  # noqa: E402
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


def thread_cpu_ns(pid: int) -> dict[int, tuple[str, int]]:
    """Every thread of ``pid``: (name, nanoseconds on a CPU so far), from schedstat (exact,
    where /proc/PID/stat counts 10 ms ticks)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            out[int(task.name)] = (name, int((task / "schedstat").read_text().split()[0]))
        except (OSError, ValueError):
            continue
    return out


def cpu_by_role(pid: int, before: dict, after: dict) -> dict[str, float]:
    """Seconds of CPU between two ``thread_cpu_ns`` readings, grouped: the engine's
    scheduler thread, the main thread (the asyncio loop, in the server and in this bench),
    and every other thread (Granian's Rust runtime, torch helpers)."""
    roles = {"engine": 0.0, "loop": 0.0, "other": 0.0}
    for tid, (name, ns) in after.items():
        spent = (ns - before.get(tid, (name, 0))[1]) / 1e9
        roles["loop" if tid == pid else "other"] += spent
    # Python does not name OS threads; the engine's is the busiest but the main one.
    busiest = max(
        (t for t in after if t != pid), key=lambda t: after[t][1] - before.get(t, ("", 0))[1]
    )
    engine = (after[busiest][1] - before.get(busiest, ("", 0))[1]) / 1e9
    roles["engine"], roles["other"] = engine, roles["other"] - engine
    return roles


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def raw_stream(port: int, body: dict) -> dict:
    """POST ``body`` with a blocking socket and read the SSE response, noting only the time
    and byte count of every ``recv`` while it streams; events are parsed afterwards, so the
    client costs one syscall and a clock read per arrival, not a JSON parse per event.

    Returns the request's start, the arrival times of its content events, the arrival of
    ``[DONE]`` and the usage's completion tokens."""
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    pieces, marks, total = [], [], 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        sock.sendall(head + payload)
        while data := sock.recv(1 << 16):
            marks.append(time.perf_counter())
            total += len(data)
            pieces.append(data)
            marks.append(total)
    raw = b"".join(pieces)
    times, ends = marks[0::2], marks[1::2]
    header_end = raw.index(b"\r\n\r\n") + 4
    if not raw.startswith(b"HTTP/1.1 200") or b"chunked" not in raw[:header_end].lower():
        raise RuntimeError(f"unexpected response: {raw[:200]!r}")
    # De-chunk, keeping for every body byte where its chunk ends in ``raw``.
    body_parts, part_ends, pos = [], [], header_end
    while True:
        line_end = raw.index(b"\r\n", pos)
        size = int(raw[pos:line_end], 16)
        if size == 0:
            break
        body_parts.append(raw[line_end + 2 : line_end + 2 + size])
        pos = line_end + 2 + size + 2
        part_ends.append(pos)
    content, done, usage, offset = [], None, None, 0
    for part, raw_end in zip(body_parts, part_ends, strict=True):
        arrived = times[bisect.bisect_left(ends, raw_end)]
        offset += len(part)
        for event in part.split(b"\n\n"):
            data = event.removeprefix(b"data: ")
            if not data:
                continue
            if data == b"[DONE]":
                done = arrived
                continue
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                content.append(arrived)
    if done is None or usage is None:
        raise RuntimeError("the stream ended without usage and [DONE]")
    return {"start": start, "content": content, "end": done, "tokens": usage}


async def timed_deltas(deltas) -> dict:
    """Consume an async stream of deltas, noting when each text delta arrived."""
    content, tokens = [], 0
    start = time.perf_counter()
    async for delta in deltas:
        if delta.text:
            content.append(time.perf_counter())
        if delta.usage:
            tokens = delta.usage.completion_tokens
    return {"start": start, "content": content, "end": time.perf_counter(), "tokens": tokens}


async def api_stream(engine, max_tokens: int, seed: int) -> dict:
    """The same generation through the Python API (``Engine.astream``)."""
    return await timed_deltas(
        engine.astream(
            messages=MESSAGES, max_tokens=max_tokens, seed=seed, ignore_eos=True, thinking="off"
        )
    )


async def per_token_wake_stream(engine, max_tokens: int, seed: int) -> dict:
    """The same generation through a copy of the Python API's hand-off before notes section
    5: every delta wakes the event loop (``call_soon_threadsafe`` + ``asyncio.Queue``),
    and ``astream`` wraps ``astream_request`` (a within-round reference for ``--api-only``)."""

    async def astream_request(request):
        loop = asyncio.get_running_loop()
        box: asyncio.Queue = asyncio.Queue()
        handle = engine.submit(request, lambda d: loop.call_soon_threadsafe(box.put_nowait, d))
        try:
            while True:
                delta = await box.get()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            handle.cancel()

    async def astream(**kwargs):
        request = engine.build_request(**kwargs)
        async for delta in astream_request(request):
            if delta.error:
                raise RuntimeError(delta.error)
            yield delta

    return await timed_deltas(
        astream(
            messages=MESSAGES, max_tokens=max_tokens, seed=seed, ignore_eos=True, thinking="off"
        )
    )


async def engine_stream(engine, max_tokens: int, seed: int) -> dict:
    """The same generation with no consumer at all: the engine thread's sink only notes the
    time (what the engine costs by itself; no event loop is woken per token)."""
    request = engine.build_request(
        messages=MESSAGES, max_tokens=max_tokens, seed=seed, ignore_eos=True, thinking="off"
    )
    content: list[float] = []
    out = {"tokens": 0}
    finished = threading.Event()

    def sink(delta) -> None:
        if delta.text:
            content.append(time.perf_counter())
        if delta.finish_reason is not None:
            out["end"], out["tokens"] = time.perf_counter(), delta.usage.completion_tokens
            finished.set()

    start = time.perf_counter()
    engine.submit(request, sink)
    await asyncio.to_thread(finished.wait)
    return {"start": start, "content": content, **out}


def _paired(runs: list[dict], bases: list[dict], suffix: str) -> dict:
    """Medians (and ranges) over rounds of run - base in the same round, in us per token."""
    out = {}
    for key, field in (("tpot", "overhead"), ("e2e", "e2e_overhead"), ("cpu", "cpu_overhead")):
        if key == "cpu":
            diffs = [
                (sum(r["cpu"].values()) / r["tokens"] - sum(b["cpu"].values()) / b["tokens"])
                for r, b in zip(runs, bases, strict=True)
            ]
        else:
            diffs = [r[key] - b[key] for r, b in zip(runs, bases, strict=True)]
        diffs = sorted(d * 1e6 for d in diffs)
        out[f"{field}_per_token_us{suffix}"] = round(statistics.median(diffs), 1)
        out[f"{field}_range_us{suffix}"] = [round(diffs[0], 1), round(diffs[-1], 1)]
    return out


def _per_token(run: dict) -> tuple[float, float]:
    """(steady-state seconds per token: first content event to the end / the tokens after
    each stream's first, whole-stream seconds per token: request to the end / tokens)."""
    first, end, tokens = run["content"][0], run["end"], run["tokens"]
    return (end - first) / (tokens - run.get("streams", 1)), (end - run["start"]) / tokens


async def _together(stream, engine, max_tokens: int, seed: int, streams: int) -> dict:
    """``streams`` copies of an in-process path at once on this loop (seeds differ), as one
    run: from the first request to the last end, every content event, all the tokens."""
    if streams == 1:
        return await stream(engine, max_tokens, seed)
    runs = await asyncio.gather(
        *(stream(engine, max_tokens, seed * streams + i) for i in range(streams))
    )
    return {
        "start": min(r["start"] for r in runs),
        "content": sorted(t for r in runs for t in r["content"]),
        "end": max(r["end"] for r in runs),
        "tokens": sum(r["tokens"] for r in runs),
        "streams": streams,
    }


async def overhead(
    ports: dict[str, int],
    engine,
    max_tokens: int,
    repeats: int,
    verbose: bool = True,
    reference: bool = False,
    streams: int = 1,
) -> dict:
    """The same seeded stream through each server and through the Python API, in turns
    (the order rotates every round, so drift and busy spells hit every path alike).

    Per path and round: wall time per token (steady state, first to last content event;
    and whole stream, request to ``[DONE]``) and the CPU time per token of the process that
    runs the engine, split by thread. The overhead of a server is the median over rounds of
    (server - Python API) in the same round; the Python API's is (Python API - bare
    engine). ``reference`` adds ``api_per_token_wake`` (the old hand-off); ``streams`` runs
    that many streams of each in-process path at once."""
    in_process = ["python_api", "engine_only"] + (["api_per_token_wake"] if reference else [])
    workers = {name: server_worker_pid(port) for name, port in ports.items()}
    workers |= {name: os.getpid() for name in in_process}
    paths = list(workers)
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    busy0, total0 = machine_jiffies()
    load_before = os.getloadavg()
    for rep in range(repeats):
        # Rotate, and reverse the cycle every other pass, so that each path runs after each
        # other path equally often (a fixed cycle always puts the same path first).
        cycle = paths if (rep // len(paths)) % 2 == 0 else paths[::-1]
        for name in cycle[rep % len(paths) :] + cycle[: rep % len(paths)]:
            pid = workers[name]
            before = thread_cpu_ns(pid)
            if name in in_process:
                stream = {
                    "python_api": api_stream,
                    "engine_only": engine_stream,
                    "api_per_token_wake": per_token_wake_stream,
                }[name]
                run = await _together(stream, engine, max_tokens, rep, streams)
            else:
                run = raw_stream(ports[name], chat_body(max_tokens, rep, True))
            cpu = cpu_by_role(pid, before, thread_cpu_ns(pid))
            tpot, e2e = _per_token(run)
            want = max_tokens * run.get("streams", 1)
            if run["tokens"] != want or len(run["content"]) < want // 2:
                raise RuntimeError(f"{name}: {run['tokens']} tokens, {len(run['content'])} events")
            runs[name].append({"tpot": tpot, "e2e": e2e, "cpu": cpu, "tokens": run["tokens"]})
            if verbose:
                print(
                    f"{rep} {name:10} tpot {tpot * 1e6:7.1f} e2e {e2e * 1e6:7.1f} cpu/token "
                    + " ".join(f"{k} {v / run['tokens'] * 1e6:6.1f}" for k, v in cpu.items())
                )
    busy1, total1 = machine_jiffies()
    out: dict = {
        "max_tokens": max_tokens,
        "repeats": repeats,
        "in_process_streams_at_once": streams,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine_busy_fraction": round((busy1 - busy0) / max(1, total1 - total0), 3),
        "client": "blocking socket, one recv + clock read per arrival, events parsed after",
    }
    us = 1e6
    for name in paths:
        rs = runs[name]
        entry = {
            "tpot_us": round(statistics.median(r["tpot"] for r in rs) * us, 1),
            "e2e_per_token_us": round(statistics.median(r["e2e"] for r in rs) * us, 1),
            "cpu_per_token_us": {
                role: round(statistics.median(r["cpu"][role] / r["tokens"] for r in rs) * us, 1)
                for role in ("engine", "loop", "other")
            },
        }
        entry["cpu_per_token_us"]["total"] = round(
            statistics.median(sum(r["cpu"].values()) / r["tokens"] for r in rs) * us, 1
        )
        if name == "python_api":
            entry |= _paired(rs, runs["engine_only"], "_vs_engine")
        elif name == "api_per_token_wake":
            entry |= _paired(rs, runs["engine_only"], "_vs_engine")
            entry |= _paired(rs, runs["python_api"], "_vs_python_api")
        elif name != "engine_only":
            for base in ("python_api", "engine_only"):
                entry |= _paired(rs, runs[base], "" if base == "python_api" else "_vs_engine")
        out[name] = entry
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
    if args.api_only:
        await api_stream(engine, 8, 0)  # warm-up
        await per_token_wake_stream(engine, 8, 0)
        cost = await overhead(
            {}, engine, args.overhead_tokens, args.repeats, reference=True, streams=args.api_streams
        )
        return {"overhead": cost}
    for port in ports.values():
        await load_test(port, 1, 4, 8)  # warm-up
    if args.overhead_only:
        await api_stream(engine, 8, 0)  # warm-up
        return {"overhead": await overhead(ports, engine, args.overhead_tokens, args.repeats)}
    # Each load level runs on every server in turn, so a drift of the machine's speed
    # shows in every server's figures alike.
    streaming: dict[str, list[dict]] = {name: [] for name in ports}
    for c in args.concurrency.split(","):
        for name, port in ports.items():
            streaming[name].append(await load_test(port, int(c), args.requests, args.max_tokens))
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


@contextlib.contextmanager
def _serving_from(tree: Path):
    """Start ``fermi serve`` from another checkout (``python -m`` imports from its cwd)."""
    saved, serving.REPO = serving.REPO, tree
    try:
        yield
    finally:
        serving.REPO = saved


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
    parser.add_argument("--repeats", type=int, default=9, help="overhead rounds (streams per path)")
    parser.add_argument("--rounds", type=int, default=5, help="small-request rounds")
    parser.add_argument(
        "--overhead-only", action="store_true", help="measure only the overhead per token"
    )
    parser.add_argument(
        "--api-only",
        action="store_true",
        help="start no server: the Python API (and its old hand-off) against the bare engine",
    )
    parser.add_argument(
        "--api-streams",
        type=int,
        default=1,
        help="with --api-only: streams at once on the one event loop, per path and round",
    )
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        default=None,
        help="also serve from this checkout (git archive COMMIT | tar -x -C DIR) as IFACE@baseline",
    )
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
        "command": " ".join(["perf/bench_serve.py", *sys.argv[1:]]),
    }
    interfaces = [] if args.api_only else args.interfaces.split(",")
    with contextlib.ExitStack() as stack:
        ports = {}
        trees = [("", serving.REPO)]
        if args.baseline_tree:
            trees.append(("@baseline", args.baseline_tree.resolve()))
        for suffix, tree in trees:
            for interface in interfaces:
                serve_args = ["--interface", interface, "--device", args.device]
                serve_args += ["--max-seq-len", str(SEQ_LEN), "--max-batch", str(MAX_BATCH)]
                log = tmp / f"{interface}{suffix}.log"
                with _serving_from(tree):
                    base = stack.enter_context(running_server(model, *serve_args, log=log))
                ports[interface + suffix] = int(base.rsplit(":", 1)[1])
        results.update(asyncio.run(measure(ports, engine, args)))
    engine.close()
    print(json.dumps({k: v for k, v in results.items() if k != "streaming"}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
