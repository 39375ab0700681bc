"""Constrained decoding on the CUDA-graph runner on a real GPU (skipped without CUDA): the
masked step's forward graph and sampling graph, and the sampling left pending until the
step in flight is read."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import torch

from fermi.loading import load_folder
from tests.test_grammar import SCHEMA, _json_request, count_continued
from tests.test_scheduler_overlap import engine as make_engine
from tests.tiny import write_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("grammar_cuda") / "qwen3", {}, seed=4)


@pytest.fixture(scope="module")
def engine(folder):
    from fermi.runners.torch_cuda import CudaGraphRunner

    torch._dynamo.reset()
    model = load_folder(folder, torch.device("cuda"), torch.float32).model
    runner = CudaGraphRunner(model, max_batch=4, max_seq_len=512, prefill_chunk=64)
    with make_engine(folder, runner) as eng:
        yield eng


def test_fifty_seeded_samples_follow_the_schema_in_graphs(engine):
    runner = engine.runner
    forward = runner._decode_logits
    continued = count_continued(runner)
    try:
        with ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(lambda s: engine.generate(**_json_request(s)), range(50)))
    finally:
        runner._decode_logits = forward
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({o.text for o in outs}) > 40
    assert any(key[0] == "sample" for key in runner._graphs)  # the sampling graph replayed
    assert sum(continued) > len(continued) // 2  # most steps continued the one in flight


def test_a_constrained_row_beside_a_free_one_gives_what_each_gives_alone(engine):
    free = {"prompt_token_ids": [9, 10, 11], "max_tokens": 40, "ignore_eos": True, "seed": 1}
    free_alone = engine.generate(**free).token_ids
    json_alone = engine.generate(**_json_request(3)).token_ids
    stream = engine.stream(**_json_request(3))
    first = next(stream)
    free_beside = engine.generate(**free).token_ids
    json_beside = first.token_ids + [t for d in stream for t in d.token_ids]
    assert free_beside == free_alone
    assert json_beside == json_alone


def test_streamed_and_whole_results_are_equal(engine):
    whole = engine.generate(**_json_request(11))
    deltas = list(engine.stream(**_json_request(11)))
    assert "".join(d.text for d in deltas) == whole.text
    assert deltas[-1].finish_reason == whole.finish_reason == "stop"
