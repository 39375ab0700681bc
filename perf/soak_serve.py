"""Soak test: a real ``fermi serve`` under mixed, partly hostile traffic for a fixed time.

    .venv/bin/python perf/soak_serve.py --minutes 20 --concurrency 6 --seed 0 \
        --out perf/results/cpu_soak_serve.json

(``--minutes 2 --out perf/results/cpu_soak_serve_smoke.json`` for a short run;
``--max-tokens 8`` caps every normal request's max_tokens, for many more requests an hour;
``--mix chat=1,malformed=1`` runs only the kinds named, with those weights, to find which
kind a memory growth comes with.)

Starts ``fermi serve --model smollm2-135m --device cpu`` (FERMI_OFFLINE=1, a free port,
the server's defaults otherwise), warms every kind of request up twice, asks one greedy
question (temperature 0) and one seeded sampled one, then runs ``--concurrency`` client
tasks for ``--minutes``, each drawing its next request from a seeded random mix:

- chat completions (openai SDK), streamed or not, max_tokens 8..128, temperature 0 or 0.8
  with a seed, sometimes n=2, logprobs/top_logprobs, stop strings; structured outputs
  (``response_format`` json_schema, a small object); tools with a forced function and
  with ``tool_choice: none``;
- ``/v1/completions`` (openai SDK), ``/v1/embeddings`` (openai SDK), ``/v1/responses``
  (openai SDK, streamed or not), ``/v1/messages`` (anthropic SDK, streamed or not);
- hostile traffic (raw httpx): streams closed after 1-3 chunks, a client timeout shorter
  than the reply, malformed JSON and invalid fields, prompts over the context, unknown
  model / path / method. Each has its expected status.

What the server's model cannot do is probed once before the load (SmolLM2 is no
embedding checkpoint, and its chat template renders no tools): such a request then counts
as an expected 4xx when it gets the documented 400, and as unexpected otherwise.

Every reply is checked (status, shape, n choices, stop strings absent, top_logprobs
counts, JSON that parses for a schema'd reply that stopped) and counted by outcome: ok,
expected_4xx, aborted_by_client (a hostile stream cut or timeout that went as planned),
and the unexpected ones: unexpected_4xx, 5xx, bad_reply, client_error, client_timeout.

Every ``--sample-every`` seconds (15): the resident memory (VmRSS, RssAnon), threads and
open fds of the Granian worker (the process that holds the model) and of the whole
process tree, the worker's CPU seconds, ``/metrics`` (requests running / waiting, replica
load, aborted, http errors, successes by reason, tokens), ``/health``'s status and time,
the load average, and per interval: requests by outcome, total-time and TTFT percentiles.

At the end: wait for /metrics to show nothing running, waiting or routed; the greedy and
the seeded question again (same text expected); then SIGTERM to ``fermi serve`` and the
seconds until every process of the tree has exited. RSS growth is the least-squares slope
of the worker's RSS against requests completed, over the samples of the second half.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import anthropic
import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]

GREEDY_PROMPT = "Name three primary colours and say one short thing about each."
SEEDED_PROMPT = "Write two sentences about a lighthouse keeper."
TOPICS = [
    "the water cycle",
    "how a bicycle works",
    "the history of tea",
    "why cats purr",
    "prime numbers",
    "the moon landing",
    "photosynthesis",
    "a good breakfast",
    "volcanoes",
    "learning to swim",
    "the Roman empire",
    "how bread rises",
    "a rainy day in Paris",
    "electric cars",
    "the game of chess",
    "honey bees",
]
CITIES = ["Paris", "Oslo", "Lima", "Pune"]
STOPS = [".", "\n", " the", "!", ",", " and"]
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
UNEXPECTED = ("unexpected_4xx", "5xx", "bad_reply", "client_error", "client_timeout")
OUTCOMES = ("ok", "expected_4xx", "aborted_by_client", *UNEXPECTED)


# -- processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(entry.name))
    return out


def tree(pid: int) -> list[int]:
    kids, out, todo = children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def proc_status(pid: int) -> dict:
    """VmRSS, RssAnon, RssFile (KiB), threads, fds and CPU seconds of one process."""
    out = {"pid": pid}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0])
            elif key == "Threads":
                out["threads"] = int(value)
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out["cpu_s"] = round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, ValueError):
        out["gone"] = True
    return out


def thread_names(pid: int) -> dict[str, int]:
    names: dict[str, int] = {}
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                name = Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()
                names[name] = names.get(name, 0) + 1
    except OSError:
        pass
    return dict(sorted(names.items()))


def find_worker(main_pid: int) -> int:
    """The Granian worker: the spawned child that holds the model (largest RSS)."""
    kids = [p for p in tree(main_pid) if p != main_pid and "spawn_main" in cmdline(p)]
    if not kids:
        raise RuntimeError("no Granian worker under the server process")
    return max(kids, key=lambda p: proc_status(p).get("VmRSS", 0))


def git_commit() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty_files": git("status", "--short").splitlines(),
    }


def machine() -> dict:
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "granian", "msgspec", "openai", "anthropic", "httpx"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[name] = md.version(name)
    return {
        "cpu": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        **versions,
    }


# -- metrics -----------------------------------------------------------------------------

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def parse_metrics(text: str) -> dict:
    """The gauges and counters that show slots, queue, errors and tokens."""
    want = {
        "fermi:num_requests_running": "running",
        "fermi:num_requests_waiting": "waiting",
        "fermi:replica_load": "replica_load",
        "fermi:replica_requests_total": "replica_requests_total",
        "fermi:requests_aborted_total": "aborted_total",
        "fermi:prompt_tokens_total": "prompt_tokens_total",
        "fermi:generation_tokens_total": "generation_tokens_total",
        "fermi:warmup_in_progress": "warmup_in_progress",
    }
    out: dict = {"http_errors_total": {}, "request_success_total": {}}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name in want:
            out[want[name]] = out.get(want[name], 0) + value
        elif name == "fermi:http_errors_total":
            status = re.search(r'status="(\d+)"', labels).group(1)
            out["http_errors_total"][status] = value
        elif name == "fermi:request_success_total":
            reason = re.search(r'finished_reason="([^"]*)"', labels).group(1)
            out["request_success_total"][reason] = value
    return out


# -- results ------------------------------------------------------------------------------


@dataclass
class Tally:
    """Every finished request: (end time, kind, outcome, total s, TTFT s or None)."""

    events: list = field(default_factory=list)
    examples: dict = field(default_factory=dict)  # outcome -> list of examples
    by_kind: dict = field(default_factory=dict)  # kind -> outcome -> count

    def add(self, kind, outcome, total, ttft=None, example=None) -> None:
        self.events.append((time.monotonic(), kind, outcome, total, ttft))
        counts = self.by_kind.setdefault(kind, {})
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome in UNEXPECTED and example is not None:
            kept = self.examples.setdefault(outcome, [])
            if len(kept) < 8:
                kept.append({"kind": kind, **example})


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))] * 1000, 1)


def latency(values: list[float]) -> dict:
    return {
        "n": len(values),
        "p50_ms": pct(values, 0.5),
        "p90_ms": pct(values, 0.9),
        "p99_ms": pct(values, 0.99),
        "max_ms": pct(values, 1.0),
    }


def interval_stats(events: list) -> dict:
    counts = {o: 0 for o in OUTCOMES}
    for e in events:
        counts[e[2]] += 1
    good = [e for e in events if e[2] == "ok"]
    return {
        "requests": len(events),
        "outcomes": {k: v for k, v in counts.items() if v},
        "total_time": latency([e[3] for e in good]),
        "ttft_streams": latency([e[4] for e in good if e[4] is not None]),
    }


def slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3 or max(xs) == min(xs):
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


# -- the traffic ---------------------------------------------------------------------------


class BadReplyError(Exception):
    """A 2xx reply that is not what was asked for."""


@dataclass
class Ctx:
    base: str
    model: str
    oai: openai.AsyncOpenAI
    anth: anthropic.AsyncAnthropic
    http: httpx.AsyncClient
    tally: Tally
    supports_tools: bool = True
    supports_embeddings: bool = True
    timeout: float = 180.0


def short_text(text: str | None, n: int = 300) -> str | None:
    return None if text is None else text[:n]


def messages(rng: random.Random) -> list[dict]:
    topic = rng.choice(TOPICS)
    out = []
    if rng.random() < 0.3:
        out.append({"role": "system", "content": "You are a concise assistant."})
    if rng.random() < 0.25:
        out += [
            {"role": "user", "content": f"Hi, I want to learn about {topic}."},
            {"role": "assistant", "content": "Sure, what would you like to know?"},
        ]
    ask = rng.choice(
        [
            "Tell me about {}.",
            "Explain {} to a child.",
            "Give three facts about {}.",
            "Write a short poem about {}.",
            "What is surprising about {}?",
        ]
    )
    out.append({"role": "user", "content": ask.format(topic)})
    return out


TOKENS_CAP = [128]  # --max-tokens: the most a normal request asks for


def tokens(rng: random.Random, lo: int, hi: int) -> int:
    hi = min(hi, TOKENS_CAP[0])
    return rng.randint(min(lo, hi), hi)


def sampling(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        return {"temperature": 0.0}
    return {"temperature": 0.8, "seed": rng.randrange(1 << 31)}


async def chat(ctx: Ctx, rng: random.Random, stream: bool) -> tuple[str, float | None]:
    n = 2 if rng.random() < 0.2 else 1
    max_tokens = tokens(rng, 8, 128)
    kw: dict = {
        "model": ctx.model,
        "messages": messages(rng),
        "max_tokens": max_tokens,
        **sampling(rng),
    }
    if n > 1:
        kw["n"] = n
    top = None
    if rng.random() < 0.3:
        top = rng.randint(0, 5)
        kw.update(logprobs=True, top_logprobs=top)
    stop = None
    if rng.random() < 0.3:
        stop = rng.sample(STOPS, rng.randint(1, 2))
        kw["stop"] = stop
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    entries: list = []
    ttft = None
    t0 = time.monotonic()
    if stream:
        usage = None
        s = await ctx.oai.chat.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}
        )
        async for chunk in s:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                if c.delta.content:
                    if ttft is None:
                        ttft = time.monotonic() - t0
                    texts[c.index] = texts.get(c.index, "") + c.delta.content
                if c.finish_reason:
                    reasons[c.index] = c.finish_reason
                if c.logprobs and c.logprobs.content:
                    entries += c.logprobs.content
        if usage is None:
            raise BadReplyError("no usage chunk")
    else:
        r = await ctx.oai.chat.completions.create(**kw)
        usage = r.usage
        for c in r.choices:
            texts[c.index] = c.message.content or ""
            reasons[c.index] = c.finish_reason
            if c.logprobs and c.logprobs.content:
                entries += c.logprobs.content
        if len(r.choices) != n:
            raise BadReplyError(f"{len(r.choices)} choices for n={n}")
    if sorted(reasons) != list(range(n)) or any(
        v not in ("stop", "length") for v in reasons.values()
    ):
        raise BadReplyError(f"finish reasons {reasons} for n={n}")
    if usage.completion_tokens > n * max_tokens:
        raise BadReplyError(f"{usage.completion_tokens} completion tokens for n={n} x {max_tokens}")
    if stop and any(s in t for s in stop for t in texts.values()):
        raise BadReplyError(f"a stop string {stop!r} in the text {list(texts.values())!r}")
    if top is not None and any(len(e.top_logprobs) != top for e in entries):
        raise BadReplyError(
            f"top_logprobs counts {[len(e.top_logprobs) for e in entries]} != {top}"
        )
    if top is not None and usage.completion_tokens and not entries:
        raise BadReplyError("logprobs asked, none returned")
    return "ok", ttft


async def structured(ctx: Ctx, rng: random.Random) -> tuple[str, float | None]:
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
    }
    r = await ctx.oai.chat.completions.create(
        model=ctx.model,
        max_tokens=tokens(rng, 48, 128),
        response_format=fmt,
        **sampling(rng),
        messages=[
            {
                "role": "user",
                "content": f"Invent a person who likes {rng.choice(TOPICS)}. Reply in JSON.",
            }
        ],
    )
    c = r.choices[0]
    if c.finish_reason == "stop":
        try:
            obj = json.loads(c.message.content)
        except (TypeError, json.JSONDecodeError) as e:
            raise BadReplyError(f"schema'd reply is not JSON: {c.message.content!r}") from e
        if set(obj) != {"name", "age", "city"} or not isinstance(obj["age"], int):
            raise BadReplyError(f"reply does not follow the schema: {obj!r}")
    elif c.finish_reason != "length":
        raise BadReplyError(f"finish_reason {c.finish_reason}")
    return "ok", None


async def tools(ctx: Ctx, rng: random.Random) -> tuple[str, float | None]:
    forced = rng.random() < 0.6
    choice = {"type": "function", "function": {"name": "get_weather"}} if forced else "none"
    kw = {
        "model": ctx.model,
        "max_tokens": tokens(rng, 32, 96),
        "tools": [WEATHER_TOOL],
        "tool_choice": choice,
        **sampling(rng),
        "messages": [
            {
                "role": "user",
                "content": f"What is the weather in {rng.choice(CITIES)}?",
            }
        ],
    }
    if forced and not ctx.supports_tools:
        try:
            await ctx.oai.chat.completions.create(**kw)
        except openai.BadRequestError as e:
            if "tools" in str(e.body):
                return "expected_4xx", None
            raise
        raise BadReplyError("a forced tool call on a template without tools was served")
    r = await ctx.oai.chat.completions.create(**kw)
    c = r.choices[0]
    if forced:
        if c.finish_reason == "tool_calls":
            call = c.message.tool_calls[0]
            try:
                arguments = json.loads(call.function.arguments)
            except json.JSONDecodeError:
                arguments = {}
            if call.function.name != "get_weather" or "city" not in arguments:
                raise BadReplyError(f"tool call {call!r}")
        elif c.finish_reason != "length":
            raise BadReplyError(f"forced call ended with {c.finish_reason}")
    elif c.message.tool_calls:
        raise BadReplyError("tool_choice none made a call")
    return "ok", None


async def completions(ctx: Ctx, rng: random.Random) -> tuple[str, float | None]:
    prompts = [f"A short note on {rng.choice(TOPICS)}:" for _ in range(rng.choice([1, 1, 1, 2]))]
    max_tokens = tokens(rng, 8, 128)
    kw: dict = {
        "model": ctx.model,
        "prompt": prompts if len(prompts) > 1 else prompts[0],
        "max_tokens": max_tokens,
        **sampling(rng),
    }
    if rng.random() < 0.3:
        kw["logprobs"] = rng.randint(0, 3)
    if rng.random() < 0.3:
        kw["stop"] = rng.sample(STOPS, 1)
    ttft = None
    t0 = time.monotonic()
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    if rng.random() < 0.4:
        s = await ctx.oai.completions.create(**kw, stream=True)
        async for chunk in s:
            for c in chunk.choices:
                if c.text and ttft is None:
                    ttft = time.monotonic() - t0
                texts[c.index] = texts.get(c.index, "") + (c.text or "")
                if c.finish_reason:
                    reasons[c.index] = c.finish_reason
    else:
        r = await ctx.oai.completions.create(**kw)
        for c in r.choices:
            texts[c.index] = c.text
            reasons[c.index] = c.finish_reason
    if sorted(reasons) != list(range(len(prompts))):
        raise BadReplyError(f"finish reasons {reasons} for {len(prompts)} prompts")
    if kw.get("stop") and any(kw["stop"][0] in t for t in texts.values()):
        raise BadReplyError(f"stop string {kw['stop']!r} in {list(texts.values())!r}")
    return "ok", ttft


async def embeddings(ctx: Ctx, rng: random.Random) -> tuple[str, float | None]:
    inputs = [f"A sentence about {rng.choice(TOPICS)}." for _ in range(rng.randint(1, 4))]
    try:
        r = await ctx.oai.embeddings.create(model=ctx.model, input=inputs)
    except openai.BadRequestError as e:
        if not ctx.supports_embeddings and "embedding checkpoint" in str(e.body):
            return "expected_4xx", None
        raise
    if len(r.data) != len(inputs):
        raise BadReplyError(f"{len(r.data)} vectors for {len(inputs)} inputs")
    return "ok", None


async def responses(ctx: Ctx, rng: random.Random) -> tuple[str, float | None]:
    kw: dict = {
        "model": ctx.model,
        "input": messages(rng)[-1]["content"],
        "max_output_tokens": tokens(rng, 16, 128),
        **{k: v for k, v in sampling(rng).items() if k != "seed"},
    }
    if rng.random() < 0.4:
        kw["instructions"] = "Answer briefly."
    ttft = None
    t0 = time.monotonic()
    if rng.random() < 0.5:
        last = None
        s = await ctx.oai.responses.create(**kw, stream=True)
        async for ev in s:
            if ev.type == "response.output_text.delta" and ttft is None:
                ttft = time.monotonic() - t0
            last = ev
        if last is None or last.type not in ("response.completed", "response.incomplete"):
            raise BadReplyError(f"stream ended with {getattr(last, 'type', None)}")
        status = last.response.status
    else:
        r = await ctx.oai.responses.create(**kw)
        status = r.status
        if not r.output:
            raise BadReplyError("empty output")
    if status not in ("completed", "incomplete"):
        raise BadReplyError(f"status {status}")
    return "ok", ttft


async def anthropic_messages(ctx: Ctx, rng: random.Random) -> tuple[str, float | None]:
    msgs = [m for m in messages(rng) if m["role"] != "system"]
    kw: dict = {
        "model": ctx.model,
        "max_tokens": tokens(rng, 8, 128),
        "messages": msgs,
        "extra_body": {"temperature": rng.choice([0.0, 0.8])},  # not in the SDK's signature
    }
    if rng.random() < 0.4:
        kw["system"] = "You are a concise assistant."
    if rng.random() < 0.3:
        kw["stop_sequences"] = rng.sample(STOPS, 1)
    ttft = None
    t0 = time.monotonic()
    if rng.random() < 0.5:
        async with ctx.anth.messages.stream(**kw) as s:
            async for _text in s.text_stream:
                if ttft is None:
                    ttft = time.monotonic() - t0
            msg = await s.get_final_message()
    else:
        msg = await ctx.anth.messages.create(**kw)
    if msg.stop_reason not in ("end_turn", "max_tokens", "stop_sequence"):
        raise BadReplyError(f"stop_reason {msg.stop_reason}")
    if kw.get("stop_sequences") and any(kw["stop_sequences"][0] in b.text for b in msg.content):
        raise BadReplyError(f"stop sequence {kw['stop_sequences']!r} in the text")
    return "ok", ttft


def stream_body(ctx: Ctx, rng: random.Random) -> tuple[str, dict]:
    path = rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"])
    body: dict = {"model": ctx.model, "stream": True, "temperature": 0.8}
    if path == "/v1/completions":
        body.update(prompt=f"A long story about {rng.choice(TOPICS)}:", max_tokens=128)
    elif path == "/v1/responses":
        body.update(input=f"Tell a long story about {rng.choice(TOPICS)}.", max_output_tokens=128)
    else:
        body.update(
            messages=[
                {"role": "user", "content": f"Tell a long story about {rng.choice(TOPICS)}."}
            ],
            max_tokens=128,
        )
    return path, body


async def abort_stream(ctx: Ctx, rng: random.Random) -> tuple[str, float | None]:
    """Close a stream after 1-3 chunks."""
    path, body = stream_body(ctx, rng)
    want = rng.randint(1, 3)
    got = 0
    async with (
        httpx.AsyncClient(base_url=ctx.base, timeout=ctx.timeout) as c,
        c.stream("POST", path, json=body) as r,
    ):
        if r.status_code != 200:
            await r.aread()
            return status_outcome(r, {200})
        async for _ in r.aiter_raw():
            got += 1
            if got >= want:
                break
    return ("aborted_by_client", None) if got >= want else ("bad_reply", None)


async def client_timeout(ctx: Ctx, rng: random.Random) -> tuple[str, float | None]:
    """A non-streamed (or streamed) reply that takes longer than the client waits."""
    body = {
        "model": ctx.model,
        "max_tokens": 128,
        "ignore_eos": True,
        "temperature": 0.8,
        "messages": [{"role": "user", "content": f"Tell a long story about {rng.choice(TOPICS)}."}],
    }
    wait = rng.uniform(0.2, 1.0)
    stream = rng.random() < 0.3
    if stream:
        body["stream"] = True
    try:
        async with httpx.AsyncClient(base_url=ctx.base) as c:
            async with asyncio.timeout(wait):
                if stream:
                    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        async for _ in r.aiter_raw():
                            pass
                else:
                    r = await c.post("/v1/chat/completions", json=body)
    except TimeoutError:
        return "aborted_by_client", None
    return status_outcome(r, {200})


def malformed_cases(model: str) -> list[tuple[str, str, bytes, set[int]]]:
    """(method, path, body, expected statuses)."""
    chat, comp = "/v1/chat/completions", "/v1/completions"
    ok_msg = [{"role": "user", "content": "Hi"}]

    def j(**kw) -> bytes:
        return json.dumps({"model": model, **kw}).encode()

    return [
        ("POST", chat, b'{"model": "x", "messages": [{"role": "user", "content": "Hi"}', {400}),
        ("POST", chat, b"this is not json", {400}),
        ("POST", chat, b"", {400}),
        ("POST", chat, b'{"messages": "hello"}', {400}),
        ("POST", chat, j(messages=[{"role": "wizard", "content": "Hi"}]), {400}),
        ("POST", chat, j(messages=ok_msg, temperature=-1), {400}),
        ("POST", chat, j(messages=ok_msg, temperature="hot"), {400}),
        ("POST", chat, j(messages=ok_msg, n=0), {400}),
        ("POST", chat, j(messages=ok_msg, max_tokens=-5), {400}),
        ("POST", chat, j(messages=ok_msg, logprobs=True, top_logprobs=50), {400}),
        ("POST", chat, j(messages=ok_msg, stop=[f"s{i}" for i in range(20)]), {400}),
        ("POST", chat, j(messages=[]), {400}),
        ("POST", chat, j(messages=ok_msg, seed=2**70), {400}),
        ("POST", chat, j(messages=ok_msg, functions=[{"name": "f"}]), {400}),
        ("POST", chat, j(messages=ok_msg, response_format={"type": "json_schema"}), {400}),
        ("POST", chat, json.dumps({"model": "no-such-model", "messages": ok_msg}).encode(), {404}),
        ("POST", comp, j(max_tokens=4), {400}),
        ("POST", comp, j(prompt="Hi", max_tokens="many"), {400}),
        ("POST", "/v1/messages", j(messages=ok_msg), {400}),
        (
            "POST",
            "/v1/messages",
            j(max_tokens=8, messages=[{"role": "system", "content": "x"}]),
            {400},
        ),
        ("POST", "/v1/responses", j(input=5), {400}),
        ("POST", "/v1/responses", j(input="Hi", previous_response_id="resp_1"), {400}),
        ("POST", "/v1/embeddings", j(input=[]), {400}),
        ("GET", chat, b"", {405}),
        ("POST", "/v1/no/such/path", j(), {404}),
    ]


def status_outcome(r: httpx.Response, expected: set[int]) -> tuple[str, dict | None]:
    if r.status_code in expected:
        return ("ok" if r.status_code < 300 else "expected_4xx"), None
    example = {"status": r.status_code, "body": short_text(r.text)}
    if r.status_code >= 500:
        return "5xx", example
    if r.status_code >= 400:
        return "unexpected_4xx", example
    return "bad_reply", example


async def malformed(ctx: Ctx, rng: random.Random) -> tuple[str, float | None]:
    method, path, body, expected = rng.choice(malformed_cases(ctx.model))
    r = await ctx.http.request(
        method, path, content=body, headers={"content-type": "application/json"}
    )
    outcome, example = status_outcome(r, expected)
    if outcome == "expected_4xx" and r.status_code != 405:
        err = r.json().get("error")
        if not isinstance(err, dict) or "message" not in err:
            return "bad_reply", {
                "status": r.status_code,
                "body": short_text(r.text),
                "request": short_text(body.decode(errors="replace"), 200),
            }
    if example is not None:
        example["request"] = f"{method} {path} " + (
            short_text(body.decode(errors="replace"), 200) or ""
        )
    return outcome, example


async def oversized(ctx: Ctx, rng: random.Random) -> tuple[str, float | None]:
    words = " ".join(rng.choice(TOPICS) for _ in range(rng.randint(1500, 3000)))  # 4.5k-9k tokens
    case = rng.choice(["chat", "completions", "messages", "responses", "max_tokens"])
    if case == "chat":
        path, body = (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": words}], "max_tokens": 8},
        )
    elif case == "completions":
        path, body = "/v1/completions", {"prompt": words, "max_tokens": 8}
    elif case == "messages":
        path, body = (
            "/v1/messages",
            {"messages": [{"role": "user", "content": words}], "max_tokens": 8},
        )
    elif case == "responses":
        path, body = "/v1/responses", {"input": words, "max_output_tokens": 16}
    else:  # a short prompt whose max_tokens passes the context
        path, body = (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5000},
        )
    r = await ctx.http.post(path, json={"model": ctx.model, **body})
    outcome, example = status_outcome(r, {400})
    if outcome == "expected_4xx":
        text = r.text
        if "context" not in text and "tokens" not in text:
            return "bad_reply", {"status": r.status_code, "body": short_text(text), "case": case}
    if example is not None:
        example["case"] = case
    return outcome, example


KINDS = {  # name -> (weight, runner)
    "chat": (20, lambda c, r: chat(c, r, False)),
    "chat_stream": (20, lambda c, r: chat(c, r, True)),
    "structured": (7, structured),
    "tools": (5, tools),
    "completions": (10, completions),
    "embeddings": (3, embeddings),
    "responses": (8, responses),
    "messages": (8, anthropic_messages),
    "abort_stream": (7, abort_stream),
    "client_timeout": (4, client_timeout),
    "malformed": (6, malformed),
    "oversized": (2, oversized),
}


async def one(ctx: Ctx, kind: str, rng: random.Random) -> None:
    t0 = time.monotonic()
    example = None
    ttft = None
    try:
        async with asyncio.timeout(ctx.timeout):
            outcome, extra = await KINDS[kind][1](ctx, rng)
        if isinstance(extra, dict):
            example = extra
        else:
            ttft = extra
    except BadReplyError as e:
        outcome, example = "bad_reply", {"error": str(e)[:400]}
    except (openai.APIStatusError, anthropic.APIStatusError) as e:
        status = e.status_code
        outcome = "5xx" if status >= 500 else "unexpected_4xx"
        example = {"status": status, "body": short_text(e.response.text)}
    except (
        openai.APITimeoutError,
        anthropic.APITimeoutError,
        TimeoutError,
        httpx.TimeoutException,
    ) as e:
        outcome, example = "client_timeout", {"error": f"{type(e).__name__}: {e}"[:300]}
    except (openai.APIError, anthropic.APIError, httpx.HTTPError, OSError) as e:
        # openai raises APIError for an SSE error event mid-stream
        outcome, example = (
            "client_error",
            {
                "error": f"{type(e).__name__}: {e}"[:300],
                "body": short_text(str(getattr(e, "body", None))),
            },
        )
    except Exception as e:
        outcome, example = "client_error", {"error": f"{type(e).__name__}: {e}"[:300]}
    ctx.tally.add(kind, outcome, time.monotonic() - t0, ttft, example)


async def client(ctx: Ctx, index: int, seed: int, deadline: float) -> None:
    rng = random.Random(seed * 1000 + index)
    names = list(KINDS)
    weights = [KINDS[k][0] for k in names]
    while time.monotonic() < deadline:
        await one(ctx, rng.choices(names, weights)[0], rng)


# -- sampling ---------------------------------------------------------------------------


async def sample(ctx: Ctx, main_pid: int, worker: int, t_start: float, since: int) -> dict:
    now = time.monotonic()
    procs = [proc_status(p) for p in tree(main_pid)]
    w = proc_status(worker)
    w["thread_names"] = thread_names(worker)
    t0 = time.monotonic()
    try:
        h = await ctx.http.get("/health", timeout=30)
        health = {"status": h.status_code, "ms": round((time.monotonic() - t0) * 1000, 1)}
    except httpx.HTTPError as e:
        health = {"error": f"{type(e).__name__}: {e}"}
    try:
        metrics = parse_metrics((await ctx.http.get("/metrics", timeout=30)).text)
    except httpx.HTTPError as e:
        metrics = {"error": f"{type(e).__name__}: {e}"}
    events = ctx.tally.events
    return {
        "t_s": round(now - t_start, 1),
        "requests_done": len(events),
        "worker": {k: v for k, v in w.items() if k != "pid"},
        "tree": {
            "processes": len(procs),
            "VmRSS": sum(p.get("VmRSS", 0) for p in procs),
            "threads": sum(p.get("threads", 0) for p in procs),
            "fds": sum(p.get("fds", 0) for p in procs),
        },
        "metrics": metrics,
        "health": health,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "interval": interval_stats(events[since:]),
    }


# -- checks -----------------------------------------------------------------------------


async def greedy(ctx: Ctx) -> str:
    r = await ctx.oai.chat.completions.create(
        model=ctx.model,
        messages=[{"role": "user", "content": GREEDY_PROMPT}],
        temperature=0,
        max_tokens=64,
    )
    return r.choices[0].message.content


async def seeded(ctx: Ctx) -> str:
    r = await ctx.oai.chat.completions.create(
        model=ctx.model,
        messages=[{"role": "user", "content": SEEDED_PROMPT}],
        temperature=0.8,
        seed=1234,
        max_tokens=64,
    )
    return r.choices[0].message.content


async def probe(ctx: Ctx) -> dict:
    """What this model serves: tools in its template, embeddings."""
    out = {}
    r = await ctx.http.post(
        "/v1/chat/completions",
        json={
            "model": ctx.model,
            "max_tokens": 8,
            "tools": [WEATHER_TOOL],
            "tool_choice": "required",
            "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        },
    )
    ctx.supports_tools = r.status_code == 200
    out["tools"] = {"status": r.status_code, "body": short_text(r.text, 400)}
    r = await ctx.http.post("/v1/embeddings", json={"model": ctx.model, "input": "hello"})
    ctx.supports_embeddings = r.status_code == 200
    out["embeddings"] = {"status": r.status_code, "body": short_text(r.text, 400)}
    return out


async def settle(ctx: Ctx, limit: float = 60.0) -> dict:
    """Poll /metrics until nothing runs, waits or is routed; the last reading and the time."""
    t0 = time.monotonic()
    while True:
        m = parse_metrics((await ctx.http.get("/metrics")).text)
        idle = (
            m.get("running", 0) == 0 and m.get("waiting", 0) == 0 and m.get("replica_load", 0) == 0
        )
        if idle or time.monotonic() - t0 > limit:
            return {"idle": idle, "seconds": round(time.monotonic() - t0, 2), "metrics": m}
        await asyncio.sleep(0.5)


def start_server(model: str, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [
        str(ROOT / ".venv/bin/fermi"),
        "serve",
        "--model",
        model,
        "--device",
        "cpu",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra,
    ]
    env = {**os.environ, "FERMI_OFFLINE": "1"}
    env.pop("FERMI_API_KEY", None)
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_healthy(proc: subprocess.Popen, base: str, log: Path, limit: float = 300) -> float:
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"fermi serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > limit:
            raise RuntimeError(f"fermi serve did not become healthy:\n{log.read_text()}")
        time.sleep(0.3)


def stop_server(proc: subprocess.Popen) -> dict:
    pids = tree(proc.pid)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
        main_exit = time.monotonic() - t0
    except subprocess.TimeoutExpired:
        main_exit = None
    while any(Path(f"/proc/{p}").exists() and "zombie" not in _state(p) for p in pids):
        if time.monotonic() - t0 > 60:
            break
        time.sleep(0.02)
    all_exit = time.monotonic() - t0
    left = [p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in _state(p)]
    if main_exit is None:
        proc.kill()
        proc.wait()
    return {
        "main_exit_s": None if main_exit is None else round(main_exit, 2),
        "all_processes_exit_s": round(all_exit, 2),
        "returncode": proc.returncode,
        "processes": len(pids),
        "still_running_after_60s": left,
    }


def _state(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line
    except OSError:
        pass
    return "zombie"  # gone


# -- main ------------------------------------------------------------------------------


async def run(args: argparse.Namespace, proc: subprocess.Popen, base: str, results: dict) -> None:
    tally = Tally()
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
    timeout = httpx.Timeout(args.request_timeout)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as http:
        ctx = Ctx(
            base=base,
            model=args.model,
            http=http,
            tally=tally,
            timeout=args.request_timeout,
            oai=openai.AsyncOpenAI(
                base_url=base + "/v1", api_key="none", max_retries=0, timeout=args.request_timeout
            ),
            anth=anthropic.AsyncAnthropic(
                base_url=base, api_key="none", max_retries=0, timeout=args.request_timeout
            ),
        )
        results["probe"] = await probe(ctx)
        worker = find_worker(proc.pid)
        results["worker_pid_cmdline"] = cmdline(worker)[:200]
        results["before_warmup"] = await sample(ctx, proc.pid, worker, time.monotonic(), 0)
        # warm-up: every kind a few times, one client, not counted in the soak
        wrng = random.Random(args.seed + 99)
        for _ in range(args.warmup_rounds):
            for kind in KINDS:
                await one(ctx, kind, wrng)
        results["warmup"] = {
            "requests": len(tally.events),
            "by_kind": tally.by_kind,
            "unexpected_examples": tally.examples,
        }
        await settle(ctx)
        results["greedy_start"] = await greedy(ctx)
        results["greedy_start_again"] = await greedy(ctx)
        results["seeded_start"] = await seeded(ctx)
        ctx.tally = tally = Tally()

        t_start = time.monotonic()
        deadline = t_start + args.minutes * 60
        series = [await sample(ctx, proc.pid, worker, t_start, 0)]
        since = 0
        tasks = [
            asyncio.create_task(client(ctx, i, args.seed, deadline))
            for i in range(args.concurrency)
        ]
        next_at = t_start + args.sample_every
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=max(0.0, next_at - time.monotonic()))
            if time.monotonic() >= next_at:
                n = len(tally.events)
                series.append(await sample(ctx, proc.pid, worker, t_start, since))
                since = n
                s = series[-1]
                print(
                    f"t={s['t_s']:7.1f}s req={s['requests_done']:5d} "
                    f"rss={s['worker']['VmRSS'] / 1024:7.1f}MiB thr={s['worker']['threads']} "
                    f"fds={s['worker']['fds']} run={s['metrics'].get('running')} "
                    f"wait={s['metrics'].get('waiting')} load={s['load_average'][0]} "
                    f"{s['interval']['outcomes']}",
                    flush=True,
                )
                next_at += args.sample_every
        for t in tasks:
            t.result()
        load_end = time.monotonic()
        results["load_seconds"] = round(load_end - t_start, 1)
        results["settle_after_load"] = await settle(ctx)
        series.append(await sample(ctx, proc.pid, worker, t_start, since))
        results["greedy_end"] = await greedy(ctx)
        results["seeded_end"] = await seeded(ctx)
        results["settle_at_end"] = await settle(ctx)
        results["series"] = series
        results["tally"] = tally
        results["t_start"] = t_start
        await ctx.oai.close()
        await ctx.anth.close()
    # every client connection closed: what the worker holds with one fresh one
    async with httpx.AsyncClient(base_url=base, timeout=timeout) as http:
        ctx.http = http
        await asyncio.sleep(1.0)
        results["after_clients_closed"] = await sample(
            ctx, proc.pid, worker, t_start, len(tally.events)
        )


def summarize(results: dict) -> dict:
    series = results["series"]
    tally: Tally = results.pop("tally")
    results.pop("t_start")
    load_s = results["load_seconds"]
    during = [s for s in series if s["t_s"] <= load_s + 1]
    mid = min(during, key=lambda s: abs(s["t_s"] - load_s / 2))
    second = [s for s in during if s["t_s"] >= load_s / 2]
    mib = 1 / 1024
    xs = [s["requests_done"] for s in second]
    rss = [s["worker"]["VmRSS"] * mib for s in second]
    anon = [s["worker"]["RssAnon"] * mib for s in second]
    k_rss, k_anon = slope(xs, rss), slope(xs, anon)
    t_rss = slope([s["t_s"] / 3600 for s in second], rss)
    counts = {o: 0 for o in OUTCOMES}
    for e in tally.events:
        counts[e[2]] += 1
    good = [e for e in tally.events if e[2] == "ok"]
    per_kind_latency = {}
    for kind in KINDS:
        ev = [e for e in good if e[1] == kind]
        if ev:
            per_kind_latency[kind] = {
                "total_time": latency([e[3] for e in ev]),
                "ttft": latency([e[4] for e in ev if e[4] is not None]),
            }
    first, last = series[0], series[-1]
    w = [s["worker"] for s in series]
    m_end = results["settle_at_end"]["metrics"]
    summary = {
        "requests": len(tally.events),
        "requests_per_minute": round(len(tally.events) / (load_s / 60), 1),
        "outcomes": counts,
        "unexpected_total": sum(counts[o] for o in UNEXPECTED),
        "by_kind": tally.by_kind,
        "unexpected_examples": tally.examples,
        "rss_worker_mib": {
            "start_after_warmup": round(first["worker"]["VmRSS"] * mib, 1),
            "middle": round(mid["worker"]["VmRSS"] * mib, 1),
            "middle_t_s": mid["t_s"],
            "end": round(last["worker"]["VmRSS"] * mib, 1),
            "max": round(max(x["VmRSS"] for x in w) * mib, 1),
            "before_warmup": round(results["before_warmup"]["worker"]["VmRSS"] * mib, 1),
            "peak_VmHWM_end": round(last["worker"].get("VmHWM", 0) * mib, 1),
        },
        "rss_anon_worker_mib": {
            "start_after_warmup": round(first["worker"]["RssAnon"] * mib, 1),
            "middle": round(mid["worker"]["RssAnon"] * mib, 1),
            "end": round(last["worker"]["RssAnon"] * mib, 1),
        },
        "rss_tree_mib": {
            "start_after_warmup": round(first["tree"]["VmRSS"] * mib, 1),
            "end": round(last["tree"]["VmRSS"] * mib, 1),
        },
        "rss_growth_second_half": {
            "samples": len(second),
            "requests_span": [xs[0], xs[-1]] if xs else None,
            "vmrss_mib_per_1000_requests": None if k_rss is None else round(k_rss * 1000, 2),
            "rssanon_mib_per_1000_requests": None if k_anon is None else round(k_anon * 1000, 2),
            "vmrss_mib_per_hour": None if t_rss is None else round(t_rss, 1),
        },
        "worker_threads": {
            "start": first["worker"]["threads"],
            "end": last["worker"]["threads"],
            "min": min(x["threads"] for x in w),
            "max": max(x["threads"] for x in w),
        },
        "worker_fds": {
            "start": first["worker"]["fds"],
            "end": last["worker"]["fds"],
            "min": min(x["fds"] for x in w),
            "max": max(x["fds"] for x in w),
        },
        "worker_after_clients_closed": {
            k: results["after_clients_closed"]["worker"].get(k)
            for k in ("VmRSS", "threads", "fds", "thread_names")
        },
        "worker_before_warmup": {
            k: results["before_warmup"]["worker"].get(k)
            for k in ("VmRSS", "threads", "fds", "thread_names")
        },
        "tree_threads": {"start": first["tree"]["threads"], "end": last["tree"]["threads"]},
        "tree_fds": {"start": first["tree"]["fds"], "end": last["tree"]["fds"]},
        "health_non_200_samples": sum(1 for s in series if s["health"].get("status") != 200),
        "health_ms_max": max((s["health"].get("ms", 0) for s in series), default=None),
        "metrics_end": {
            k: m_end.get(k)
            for k in (
                "running",
                "waiting",
                "replica_load",
                "aborted_total",
                "http_errors_total",
                "request_success_total",
                "replica_requests_total",
                "generation_tokens_total",
            )
        },
        "slots_idle_at_end": results["settle_at_end"]["idle"],
        "seconds_to_idle_after_load": results["settle_after_load"]["seconds"],
        "greedy_equal": results["greedy_start"] == results["greedy_end"],
        "greedy_start_twice_equal": results["greedy_start"] == results["greedy_start_again"],
        "seeded_equal": results["seeded_start"] == results["seeded_end"],
        "latency_all_ok": {
            "total_time": latency([e[3] for e in good]),
            "ttft_streams": latency([e[4] for e in good if e[4] is not None]),
        },
        "latency_by_kind": per_kind_latency,
        "load_average": {
            "start": first["load_average"],
            "end": last["load_average"],
            "max_1min": max(s["load_average"][0] for s in series),
        },
    }
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-every", type=float, default=15.0)
    p.add_argument("--warmup-rounds", type=int, default=2)
    p.add_argument(
        "--request-timeout",
        type=float,
        default=180.0,
        help="client timeout of a normal request (a reply later is a client_timeout)",
    )
    p.add_argument(
        "--max-tokens", type=int, default=128, help="cap of a normal request's max_tokens"
    )
    p.add_argument("--mix", default=None, help="weights kind=w,... (a kind left out: 0)")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--serve-arg", action="append", default=[], help="extra fermi serve argument")
    p.add_argument("--out", type=Path, default=ROOT / "perf/results/cpu_soak_serve.json")
    p.add_argument("--keep-log", type=Path, default=None, help="copy the server log here")
    args = p.parse_args()

    TOKENS_CAP[0] = args.max_tokens
    if args.mix:
        weights = {k: float(w) for k, w in (item.split("=") for item in args.mix.split(","))}
        unknown = set(weights) - set(KINDS)
        if unknown:
            raise SystemExit(f"unknown kinds {sorted(unknown)}; kinds: {', '.join(KINDS)}")
        for k in KINDS:
            KINDS[k] = (weights.get(k, 0), KINDS[k][1])
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    tmp = Path(tempfile.mkdtemp(prefix="fermi-soak-"))
    log = args.keep_log or tmp / "serve.log"
    results: dict = {
        "benchmark": "soak: fermi serve under mixed and hostile traffic for a fixed time",
        "command": " ".join([".venv/bin/python perf/soak_serve.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git": git_commit(),
        "machine": machine(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "mix_weights": {k: v[0] for k, v in KINDS.items()},
        "server_command": f"fermi serve --model {args.model} --device cpu --port {port} "
        f"--log-level warning {' '.join(args.serve_arg)}".strip(),
    }
    proc = start_server(args.model, port, log, args.serve_arg)
    try:
        results["start_to_healthy_s"] = round(wait_healthy(proc, base, log), 1)
        asyncio.run(run(args, proc, base, results))
        results["summary"] = summarize(results)
    finally:
        if proc.poll() is None:
            results["stop"] = stop_server(proc)
        text = log.read_text(errors="replace") if log.exists() else ""
        results["server_log"] = {
            "lines": len(text.splitlines()),
            "tracebacks": text.count("Traceback"),
            "error_lines": [ln[:300] for ln in text.splitlines() if "ERROR" in ln or "Error" in ln][
                :20
            ],
            "tail": text.splitlines()[-30:],
        }
        results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if "summary" in results:
        results["summary"]["stop"] = results.get("stop")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    s = results.get("summary", {})
    brief = {
        k: s.get(k)
        for k in (
            "requests",
            "requests_per_minute",
            "outcomes",
            "unexpected_total",
            "rss_worker_mib",
            "rss_growth_second_half",
            "worker_threads",
            "worker_fds",
            "slots_idle_at_end",
            "greedy_equal",
            "greedy_start_twice_equal",
            "seeded_equal",
            "latency_all_ok",
            "load_average",
            "stop",
        )
    }
    brief["unexpected_examples"] = s.get("unexpected_examples")
    print(json.dumps(brief, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
