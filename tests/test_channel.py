"""``fermi.engine.channel.Channel``, the engine thread -> event loop hand-off, without an
engine: producer threads put, a consumer on a counting event loop pulls batches or has the
items pushed to it; wake-ups are counted as thread-safe calls into the loop."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref

import pytest

from fermi.engine.channel import Channel

DEADLINE_S = 10.0


class CountingLoop(asyncio.SelectorEventLoop):
    """A real event loop that counts the calls made into it from other threads."""

    threadsafe_calls = 0

    def call_soon_threadsafe(self, *args, **kwargs):
        self.threadsafe_calls += 1
        return super().call_soon_threadsafe(*args, **kwargs)


def run_counting(make_coro):
    loop = CountingLoop()
    try:
        return loop.run_until_complete(make_coro()), loop.threadsafe_calls
    finally:
        loop.close()


def in_thread(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args)
    thread.start()
    return thread


async def until(condition) -> None:
    """Let the loop run until ``condition()`` holds (a consumer reached its wait)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():
        assert loop.time() < deadline
        await asyncio.sleep(0.001)


def waiting(channel: Channel) -> bool:
    return channel._waiter is not None


# -- pulled ---------------------------------------------------------------------------------


def test_pulled_items_from_a_thread_arrive_in_order_and_end_when_closed():
    async def main() -> list[int]:
        channel: Channel[int] = Channel()
        got: list[int] = []

        def produce() -> None:
            for i in range(200):
                channel.put(i)

        thread = in_thread(produce)
        async for batch in channel:
            got.extend(batch)
            if len(got) == 200:
                channel.close()
        thread.join()
        return got

    got, _ = run_counting(main)
    assert got == list(range(200))


def test_a_consumer_that_falls_behind_takes_the_piled_up_items_in_one_batch_without_wake_ups():
    async def main() -> list[list[int]]:
        channel: Channel[int] = Channel()
        thread = in_thread(lambda: [channel.put(i) for i in range(50)])
        thread.join()  # the consumer never waited: nothing to wake
        batch = await anext(aiter(channel))
        channel.close()
        return [batch]

    batches, wakes = run_counting(main)
    assert batches == [list(range(50))]
    assert wakes == 0


def test_a_waiting_consumer_is_woken_once_for_its_first_item():
    async def main() -> list[int]:
        channel: Channel[int] = Channel()
        pending = asyncio.ensure_future(anext(aiter(channel)))
        await until(lambda: waiting(channel))
        in_thread(channel.put, 7).join()
        return await pending

    batch, wakes = run_counting(main)
    assert batch == [7]
    assert wakes == 1


def test_channels_of_one_loop_that_became_ready_together_share_one_wake_up():
    """Three consumers wait; a thread puts into all three while the loop is busy: one
    thread-safe call wakes all three."""

    async def main() -> list[list[str]]:
        channels: list[Channel[str]] = [Channel() for _ in range(3)]
        pending = [asyncio.ensure_future(anext(aiter(c))) for c in channels]
        await until(lambda: all(waiting(c) for c in channels))

        def produce() -> None:
            for i, channel in enumerate(channels):
                channel.put(f"item {i}")

        in_thread(produce).join()  # blocks the loop: the three become due before it runs
        return list(await asyncio.gather(*pending))

    batches, wakes = run_counting(main)
    assert batches == [["item 0"], ["item 1"], ["item 2"]]
    assert wakes == 1


def test_items_put_after_close_are_dropped_and_iteration_ends():
    async def main() -> list[list[int]]:
        channel: Channel[int] = Channel()
        channel.put(1)
        channel.close()
        in_thread(channel.put, 2).join()
        return [batch async for batch in channel]

    batches, wakes = run_counting(main)
    assert batches == []
    assert wakes == 0


def test_several_producer_threads_each_keep_their_order():
    async def main() -> list[tuple[int, int]]:
        channel: Channel[tuple[int, int]] = Channel()
        got: list[tuple[int, int]] = []

        def produce(who: int) -> None:
            for i in range(300):
                channel.put((who, i))

        threads = [in_thread(produce, who) for who in range(3)]
        async for batch in channel:
            got.extend(batch)
            if len(got) == 900:
                break
        channel.close()
        for thread in threads:
            thread.join()
        return got

    got, _ = run_counting(main)
    for who in range(3):
        assert [i for w, i in got if w == who] == list(range(300))


