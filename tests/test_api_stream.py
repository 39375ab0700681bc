"""``Engine.astream`` / ``astream_request`` on a real tiny engine: the same output as
``generate``, order, the one final delta, cancellation, several streams on one loop, errors,
the hand-off that wakes the event loop only when a consumer waits, and event loops in several
threads, or closed while a stream waits (never kept alive)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
import time
import weakref

import pytest

import fermi
from fermi.errors import FermiError, RequestError
from tests.tiny import every_slot_back, write_checkpoint

PROMPT = [5, 77, 120, 33, 400, 9, 18]
DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("api_stream") / "qwen3", {})


@pytest.fixture(scope="module")
def engine(folder):
    # Streams are compared with whole runs of the same request: without prefix reuse both
    # prefill alike (a reused prefix changes usage.cached_tokens and the logprobs' rounding).
    eng = fermi.load(folder, max_batch=4, max_seq_len=256, prefix_reuse=False)
    yield eng
    eng.close()


class CountingLoop(asyncio.SelectorEventLoop):
    """A real event loop that counts the calls made into it from other threads (each one
    writes to its self-pipe and wakes it)."""

    threadsafe_calls = 0

    def call_soon_threadsafe(self, *args, **kwargs):
        self.threadsafe_calls += 1
        return super().call_soon_threadsafe(*args, **kwargs)


def run_counting(coro):
    loop = CountingLoop()
    try:
        return loop.run_until_complete(coro), loop.threadsafe_calls
    finally:
        loop.close()


async def collect(stream) -> list:
    return [delta async for delta in stream]


def joined(deltas) -> tuple[str, str, list[int]]:
    return (
        "".join(d.text for d in deltas),
        "".join(d.reasoning for d in deltas),
        [t for d in deltas for t in d.token_ids],
    )


def assert_idle(engine) -> None:
    assert engine.load == 0
    assert every_slot_back(engine)


async def wait_idle(engine) -> None:
    """Let the loop run (an abandoned generator is closed by a task) until no request is
    left in the engine."""
    deadline = time.monotonic() + DEADLINE_S
    while engine.load and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert_idle(engine)


SAMPLED = {"max_tokens": 40, "temperature": 0.9, "top_p": 0.95, "seed": 13, "ignore_eos": True}


@pytest.mark.parametrize(
    "source",
    [
        {"prompt": "Once upon a time"},
        {"messages": [{"role": "user", "content": "Tell me a story"}], "thinking": "off"},
    ],
)
def test_astream_yields_what_generate_returns(engine, source):
    whole = engine.generate(**source, **SAMPLED)
    deltas = asyncio.run(collect(engine.astream(**source, **SAMPLED)))
    assert joined(deltas) == (whole.text, whole.reasoning, whole.token_ids)
    assert len(whole.token_ids) == 40
    assert deltas[-1].finish_reason == whole.finish_reason == "length"
    assert deltas[-1].usage == whole.usage


def test_deltas_arrive_in_order_with_one_final_delta(engine):
    request = engine.build_request(prompt_token_ids=PROMPT, max_tokens=30, temperature=0)
    whole = engine.generate_request(request)
    deltas = asyncio.run(collect(engine.astream_request(request)))
    finals = [i for i, d in enumerate(deltas) if d.finish_reason is not None]
    assert finals == [len(deltas) - 1]
    assert all(not d.error for d in deltas)
    assert joined(deltas)[2] == whole.token_ids  # every token, in order
    assert deltas[-1].usage.completion_tokens == len(whole.token_ids)


def test_a_consumer_that_falls_behind_takes_the_piled_up_deltas_without_wake_ups(engine):
    """While the consumer is busy (here: it blocks the loop until the engine has finished),
    deltas pile up unannounced; it then takes them all, in order, with no wake-up each."""
    kwargs = {"prompt_token_ids": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    whole = engine.generate(**kwargs)

    async def slow() -> list:
        deltas = []
        async for delta in engine.astream(**kwargs):
            if not deltas:
                deadline = time.monotonic() + DEADLINE_S
                while engine.load and time.monotonic() < deadline:
                    time.sleep(0.005)  # blocks the loop: nothing can be handed over
                time.sleep(0.05)  # the final delta is sent just after the load drops
            deltas.append(delta)
        return deltas

    deltas, wakes = run_counting(slow())
    assert joined(deltas)[2] == whole.token_ids
    assert [d.finish_reason for d in deltas].count(None) == len(deltas) - 1
    assert len(deltas) >= 30
    # One wake-up for the first delta (at most a second one racing the first), none for
    # the ~39 that waited in the buffer; a wake-up per delta would be >= 30.
    assert wakes <= 3


def test_a_consumer_that_keeps_up_is_woken_at_most_once_per_delta(engine):
    kwargs = {"prompt_token_ids": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    deltas, wakes = run_counting(collect(engine.astream(**kwargs)))
    assert joined(deltas)[2] == engine.generate(**kwargs).token_ids
    # Plus one: the request is built in a worker thread, whose result wakes the loop.
    assert 1 <= wakes <= len(deltas) + 1


def test_breaking_out_early_cancels_the_request_and_frees_its_slot(engine):
    async def main() -> tuple[int, list]:
        before = engine.stats().generated_tokens
        seen = 0
        async for _ in engine.astream(
            prompt_token_ids=PROMPT, max_tokens=240, temperature=0, ignore_eos=True
        ):
            seen += 1
            if seen == 3:
                break
        await wait_idle(engine)
        generated = engine.stats().generated_tokens - before
        after = await collect(
            engine.astream(prompt_token_ids=PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
        )
        return generated, after

    generated, after = asyncio.run(main())
    assert generated < 120  # run to the end it would make 240
    assert (
        joined(after)[2]
        == engine.generate(
            prompt_token_ids=PROMPT, max_tokens=8, temperature=0, ignore_eos=True
        ).token_ids
    )
    assert after[-1].finish_reason == "length"
    assert_idle(engine)


def test_cancelling_the_task_cancels_the_request(engine):
    async def main() -> int:
        before = engine.stats().generated_tokens
        started = asyncio.Event()

        async def consume() -> None:
            request = engine.build_request(
                prompt_token_ids=PROMPT, max_tokens=240, temperature=0, ignore_eos=True
            )
            async for _ in engine.astream_request(request):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), DEADLINE_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(engine)
        return engine.stats().generated_tokens - before

    assert asyncio.run(main()) < 120
    assert_idle(engine)


def test_concurrent_astreams_on_one_loop_each_equal_their_generate(engine):
    requests = [
        {"prompt": "Once upon", "max_tokens": 30, "temperature": 1.0, "seed": 7},
        {"prompt_token_ids": PROMPT, "max_tokens": 24, "temperature": 0},
        {"prompt": "The quick", "max_tokens": 36, "temperature": 0.8, "top_k": 20, "seed": 2},
    ]
    solo = [engine.generate(**r, ignore_eos=True) for r in requests]

    async def main() -> list:
        return await asyncio.gather(
            *(collect(engine.astream(**r, ignore_eos=True)) for r in requests)
        )

    streamed = asyncio.run(main())
    for deltas, whole in zip(streamed, solo, strict=True):
        assert joined(deltas) == (whole.text, whole.reasoning, whole.token_ids)
        assert [d.finish_reason for d in deltas][-1] == "length"
    assert_idle(engine)


def test_a_request_failing_at_admission_ends_with_an_error(engine):
    good = engine.build_request(prompt_token_ids=PROMPT, max_tokens=4)
    bad = dataclasses.replace(good, params=dataclasses.replace(good.params, seed="x"))

    async def main() -> tuple[list, list]:
        innocent = engine.astream(
            prompt_token_ids=PROMPT, max_tokens=30, temperature=0, ignore_eos=True
        )
        first = await anext(innocent)
        failed = await collect(engine.astream_request(bad))
        return failed, [first, *await collect(innocent)]

    failed, innocent = asyncio.run(main())
    assert len(failed) == 1
    assert failed[0].finish_reason == "error" and "TypeError" in failed[0].error
    assert (
        joined(innocent)[2]
        == engine.generate(
            prompt_token_ids=PROMPT, max_tokens=30, temperature=0, ignore_eos=True
        ).token_ids
    )
    assert_idle(engine)


def test_closing_the_engine_mid_stream_ends_streams_with_its_error(folder):
    async def main(eng) -> tuple[list, Exception | None]:
        low = eng.astream_request(
            eng.build_request(prompt_token_ids=PROMPT, max_tokens=200, ignore_eos=True)
        )
        high = eng.astream(prompt_token_ids=PROMPT, max_tokens=200, ignore_eos=True)
        got = [await anext(low)]
        await anext(high)
        eng.close()  # fails the running requests from the engine thread
        got += await collect(low)
        try:
            await collect(high)
        except FermiError as exc:
            return got, exc
        return got, None

    eng = fermi.load(folder, max_batch=2, max_seq_len=256)
    try:
        got, raised = asyncio.run(main(eng))
    finally:
        eng.close()
    assert got[-1].finish_reason == "error" and "closed" in got[-1].error
    assert len(got[-1].token_ids) == 0 and len(got) < 200
    assert raised is not None and "closed" in str(raised)


def test_bad_arguments_raise_request_error_on_the_first_iteration(engine):
    stream = engine.astream(prompt="a", temperature=-1)  # nothing runs yet

    with pytest.raises(RequestError) as err:
        asyncio.run(collect(stream))
    assert err.value.param == "temperature"
    assert_idle(engine)


def test_event_loops_that_streamed_are_not_kept_alive(engine):
    loop = asyncio.new_event_loop()
    deltas = loop.run_until_complete(
        collect(engine.astream(prompt_token_ids=PROMPT, max_tokens=3, temperature=0))
    )
    assert deltas[-1].finish_reason is not None
    loop.close()
    ref = weakref.ref(loop)
    del loop
    gc.collect()
    assert ref() is None


# -- event loops: closed mid-stream, several at once in several threads -------------------


def wait_unloaded(engine) -> None:
    """From outside any event loop: wait until no request is left in the engine."""
    deadline = time.monotonic() + DEADLINE_S
    while engine.load and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.load == 0


def test_a_loop_closed_while_its_stream_waits_is_not_kept_alive(engine):
    """A consumer still waiting when its loop is closed (its wake-up never runs, or the
    engine's next delta finds the loop closed) must not pin the loop, its task and its
    request for the life of the process through the per-loop waker."""
    loop = asyncio.new_event_loop()

    async def start() -> asyncio.Task:
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.astream(
                prompt_token_ids=PROMPT, max_tokens=60, temperature=0, ignore_eos=True
            ):
                first.set()

        task = asyncio.get_running_loop().create_task(consume())
        await asyncio.wait_for(first.wait(), DEADLINE_S)
        await asyncio.sleep(0.02)  # the consumer waits on the next delta
        return task

    task = loop.run_until_complete(start())
    loop.close()  # without cancelling the task: the engine goes on into a closed loop
    wait_unloaded(engine)
    # The engine thread keeps its last request until the next one: let two more through.
    for _ in range(2):
        engine.generate(prompt_token_ids=PROMPT, max_tokens=2, temperature=0)
    ref = weakref.ref(loop)
    del loop, task
    gc.collect()
    assert ref() is None


def test_streams_on_loops_in_several_threads_at_once_each_get_their_tokens(engine):
    """Three threads, each with its own loop and two streams on it, several rounds of
    loops created and closed: every stream gets exactly its own tokens, in order."""
    kwargs = [
        {"prompt_token_ids": PROMPT, "max_tokens": 20, "temperature": 0},
        {"prompt_token_ids": PROMPT[:4], "max_tokens": 16, "temperature": 0},
    ]
    want = [engine.generate(**k, ignore_eos=True).token_ids for k in kwargs]
    got: list[list[list[int]]] = []
    errors: list[BaseException] = []

    async def pair() -> list[list[int]]:
        async def one(k) -> list[int]:
            return joined([d async for d in engine.astream(**k, ignore_eos=True)])[2]

        return list(await asyncio.gather(*(one(k) for k in kwargs)))

    def worker() -> None:
        try:
            for _ in range(3):  # a fresh loop each round, closed after it
                got.append(asyncio.run(pair()))
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert len(got) == 9
    assert all(pair == want for pair in got)
    wait_unloaded(engine)


def test_a_sync_reply_is_cancelled_from_another_thread_through_its_handle(engine):
    """README's recipe: ``stream``'s iterator cannot be closed while another thread is
    blocked in it (a generator already executing), so a reply to stop from elsewhere is
    submitted with a sink and cancelled through the handle; it ends with "cancelled"."""
    import queue

    request = engine.build_request(
        prompt_token_ids=PROMPT, max_tokens=240, temperature=0, ignore_eos=True
    )
    deltas: queue.SimpleQueue = queue.SimpleQueue()
    handle = engine.submit(request, deltas.put)
    threading.Timer(0.05, handle.cancel).start()
    got = []
    while not got or got[-1].finish_reason is None:
        got.append(deltas.get(timeout=60))
    assert got[-1].finish_reason == "cancelled"
    assert sum(len(d.token_ids) for d in got) < 240
    deadline = time.monotonic() + DEADLINE_S
    while engine.load and time.monotonic() < deadline:
        time.sleep(0.01)
    assert_idle(engine)
