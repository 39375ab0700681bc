"""The overlapped decode path of the scheduler (step n+1 queued with the ids step n sampled,
before the host reads step n), against the eager engine as the reference.

On CPU the CUDA-graph runner runs with ``backend=None, use_graphs=False``: it offers
``Capabilities.overlaps``, so the engine over it takes the overlapped path, with the same
bucketing and in-graph token feedback as on the GPU.
"""

from __future__ import annotations

import functools
import queue
import threading
from dataclasses import replace

import pytest
import torch

from fermi.engine.api import Engine
from fermi.loading import GenerationDefaults, load_folder
from fermi.runners.torch_cuda import CudaGraphRunner
from fermi.runners.torch_eager import TorchRunner
from fermi.text.tokenizer import Tokenizer
from tests.tiny import write_checkpoint

SEQ = 300


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("overlap") / "qwen3", {}, seed=3)


def model(folder):
    return load_folder(folder, torch.device("cpu"), torch.float32).model


def engine(folder, runner, prefix_reuse: bool = True, generation=None) -> Engine:
    """An engine over ``runner``; without ``generation``, one with no end-of-sequence ids
    (a random model then writes to max_tokens)."""
    tokenizer = Tokenizer.from_folder(folder)
    generation = generation or GenerationDefaults()
    return Engine(runner, tokenizer, generation, "tiny", prefix_reuse=prefix_reuse)


def eager(folder, max_batch=4, prefix_reuse: bool = True, generation=None) -> Engine:
    runner = TorchRunner(model(folder), max_batch, SEQ, prefill_chunk=32)
    return engine(folder, runner, prefix_reuse, generation)


def overlapped(folder, max_batch=4, prefix_reuse: bool = True, generation=None, **kw) -> Engine:
    runner = CudaGraphRunner(
        model(folder), max_batch, SEQ, 32, backend=None, use_graphs=False, warmup=False, **kw
    )
    fed = runner.decode_sample
    runner.fed = 0

    def counting(slots, token_ids, *args, **kw):  # counts the steps fed on the device
        runner.fed += token_ids is None
        return fed(slots, token_ids, *args, **kw)

    runner.decode_sample = counting
    eng = engine(folder, runner, prefix_reuse, generation)
    assert eng.runner.capabilities.overlaps
    return eng


def concurrently(eng: Engine, requests: list[dict], run=None) -> list:
    """``eng.generate(**request)`` for each request, each on its own thread (or
    ``run(eng, **request)``)."""
    results: list = [None] * len(requests)
    call = run or Engine.generate

    def run_one(i):
        try:
            results[i] = call(eng, **requests[i])
        except Exception as exc:  # reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=run_one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def same(got, want) -> None:
    assert not isinstance(got, Exception), got
    assert got.token_ids == want.token_ids
    assert got.finish_reason == want.finish_reason


def test_max_batch_one_runs_queued_requests_one_after_another(folder):
    """One slot: each request ends (length, stop) while a fed step is queued for it, and
    the next request takes the slot that step still writes to."""
    requests = [
        {"prompt_token_ids": [5, 77, 120], "max_tokens": 12, "temperature": 0},
        {"prompt_token_ids": [9, 8, 7, 6], "max_tokens": 1, "temperature": 0},
        {"prompt_token_ids": [44, 45], "max_tokens": 2, "temperature": 0.8, "seed": 11},
        {"prompt_token_ids": [3] * 9, "max_tokens": 15, "temperature": 0.9, "seed": 2},
    ]
    with eager(folder, 1) as ref:
        want = [ref.generate(**r) for r in requests]
        requests[3]["stop"] = [want[3].text[4:6]]
        want[3] = ref.generate(**requests[3])
    assert want[3].finish_reason == "stop"
    with overlapped(folder, 1) as eng:
        got = concurrently(eng, requests)
        assert eng.runner.fed > 5
    for g, w in zip(got, want, strict=True):
        same(g, w)


def test_short_requests_beside_long_ones_and_context_limit(folder):
    """max_tokens 1 and 2 beside long requests; one request ends exactly at the context."""
    long_prompt = [100 + i % 50 for i in range(SEQ - 6)]  # 6 positions left: ends by context
    requests = [
        {"prompt_token_ids": [5, 6], "max_tokens": 40, "temperature": 0},
        {"prompt_token_ids": [7, 8, 9], "max_tokens": 1, "temperature": 0},
        {"prompt_token_ids": [10, 11], "max_tokens": 2, "temperature": 0.7, "seed": 5},
        {"prompt_token_ids": long_prompt, "max_tokens": 50, "temperature": 0},
        {"prompt_token_ids": [12], "max_tokens": 3, "temperature": 0, "logprobs": 3},
        {
            "prompt_token_ids": [13, 14],
            "max_tokens": 30,
            "temperature": 1.0,
            "seed": 9,
            "frequency_penalty": 0.4,
            "top_p": 0.9,
        },
    ]
    with eager(folder) as ref:
        want = [ref.generate(**r) for r in requests]
    assert len(want[3].token_ids) == 6 and want[3].finish_reason == "length"
    with overlapped(folder) as eng:
        got = concurrently(eng, requests)
        assert eng.runner.fed > 5
    for g, w in zip(got, want, strict=True):
        same(g, w)
    lp = [(a.token_id, [t.token_id for t in a.top]) for a in got[4].logprobs]
    assert lp == [(a.token_id, [t.token_id for t in a.top]) for a in want[4].logprobs]
    values = [a.logprob for a in got[4].logprobs]
    assert values == pytest.approx([a.logprob for a in want[4].logprobs], abs=1e-4)


