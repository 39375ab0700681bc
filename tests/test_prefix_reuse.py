"""Automatic prefix reuse: a finished request's slot keeps its KV cache, and a later prompt
that starts the same way is admitted there and prefills only the rest, with exactly the
output of a cold run (greedy and seeded; eager and overlapped; Gemma 2's sliding window;
LongRoPE's factor switch)."""

from __future__ import annotations

import random
import threading
from dataclasses import replace

import pytest
import torch

import fermi
from fermi.engine.slots import SlotTable, common_prefix
from fermi.runners.base import SlotMove
from tests.test_arch_gemma2 import write as write_gemma2
from tests.test_arch_phi3 import write as write_phi3
from tests.test_scheduler_overlap import eager, overlapped
from tests.tiny import write_checkpoint

SEEDED = {"temperature": 0.9, "seed": 11, "top_k": 50, "presence_penalty": 0.3}
GREEDY = {"temperature": 0}


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 450) for _ in range(n)]


PREFIX = tokens(200, 1)  # a system prompt, or a conversation so far
FIRST = [*PREFIX, 17, 18, 19]
SECOND = [*PREFIX, 41, 42, 43, 44, 45, 46, 47, 48]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("reuse") / "qwen3", {}, seed=3)


def request(engine, prompt, max_tokens=12, **sampling):
    return engine.build_request(
        prompt_token_ids=prompt, max_tokens=max_tokens, ignore_eos=True, logprobs=2, **sampling
    )


def logprobs(out) -> list[float]:
    return [lp.logprob for lp in out.logprobs]


def prefilled(engine, req):
    """Run ``req``; return its completion and how many prompt tokens the engine prefilled."""
    before = engine.stats().prompt_tokens
    out = engine.generate_request(req)
    return out, engine.stats().prompt_tokens - before


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("make", [eager, overlapped], ids=["eager", "overlapped"])
def test_a_prompt_sharing_a_200_token_prefix_prefills_only_the_rest(folder, make, sampling):
    with make(folder) as warm, make(folder, prefix_reuse=False) as cold:
        warm.generate_request(request(warm, FIRST, **sampling))
        out, count = prefilled(warm, request(warm, SECOND, **sampling))
        assert count == len(SECOND) - len(PREFIX)
        assert out.usage.cached_tokens == len(PREFIX)
        want, cold_count = prefilled(cold, request(cold, SECOND, **sampling))
        assert cold_count == len(SECOND) and want.usage.cached_tokens == 0
        assert out.token_ids == want.token_ids
        assert logprobs(out) == pytest.approx(logprobs(want), abs=1e-5)
        for got, ref in zip(out.logprobs, want.logprobs, strict=True):
            assert [a.token_id for a in got.top] == [a.token_id for a in ref.top]


@pytest.mark.parametrize("make", [eager, overlapped], ids=["eager", "overlapped"])
def test_the_next_turn_of_a_conversation_reuses_the_previous_reply_too(folder, make):
    with make(folder) as warm, make(folder, prefix_reuse=False) as cold:
        turn = warm.generate_request(request(warm, FIRST, 20, **SEEDED))
        follow = [*FIRST, *turn.token_ids, 300, 301, 302]
        out, count = prefilled(warm, request(warm, follow, **SEEDED))
        # Every token of the first turn but its last reply token (sampled, never fed).
        reused = len(FIRST) + len(turn.token_ids) - 1
        assert out.usage.cached_tokens == reused and count == len(follow) - reused
        want = cold.generate_request(request(cold, follow, **SEEDED))
        assert out.token_ids == want.token_ids
        assert logprobs(out) == pytest.approx(logprobs(want), abs=1e-5)


def test_the_same_prompt_again_runs_only_its_last_token(folder):
    with eager(folder) as engine:
        first = engine.generate_request(request(engine, FIRST, **SEEDED))
        again, count = prefilled(engine, request(engine, FIRST, **SEEDED))
        assert count == 1 and again.usage.cached_tokens == len(FIRST) - 1
        assert again.token_ids == first.token_ids
        assert logprobs(again) == pytest.approx(logprobs(first), abs=1e-5)


