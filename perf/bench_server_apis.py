"""Per-token server overhead of each streaming API against chat completions, in one run.

    .venv/bin/python perf/bench_server_apis.py [--repeats 15] [--tokens 256]
        [--endpoints chat,responses,messages] [--out perf/results/cpu_server_apis.json]

Two measurements, per endpoint in ``ENDPOINTS`` (a dict of endpoint -> path, request builder
and event parser; a new API is one entry there):

1. **Through a real server.** One ``fermi serve`` (RSGI, the default interface) on
   tests/tiny.py's random Qwen3, and the same seeded generation (``--tokens`` tokens,
   ignore_eos, thinking off) streamed through each endpoint in rounds whose order rotates.
   Per stream: wall time per token (first content event to the end of the body, over the
   tokens after the first) and CPU time per token of the server process (schedstat: the
   engine thread, which builds and sends the events of a pushed stream, and the whole
   process). Each endpoint's overhead is the median over rounds of (endpoint - chat) within
   the round, with its range. The client is bench_serve.py's: a blocking socket noting the
   time and size of each recv, events parsed afterwards.
2. **The formatting alone, in process.** The StreamReply each endpoint's handler builds,
   fed the same text deltas; ``feed`` (what the engine thread runs per token of a pushed
   stream) timed per call: hot (back to back) and cold (after ``--cold-ops`` small torch ops,
   as after a model step: perf/notes_serve.md measured per-token Python at 10-20x its hot
   cost there). Medians in us per token, and the difference to chat.

The engine's own step on this model is ~2 ms of CPU per token and varies by tens of us
between streams on 2 shared cores, so (1) bounds the difference loosely and (2) gives it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fermi.engine.types import Delta, Usage  # noqa: E402
from fermi.server.handlers import StreamReply  # noqa: E402
from perf.bench_serve import (  # noqa: E402
    cpu_by_role,
    machine,
    machine_jiffies,
    server_worker_pid,
    thread_cpu_ns,
)
from tests.serving import running_server, thinking_checkpoint  # noqa: E402

QUESTION = "Tell me about the quick brown fox."
SEQ_LEN = 1024


@dataclass(frozen=True)
class Endpoint:
    """How to stream one generation through an API and read its events back.

    ``body(tokens, seed)`` is the streamed request; ``parse(event)`` reads one server-sent
    event (its bytes, without the blank line) and returns "content" for an event that
    carries generated text, an int for the one that reports the output tokens, else None;
    ``reply()`` builds the handler's StreamReply (for the in-process measurement)."""

    path: str
    body: Callable[[int, int], dict]
    parse: Callable[[bytes], str | int | None]
    reply: Callable[[], StreamReply]


def _data(event: bytes) -> dict | None:
    """The JSON of an event's ``data:`` line (None for ``[DONE]``)."""
    for line in event.split(b"\n"):
        if line.startswith(b"data: "):
            payload = line[6:]
            return None if payload == b"[DONE]" else json.loads(payload)
    return None