def test_cancel_mid_stream_while_others_run_and_a_new_request_takes_the_slot(folder):
    """A stream closed between a step's launch and its read: the others are unaffected, and
    a request admitted into the freed slot (while the cancelled row's step is queued) gets
    what it gets alone."""
    base = {"max_tokens": 30, "temperature": 0.8, "seed": 21, "ignore_eos": True}
    others = [
        {"prompt_token_ids": [20, 21, 22], **base},
        {"prompt_token_ids": [30, 31], **base, "seed": 22},
    ]
    late = {"prompt_token_ids": [40, 41, 42, 43], **base, "seed": 23, "presence_penalty": 0.3}
    with eager(folder) as ref:
        want = [ref.generate(**r) for r in [*others, late]]
    with overlapped(folder, 2) as eng:
        stream = eng.stream(prompt_token_ids=[50, 51], max_tokens=200, temperature=0)
        next(stream)
        results: list = [None] * 3

        def run(i, r):
            results[i] = eng.generate(**r)

        threads = [threading.Thread(target=run, args=(0, others[0]))]
        threads[0].start()
        for _ in range(5):
            next(stream)
        stream.close()  # cancels: the queued request for others[1] and late take its slot
        threads += [
            threading.Thread(target=run, args=(1, others[1])),
            threading.Thread(target=run, args=(2, late)),
        ]
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert eng.runner.fed > 5
    for g, w in zip(results, want, strict=True):
        same(g, w)


def test_sessions_keep_a_cache_that_equals_a_fresh_run(folder):
    """A session request ending by a stop string while a fed step for its slot is queued
    (it wrote one token past what the session keeps): the session's next request reuses what
    the cache holds and generates what a fresh run does."""
    prompt = [5, 77, 120, 33, 400, 9, 18]
    sampled = {"max_tokens": 20, "temperature": 0.7, "seed": 1, "ignore_eos": True}
    with eager(folder) as ref, overlapped(folder, 2) as eng:
        full = ref.generate(prompt_token_ids=prompt, **sampled)
        sampled["stop"] = [full.text[6:9]]
        want = ref.generate(prompt_token_ids=prompt, **sampled)
        assert want.finish_reason == "stop" and 2 < len(want.token_ids) < 19
        busy = eng.stream(prompt_token_ids=[60, 61], max_tokens=120, temperature=0)
        next(busy)  # a long neighbour keeps the batch overlapped
        fed = eng.runner.fed
        request = eng.build_request(prompt_token_ids=prompt, **sampled)
        first = eng.generate_request(replace(request, session="s"))
        assert eng.runner.fed > fed
        same(first, want)
        follow = [*prompt, *first.token_ids, 300, 301]
        greedy = {"prompt_token_ids": follow, "max_tokens": 10, "temperature": 0}
        second = eng.generate_request(replace(eng.build_request(**greedy), session="s"))
        assert second.usage.cached_tokens == len(prompt) + len(first.token_ids) - 1
        same(second, ref.generate(**greedy))
        list(busy)
        eng.release_session("s")


def decode_once(runner, slots, tokens, positions, twice: str):
    """One decode_sample step's body on ``runner``'s filled inputs, run as a graph capture
    runs it: ``twice="rehearse"`` is the capture's eager run then the replay,
    ``twice="plain"`` the same two runs with nothing between them."""
    b, kv = runner._fill_decode(slots, tokens, positions)
    variant = (False, False, 2)  # not warmed up: on the GPU captured while serving
    body = functools.partial(runner._decode_body, b, kv, variant)
    with torch.inference_mode():
        if twice == "rehearse":
            runner._rehearse(body)
        elif twice == "plain":
            body()
        out = body()
    return [t[: len(slots)].clone() for t in out if t is not None]


