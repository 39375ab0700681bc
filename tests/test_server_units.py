"""Server pieces without a server process: delta -> chunk mapping, thinking switches,
replica placement and routing, streamed replies pulled by the event loop and pushed from
the engine threads, and the ASGI app driven in-process (a failing engine step becomes an
SSE error event; an unexpected exception becomes a 500 without a traceback)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time

import msgspec
import pytest
import torch

from fermi.engine.types import Delta, TokenLogprob, Usage
from fermi.server.app import AsgiApp
from fermi.server.build import resolve_thinking
from fermi.server.chunks import ChatChunker, TextChunker, sse
from fermi.server.config import ServerConfig
from fermi.server.handlers import Api, StreamEndedError
from fermi.server.pool import PoolConfigError, load_pool, parse_devices, plan_devices
from fermi.server.protocol import ENCODER, ChatCompletionRequest
from tests.serving import metric, thinking_checkpoint


def as_json(obj) -> dict:
    return json.loads(ENCODER.encode(obj))


def lp(token: str, value: float) -> TokenLogprob:
    top = (TokenLogprob(1, token, token.encode(), value), TokenLogprob(2, "x", b"x", value - 1))
    return TokenLogprob(1, token, token.encode(), value, top)


# -- delta -> chunk -----------------------------------------------------------------------


def test_first_chunks_announce_the_role_once_per_choice():
    chunks = [as_json(c) for c in ChatChunker("id1", 5, "m", 2, False).first()]
    assert [c["choices"] for c in chunks] == [
        [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
          "finish_reason": None}]
        for i in (0, 1)
    ]  # fmt: skip
    assert {c["id"] for c in chunks} == {"id1"} and chunks[0]["usage"] is None


def test_reasoning_delta_fills_both_reasoning_fields_and_no_content():
    chunk = ChatChunker("id", 5, "m", 1, False).delta(0, Delta(reasoning="hmm", token_ids=[1]))
    assert as_json(chunk)["choices"][0]["delta"] == {
        "reasoning_content": "hmm",
        "reasoning": "hmm",
    }


def test_held_back_tokens_send_nothing_and_their_logprobs_ride_with_the_next_chunk():
    chunker = ChatChunker("id", 5, "m", 1, True)
    assert chunker.delta(0, Delta(token_ids=[1], logprobs=[lp("<", -0.5)])) is None
    chunk = as_json(chunker.delta(0, Delta(text="<b", token_ids=[2], logprobs=[lp("b", -1.0)])))
    content = chunk["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["<", "b"]
    assert content[0]["top_logprobs"][1] == {"token": "x", "logprob": -1.5, "bytes": [120]}


def test_last_delta_carries_finish_reason_and_cancelled_reads_as_stop():
    chunker = ChatChunker("id", 5, "m", 1, False)
    end = Delta(text="!", finish_reason="length", usage=Usage(3, 4))
    assert as_json(chunker.delta(0, end))["choices"][0]["finish_reason"] == "length"
    cut = as_json(chunker.delta(0, Delta(finish_reason="cancelled")))
    assert cut["choices"][0] == {
        "index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"
    }  # fmt: skip


def test_minus_infinity_logprob_is_floored_to_a_json_number():
    chunker = ChatChunker("id", 5, "m", 1, True)
    chunk = chunker.delta(0, Delta(text="a", logprobs=[lp("a", float("-inf"))]))
    assert as_json(chunk)["choices"][0]["logprobs"]["content"][0]["logprob"] == -9999.0


def test_text_chunks_keep_text_offsets_across_chunks():
    chunker = TextChunker("id", 5, "m", 1, 1)
    first = as_json(chunker.delta(0, Delta(text="ab", logprobs=[lp("ab", -1.0)])))
    second = as_json(chunker.delta(0, Delta(text="c", logprobs=[lp("c", -2.0)])))
    assert first["choices"][0]["logprobs"]["text_offset"] == [0]
    assert second["choices"][0]["logprobs"]["text_offset"] == [2]
    assert second["choices"][0]["logprobs"]["top_logprobs"] == [{"c": -2.0, "x": -3.0}]


EVENT_DELTAS = [
    Delta(text="plain", token_ids=[1]),
    Delta(text='"quoted" back\\slash\nnew line \u2028 \u00e9 \U0001f600 \x01', token_ids=[2]),
    Delta(reasoning='thinking "aloud"', token_ids=[3]),
    Delta(text="both", reasoning="at once", token_ids=[4]),
    Delta(token_ids=[5]),  # held back: nothing to send
    Delta(text="with logprob", token_ids=[6], logprobs=[lp("with logprob", -0.25)]),
    Delta(token_ids=[7], logprobs=[lp("<", -0.5)]),  # held back, its logprob pending
    Delta(text="<b", token_ids=[8]),
    Delta(text="end", token_ids=[9], finish_reason="length", usage=Usage(3, 9)),
]


@pytest.mark.parametrize(
    "make",
    [
        lambda: ChatChunker("chatcmpl-x", 7, "m", 2, False),
        lambda: ChatChunker("chatcmpl-x", 7, "m", 2, True),
        lambda: TextChunker("cmpl-x", 7, "m", 2, None),
        lambda: TextChunker("cmpl-x", 7, "m", 2, 1),
    ],
)
def test_event_bytes_equal_the_encoded_chunk_of_every_delta(make):
    """``event`` splices common deltas into a template; its bytes must be the chunk's."""
    reference, spliced = make(), make()
    for index in (1, 0):
        for delta in EVENT_DELTAS:
            chunk = reference.delta(index, delta)
            assert spliced.event(index, delta) == (b"" if chunk is None else sse(chunk))