def test_a_loop_closed_while_its_consumer_waits_is_not_kept_alive_by_the_channel():
    """The producer still holds the channel (as the engine holds a request's sink) after the
    loop was closed with its consumer waiting: the loop must not be pinned through it."""
    loop = asyncio.new_event_loop()
    channel: Channel[int] = Channel(loop)
    task = loop.create_task(anext(aiter(channel)))
    loop.run_until_complete(asyncio.sleep(0.01))
    assert waiting(channel)
    loop.close()  # without cancelling the task
    in_thread(channel.put, 1).join()  # the wake-up finds the loop closed
    ref = weakref.ref(loop)
    del loop, task
    gc.collect()
    assert ref() is None
    channel.put(2)  # still harmless


# -- pushed ---------------------------------------------------------------------------------


def test_pushed_items_buffered_first_then_on_the_producer_thread_with_one_wake_up_in_all():
    async def main():
        channel: Channel[int] = Channel()
        channel.put(0)
        channel.put(1)  # before push: buffered, then handed on by push itself
        seen: list[tuple[int, int]] = []
        producer: list[int] = []

        def deliver(item: int) -> bool:
            seen.append((item, threading.get_ident()))
            return item == 9

        def produce() -> None:
            producer.append(threading.get_ident())
            for i in range(2, 12):  # 10 and 11 come after the stream is complete
                channel.put(i)

        async def start_producer() -> None:
            await asyncio.sleep(0.01)  # push is waiting
            in_thread(produce).join()

        starter = asyncio.ensure_future(start_producer())
        await channel.push(deliver)
        await starter
        return seen, producer[0], threading.get_ident()

    (seen, producer, loop_thread), wakes = run_counting(main)
    assert [item for item, _ in seen] == list(range(10))
    assert {thread for item, thread in seen if item < 2} == {loop_thread}
    assert {thread for item, thread in seen if item >= 2} == {producer}
    assert wakes == 1  # the completion, not one per item


def test_push_raises_what_deliver_raised_and_drops_later_items():
    async def main() -> list[int]:
        channel: Channel[int] = Channel()
        seen: list[int] = []

        def deliver(item: int) -> bool:
            seen.append(item)
            if item == 3:
                raise ValueError("the client is gone")
            return False

        async def produce() -> None:
            await asyncio.sleep(0.01)
            in_thread(lambda: [channel.put(i) for i in range(6)]).join()

        producer = asyncio.ensure_future(produce())
        with pytest.raises(ValueError, match="the client is gone"):
            await channel.push(deliver)
        await producer
        assert channel.closed
        return seen

    seen, _ = run_counting(main)
    assert seen == [0, 1, 2, 3]


def test_a_buffered_item_that_completes_the_stream_stops_the_hand_over():
    async def main() -> list[int]:
        channel: Channel[int] = Channel()
        for i in range(5):
            channel.put(i)
        seen: list[int] = []
        await channel.push(lambda item: seen.append(item) or item == 2)
        return seen

    seen, wakes = run_counting(main)
    assert seen == [0, 1, 2]
    assert wakes == 0  # completed on the loop: nothing to wake from outside


def test_cancelling_a_push_closes_the_channel_and_drops_the_callback():
    async def main() -> tuple[bool, bool]:
        channel: Channel[int] = Channel()

        class Deliver:
            def __call__(self, item: int) -> bool:
                return False

        deliver = Deliver()
        ref = weakref.ref(deliver)
        task = asyncio.ensure_future(channel.push(deliver))
        del deliver
        await asyncio.sleep(0.01)
        channel.put(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        del task
        gc.collect()
        return channel.closed, ref() is None

    (closed, dropped), _ = run_counting(main)
    assert closed
    assert dropped


def test_pushed_items_from_several_threads_are_handed_on_one_at_a_time_each_in_order():
    async def main() -> tuple[list[tuple[int, int]], int]:
        channel: Channel[tuple[int, int]] = Channel()
        seen: list[tuple[int, int]] = []
        inside = [0, 0]  # now, most at once

        def deliver(item: tuple[int, int]) -> bool:
            inside[0] += 1
            inside[1] = max(inside)
            seen.append(item)
            inside[0] -= 1
            return len(seen) == 600

        def produce(who: int) -> None:
            for i in range(200):
                channel.put((who, i))

        async def start() -> None:
            await asyncio.sleep(0.01)
            for thread in [in_thread(produce, who) for who in range(3)]:
                thread.join()

        starter = asyncio.ensure_future(start())
        await channel.push(deliver)
        await starter
        return seen, inside[1]

    (seen, most_at_once), _ = run_counting(main)
    assert most_at_once == 1
    for who in range(3):
        assert [i for w, i in seen if w == who] == list(range(200))