def test_prefix_reuse_off_prefills_every_prompt_whole(folder):
    with eager(folder, prefix_reuse=False) as engine:
        engine.generate_request(request(engine, FIRST))
        out, count = prefilled(engine, request(engine, SECOND))
        assert count == len(SECOND) and out.usage.cached_tokens == 0
        assert engine.stats().cached_slots == {}


def test_a_sliding_window_model_reuses_a_prefix_longer_than_its_window(tmp_path):
    """Gemma 2's local layers (window 8 here) mask the cache by position, so a prefix of 40
    positions is reused whole and the output equals a cold run's."""
    folder = write_gemma2(tmp_path, "gemma2")
    kw = {"max_seq_len": 96, "max_batch": 2, "prefill_chunk": 16, "dtype": "float32"}
    torch.manual_seed(2)
    prefix = torch.randint(0, 450, (40,)).tolist()
    with fermi.load(folder, **kw) as warm, fermi.load(folder, **kw, prefix_reuse=False) as cold:
        warm.generate_request(request(warm, [*prefix, 1, 2], 10, **GREEDY))
        second = [*prefix, 7, 8, 9]
        out, count = prefilled(warm, request(warm, second, 10, **GREEDY))
        assert count == 3 and out.usage.cached_tokens == 40
        want = cold.generate_request(request(cold, second, 10, **GREEDY))
        assert out.token_ids == want.token_ids
        assert logprobs(out) == pytest.approx(logprobs(want), abs=1e-4)


@pytest.mark.parametrize("shared", [20, 30], ids=["short-again", "still-long"])
def test_a_longrope_prefix_is_reused_with_the_factors_the_new_prompt_needs(tmp_path, shared):
    """The first request crosses the switch (32 positions), so its slot's cache holds keys
    rotated with the long factors. A prompt sharing its first 20 tokens and staying short
    (24) must be re-encoded short; one sharing all 30 and running past the switch (36 and
    on) reuses the keys as they are. Either way the output is a cold run's."""
    folder = write_phi3(tmp_path, "longrope")
    kw = {"max_seq_len": 128, "max_batch": 2, "prefill_chunk": 16, "dtype": "float32"}
    torch.manual_seed(0)
    first = torch.randint(0, 450, (30,)).tolist()
    second = [*first[:shared], 501, 502, 503, 504, *([505, 506] if shared == 30 else [])]
    # One slot: a prompt sharing 20 of its 49 cached tokens must take it (with a slot free,
    # a cache losing more than it gives is left alone).
    with (
        fermi.load(folder, **{**kw, "max_batch": 1}) as warm,
        fermi.load(folder, **kw, prefix_reuse=False) as cold,
    ):
        warm.generate_request(request(warm, first, 20, **GREEDY))  # crosses at position 32
        out = warm.generate_request(request(warm, second, 10, **GREEDY))
        assert out.usage.cached_tokens == shared
        want = cold.generate_request(request(cold, second, 10, **GREEDY))
        assert out.token_ids == want.token_ids
        assert logprobs(out) == pytest.approx(logprobs(want), abs=1e-4)