# -- thinking switches --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "mode"),
    [
        ({}, "auto"),
        ({"thinking": "on"}, "on"),
        ({"chat_template_kwargs": {"enable_thinking": False}}, "off"),
        ({"chat_template_kwargs": {"enable_thinking": True}}, "on"),
        ({"chat_template_kwargs": {"thinking": True}}, "on"),  # Granite 3.3's switch
        ({"chat_template_kwargs": {"thinking": False}}, "off"),
        ({"reasoning_effort": "none"}, "off"),
        ({"reasoning_effort": "high"}, "on"),
        ({"reasoning_effort": "minimal"}, "off"),
        ({"think": False}, "off"),
        # The product's own switch wins over the conventions.
        ({"thinking": "on", "reasoning_effort": "none"}, "on"),
    ],
)
def test_thinking_switches_resolve_to_one_mode(fields, mode):
    body = msgspec.json.decode(json.dumps({"messages": [], **fields}), type=ChatCompletionRequest)
    assert resolve_thinking(body) == mode


# -- placement ----------------------------------------------------------------------------


def test_devices_are_parsed_and_placed_one_replica_each():
    assert parse_devices("0, 1") == ["cuda:0", "cuda:1"]
    assert plan_devices(None, ["cuda:0", "cuda:1"], None, gpu_count=2) == ["cuda:0", "cuda:1"]
    assert plan_devices(2, [], None, gpu_count=2) == ["cuda:0", "cuda:1"]
    assert plan_devices(3, [], "cpu", gpu_count=2) == ["cpu", "cpu", "cpu"]
    assert plan_devices(2, [], None, gpu_count=0) == [None, None]  # CPU host: shared
    assert plan_devices(2, ["cuda:0", "cuda:0"], None, gpu_count=1) == ["cuda:0", "cuda:0"]


@pytest.mark.parametrize(
    ("pool", "devices", "device", "gpus", "message"),
    [
        (3, [], None, 2, "--pool 3 needs 3 GPUs"),
        (2, [], "cuda:1", 2, "name one device per replica"),
        (None, ["cuda:2"], None, 2, "device cuda:2 does not exist"),
        (None, ["tpu"], None, 2, "is not cpu, mps or cuda:N"),
        (0, [], None, 0, "at least 1"),
    ],
)
def test_impossible_placements_are_errors_that_say_why(pool, devices, device, gpus, message):
    with pytest.raises(PoolConfigError, match=message):
        plan_devices(pool, devices, device, gpu_count=gpus)


# -- in-process app -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    folder = thinking_checkpoint(tmp_path_factory.mktemp("units") / "tiny", max_positions=256)
    # Without prefix reuse, a request repeated to compare two delivery paths runs the same
    # prefill both times (a reused prefix gives the same tokens, logprobs to float rounding).
    pool = load_pool(str(folder), [None, None], max_seq_len=256, max_batch=4, prefix_reuse=False)
    api = Api(pool, ServerConfig(model=str(folder), prefix_reuse=False))
    yield api
    api.close()


def wait_until_idle(pool, timeout: float = 60.0) -> None:
    """Wait until no replica holds an unfinished request (one a test before this one
    cancelled frees its place on the engine thread, a step later)."""
    deadline = time.monotonic() + timeout
    while any(r.load for r in pool.replicas):
        assert time.monotonic() < deadline, [r.load for r in pool.replicas]
        time.sleep(0.01)


def test_least_loaded_replica_is_picked_and_ties_rotate(api):
    pool = api.pool
    wait_until_idle(pool)  # equal loads: only the turn decides
    first, second = pool.pick(), pool.pick()
    assert {first.index, second.index} == {0, 1}  # idle replicas take turns
    busy = pool.replicas[0].engine
    long = busy.build_request(prompt="hello", max_tokens=200, ignore_eos=True)
    handle = busy.submit(long, lambda d: None)
    try:
        assert [pool.pick().index for _ in range(4)] == [1, 1, 1, 1]
    finally:
        handle.cancel()


async def call_asgi(app: AsgiApp, path: str, body: dict | bytes) -> tuple[int, bytes]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = []
    incoming = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive():
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)  # the client stays connected

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    await app(scope, receive, send)
    status = sent[0]["status"]
    return status, b"".join(m.get("body", b"") for m in sent[1:])