def test_a_graph_capture_leaves_the_decode_step_its_token_input(folder):
    """A CUDA graph is captured behind one eager run of the step, and its first replay
    repeats that step on the same input buffers. The decode step writes the ids it sampled
    into its own token input (for the next step to continue from): without putting the
    input back, the replay fed those ids in place of the step's tokens, so on the GPU the
    first step of every shape captured while serving (penalties, logprobs, warmup=False)
    sampled from the wrong token and left it in the cache."""
    slots, positions = [0, 1, 2], [5, 9, 3]
    runners = [
        CudaGraphRunner(model(folder), 4, SEQ, 32, backend=None, use_graphs=False, warmup=False)
        for _ in range(3)
    ]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 450, (p,), generator=g).tolist() for p in positions]
    tokens = [int(t) for t in torch.randint(0, 450, (3,), generator=g)]
    for runner in runners:
        for slot, ids in zip(slots, prompts, strict=True):
            runner.prefill(slot, ids, 0)
    once = decode_once(runners[0], slots, tokens, positions, twice="")
    assert once[0].tolist() != tokens  # the hazard: the step's output differs from its input
    plain = decode_once(runners[1], slots, tokens, positions, twice="plain")
    assert plain[0].tolist() != once[0].tolist()  # what the replay got before the fix
    captured = decode_once(runners[2], slots, tokens, positions, twice="rehearse")
    assert captured[0].tolist() == once[0].tolist()
    for a, b in zip(captured, once, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_steps_captured_while_serving_on_the_gpu_equal_the_cpu(folder):
    """On the GPU: logprobs and penalties are sampling variants that warm-up does not
    capture, so their first step of each (batch, length) shape is captured mid-request."""
    import fermi

    prompt = [5, 77, 120, 33, 400, 9, 18] * 5
    kw = {"prompt_token_ids": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    variants = [{"logprobs": 2}, {"repetition_penalty": 1.3}]
    torch._dynamo.reset()
    with fermi.load(folder, device="cuda", dtype="fp32", max_batch=2, max_seq_len=256) as gpu:
        on_gpu = [gpu.generate(**kw, **v).token_ids for v in variants]
    with fermi.load(folder, device="cpu", max_batch=2, max_seq_len=256) as cpu:
        on_cpu = [cpu.generate(**kw, **v).token_ids for v in variants]
    assert on_gpu == on_cpu


def test_requests_arriving_as_others_end_keep_the_steps_fed_on_the_device(folder):
    """A server's steady load: four workers each send three requests back to back, with
    lengths that make a request end or join at most steps. A row that joins (its first
    token sampled by the prefill in flight) or leaves (its last token in flight) does not
    make the engine read the step in flight first: most decode steps are queued with the
    ids still on the device, and every request gets what it gets alone."""
    workers = [
        [
            {"prompt_token_ids": [5 + w, 77, 120 + j], "max_tokens": 3 + 2 * w + j,
             "temperature": 0.9, "seed": 10 * w + j, "ignore_eos": True}
            for j in range(3)
        ]
        for w in range(4)
    ]  # fmt: skip
    with eager(folder) as ref:
        want = [[ref.generate(**r) for r in reqs] for reqs in workers]
    with overlapped(folder) as eng:
        runner = eng.runner
        decode_steps, execute = [0], runner.execute

        def counting(batch):
            decode_steps[0] += batch.decode is not None
            return execute(batch)

        runner.execute = counting
        got = concurrently(eng, [{"reqs": reqs} for reqs in workers], run=run_in_turn)
    for results, expected in zip(got, want, strict=True):
        assert not isinstance(results, Exception), results
        for g, w in zip(results, expected, strict=True):
            same(g, w)
    assert runner.fed >= 0.75 * decode_steps[0], (runner.fed, decode_steps[0])


def run_in_turn(eng: Engine, reqs: list[dict]) -> list:
    return [eng.generate(**r) for r in reqs]


def test_cancelling_a_logit_bias_row_while_its_step_is_queued(folder):
    """B (slot 0) and A (slot 1, logit_bias) decode together; A is cancelled while a step
    that sampled A's row off the device (a logits processor) is in flight, so no row of
    that step left its id on the device. B must still get what it gets alone."""
    b_req = {"prompt_token_ids": [30, 31, 32], "max_tokens": 20, "temperature": 0,
             "ignore_eos": True}  # fmt: skip
    a_req = {"prompt_token_ids": [20, 21], "max_tokens": 50, "temperature": 0,
             "ignore_eos": True, "logit_bias": {7: 1.0}}  # fmt: skip
    with eager(folder) as ref:
        want = ref.generate(**b_req)
    with overlapped(folder) as eng:
        runner = eng.runner
        execute, box = runner.execute, queue.SimpleQueue()
        handle_a, seen = None, [0]

        def cancelling(batch):
            out = execute(batch)
            if batch.decode is not None and batch.processors and len(batch.decode.slots) == 2:
                seen[0] += 1
                if seen[0] == 3:
                    handle_a.cancel()  # as a client disconnecting would, from any thread
            return out

        runner.execute = cancelling
        stream_b = eng.stream(**b_req)  # admitted first: slot 0
        first = next(stream_b)
        handle_a = eng.submit(eng.build_request(**a_req), box.put)  # slot 1
        deltas = [first, *stream_b]
    assert seen[0] >= 3
    ids = [t for d in deltas for t in d.token_ids]
    errors = [d.error for d in deltas if d.error]
    assert not errors, errors
    assert ids == want.token_ids
