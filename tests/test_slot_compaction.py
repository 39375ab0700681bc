"""Running sequences move down into freed lower cache slots (``Scheduler._compact``), so a
decode step spans as few rows as run; a moved sequence continues exactly as if it had never
moved (its cache, its sampling row, and on LongRoPE models its rope factors go with it)."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

import fermi
from fermi.runners.longrope import LongRopeRunner
from tests.test_arch_phi3 import write as write_phi3
from tests.test_scheduler_overlap import eager, overlapped
from tests.tiny import write_checkpoint

SAMPLED = {"temperature": 0.8, "seed": 4, "presence_penalty": 0.4, "top_k": 40}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("compaction") / "qwen3", {}, seed=5)


def record_decode_slots(engine) -> list[list[int]]:
    """Note the slots of every decode step the scheduler asks its runner for."""
    runner = engine.scheduler.runner
    steps: list[list[int]] = []
    name = "decode_sample" if engine.scheduler._overlap else "decode"
    inner = getattr(runner, name)

    def noting(slots, *args, **kwargs):
        steps.append(list(slots))
        return inner(slots, *args, **kwargs)

    setattr(runner, name, noting)
    return steps


def request(engine, prompt, max_tokens, session=None, **sampling):
    built = engine.build_request(
        prompt_token_ids=prompt, max_tokens=max_tokens, ignore_eos=True, **sampling
    )
    return replace(built, session=session)


def run_pair(engine, first, second) -> tuple:
    """Submit ``first`` then ``second`` at once; both outputs."""
    outputs: list = [None, None]

    def go(i, req):
        outputs[i] = engine.generate_request(req)

    threads = [threading.Thread(target=go, args=(i, r)) for i, r in enumerate((first, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return tuple(outputs)


def moved_down(steps: list[list[int]]) -> bool:
    """Whether some step ran slot 1 with slot 0 and a later one ran only slot 0."""
    paired = next((i for i, s in enumerate(steps) if sorted(s) == [0, 1]), None)
    return paired is not None and any(s == [0] for s in steps[paired + 1 :])


@pytest.mark.parametrize("make", [eager, overlapped], ids=["eager", "overlapped"])
def test_a_sequence_left_alone_in_slot_1_moves_to_slot_0_and_continues_unchanged(folder, make):
    engine = make(folder)
    try:
        long = request(engine, [7, 8, 9, 10, 11], 40, **SAMPLED)
        solo = engine.generate_request(long).token_ids
        steps = record_decode_slots(engine)
        short = request(engine, [3, 4, 5], 6, temperature=0)
        _, together = run_pair(engine, short, long)
        # The short request took slot 0 and the long one slot 1; once the short one ended,
        # the long one decoded alone, in slot 0.
        assert moved_down(steps), steps
        assert steps[-1] == [0]
        assert together.token_ids == solo
        # Nothing leaked: every slot is free again, in order.
        assert engine.scheduler._free == list(range(4))
    finally:
        engine.close()


def test_a_kept_session_yields_slot_0_and_its_next_turn_still_reuses_its_cache(folder):
    engine = fermi.load(folder, max_batch=4, max_seq_len=256)
    try:
        turn = [5, 77, 120, 33, 400, 9]
        fresh = engine.generate_request(request(engine, turn, 8, temperature=0)).token_ids
        other = request(engine, [21, 22, 23], 30, **SAMPLED)
        other_solo = engine.generate_request(other).token_ids

        engine.generate_request(request(engine, turn[:4], 3, session="s", temperature=0))
        scheduler = engine.scheduler
        assert scheduler._kept["s"].slot == 0
        steps = record_decode_slots(engine)
        # Slot 0 holds the idle session: the new request is admitted to slot 1, and the
        # session's cache moves to a free slot so that the request decodes in slot 0.
        out = engine.generate_request(other)
        assert out.token_ids == other_solo
        assert steps and all(s == [0] for s in steps)
        assert scheduler._kept["s"].slot == 2
        # The session's next turn finds its cache where it went, moves back down, and
        # prefills only past the shared prefix.
        before = scheduler.stats.prompt_tokens
        again = engine.generate_request(request(engine, turn, 8, session="s", temperature=0))
        assert scheduler.stats.prompt_tokens - before == len(turn) - 4
        assert again.usage.cached_tokens == 4
        assert again.token_ids == fresh
        assert steps[-1] == [0]
    finally:
        engine.close()


def test_a_longrope_sequence_moved_after_the_switch_keeps_its_long_factors(tmp_path):
    folder = write_phi3(tmp_path, "longrope")  # switch at 32 positions
    kw = {"max_seq_len": 128, "max_batch": 2, "prefill_chunk": 16, "dtype": "float32"}
    with fermi.load(folder, **kw) as engine:
        assert isinstance(engine.runner, LongRopeRunner)
        torch.manual_seed(0)
        crossing = request(engine, torch.randint(0, 512, (30,)).tolist(), 40, temperature=0)
        solo = engine.generate_request(crossing).token_ids
        steps = record_decode_slots(engine)
        # The short request (slot 0) ends after the other (slot 1) crossed 32 positions:
        # its move to slot 0 must carry the long factors, or slot 0's short mark would apply.
        short = request(engine, [1, 2, 3], 12, temperature=0)
        _, together = run_pair(engine, short, crossing)
        assert moved_down(steps), steps
        assert together.token_ids == solo
        assert bool(engine.runner.model.rope_long[0])