async def stream_events(api: Api, path: str, body: dict, pushed: bool) -> tuple[list, set]:
    """The events of a streamed reply, delivered one way or the other, and the threads
    that wrote them (pulled: the event loop's)."""
    reply = await api.handle("POST", path, {}, json.dumps({**body, "stream": True}).encode())
    pieces, threads = [], set()

    def write(data: bytes) -> None:
        pieces.append(data)
        threads.add(threading.get_ident())

    try:
        if pushed:
            await reply.push(write)
        else:
            async for piece in reply.chunks():
                write(piece)
    except StreamEndedError:
        pass
    events = b"".join(pieces).decode().strip().split("\n\n")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]], threads


def per_choice(events: list[dict]) -> dict[int, list]:
    """Each choice's chunks in order (choices on two replicas interleave at random), with
    the per-request id and timestamp left out; the usage chunk under -1."""
    out: dict[int, list] = {}
    for event in events:
        body = {k: v for k, v in event.items() if k not in ("id", "created")}
        index = event["choices"][0]["index"] if event["choices"] else -1
        out.setdefault(index, []).append(body)
    return out


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                  "logprobs": True, "top_logprobs": 2, "thinking": "off"}),
        ("/v1/completions", {"prompt": "Once upon", "logprobs": 1}),
    ],
)  # fmt: skip
def test_pushed_stream_equals_the_pulled_one_and_is_written_by_the_engine_threads(api, path, body):
    body = {**body, "max_tokens": 12, "n": 2, "seed": 3, "ignore_eos": True}
    body["stream_options"] = {"include_usage": True}

    async def idle() -> None:
        # Place the second run's choices as the first's: a replica still releasing the first
        # run's request would send both choices to the other one, batched together, whose
        # float sums (and so logprobs) differ in the last bits from one row at a time.
        while any(r.load for r in api.pool.replicas):
            await asyncio.sleep(0.01)

    async def both():
        await idle()
        pulled = await stream_events(api, path, body, pushed=False)
        await idle()
        pushed = await stream_events(api, path, body, pushed=True)
        return pulled, pushed, threading.get_ident()

    (pulled, pull_threads), (pushed, push_threads), loop_thread = asyncio.run(both())
    assert per_choice(pushed) == per_choice(pulled)
    assert pushed[-1]["usage"]["completion_tokens"] == 24 and pushed[-1]["choices"] == []
    assert pull_threads == {loop_thread}
    # The choices ran on the two replicas; their engine threads wrote the events (the loop
    # wrote only the opening role chunks of the chat stream).
    engine_threads = push_threads - {loop_thread}
    assert len(engine_threads) == 2
    if "messages" in body:
        assert [e["choices"][0]["delta"].get("role") for e in pushed[:2]] == ["assistant"] * 2


@contextlib.contextmanager
def broken_decode_steps(api):
    """Every replica's decode step raises a device fault inside the block."""
    runners = [r.engine.runner for r in api.pool.replicas]
    originals = [r.decode for r in runners]

    def broken(*args, **kwargs):
        raise RuntimeError("simulated device fault")

    for runner in runners:
        runner.decode = broken
    try:
        yield
    finally:
        for runner, decode in zip(runners, originals, strict=True):
            runner.decode = decode


# The failing requests turn end-of-sequence off too: their first token comes from the
# prefill, which does not fail, and a sampled eos there (p = 0.003 for this prompt) would
# end the choice before any decode step could fail it.
FAILING = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "ignore_eos": True}


def test_failing_engine_step_ends_a_pushed_stream_with_an_error_event(api):
    body = {**FAILING, "n": 2}
    with broken_decode_steps(api):
        events, _ = asyncio.run(stream_events(api, "/v1/chat/completions", body, pushed=True))
    error = events[-1]["error"]
    assert error["type"] == "server_error" and "simulated device fault" in error["message"]
    # One error event ends the stream; the other choice's failure is not written after it.
    assert sum("error" in e for e in events) == 1
    # The same engines keep serving, pushed.
    events, _ = asyncio.run(
        stream_events(api, "/v1/chat/completions", {**body, "n": 1}, pushed=True)
    )
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_failing_engine_step_ends_the_stream_with_an_error_event(api):
    body = {**FAILING, "stream": True}
    with broken_decode_steps(api):
        status, raw = asyncio.run(call_asgi(AsgiApp(api), "/v1/chat/completions", body))
    events = raw.decode().strip().split("\n\n")
    assert status == 200 and events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "simulated device fault" in error["message"]
    assert "Traceback" not in raw.decode()
    # The same engines keep serving.
    body["stream"] = False
    status, raw = asyncio.run(call_asgi(AsgiApp(api), "/v1/chat/completions", body))
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 5


