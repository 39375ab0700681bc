"""The compiled CPU runner (``torch-compile``) against the eager runner on the same tiny Qwen3
with fp16 weight storage: logits, greedy and seeded tokens. One compile for the module."""

from __future__ import annotations

import pytest
import torch

from fermi.engine.api import Engine
from fermi.loading import load_folder
from fermi.models.half_weights import use_half_weights
from fermi.runners.select import torch_runner
from fermi.runners.torch_cpu_compiled import CompiledCpuRunner
from tests.tiny import write_checkpoint

# Inductor's C++ compiles: ~1-3 minutes on 2 cores, over 5 on a loaded machine (a CI run
# whose first test, which builds the module's engines, passed pytest's 300 s default).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CPU = torch.device("cpu")
MAX_BATCH, MAX_SEQ, CHUNK = 2, 128, 16
# Both runners run the same FBGEMM products on the same packed weights; Inductor only fuses
# and reorders the float32 glue between them (norm and softmax reductions, rope, residual
# adds), each op off by a few float32 ulps (~1e-7 relative). Over the tiny model's layers that
# stays far below 1e-4 of logits of size ~1; a real error (a wrong position, mask or cache
# row) moves them by 1e-2 or more.
TOL = 1e-4


def loaded(folder):
    ckpt = load_folder(folder, CPU, torch.float32)
    use_half_weights(ckpt.model)
    return ckpt


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("compile_cpu") / "qwen3", {})


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("compile_cache")


@pytest.fixture(scope="module")
def engines(folder, compile_cache):
    made = []
    for name in ("torch-compile", "torch-cpu"):
        ckpt = loaded(folder)
        # By name, as fermi.load(runner=...) and --runner pick it (fermi.runners.select).
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FERMI_COMPILE_CACHE", str(compile_cache))
            runner = torch_runner(ckpt.model, name, MAX_BATCH, MAX_SEQ, CHUNK, "full")
        # No prefix reuse: every request prefills from scratch, so the logits test may
        # write the runners' slots directly.
        made.append(Engine(runner, ckpt.tokenizer, ckpt.generation, "tiny", prefix_reuse=False))
    yield made
    for engine in made:
        engine.close()


def test_compiled_cpu_runner_names_itself_and_compiles_each_step_kind_once(engines, compile_cache):
    compiled = engines[0].runner
    assert isinstance(compiled, CompiledCpuRunner)
    assert compiled.capabilities.name == "torch-compile"
    assert engines[1].runner.capabilities.name == "torch-cpu"
    # Prefill, the one-row decode step, the wider one, two samplers; dynamic shapes cover the
    # rest of the buckets (a recompile per bucket would show here).
    assert compiled.startup.compiles <= 10
    assert not compiled.startup.notes
    # The artefacts went to disk for the next start (one bundle for this model and shape).
    assert not compiled.startup.cache_hit and len(list(compile_cache.glob("*.bin"))) == 1


def test_compiled_cpu_logits_equal_eager_within_float32_reordering(engines):
    compiled, eager = (e.runner for e in engines)
    vocab = compiled.capabilities.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = {0: torch.randint(0, vocab, (23,), generator=g).tolist(), 1: [7, 3, 11]}
    worst, last, pos = 0.0, {}, {}
    for slot, ids in prompts.items():
        for start in range(0, len(ids), CHUNK):
            a = compiled.prefill(slot, ids[start : start + CHUNK], start)
            b = eager.prefill(slot, ids[start : start + CHUNK], start)
            worst = max(worst, (a - b).abs().max().item())
        last[slot], pos[slot] = int(b.argmax()), len(ids)
    for _ in range(6):
        for slots in ([0, 1], [1]):  # the batch-2 step and the one-row step
            toks, where = [last[s] for s in slots], [pos[s] for s in slots]
            a, b = compiled.decode(slots, toks, where), eager.decode(slots, toks, where)
            assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
            worst = max(worst, (a - b).abs().max().item())
            for i, s in enumerate(slots):
                last[s], pos[s] = int(b[i].argmax()), pos[s] + 1
    assert worst < TOL


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 0},
        {"temperature": 0.9, "seed": 11},
        {"temperature": 1.0, "top_p": 0.9, "seed": 5},
    ],
)
def test_compiled_cpu_tokens_equal_eager(engines, settings):
    prompts = [[5, 77, 120, 33, 400, 9, 18], [100 + i for i in range(25)]]
    outs = [
        [
            e.generate(prompt_token_ids=p, max_tokens=20, ignore_eos=True, **settings).token_ids
            for p in prompts
        ]
        for e in engines
    ]
    assert outs[0] == outs[1]


def test_torch_compile_is_refused_off_the_cpu_by_name(folder):
    ckpt = load_folder(folder, CPU, torch.float32)
    ckpt.model.to("meta")
    with pytest.raises(ValueError, match="'torch-compile' compiles for the CPU"):
        CompiledCpuRunner(ckpt.model, 1, 16)
