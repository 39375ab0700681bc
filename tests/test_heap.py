"""fermi.heap: collections held off while requests are built, and what a failed build made
freed in its worker thread."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest

from fermi.heap import gc_paused, off_loop


def test_the_pause_is_counted_across_threads():
    assert gc.isenabled()
    inside, release = threading.Event(), threading.Event()

    def hold():
        with gc_paused():
            inside.set()
            release.wait(10)

    other = threading.Thread(target=hold)
    other.start()
    inside.wait(10)
    with gc_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread still holds it
    release.set()
    other.join(10)
    assert gc.isenabled()


def test_a_pause_leaves_a_disabled_collector_disabled():
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


FREED_ON: list[str] = []  # the threads Marker objects were freed on


class Marker:
    def __del__(self):
        FREED_ON.append(threading.current_thread().name)


def build_and_fail():
    made = [Marker() for _ in range(3)]  # noqa: F841 (held by this frame when it raises)
    try:
        raise KeyError("inner")
    except KeyError as exc:
        raise ValueError("refused") from exc


def test_what_a_failed_build_made_is_freed_in_its_worker_thread():
    FREED_ON.clear()

    async def run():
        with pytest.raises(ValueError, match="refused") as info:
            await off_loop(build_and_fail)
        return info

    loop_thread = threading.current_thread().name
    info = asyncio.run(run())
    # Without clearing the frames the traceback keeps, the markers would live on with the
    # exception and be freed here, on the caller's thread.
    assert len(FREED_ON) == 3
    assert loop_thread not in FREED_ON
    del info


def test_a_build_runs_with_collections_held_off():
    async def run():
        return await off_loop(gc.isenabled)

    assert asyncio.run(run()) is False
    assert gc.isenabled()