def test_unexpected_exception_is_a_500_without_traceback(api, monkeypatch):
    def explode(**kwargs):
        raise KeyError("internal detail")

    monkeypatch.setattr(api.pool.replicas[0].engine, "build_request", explode)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    status, raw = asyncio.run(call_asgi(AsgiApp(api), "/v1/chat/completions", body))
    assert status == 500
    error = json.loads(raw)["error"]
    assert error["type"] == "server_error" and "internal detail" not in error["message"]


def errors_counted(api: Api, status: int) -> float:
    return metric(api.metrics.render().decode(), "fermi:http_errors_total", status=str(status))


def test_an_unexpected_500_is_counted_in_http_errors(api, monkeypatch):
    def explode(**kwargs):
        raise KeyError("internal detail")

    monkeypatch.setattr(api.pool.engine, "build_request", explode)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    status, _ = asyncio.run(call_asgi(AsgiApp(api), "/v1/chat/completions", body))
    assert status == 500
    before = errors_counted(api, 500)
    asyncio.run(call_asgi(AsgiApp(api), "/v1/chat/completions", body))
    assert errors_counted(api, 500) == before + 1


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_json_nested_deeper_than_the_decoder_goes_is_400(api, path):
    nested = b'{"messages": [], "prompt": "x", "chat_template_kwargs": {"a": '
    nested += b"[" * 100_000 + b"]" * 100_000 + b"}}"
    status, raw = asyncio.run(call_asgi(AsgiApp(api), path, nested))
    assert status == 400
    assert json.loads(raw)["error"] == {
        "message": "the request body nests JSON arrays or objects too deeply",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_json",
    }


@pytest.mark.parametrize(
    ("body", "escape"),
    [
        (b'{"messages": [{"role": "user", "content": "hi\\ud800"}]}', "\\ud800"),
        (b'{"messages": [{"role": "user", "content": "\\uDC00 x"}]}', "\\uDC00"),
    ],
)
def test_an_unpaired_surrogate_escape_is_400_saying_so(api, body, escape):
    """msgspec refuses half a UTF-16 pair; its words for a high half ("Input data was
    truncated") sent clients looking for a cut body."""
    status, raw = asyncio.run(call_asgi(AsgiApp(api), "/v1/chat/completions", body))
    assert status == 400
    error = json.loads(raw)["error"]
    assert error["code"] == "invalid_json"
    assert error["message"] == (
        f"the request body is not valid JSON: it holds {escape}, half of a UTF-16 "
        "surrogate pair without its other half, which is not text"
    )
    paired = b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 1}'
    assert asyncio.run(call_asgi(AsgiApp(api), "/v1/chat/completions", paired))[0] == 200


@pytest.mark.parametrize(
    "template", ["{{ 'a' * 10000000000 }}", "{% for i in range(10**12) %}{% endfor %}"]
)
def test_a_runaway_chat_template_is_400_naming_the_messages(api, monkeypatch, template):
    tokenizer = api.pool.engine.tokenizer
    monkeypatch.setattr(tokenizer, "chat_template", template)
    monkeypatch.setattr(tokenizer, "_compiled", None)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    status, raw = asyncio.run(call_asgi(AsgiApp(api), "/v1/chat/completions", body))
    error = json.loads(raw)["error"]
    assert (status, error["param"], error["code"]) == (400, "messages", "invalid_value")
    assert error["message"].startswith("chat template error:")


def test_health_probe_generates_a_token_on_each_idle_replica(api):
    ok, lines = asyncio.run(api.health.check())
    assert ok and lines == ["replica 0 (cpu): ok", "replica 1 (cpu): ok"]
    # Generated tokens are counted before their delta is delivered (a step's own counter
    # moves only after it, which raced with this read).
    tokens = [r.engine.stats().generated_tokens for r in api.pool.replicas]
    assert all(t > 0 for t in tokens)
    started = time.monotonic()
    assert asyncio.run(api.health.check())[0]  # cached: no new generation
    assert [r.engine.stats().generated_tokens for r in api.pool.replicas] == tokens
    assert time.monotonic() - started < 0.5


# -- hostile request bodies (issue 18, item 2) ---------------------------------------------

BIG = 6_600_000  # characters: the 6.6 MB chat message that froze /health for 12.5 s
HOSTILE = {
    "400k one-token prompts": (
        "/v1/completions",
        {"prompt": [[1]] * 400_000, "max_tokens": 1},
        ("prompt", None),
    ),
    "6.6 MB chat message": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "The quick brown fox. " * (BIG // 21)}]},
        ("messages", "context_length_exceeded"),
    ),
    "6.6 MB prompt": (
        "/v1/completions",
        {"prompt": "x" * BIG, "max_tokens": 1},
        ("prompt", "context_length_exceeded"),
    ),
    "2M token ids": (
        "/v1/completions",
        {"prompt": [1] * 2_000_000, "max_tokens": 1},
        ("prompt", "context_length_exceeded"),
    ),
    # 7.5 MB: decoded as Message structs on the event loop, then rendered, these held
    # /health 245 ms (quiet 2-core machine); the count is now refused before any is decoded.
    "250k small chat messages": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}] * 250_000, "max_tokens": 1},
        ("messages", "context_length_exceeded"),
    ),
    "250k small Responses items": (
        "/v1/responses",
        {"input": [{"role": "user", "content": "a"}] * 250_000},
        ("messages", "context_length_exceeded"),
    ),
    "150k small tools": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}] * 150_000},
        ("tools", None),
    ),
}