def test_kept_caches_never_delay_new_work(folder):
    """Both slots keep caches; two new prompts sharing nothing with them run at once (the
    least recently used caches give way), and a third, sharing the newest cache, finds it."""
    with eager(folder, 2) as engine:
        engine.generate_request(request(engine, FIRST))
        engine.generate_request(request(engine, tokens(30, 5)))
        assert len(engine.stats().cached_slots) == 2
        events: list[tuple[str, str | None]] = []  # (stream, finish reason) in arrival order
        second_started = threading.Event()

        def sink(name):
            def put(delta):
                events.append((name, delta.finish_reason))
                if name == "second":
                    second_started.set()

            return put

        long = {"max_tokens": 250, "ignore_eos": True}
        first = engine.submit(
            engine.build_request(prompt_token_ids=tokens(20, 6), **long), sink("first")
        )
        second = engine.submit(
            engine.build_request(prompt_token_ids=tokens(20, 7), **long), sink("second")
        )
        assert second_started.wait(60)
        # The second had a token while the first still ran: it did not wait for a slot.
        assert ("first", "length") not in events[: events.index(("second", None)) + 1]
        first.cancel()
        second.cancel()
        assert first.done.wait(60) and second.done.wait(60)
        out = engine.generate_request(request(engine, [*tokens(20, 7), 9]))
        assert out.usage.cached_tokens == 20


def test_a_session_cache_is_not_taken_by_another_prompt_that_matches_it(folder):
    with eager(folder, 2) as engine:
        engine.generate_request(replace(request(engine, FIRST), session="mine"))
        out = engine.generate_request(request(engine, SECOND))
        assert out.usage.cached_tokens == 0  # the session's slot is its own
        assert "mine" in engine.stats().cached_slots.values()


# -- the slot table ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 600])
def test_common_prefix_matches_a_plain_scan_at_every_block_boundary(n):
    rng = random.Random(n)
    a = [rng.randrange(9) for _ in range(n)]
    for cut in sorted({0, n // 2, max(n - 1, 0), n}):
        b = [*a[:cut], 99, *a[cut + 1 :]] if cut < n else [*a, 5]
        plain = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        assert common_prefix(a, b) == (min(len(a), len(b)) if plain is None else plain)
        assert common_prefix(a, a[:cut]) == cut


def test_a_full_table_gives_up_its_least_recently_used_cache():
    table = SlotTable(2, reuse=True)
    assert table.take([1, 2, 3], None) == (0, 0, [])
    assert table.take([4, 5, 6], None) == (1, 0, [])
    table.finish(0, [1, 2, 3], None)
    table.finish(1, [4, 5, 6], None)
    assert table.take([1, 2, 3, 7], None) == (0, 3, [])  # slot 0 is now in use
    table.finish(0, [1, 2, 3, 7], None)  # ... and the most recently used
    # No match: the oldest cache (slot 1) goes; the newest moves there so that the new
    # request runs in slot 0.
    assert table.take([8, 9], None) == (0, 0, [SlotMove(0, 1, 4)])
    assert list(table.idle) == [1] and table.idle[1].tokens == [1, 2, 3, 7]


def test_a_cache_that_would_lose_more_than_it_gives_lends_its_prefix_by_copy():
    table = SlotTable(3, reuse=True)
    cached = list(range(100))
    slot, _, _ = table.take(cached, None)
    table.finish(slot, cached, None)
    # Sharing 40 of 100 cached tokens: slot 0 keeps its cache for the conversation it holds
    # and copies the 40 into a free slot, where the new prompt prefills only the rest.
    assert table.take([*range(40), 500, 501], None) == (1, 40, [SlotMove(0, 1, 40)])
    assert list(table.idle) == [0]
    # Below COPY_AT_LEAST shared tokens a prefill is cheaper than a copy.
    assert table.take([*range(10), 501, 502], None) == (2, 0, [])
    # With no free slot left, any shared prefix beats none.
    table.finish(1, [*range(40), 500, 501], None)
    table.finish(2, [*range(10), 501, 502], None)
    assert table.take([*range(10), 503, 504], None)[1:] == (10, [])


def test_a_prompt_held_whole_by_a_cache_takes_it_over():
    """The same prompt again (a regenerated reply): nothing but its last token runs, even
    though the cache's old reply is thrown away."""
    table = SlotTable(2, reuse=True)
    slot, _, _ = table.take([1, 2, 3], None)
    table.finish(slot, [1, 2, 3, *range(10, 40)], None)
    assert table.take([1, 2, 3], None) == (0, 2, [])
