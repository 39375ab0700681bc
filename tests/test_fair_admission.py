"""A request queued behind a call of many choices or prompts gets the next free slot.

The engine's queue hands slots out by group (one API call's choices and prompts share a
group): the group with the fewest sequences running goes first, so a call that queued
many requests cannot hold a later caller back for longer than one slot takes to free.
Checked on the queue itself, on an engine (CPU, tiny model) and through a real server.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from urllib.parse import urlsplit

import pytest

import fermi
from fermi.engine.scheduler import RequestHandle, Sequence, WaitingQueue, running_by_group
from tests.serving import http as fetch
from tests.serving import running_server, thinking_checkpoint
from tests.tiny import every_slot_back, write_checkpoint


def handle(name: str, group: object = None) -> RequestHandle:
    h = RequestHandle(request=None, sink=lambda delta: None, group=group)  # type: ignore[arg-type]
    h.name = name  # type: ignore[attr-defined]
    return h


def running(*handles: RequestHandle):
    """How many sequences each group runs, ``handles`` running."""
    seqs = [Sequence(h, slot=i, output=None) for i, h in enumerate(handles)]  # type: ignore[arg-type]
    return running_by_group(seqs)


def names(handles) -> list[str]:
    return [h.name for h in handles]


def test_single_requests_wait_in_order_of_arrival():
    queue = WaitingQueue()
    for name in "abcd":
        queue.append(handle(name))
    assert len(queue) == 4
    assert names(queue.pop({}) for _ in range(4)) == list("abcd")
    assert not queue


def test_a_later_caller_goes_before_the_rest_of_a_call_that_holds_slots():
    queue = WaitingQueue()
    call = object()
    many = [handle(f"n{i}", call) for i in range(6)]
    for h in many:
        queue.append(h)
    first = queue.pop({})
    second = queue.pop(running(first))
    assert names([first, second]) == ["n0", "n1"]  # nothing else waits: the call takes both
    late = handle("late")
    queue.append(late)
    # One of the call's sequences ended; the other still runs: the late caller has none.
    assert queue.pop(running(second)).name == "late"
    assert queue.pop(running(second)).name == "n2"


def test_between_groups_running_as_many_the_one_served_longest_ago_goes_first():
    queue = WaitingQueue()
    a, b = object(), object()
    for i in range(3):
        queue.append(handle(f"a{i}", a))
    for i in range(3):
        queue.append(handle(f"b{i}", b))
    order = []
    for _ in range(6):  # every sequence ends before the next admission: counts stay 0
        order.append(queue.pop({}).name)
    assert order == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_a_stream_of_later_single_requests_does_not_hold_a_call_back_for_ever():
    """A call served once, then one single request arriving for every slot that frees:
    once the call runs nothing it goes before the requests that came after its last turn."""
    queue = WaitingQueue()
    call = object()
    for i in range(4):
        queue.append(handle(f"n{i}", call))
    assert queue.pop({}).name == "n0"
    order = []
    for i in range(6):  # every sequence ends before the next admission: counts stay 0
        queue.append(handle(f"s{i}"))
        order.append(queue.pop({}).name)
    # s1 and s2 arrived before n2 was admitted, so they go before n3.
    assert order == ["n1", "s0", "n2", "s1", "s2", "n3"]


def test_remove_and_iteration_cover_every_group():
    queue = WaitingQueue()
    call = object()
    hs = [handle("x"), handle("y", call), handle("z", call)]
    for h in hs:
        queue.append(h)
    assert sorted(names(queue)) == ["x", "y", "z"]
    queue.remove(hs[1])
    queue.remove(hs[0])
    assert names(queue) == ["z"] and len(queue) == 1
    queue.remove(hs[2])
    assert not queue and list(queue) == []


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("fair") / "qwen3", {})


PROMPT = [5, 77, 120, 33, 400, 9, 18]


def test_engine_admits_a_later_request_before_the_rest_of_a_group(folder):
    """Two slots; a group of six long requests, then one short request: the short one
    starts when the first slot frees, not after the whole group."""
    with fermi.load(folder, max_batch=2, max_seq_len=256) as eng:
        done = threading.Event()
        started: dict[str, float] = {}

        def sink_for(name):
            def sink(delta):
                started.setdefault(name, time.perf_counter())
                if delta.finish_reason is not None and name == "late":
                    done.set()

            return sink

        call = object()
        handles = []
        for i in range(6):
            request = eng.build_request(
                prompt_token_ids=PROMPT, max_tokens=12 + i, temperature=0, ignore_eos=True
            )
            handles.append(eng.submit(request, sink_for(f"g{i}"), group=call))
        late = eng.build_request(prompt_token_ids=PROMPT[:3], max_tokens=3, temperature=0)
        handles.append(eng.submit(late, sink_for("late")))
        for h in handles:
            assert h.done.wait(60)
        assert done.is_set()
        order = sorted(started, key=started.get)
        # FIFO would start it last (after g0-g5); fair, it takes the first slot that frees.
        assert order.index("late") <= 2, order
        assert eng.load == 0
        assert every_slot_back(eng)


def test_a_short_prompt_is_prefilled_between_the_chunks_of_a_long_one(folder):
    """Chunks of 16 tokens; a 240-token prompt (15 chunks), then a 4-token one: the short
    prompt's first token comes before the long one's, not after its 15 chunks."""
    with fermi.load(folder, max_batch=2, max_seq_len=256, prefill_chunk=16) as eng:
        first: dict[str, float] = {}

        def sink_for(name):
            return lambda delta: first.setdefault(name, time.perf_counter())

        long_prompt = [(7 * i) % 400 + 5 for i in range(240)]
        args = {"max_tokens": 2, "temperature": 0, "ignore_eos": True}
        long = eng.submit(eng.build_request(prompt_token_ids=long_prompt, **args), sink_for("long"))
        short = eng.submit(
            eng.build_request(prompt_token_ids=PROMPT[:4], **args), sink_for("short")
        )
        assert long.done.wait(60) and short.done.wait(60)
        assert first["short"] < first["long"]
        assert eng.load == 0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fair_server")
    model = thinking_checkpoint(folder / "tiny", max_positions=512)
    with running_server(model, "--max-batch", "2", log=folder / "serve.log") as url:
        yield url


def test_server_a_chat_request_is_not_held_behind_a_call_of_eight_prompts(server):
    """A streamed completions call of 8 prompts (2 slots), then a chat request: the chat
    request's reply comes before most of the 8 prompts started."""
    parts = urlsplit(server)
    first_chunk: dict[int, float] = {}
    big_started = threading.Event()
    failure: list[BaseException] = []

    def big():
        try:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
            body = {
                "prompt": [f"Prompt number {i}:" for i in range(8)],
                "max_tokens": 40,
                "ignore_eos": True,
                "stream": True,
            }
            headers = {"Content-Type": "application/json"}
            conn.request("POST", "/v1/completions", json.dumps(body).encode(), headers)
            resp = conn.getresponse()
            assert resp.status == 200
            for line in resp:
                if line.startswith(b"data: {"):
                    index = json.loads(line[6:])["choices"][0]["index"]
                    first_chunk.setdefault(index, time.perf_counter())
                    big_started.set()
            conn.close()
        except BaseException as exc:  # reported below
            failure.append(exc)
            big_started.set()

    thread = threading.Thread(target=big)
    thread.start()
    assert big_started.wait(60)
    status, _, reply = fetch(
        server + "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "thinking": "off"},
    )
    answered = time.perf_counter()
    thread.join(120)
    assert not failure, failure
    assert status == 200, reply
    assert sorted(first_chunk) == list(range(8))
    later = [i for i, t in first_chunk.items() if t > answered]
    # Behind the whole call (first in, first out) none would start after the chat reply.
    assert len(later) >= 4, (later, first_chunk, answered)