async def probe_while(api: Api, work: asyncio.Future) -> float:
    """The longest time between two /health answers while ``work`` runs: how long the
    event loop was kept from serving anything else. (The first probe, which generates a
    token on each replica, ran before ``work`` started: its answer is cached for 2 s.)"""
    longest, last = 0.0, time.perf_counter()
    while not work.done():
        assert (await api.handle("GET", "/health", {}, b"")).status == 200
        await asyncio.sleep(0.01)
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    return longest


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_health_answers_while_a_hostile_request_is_refused(api, kind):
    path, body, (param, code) = HOSTILE[kind]
    raw = json.dumps(body).encode()

    async def run():
        await api.handle("GET", "/health", {}, b"")
        hostile = asyncio.ensure_future(api.handle("POST", path, {}, raw))
        longest = await probe_while(api, hostile)
        return longest, hostile.result()

    longest, reply = asyncio.run(run())
    # Before: 6.8 s for the chat message, 8.6 s for the prompt (tokenised on the loop), the
    # prompts were all built before their 400. Now cheap checks refuse them first, in
    # 0.01-0.12 s; 2 s leaves room for a slow machine.
    assert longest < 2.0, f"/health waited {longest:.1f} s"
    error = json.loads(reply.body)["error"]
    assert (reply.status, error["param"], error["code"]) == (400, param, code)


@pytest.mark.parametrize(
    ("path", "body", "param", "said"),
    [
        # One malformed item at the end of a list too long: the count is refused, before
        # any item is decoded (the context holds 256 tokens).
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a"}] * 300 + [{"role": 5}]},
            "messages",
            "301 messages cannot fit in this engine's context of 256 tokens",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user"}], "tools": [{"type": "function"}] * 129 + [5]},
            "tools",
            "tools takes at most 128 tools, not 130",
        ),
        (
            "/v1/responses",
            {"input": [{"role": "user", "content": "a"}] * 300 + [5]},
            "messages",
            "301 messages cannot fit",
        ),
        # Within the limits, an item decoded on its own is named from the body's root.
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a"}, {"role": 5}]},
            "messages[1].role",
            "Expected `str`, got `int` - at `$.messages[1].role`",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
            "messages[0].content[0].text",
            "got `int` - at `$.messages[0].content[0].text`",
        ),
        (
            "/v1/responses",
            {"input": [{"role": "user", "content": "a"}, []]},
            "input[1]",
            "Expected `object`, got `array` - at `$.input[1]`",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a"}], "response_format": {"type": 5}},
            "response_format",
            "response_format must be an object with a",
        ),
    ],
)
def test_list_items_are_counted_first_and_named_from_the_root(api, path, body, param, said):
    reply = asyncio.run(api.handle("POST", path, {}, json.dumps(body).encode()))
    error = json.loads(reply.body)["error"]
    assert (reply.status, error["param"]) == (400, param), error
    assert said in error["message"]


USER = {"role": "user", "content": "hi"}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("fields", "param", "said"),
    [
        # A conversation OpenAI's API refuses (and /v1/messages, /v1/responses here).
        ({"messages": [{"role": "user"}]}, "messages[0].content", "needs content"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "needs"),
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content", "non-empty"),
        ({"messages": [USER, {"role": "assistant"}]}, "messages[1].content", "or tool_calls"),
        (
            {"messages": [{**USER, "tool_calls": [CALL]}]},
            "messages[0].tool_calls",
            "only an assistant message carries tool_calls",
        ),
        (
            {"messages": [USER, {"role": "tool", "content": "4", "tool_call_id": "c9"}]},
            "messages[1].tool_call_id",
            "'c9' answers no tool call of an earlier assistant message",
        ),
        (  # the call comes after its answer
            {
                "messages": [
                    USER,
                    {"role": "tool", "content": "4", "tool_call_id": "c1"},
                    {"role": "assistant", "tool_calls": [CALL]},
                ]
            },
            "messages[1].tool_call_id",
            "answers no tool call",
        ),
        ({"messages": [USER], "tools": []}, "tools", "tools must not be empty"),
        # A part without its text is named as such, not as an unsupported type.
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0].text",
            "a text part needs text",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]},
            "messages[0].content[0]",
            "content part of type 'refusal' is not supported",
        ),
        (
            {"messages": [USER, {"role": "assistant", "content": [{"type": "refusal"}]}]},
            "messages[1].content[0].refusal",
            "a refusal part needs refusal",
        ),
        # Settings that would be dropped or wrapped without a word.
        ({"messages": [USER], "verbosity": "low"}, "verbosity", "'low' is not supported"),
        (
            {"messages": [USER], "max_tokens": -5, "max_completion_tokens": 3},
            "max_tokens",
            "max_tokens (-5) and max_completion_tokens (3) disagree",
        ),
        ({"messages": [USER], "seed": 2**64}, "seed", "<= 9223372036854775807"),
        ({"messages": [USER], "seed": -(2**63) - 1}, "seed", ">= -9223372036854775808"),
        # Stored completions and other service tiers are features this server lacks.
        ({"messages": [USER], "store": True}, "store", "does not store chat completions"),
        ({"messages": [USER], "metadata": {"a": "b"}}, "metadata", "does not store"),
        ({"messages": [USER], "service_tier": "flex"}, "service_tier", "'flex' is not offered"),
        (
            {"messages": [USER], "stream_options": {"include_usage": True}},
            "stream_options",
            "stream_options needs stream: true",
        ),
    ],
)
def test_a_malformed_conversation_or_setting_is_400_naming_it(api, fields, param, said):
    body = {"max_tokens": 2, **fields}
    reply = asyncio.run(api.handle("POST", "/v1/chat/completions", {}, json.dumps(body).encode()))
    error = json.loads(reply.body)["error"]
    assert (reply.status, error["param"]) == (400, param), error
    assert said in error["message"], error


