"""Session KV reuse in the scheduler: a request that names a session keeps its slot's cache,
and the session's next request prefills only past the prefix it shares with that cache."""

from __future__ import annotations

from dataclasses import replace

import pytest

import fermi
from tests.tiny import write_checkpoint

PROMPT = [5, 77, 120, 33, 400, 9, 18, 250, 61]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp("sessions") / "qwen3", {})
    # Sessions alone keep caches here; tests/test_prefix_reuse.py covers reuse for all.
    eng = fermi.load(folder, max_batch=2, max_seq_len=256, prefix_reuse=False)
    yield eng
    eng.close()


def run(engine, prompt, session=None, max_tokens=6):
    request = engine.build_request(
        prompt_token_ids=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True
    )
    return engine.generate_request(replace(request, session=session))


def prefilled(engine, fn):
    """Run ``fn`` and return (its result, prompt tokens the engine actually prefilled)."""
    before = engine.stats().prompt_tokens
    result = fn()
    return result, engine.stats().prompt_tokens - before


def test_next_request_of_a_session_prefills_only_new_tokens_and_matches_a_fresh_run(engine):
    first = run(engine, PROMPT, session="a")
    # The cache holds the prompt and every generated token but the last (never fed back).
    follow = [*PROMPT, *first.token_ids, 300, 301, 302]
    second, computed = prefilled(engine, lambda: run(engine, follow, session="a"))
    cached = len(PROMPT) + len(first.token_ids) - 1
    assert second.usage.cached_tokens == cached
    assert computed == len(follow) - cached
    assert second.token_ids == run(engine, follow).token_ids
    engine.release_session("a")


def test_diverging_prompt_reuses_only_the_common_prefix(engine):
    run(engine, PROMPT, session="b")
    changed = [*PROMPT[:4], 401, 402, 403]
    out, computed = prefilled(engine, lambda: run(engine, changed, session="b"))
    assert out.usage.cached_tokens == 4
    assert computed == len(changed) - 4
    assert out.token_ids == run(engine, changed).token_ids
    engine.release_session("b")


def test_identical_prompt_recomputes_only_its_last_token(engine):
    run(engine, PROMPT, session="c")
    out, computed = prefilled(engine, lambda: run(engine, PROMPT, session="c"))
    assert (out.usage.cached_tokens, computed) == (len(PROMPT) - 1, 1)
    engine.release_session("c")


def test_released_session_starts_from_an_empty_cache(engine):
    run(engine, PROMPT, session="d")
    engine.release_session("d")
    out = run(engine, PROMPT, session="d")
    assert out.usage.cached_tokens == 0
    engine.release_session("d")


def test_requests_without_a_session_report_no_cached_tokens(engine):
    run(engine, PROMPT)
    assert run(engine, PROMPT).usage.cached_tokens == 0


def test_idle_sessions_holding_every_slot_give_way_least_recently_used_first(engine):
    # max_batch is 2: two idle sessions hold both slots.
    run(engine, PROMPT, session="old")
    run(engine, PROMPT, session="new")
    # A request with no session must still run: it takes the least recently used slot.
    assert run(engine, [7, 8, 9]).finish_reason == "length"
    assert run(engine, PROMPT, session="new").usage.cached_tokens == len(PROMPT) - 1
    assert run(engine, PROMPT, session="old").usage.cached_tokens == 0
    engine.release_session("old")
    engine.release_session("new")


def test_cancelled_session_request_keeps_what_its_cache_holds(engine):
    request = engine.build_request(
        prompt_token_ids=PROMPT, max_tokens=50, temperature=0, ignore_eos=True
    )
    stream = engine.stream_request(replace(request, session="e"))
    got = [next(stream).token_ids[0] for _ in range(3)]
    stream.close()  # cancels the request
    follow = [*PROMPT, *got]
    out = run(engine, follow, session="e")
    # The cache held at least the prompt and the tokens fed back before the cancel.
    assert out.usage.cached_tokens >= len(PROMPT) + 2
    assert out.token_ids == run(engine, follow).token_ids
    engine.release_session("e")


def test_releasing_a_session_whose_request_still_waits_keeps_no_cache(engine):
    import threading

    # Two streams long enough to hold both slots until they are closed (closing cancels
    # them), so the session's request still waits however late its thread gets to run.
    busy = [
        engine.stream(prompt_token_ids=PROMPT, max_tokens=240, temperature=0, ignore_eos=True)
        for _ in range(2)
    ]
    for stream in busy:  # both slots are taken once each stream has produced a token
        next(stream)
    result = {}
    waiter = threading.Thread(target=lambda: result.update(out=run(engine, PROMPT, session="w")))
    waiter.start()
    while engine.stats().waiting == 0 and not result:
        threading.Event().wait(0.005)
    engine.release_session("w")  # arrives while the request is queued behind the streams
    for stream in busy:
        stream.close()
    waiter.join(timeout=60)
    assert result["out"].finish_reason == "length"
    # The engine takes a release and a request in the order they came: once this one ran,
    # the release was handled (even had the streams ended before the request was queued).
    run(engine, [7, 8, 9], max_tokens=1)
    assert "w" not in engine.stats().cached_slots.values()
