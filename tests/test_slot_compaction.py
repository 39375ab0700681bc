"""Running sequences move down into freed lower cache slots (``SlotTable.compact``), so a
decode step spans as few rows as run; a moved sequence continues exactly as if it had never
moved (its cache, its sampling row, and on LongRoPE models its rope factors go with it).

Most engines here keep no finished request's cache (``prefix_reuse=False``), so that each
test places its requests in the slots it means; the last tests move with reuse on."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
import torch

import fermi
from fermi.errors import FermiError
from fermi.runners.longrope import LongRopeRunner
from tests.test_arch_gemma2 import write as write_gemma2
from tests.test_arch_phi3 import write as write_phi3
from tests.test_scheduler_overlap import eager, overlapped
from tests.tiny import write_checkpoint

SAMPLED = {"temperature": 0.8, "seed": 4, "presence_penalty": 0.4, "top_k": 40}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("compaction") / "qwen3", {}, seed=5)


def record_decode_slots(engine) -> list[list[int]]:
    """Note the slots of every decode step the engine asks its runner for."""
    runner = engine.runner
    steps: list[list[int]] = []
    inner = runner.execute

    def noting(batch):
        if batch.decode is not None:
            steps.append(list(batch.decode.slots))
        return inner(batch)

    runner.execute = noting
    return steps


def request(engine, prompt, max_tokens, session=None, **sampling):
    built = engine.build_request(
        prompt_token_ids=prompt, max_tokens=max_tokens, ignore_eos=True, **sampling
    )
    return replace(built, session=session)


@dataclass
class Run:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    cached_tokens: int = 0


def hold_slot_0(engine):
    """A stream decoding in slot 0 until it is closed (the engine must be idle)."""
    holder = engine.stream(
        prompt_token_ids=[3, 4, 5], max_tokens=200, temperature=0, ignore_eos=True
    )
    next(holder)
    return holder


def moved_run(engine, req, after: int = 1) -> Run:
    """Run ``req`` in slot 1 beside a stream in slot 0 that is closed once ``req`` has
    ``after`` tokens: from then on ``req`` runs in slot 0."""
    holder = hold_slot_0(engine)
    run = Run()
    for delta in engine.stream_request(req):
        run.token_ids += delta.token_ids
        run.logprobs += [lp.logprob for lp in delta.logprobs or ()]
        if delta.usage is not None:
            run.cached_tokens = delta.usage.cached_tokens
        if len(run.token_ids) >= after:
            holder.close()
    return run


def moved_down(steps: list[list[int]]) -> bool:
    """Whether some step ran slot 1 with slot 0 and a later one ran only slot 0."""
    paired = next((i for i, s in enumerate(steps) if sorted(s) == [0, 1]), None)
    return paired is not None and any(s == [0] for s in steps[paired + 1 :])


@pytest.mark.parametrize("make", [eager, overlapped], ids=["eager", "overlapped"])
def test_a_sequence_left_alone_in_slot_1_moves_to_slot_0_and_continues_unchanged(folder, make):
    with make(folder, prefix_reuse=False) as engine:
        long = replace(request(engine, [7, 8, 9, 10, 11], 40, **SAMPLED), logprobs=0)
        solo = engine.generate_request(long)
        steps = record_decode_slots(engine)
        together = moved_run(engine, long, after=6)
        # It decoded in slot 1 beside the stream in slot 0; once that stream ended, it
        # decoded alone, in slot 0, with the same tokens (its cache, seed, step and penalty
        # counts went with it).
        assert moved_down(steps), steps
        assert steps[-1] == [0]
        assert together.token_ids == solo.token_ids
        want = [lp.logprob for lp in solo.logprobs]
        assert together.logprobs == pytest.approx(want, abs=1e-5)
        # Nothing leaked: every slot is free again, in order.
        assert engine.stats().free_slots == tuple(range(4))


def test_a_kept_session_yields_slot_0_and_its_next_turn_still_reuses_its_cache(folder):
    engine = fermi.load(folder, max_batch=4, max_seq_len=256, prefix_reuse=False)
    try:
        turn = [5, 77, 120, 33, 400, 9]
        fresh = engine.generate_request(request(engine, turn, 8, temperature=0)).token_ids
        other = request(engine, [21, 22, 23], 30, **SAMPLED)
        other_solo = engine.generate_request(other).token_ids

        engine.generate_request(request(engine, turn[:4], 3, session="s", temperature=0))
        assert engine.stats().cached_slots == {0: "s"}
        steps = record_decode_slots(engine)
        # Slot 0 holds the idle session: the new request is admitted to slot 1, and the
        # session's cache moves to a free slot so that the request decodes in slot 0.
        out = engine.generate_request(other)
        assert out.token_ids == other_solo
        assert steps and all(s == [0] for s in steps)
        assert engine.stats().cached_slots == {2: "s"}
        # The session's next turn finds its cache where it went, moves back down, and
        # prefills only past the shared prefix.
        before = engine.stats().prompt_tokens
        again = engine.generate_request(request(engine, turn, 8, session="s", temperature=0))
        assert engine.stats().prompt_tokens - before == len(turn) - 4
        assert again.usage.cached_tokens == 4
        assert again.token_ids == fresh
        assert steps[-1] == [0]
    finally:
        engine.close()


def longrope_engine(tmp_path):
    """A tiny Phi-3.5-style LongRoPE model whose factors switch at 32 positions."""
    folder = write_phi3(tmp_path, "longrope")
    kw = {"max_seq_len": 128, "max_batch": 2, "prefill_chunk": 16, "dtype": "float32"}
    engine = fermi.load(folder, **kw, prefix_reuse=False)
    assert isinstance(engine.runner, LongRopeRunner)
    return engine


def crossing_request(engine):
    """A 30-token prompt and 40 new tokens: the sequence crosses the switch early on."""
    torch.manual_seed(0)
    return request(engine, torch.randint(0, 512, (30,)).tolist(), 40, temperature=0)


def test_a_longrope_sequence_moved_after_the_switch_keeps_its_long_factors(tmp_path):
    with longrope_engine(tmp_path) as engine:
        crossing = crossing_request(engine)
        solo = engine.generate_request(crossing).token_ids
        steps = record_decode_slots(engine)
        # The stream in slot 0 ends after the request in slot 1 crossed 32 positions: its
        # move to slot 0 must carry the long factors, or slot 0's short mark would apply.
        together = moved_run(engine, crossing, after=8)
        assert moved_down(steps), steps
        assert together.token_ids == solo
        assert bool(engine.runner.model.rope_long[0])


def test_a_short_request_in_the_slot_a_long_sequence_left_runs_with_short_factors(tmp_path):
    """A LongRoPE sequence past the switch moves from slot 1 to slot 0; slot 1 keeps the
    decoder's long mark. A short request later admitted to slot 1 must still be encoded
    with the short factors (the runner must not believe slot 1 is short while the decoder
    marks it long)."""
    with longrope_engine(tmp_path) as engine:
        crossing = crossing_request(engine)
        probe = request(engine, [40, 41, 42, 43, 44], 10, temperature=0, logprobs=0)
        probe_solo = engine.generate_request(probe)
        steps = record_decode_slots(engine)
        moved_run(engine, crossing, after=5)  # moves at 35 positions, with long factors
        assert moved_down(steps), steps
        assert bool(engine.runner.model.rope_long[1])  # slot 1's mark is left as it was
        # Slot 0 is held, so the probe is admitted to slot 1 and stays there.
        holder = hold_slot_0(engine)
        steps.clear()
        probed = engine.generate_request(probe)
        holder.close()
        assert [0, 1] in [sorted(s) for s in steps], steps
        assert probed.token_ids == probe_solo.token_ids
        got = [lp.logprob for lp in probed.logprobs]
        want = [lp.logprob for lp in probe_solo.logprobs]
        assert got == pytest.approx(want, abs=1e-4)


def test_a_move_that_fails_fails_its_batch_once_and_loses_no_slot(tmp_path):
    """A move that raises (a device error) fails the running batch, like any failed step;
    afterwards every slot is free again and the next requests run. (A slot taken off the
    free list before the copy ran would be lost: later compactions would look for it there
    and fail every batch above it.)"""
    folder = write_checkpoint(tmp_path / "qwen3", {}, seed=5)
    with eager(folder, 2, prefix_reuse=False) as engine:
        runner = engine.runner
        works = runner.move_slot
        calls = []

        def fails_once(src, dst, length):
            calls.append((src, dst))
            if len(calls) == 1:
                raise RuntimeError("device copy failed")
            works(src, dst, length)

        runner.move_slot = fails_once
        mover = request(engine, [7, 8, 9, 10], 60, temperature=0)
        with pytest.raises(FermiError, match="device copy failed"):
            moved_run(engine, mover)
        assert calls == [(1, 0)]
        assert engine.stats().free_slots == (0, 1)
        # Both slots serve again, and the next move works.
        assert len(moved_run(engine, mover).token_ids) == 60
        assert calls == [(1, 0), (1, 0)]
        assert engine.stats().free_slots == (0, 1)


def test_a_sequence_moved_past_a_sliding_window_continues_unchanged(tmp_path):
    """Gemma 2's local layers (window 8 here) keep the cache linear by position (the window
    is a mask), so a moved prefix is the whole state: the moved sequence's logprobs equal
    its solo run's."""
    folder = write_gemma2(tmp_path, "gemma2")
    kw = {"max_seq_len": 96, "max_batch": 2, "prefill_chunk": 16, "dtype": "float32"}
    with fermi.load(folder, **kw, prefix_reuse=False) as engine:
        torch.manual_seed(1)
        long = request(engine, torch.randint(0, 512, (20,)).tolist(), 30, temperature=0)
        long = replace(long, logprobs=0)
        solo = engine.generate_request(long)
        steps = record_decode_slots(engine)
        together = moved_run(engine, long, after=8)  # moves at 28 positions
        assert moved_down(steps), steps
        assert together.token_ids == solo.token_ids
        want = [lp.logprob for lp in solo.logprobs]
        assert together.logprobs == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("make", [eager, overlapped], ids=["eager", "overlapped"])
def test_a_session_request_that_moved_is_kept_where_it_went(tmp_path, make):
    """A session's request moves from slot 1 to slot 0, then ends: the session keeps slot
    0 (slot 1 is free, not lost nor kept twice), and its next turn reuses every cached
    position and generates what a fresh run does."""
    folder = write_checkpoint(tmp_path / "qwen3", {}, seed=5)
    with make(folder, 2, prefix_reuse=False) as engine:
        prompt = [5, 77, 120, 33, 400, 9]
        steps = record_decode_slots(engine)
        # after=2: its second token comes from a decode step beside the stream in slot 0
        # (its first comes from its prefill, in a step that decodes slot 0 alone).
        turn = moved_run(engine, request(engine, prompt, 20, session="s", temperature=0), 2)
        assert moved_down(steps), steps
        assert engine.stats().cached_slots == {0: "s"}
        assert engine.stats().free_slots == (1,)
        follow = [*prompt, *turn.token_ids, 300, 301]
        fresh = engine.generate_request(request(engine, follow, 8, temperature=0))
        again = engine.generate_request(request(engine, follow, 8, session="s", temperature=0))
        assert again.usage.cached_tokens == len(prompt) + len(turn.token_ids) - 1
        assert again.token_ids == fresh.token_ids