@pytest.mark.parametrize(
    "fields",
    [
        {
            "messages": [
                USER,
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
                USER,
            ]
        },
        {
            "messages": [
                USER,
                {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
                USER,
            ]
        },
        {"messages": [USER], "verbosity": "medium"},
        {"messages": [USER], "max_tokens": 2, "max_completion_tokens": 2},
        {"messages": [USER], "seed": 2**63 - 1, "temperature": 1.0},
        {"messages": [USER], "seed": -(2**63), "n": 2, "temperature": 1.0},
        # choice 1 draws with seed + 1, wrapped to -2**63 (it was a 500 once seeds were
        # range-checked)
        {"messages": [USER], "seed": 2**63 - 1, "n": 2, "temperature": 1.0},
        {"messages": [USER], "store": False, "service_tier": "auto"},
        {"messages": [USER], "service_tier": "default", "stream_options": None},
    ],
)
def test_the_edges_of_those_checks_are_served(api, fields):
    body = {"max_tokens": 2, **fields}
    reply = asyncio.run(api.handle("POST", "/v1/chat/completions", {}, json.dumps(body).encode()))
    assert reply.status == 200, reply.body
    out = json.loads(reply.body)
    assert len(out["choices"]) == fields.get("n", 1)
    assert all(c["message"]["content"] is not None for c in out["choices"])


def test_a_slow_request_build_runs_beside_a_streaming_request(api, monkeypatch):
    """Building a request that passes every limit yet takes long (megabytes for a model
    with a long context) happens off the event loop: another request's stream keeps
    coming, and /health keeps answering."""
    wait_until_idle(api.pool)
    tokenizer = api.pool.engine.tokenizer
    encode = tokenizer.encode
    building = threading.Event()

    def slow_encode(text, *args, **kwargs):
        if "SLOW" in text:  # stands for seconds of tokenising (the sleep lets go of the GIL
            building.set()  # as encode_batch does)
            time.sleep(3)
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", slow_encode)
    normal = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60}
    normal.update(ignore_eos=True, stream=True, thinking="off")
    slow = {"messages": [{"role": "user", "content": "SLOW"}], "max_tokens": 2}

    async def run():
        await api.handle("GET", "/health", {}, b"")
        reply = await api.handle("POST", "/v1/chat/completions", {}, json.dumps(normal).encode())
        arrivals, hostile = [], None
        async for _ in reply.chunks():
            arrivals.append(time.perf_counter())
            if hostile is None:
                raw = json.dumps(slow).encode()
                hostile = asyncio.ensure_future(api.handle("POST", "/v1/chat/completions", {}, raw))
                while not building.is_set():  # the slow build has started
                    await asyncio.sleep(0.001)
                started = time.perf_counter()
        longest = await probe_while(api, hostile)
        return arrivals, started, longest, await hostile

    arrivals, started, longest, reply = asyncio.run(run())
    assert reply.status == 200
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # Blocking the loop would hold every chunk back for the 3 s of the build.
    assert max(gaps) < 2.0, f"the stream stalled {max(gaps):.1f} s"
    assert arrivals[-1] - started < 2.5  # the normal stream ended while the slow one built
    assert longest < 2.0


def test_an_error_counts_in_metrics_with_the_status_sent(api, monkeypatch):
    """Anthropic's API answers a full queue with 529, not 429: the counter says 529."""
    from fermi.server.errors import ApiError

    async def full(raw):
        raise ApiError(429, "the engine is full", type="rate_limit_error", code="engine_overloaded")

    def count() -> float:
        try:
            return metric(api.metrics.render().decode(), "fermi:http_errors_total", status="529")
        except KeyError:  # none counted yet
            return 0.0

    monkeypatch.setitem(api._routes, ("POST", "/v1/messages"), full)
    before = count()
    reply = asyncio.run(api.handle("POST", "/v1/messages", {}, b"{}"))
    assert reply.status == 529
    assert count() == before + 1


