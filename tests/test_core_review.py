"""Review of the engine core (issue 14): the step seam, the slot table and prefix reuse,
each test a bug found by reading and fixed since."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fermi.engine.slots import SlotTable
from fermi.loading import load_folder
from fermi.runners.base import Runner
from fermi.runners.torch_cuda import CudaGraphRunner
from fermi.runners.torch_eager import TorchRunner
from tests.test_scheduler_overlap import SEQ, engine, model
from tests.tiny import write_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("review") / "qwen3", {}, seed=3)


class Unmovable(TorchRunner):
    """A runner that cannot move slots, as ONNX's (``Capabilities.moves_slots`` False)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.capabilities = replace(self.capabilities, moves_slots=False)

    move_slot = Runner.move_slot  # raises, as the base class does


def test_a_runner_that_cannot_move_slots_gets_no_move_from_admission(folder):
    """A kept cache in slot 0 and a new prompt sharing nothing with it: the slot table moved
    the cache to slot 1 to run the request in slot 0, whatever the runner, and a runner
    without ``move_slot`` (ONNX) failed the request ("the onnx runner cannot move slots")."""
    runner = Unmovable(model(folder), 2, SEQ, prefill_chunk=32)
    with engine(folder, runner) as eng, engine(folder, TorchRunner(model(folder), 2, SEQ)) as ref:
        kw = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
        eng.generate(prompt_token_ids=[5, 6, 7, 8], **kw)
        got = eng.generate(prompt_token_ids=[90, 91, 92], **kw)
        assert got.token_ids == ref.generate(prompt_token_ids=[90, 91, 92], **kw).token_ids
        assert eng.stats().cached_slots.keys() == {0, 1}


def test_a_slot_table_without_moves_never_copies_a_shared_prefix():
    table = SlotTable(2, reuse=True, moves=False)
    cached = list(range(100))
    table.finish(table.take(cached, None)[0], cached, None)
    assert table.take([*range(40), 500, 501], None) == (1, 0, [])


def test_a_session_name_used_again_keeps_its_cache_after_a_released_request_was_cancelled(folder):
    """``release_session`` while a request of the session waits marks the session so that
    the waiting request keeps no cache. When that request was cancelled before it ran, the
    mark stayed for good: every later request of a session of that name kept no cache."""
    runner = TorchRunner(model(folder), 1, SEQ, prefill_chunk=32)
    with engine(folder, runner, prefix_reuse=False) as eng:
        busy = eng.stream(prompt_token_ids=[60, 61], max_tokens=200, ignore_eos=True)
        next(busy)  # holds the only slot
        kw = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
        waiting = eng.submit(
            replace(eng.build_request(prompt_token_ids=[1, 2], **kw), session="s"), print
        )
        eng.release_session("s")
        waiting.cancel()
        busy.close()
        assert waiting.done.wait(30)
        prompt = [5, 6, 7, 8, 9]
        first = eng.generate_request(
            replace(eng.build_request(prompt_token_ids=prompt, **kw), session="s")
        )
        follow = [*prompt, *first.token_ids, 10]
        second = eng.build_request(prompt_token_ids=follow, **kw)
        out = eng.generate_request(replace(second, session="s"))
        assert out.usage.cached_tokens == len(prompt) + len(first.token_ids) - 1
        assert eng.load == 0


class Forgetful(TorchRunner):
    """A runner whose slots do not keep their cache between requests, as Core ML's
    (``Capabilities.keeps_cache`` False)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.capabilities = replace(self.capabilities, keeps_cache=False)


def test_a_runner_that_keeps_no_cache_gets_no_reuse_even_for_a_session(folder):
    runner = Forgetful(model(folder), 2, SEQ, prefill_chunk=32)
    with engine(folder, runner) as eng:
        kw = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
        first = replace(eng.build_request(prompt_token_ids=[5, 6, 7, 8], **kw), session="s")
        eng.generate_request(first)
        again = eng.generate_request(replace(first, prompt_ids=(5, 6, 7, 8, 9)))
        assert again.usage.cached_tokens == 0
        assert eng.stats().cached_slots == {}


class Recording(CudaGraphRunner):
    """The compiled runner (Dynamo's eager backend: no C++ compile), noting the Dynamo
    recompile limit its steps run under."""

    seen: list[int]

    def execute(self, batch):
        self.seen.append(torch._dynamo.config.recompile_limit)
        return super().execute(batch)


def test_the_engine_thread_runs_under_the_compiler_settings_of_the_thread_that_made_it(folder):
    # torch keeps its compiler settings per thread (context variables): the limit a compiled
    # runner raises at construction must hold in the engine thread too, or a process whose
    # layer code already has eight compiles (a second model, other kernels) fails its next
    # one with "hit config.recompile_limit (8)".
    with torch._dynamo.config.patch(recompile_limit=8):
        runner = Recording(
            load_folder(folder, torch.device("cpu"), torch.float32).model,
            2,
            64,
            16,
            backend="eager",
            use_graphs=False,
            warmup=False,
        )
        runner.seen = []
        made = engine(folder, runner)
    try:
        made.generate(prompt_token_ids=[5, 6, 7], max_tokens=3, ignore_eos=True)
        assert runner.seen and set(runner.seen) == {64}
    finally:
        made.close()