def _chat_body(tokens: int, seed: int) -> dict:
    return {
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": tokens,
        "seed": seed,
        "ignore_eos": True,
        "thinking": "off",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _chat_parse(event: bytes) -> str | int | None:
    chunk = _data(event)
    if chunk is None:
        return None
    if chunk.get("usage"):
        return chunk["usage"]["completion_tokens"]
    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
        return "content"
    return None


# What a StreamReply needs besides its formatter, without an engine behind it: the api
# (metrics, used on errors only), the generation (cancel), the timing, the requests.
def _stubs() -> tuple:
    generation = SimpleNamespace(cancel=lambda: None, unfinished=1)
    return SimpleNamespace(metrics=None), generation, SimpleNamespace(arrived=lambda: None)


REQUESTS = [SimpleNamespace(prompt_ids=(1,) * 16)]


def _chat_reply() -> StreamReply:
    from fermi.server.chunks import ChatChunker

    chunker = ChatChunker("chatcmpl-" + "0" * 32, 1, "tiny", 1, False, "fermi-0-torch-cpu-0")
    return StreamReply(*_stubs(), chunker, REQUESTS, 1, True)


def _responses_body(tokens: int, seed: int) -> dict:
    return {
        "input": QUESTION,
        "max_output_tokens": tokens,
        "seed": seed,
        "ignore_eos": True,
        "reasoning": {"effort": "none"},
        "stream": True,
    }


def _responses_parse(event: bytes) -> str | int | None:
    data = _data(event)
    if data is None:
        return None
    kind = data["type"]
    if kind == "response.output_text.delta" and data["delta"]:
        return "content"
    if kind in ("response.completed", "response.incomplete"):
        return data["response"]["usage"]["output_tokens"]
    return None


def _responses_reply() -> StreamReply:
    from fermi.server.responses import ResponsesStreamReply, ResponseWriter
    from fermi.server.responses_protocol import ResponseBody, TextEcho

    head = ResponseBody(
        id="resp_" + "0" * 32,
        created_at=1,
        status="in_progress",
        model="tiny",
        text=TextEcho({"type": "text"}),
    )
    return ResponsesStreamReply(*_stubs(), ResponseWriter(head, stream=True), REQUESTS)


def _messages_body(tokens: int, seed: int) -> dict:
    # No "thinking" field: off, as on Anthropic's API (chat's "thinking": "off").
    return {
        "model": "tiny",  # required here: the served id (the checkpoint's folder name)
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": tokens,
        "seed": seed,
        "ignore_eos": True,
        "stream": True,
    }


def _messages_parse(event: bytes) -> str | int | None:
    data = _data(event)
    if data is None:
        return None
    kind = data["type"]
    if kind == "content_block_delta" and data["delta"]["type"] == "text_delta":
        return "content" if data["delta"]["text"] else None
    if kind == "message_delta":
        return data["usage"]["output_tokens"]
    return None


def _messages_reply() -> StreamReply:
    from fermi.server.anthropic import MessageChunker, MessageStream

    chunker = MessageChunker("msg_" + "0" * 32, "tiny", 16)
    return MessageStream(*_stubs(), chunker, REQUESTS[0], 1 << 20)


# chat first: every other endpoint is compared with it.
ENDPOINTS: dict[str, Endpoint] = {
    "chat": Endpoint("/v1/chat/completions", _chat_body, _chat_parse, _chat_reply),
    "responses": Endpoint("/v1/responses", _responses_body, _responses_parse, _responses_reply),
    "messages": Endpoint("/v1/messages", _messages_body, _messages_parse, _messages_reply),
}


# -- through the server --------------------------------------------------------------------


def stream(port: int, endpoint: Endpoint, tokens: int, seed: int) -> dict:
    """POST one streamed request on a blocking socket, noting only when each piece arrived;
    the events are parsed afterwards. Returns the content events' arrival times, the end of
    the body and the output tokens the stream reported."""
    payload = json.dumps(endpoint.body(tokens, seed)).encode()
    head = (
        f"POST {endpoint.path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    pieces: list[tuple[float, bytes]] = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        sock.sendall(head + payload)
        while data := sock.recv(1 << 16):
            pieces.append((time.perf_counter(), data))
    raw = b"".join(data for _, data in pieces)
    if not raw.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{endpoint.path}: {raw[:300]!r}")
    # Where each body byte arrived: walk the chunked encoding over the received pieces.
    arrivals, ends, total = [], [], 0
    for at, data in pieces:
        total += len(data)
        arrivals.append(at)
        ends.append(total)
    pos = raw.index(b"\r\n\r\n") + 4
    content, reported, buffer, last = [], None, b"", start
    while True:
        line_end = raw.index(b"\r\n", pos)
        size = int(raw[pos:line_end], 16)
        if size == 0:
            break
        chunk_end = line_end + 2 + size
        at = next(a for a, e in zip(arrivals, ends, strict=True) if e >= chunk_end)
        buffer += raw[line_end + 2 : chunk_end]
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            kind = endpoint.parse(event)
            if kind == "content":
                content.append(at)
            elif isinstance(kind, int):
                reported = kind
        last = at
        pos = chunk_end + 2
    if reported != tokens:
        raise RuntimeError(f"{endpoint.path}: {reported} tokens reported, {tokens} asked")
    return {"start": start, "content": content, "end": last, "tokens": reported}


def through_server(port: int, names: list[str], tokens: int, repeats: int) -> dict:
    pid = server_worker_pid(port)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    busy0, total0 = machine_jiffies()
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        if (rep // len(names)) % 2:
            order = order[::-1]
        for name in order:
            before = thread_cpu_ns(pid)
            run = stream(port, ENDPOINTS[name], tokens, seed=rep)
            cpu = cpu_by_role(pid, before, thread_cpu_ns(pid))
            tpot = (run["end"] - run["content"][0]) / (tokens - 1)
            runs[name].append(
                {
                    "tpot": tpot,
                    "engine_cpu": cpu["engine"] / tokens,
                    "loop_cpu": cpu["loop"] / tokens,
                    "other_cpu": cpu["other"] / tokens,
                    "cpu": sum(cpu.values()) / tokens,
                    "events": len(run["content"]),
                }
            )
            print(
                f"{rep:2} {name:10} tpot {tpot * 1e6:7.1f} us  cpu/token engine "
                f"{cpu['engine'] / tokens * 1e6:7.1f} all {sum(cpu.values()) / tokens * 1e6:7.1f}"
            )
    busy1, total1 = machine_jiffies()
    out: dict = {
        "tokens": tokens,
        "repeats": repeats,
        "machine_busy_fraction": round((busy1 - busy0) / max(1, total1 - total0), 3),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    base = runs[names[0]]
    for name in names:
        rs = runs[name]
        entry = {
            key + "_us": round(statistics.median(r[key] for r in rs) * 1e6, 1)
            for key in ("tpot", "engine_cpu", "loop_cpu", "other_cpu", "cpu")
        }
        entry["content_events"] = statistics.median(r["events"] for r in rs)
        if name != names[0]:
            for key in ("tpot", "engine_cpu", "cpu"):
                diffs = sorted((r[key] - b[key]) * 1e6 for r, b in zip(rs, base, strict=True))
                entry[f"{key}_minus_{names[0]}_us"] = round(statistics.median(diffs), 1)
                entry[f"{key}_minus_{names[0]}_range_us"] = [
                    round(diffs[0], 1),
                    round(diffs[-1], 1),
                ]
        out[name] = entry
    return out


# -- the formatting alone ------------------------------------------------------------------

WORDS = [" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", "."]


def _cold(ops: int, x: torch.Tensor) -> None:
    for _ in range(ops):
        x = x @ x
        x = x / x.norm()


def formatting(names: list[str], tokens: int, streams: int, cold_ops: int) -> dict:
    """Median ``StreamReply.feed`` time per text delta, hot and after ``cold_ops`` torch ops;
    the streams of each endpoint alternate, so drifts hit every endpoint alike."""
    x = torch.randn(256, 256)  # 256 KB: a few ops push the hot path's data out of L2
    samples: dict[str, dict[str, list[float]]] = {n: {"hot": [], "cold": []} for n in names}
    deltas = [Delta(text=WORDS[i % len(WORDS)], token_ids=[i]) for i in range(tokens)]
    last = Delta(token_ids=[0], finish_reason="length", usage=Usage(16, tokens + 1))
    clock = time.perf_counter_ns
    for _ in range(streams):
        for name in names:
            for mode in ("hot", "cold"):
                reply = ENDPOINTS[name].reply()
                reply.opening()
                feed, out = reply.feed, samples[name][mode]
                for delta in deltas:
                    if mode == "cold":
                        _cold(cold_ops, x)
                    t0 = clock()
                    feed(0, delta)
                    out.append(clock() - t0)
                feed(0, last)
    result: dict = {"tokens_per_stream": tokens, "streams": streams, "cold_torch_ops": cold_ops}
    for name in names:
        result[name] = {
            f"{mode}_feed_us": round(statistics.median(samples[name][mode]) / 1e3, 2)
            for mode in ("hot", "cold")
        }
    for name in names[1:]:
        for mode in ("hot", "cold"):
            diff = result[name][f"{mode}_feed_us"] - result[names[0]][f"{mode}_feed_us"]
            result[name][f"{mode}_minus_{names[0]}_us"] = round(diff, 2)
    return result


def event_sizes(names: list[str]) -> dict[str, int]:
    """Bytes of one text-delta event of each endpoint (what goes on the wire per token)."""
    sizes = {}
    for name in names:
        reply = ENDPOINTS[name].reply()
        reply.opening()
        reply.feed(0, Delta(text=" fox", token_ids=[1]))
        sizes[name] = len(reply.feed(0, Delta(text=" fox", token_ids=[2])))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15, help="server rounds")
    parser.add_argument("--format-streams", type=int, default=20)
    parser.add_argument("--cold-ops", type=int, default=20)
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "perf/results/cpu_server_apis.json")
    args = parser.parse_args()
    names = args.endpoints.split(",")
    if names[0] != "chat":
        raise SystemExit("the first endpoint is the baseline: start --endpoints with chat")
    torch.set_num_threads(1)
    results = {
        "benchmark": "per-token server overhead of each streaming API vs chat completions",
        "model": "tests/tiny.py random Qwen3 (tiny)",
        "machine": machine(),
        "command": " ".join(["perf/bench_server_apis.py", *sys.argv[1:]]),
        "event_bytes": event_sizes(names),
        "formatting": formatting(names, args.tokens, args.format_streams, args.cold_ops),
    }
    print(json.dumps(results["formatting"], indent=1))
    if not args.skip_server:
        tmp = Path(tempfile.mkdtemp(prefix="fermi-bench-apis-"))
        model = thinking_checkpoint(tmp / "tiny", max_positions=SEQ_LEN)
        serve = ["--device", "cpu", "--max-seq-len", str(SEQ_LEN), "--max-batch", "4"]
        with running_server(model, *serve, log=tmp / "serve.log") as base:
            port = int(base.rsplit(":", 1)[1])
            for name in names:  # warm-up
                stream(port, ENDPOINTS[name], 8, 0)
            results["server"] = through_server(port, names, args.tokens, args.repeats)
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