def streamed_until_it_fails(api, path: str, body: dict) -> bytes:
    """A streamed request's bytes up to the end a failure gives it (the adapter then closes
    the stream quietly: ``StreamEndedError``)."""

    async def run() -> bytes:
        reply = await api.handle("POST", path, {}, json.dumps({**body, "stream": True}).encode())
        got = []
        with pytest.raises(StreamEndedError):  # after the error (or failed) event
            async for chunk in reply.chunks():
                got.append(chunk)
        return b"".join(got)

    return asyncio.run(run())


def test_a_grammar_past_its_limits_is_a_400_whole_or_streamed(api, monkeypatch):
    import fermi.grammar
    from tests.test_grammar import OVER_LIMITS_FUEL, OVER_LIMITS_SCHEMA

    monkeypatch.setitem(fermi.grammar.LIMITS, "step_lexer_fuel", OVER_LIMITS_FUEL)
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "thinking": "off",
        "max_tokens": 200,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "p", "schema": OVER_LIMITS_SCHEMA},
        },
    }
    reply = asyncio.run(api.handle("POST", "/v1/chat/completions", {}, json.dumps(body).encode()))
    error = json.loads(reply.body).get("error")
    assert (reply.status, error and error["code"]) == (400, "grammar_too_complex"), reply.body
    assert "more work for one token" in error["message"]

    events = streamed_until_it_fails(api, "/v1/chat/completions", body).decode()
    assert '"code":"grammar_too_complex"' in events.replace(" ", "")


def test_a_grammar_past_its_limits_fails_a_response_as_the_requests_fault(api, monkeypatch):
    import fermi.grammar
    from tests.test_grammar import OVER_LIMITS_FUEL, OVER_LIMITS_SCHEMA

    monkeypatch.setitem(fermi.grammar.LIMITS, "step_lexer_fuel", OVER_LIMITS_FUEL)
    fmt = {"type": "json_schema", "name": "p", "schema": OVER_LIMITS_SCHEMA}
    body = {"input": "hi", "max_output_tokens": 200, "text": {"format": fmt}}
    body["reasoning"] = {"effort": "none"}  # the grammar from the first token
    reply = asyncio.run(api.handle("POST", "/v1/responses", {}, json.dumps(body).encode()))
    error = json.loads(reply.body).get("error")
    assert (reply.status, error and error["code"]) == (400, "grammar_too_complex"), reply.body

    events = [
        json.loads(line[6:])
        for line in streamed_until_it_fails(api, "/v1/responses", body).decode().splitlines()
        if line.startswith("data: ")
    ]
    failed = events[-1]
    assert failed["type"] == "response.failed", failed
    # The API's own codes: "invalid_prompt" is the request's fault, the message names ours.
    assert failed["response"]["error"]["code"] == "invalid_prompt"
    assert failed["response"]["error"]["message"].startswith("grammar_too_complex: ")


def test_health_and_metrics_name_a_replica_still_warming(tmp_path_factory, monkeypatch):
    """A CUDA runner warmed with ``warmup="first"`` (the command line's default) compiles
    and captures the rest in idle time; a request that arrives during one of those units
    waits for it. /health's ``warming`` lists such replicas and
    ``fermi:warmup_in_progress`` says 1 for them, until the warm-up is complete. (The
    runner here is that runner on CPU: eager steps, no graphs, the same warm-up plan.)"""
    import fermi.engine.core as core
    from fermi.engine.api import Engine
    from fermi.loading import GenerationDefaults, load_folder
    from fermi.runners.torch_cuda import CudaGraphRunner
    from fermi.server.pool import EnginePool
    from fermi.text.tokenizer import Tokenizer
    from tests.tiny import write_checkpoint

    folder = write_checkpoint(tmp_path_factory.mktemp("warming") / "qwen3", {}, seed=2)
    model = load_folder(folder, torch.device("cpu"), torch.float32).model
    runner = CudaGraphRunner(model, 2, 256, 32, backend=None, use_graphs=False, warmup="first")
    assert runner.startup.complete_s is None and runner.startup.deferred > 0
    monkeypatch.setattr(core, "IDLE_WORK_AFTER_S", 60.0)  # hold the idle warm-up back
    engine = Engine(runner, Tokenizer.from_folder(folder), GenerationDefaults(), "tiny")
    api = Api(EnginePool([engine], ["cpu"]), ServerConfig(model=str(folder)))
    try:

        async def probe() -> tuple[dict, float]:
            health = await api.handle("GET", "/health", {}, b"")
            text = (await api.handle("GET", "/metrics", {}, b"")).body.decode()
            return json.loads(health.body), metric(text, "fermi:warmup_in_progress")

        body, gauge = asyncio.run(probe())
        assert (body["status"], body["warming"], gauge) == ("ok", [0], 1.0)
        monkeypatch.setattr(core, "IDLE_WORK_AFTER_S", 0.01)
        engine.generate(prompt_token_ids=[5, 6], max_tokens=2)  # an idle spell that reads it
        deadline = time.monotonic() + 60
        while runner.startup.complete_s is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner.startup.complete_s is not None
        body, gauge = asyncio.run(probe())
        assert (body["status"], body["warming"], gauge) == ("ok", [], 0.0)
    finally:
        api.close()


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"temperature": "hot"}, "temperature", "invalid_type"),  # the Python API's code too
        ({"n": 1.5}, "n", "invalid_type"),
        ({"messages": None}, "messages", "invalid_type"),
        ({"messages": "__drop__"}, "messages", "missing_required_parameter"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
    ],
)
def test_a_body_field_of_the_wrong_type_or_missing_has_the_python_apis_code(
    api, fields, param, code
):
    body = {"messages": [USER], "max_tokens": 2, **fields}
    body = {k: v for k, v in body.items() if v != "__drop__"}
    reply = asyncio.run(api.handle("POST", "/v1/chat/completions", {}, json.dumps(body).encode()))
    error = json.loads(reply.body)["error"]
    assert (reply.status, error["param"], error["code"]) == (400, param, code), error


