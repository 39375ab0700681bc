"""``Engine.astream`` across event loops: loops in several threads, created and closed over
and over, each get their own tokens; a loop closed while its stream waits is not kept alive."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import pytest

import fermi
from tests.tiny import write_checkpoint

PROMPT = [5, 77, 120, 33, 400, 9, 18]
DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("loops") / "qwen3", {})


@pytest.fixture(scope="module")
def engine(folder):
    eng = fermi.load(folder, max_batch=4, max_seq_len=256)
    yield eng
    eng.close()


def wait_idle(engine) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while engine.scheduler.load and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.scheduler.load == 0


def tokens(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


# -- astream: loops closed mid-stream, several loops at once ---------------------------


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
    wait_idle(engine)
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
            return tokens([d async for d in engine.astream(**k, ignore_eos=True)])

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
    wait_idle(engine)