def test_the_fingerprint_follows_the_weights_not_only_the_name(tmp_path):
    """Same name and runner: another quantization, dtype or copy of other files under the
    same folder name gives another fingerprint; the same folder untouched, the same."""
    import os
    import shutil

    from fermi.server.config import ServerConfig
    from fermi.server.handlers import fingerprint

    folder = tmp_path / "a" / "model"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 10)

    def of(**kwargs) -> str:
        return fingerprint(ServerConfig(model=str(folder), **kwargs), "model", "torch-cpu")

    plain = of()
    assert plain == of() and plain.startswith("fermi-") and "-torch-cpu-" in plain
    assert len({plain, of(quantize="int4"), of(quantize="int8"), of(dtype="fp16")}) == 4
    other = tmp_path / "b" / "model"
    shutil.copytree(folder, other)
    (other / "model.safetensors").write_bytes(b"y" * 11)
    assert fingerprint(ServerConfig(model=str(other)), "model", "torch-cpu") != plain
    os.utime(folder / "model.safetensors", ns=(0, 0))  # rewritten in place
    assert of() != plain


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/chat/completions", "min_tokens", 5),
        ("/v1/chat/completions", "stop_token_ids", [2]),
        ("/v1/chat/completions", "guided_json", {"type": "object"}),
        ("/v1/chat/completions", "use_beam_search", True),
        ("/v1/chat/completions", "skip_special_tokens", False),
        ("/v1/completions", "include_stop_str_in_output", True),
        ("/v1/completions", "guided_regex", "a+"),
        ("/v1/completions", "bad_words", ["x"]),
    ],
)
def test_vllms_extensions_this_server_lacks_are_refused_naming_them(api, path, field, value):
    """A vLLM client's field that would change the reply is a 400 naming it, not ignored
    (vLLM's ignore_eos, top_k, min_p and repetition_penalty are served)."""
    body = {"max_tokens": 2, field: value}
    body |= {"messages": [USER]} if path.endswith("chat/completions") else {"prompt": "hi"}
    reply = asyncio.run(api.handle("POST", path, {}, json.dumps(body).encode()))
    error = json.loads(reply.body)["error"]
    assert (reply.status, error["param"]) == (400, field), error
    served = {**body, field: True} if field == "skip_special_tokens" else None
    if served is not None:  # the default, true, is served
        ok = asyncio.run(api.handle("POST", path, {}, json.dumps(served).encode()))
        assert ok.status == 200, ok.body


def test_a_body_that_never_arrives_is_a_408_not_a_held_connection(api, monkeypatch):
    """Granian times out headers that stop coming, not a body: a client that sent its
    headers (Content-Length: 100) and then one byte held the connection for as long as it
    liked, and about a thousand of them left the server accepting nothing."""
    monkeypatch.setattr(api.config, "body_timeout_s", 0.2)
    sent = []

    async def receive():
        if not sent:
            sent.append(None)
            return {"type": "http.request", "body": b"{", "more_body": True}
        await asyncio.sleep(3600)  # the rest never comes

    replies = []

    async def send(message):
        replies.append(message)

    headers = [(b"content-length", b"100"), (b"content-type", b"application/json")]
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers}
    started = time.monotonic()
    asyncio.run(AsgiApp(api)(scope, receive, send))
    assert time.monotonic() - started < 5
    assert replies[0]["status"] == 408
    error = json.loads(b"".join(m.get("body", b"") for m in replies[1:]))["error"]
    assert error["code"] == "request_timeout" and "did not arrive within 0.2 s" in error["message"]
