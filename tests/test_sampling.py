"""Tests for the on-device batched sampler."""

from __future__ import annotations

import os

import pytest
import torch

from fermi.sampling import (
    SampleOutput,
    SamplingBatch,
    SamplingParams,
    apply_penalties,
    exponential_noise,
    sample,
)

CPU = torch.device("cpu")


def _batch(
    params: list[SamplingParams],
    vocab: int,
    *,
    prompts: list[list[int]] | None = None,
    seeds: list[int] | None = None,
    max_batch: int | None = None,
) -> SamplingBatch:
    batch = SamplingBatch(max_batch or len(params), vocab, CPU)
    for row, p in enumerate(params):
        prompt = prompts[row] if prompts else []
        batch.set_row(row, p, prompt, seeds[row] if seeds else row)
    return batch


def _sample(logits: torch.Tensor, batch: SamplingBatch, rows: list[int], **kw) -> SampleOutput:
    # The general variant unless a test picks one: neutral rows come out the same in it.
    kw.setdefault("use_filters", True)
    kw.setdefault("use_penalties", True)
    return sample(logits, batch, torch.tensor(rows, dtype=torch.int64), **kw)


def _many_seeds(params: SamplingParams, vocab: int, n: int) -> SamplingBatch:
    """n rows with identical params and seeds 0..n-1, written directly (set_row n times is slow)."""
    batch = SamplingBatch(n, vocab, CPU)
    batch.temperature.fill_(params.temperature)
    batch.top_k.fill_(params.top_k)
    batch.top_p.fill_(params.top_p)
    batch.min_p.fill_(params.min_p)
    batch.seed.copy_(torch.arange(n))
    return batch


def _draw_many(logits: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    """One draw for each of n seeds from the same [1, V] logits."""
    batch = _many_seeds(params, logits.shape[-1], n)
    rows = torch.arange(n)
    kw = {"use_filters": params.uses_filters, "use_penalties": False}
    return sample(logits.expand(n, -1), batch, rows, **kw).tokens


def _logits(vocab: int, seed: int = 0, rows: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 2.0


# --- greedy and temperature -------------------------------------------------------------------


def test_greedy_rows_take_argmax_of_logits():
    logits = _logits(300, rows=6)
    batch = _batch([SamplingParams(temperature=0.0)] * 6, 300)
    out = _sample(logits, batch, list(range(6)))
    assert torch.equal(out.tokens, logits.argmax(-1))


def test_all_greedy_shortcut_gives_the_same_tokens_and_logprobs():
    logits = _logits(300, rows=5)
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.3)] * 5
    batch = _batch(params, 300, prompts=[[1, 2, 3]] * 5)
    full = _sample(logits, batch, list(range(5)), want_logprobs=3)
    fast = _sample(logits, batch, list(range(5)), want_logprobs=3, all_greedy=True)
    for a, b in zip(full, fast, strict=True):
        assert torch.equal(a, b)


def test_greedy_ignores_low_precision_dtype_and_filters():
    logits = _logits(300, rows=4).to(torch.bfloat16)
    batch = _batch([SamplingParams(temperature=0.0, top_k=3, top_p=0.5)] * 4, 300)
    out = _sample(logits, batch, list(range(4)), use_filters=True, use_penalties=False)
    assert torch.equal(out.tokens, logits.float().argmax(-1))


def test_tiny_temperature_matches_greedy():
    logits = _logits(500, rows=16)
    batch = _batch([SamplingParams(temperature=1e-6)] * 16, 500, seeds=list(range(100, 116)))
    assert torch.equal(_sample(logits, batch, list(range(16))).tokens, logits.argmax(-1))


def test_top_k_one_matches_greedy():
    logits = _logits(500, rows=16)
    batch = _batch([SamplingParams(temperature=1.5, top_k=1)] * 16, 500)
    assert torch.equal(_sample(logits, batch, list(range(16))).tokens, logits.argmax(-1))


def test_greedy_and_sampled_rows_mix_in_one_batch():
    logits = _logits(200, rows=1).expand(64, -1)
    params = [SamplingParams(temperature=0.0 if r % 2 else 5.0) for r in range(64)]
    tokens = _sample(logits, _batch(params, 200), list(range(64))).tokens
    argmax = logits[0].argmax()
    assert (tokens[1::2] == argmax).all()
    assert len(set(tokens[0::2].tolist())) > 10  # hot rows really sample


# --- filters ----------------------------------------------------------------------------------


def test_top_k_samples_stay_within_k_largest():
    logits = _logits(100)
    tokens = _draw_many(logits, SamplingParams(temperature=3.0, top_k=5), 2000)
    top5 = set(logits[0].topk(5).indices.tolist())
    assert set(tokens.tolist()) == top5


def test_top_p_support_is_exactly_the_nucleus():
    probs = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.05, 0.03, 0.02])
    logits = probs.log()[torch.tensor([4, 0, 6, 2, 1, 5, 3])].unsqueeze(0)  # shuffled
    # Cumulative 0.35, 0.60, 0.80 >= 0.75: nucleus is the three largest, ids 1, 4, 3.
    tokens = _draw_many(logits, SamplingParams(top_p=0.75), 3000)
    assert set(tokens.tolist()) == {1, 4, 3}


def test_top_p_one_keeps_every_token():
    logits = torch.zeros(1, 20)
    tokens = _draw_many(logits, SamplingParams(top_p=1.0, top_k=20), 2000)
    assert set(tokens.tolist()) == set(range(20))


def test_min_p_drops_tokens_below_fraction_of_max():
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = probs.log().unsqueeze(0)
    # min_p 0.3: keep p >= 0.12, i.e. ids 0, 1, 2.
    tokens = _draw_many(logits, SamplingParams(min_p=0.3), 3000)
    assert set(tokens.tolist()) == {0, 1, 2}


def test_top_k_then_top_p_renormalises_over_top_k():
    probs = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1])
    logits = probs.log().unsqueeze(0)
    # After top_k=2 the survivors weigh 0.545 / 0.455, so top_p=0.5 keeps the first alone;
    # on the unrenormalised 0.3 it would have kept the second too.
    tokens = _draw_many(logits, SamplingParams(top_k=2, top_p=0.5), 500)
    assert set(tokens.tolist()) == {0}


def test_tokens_tied_with_the_last_kept_one_are_kept():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    # A value threshold cannot tell ties apart, so top_k=2 keeps both 1.0 logits.
    tokens = _draw_many(logits, SamplingParams(top_k=2), 1000)
    assert set(tokens.tolist()) == {0, 1, 2}


def test_filters_match_transformers_warpers():
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    scores = _logits(400, seed=3, rows=1)
    warpers = [
        logits_process.TopKLogitsWarper(top_k=40),
        logits_process.TopPLogitsWarper(top_p=0.8),
        logits_process.MinPLogitsWarper(min_p=0.05),
    ]
    hf = scores.clone()
    for warper in warpers:
        hf = warper(torch.zeros(1, 1, dtype=torch.int64), hf)
    params = SamplingParams(top_k=40, top_p=0.8, min_p=0.05)
    tokens = _draw_many(scores, params, 4000)
    expected = set(torch.isfinite(hf[0]).nonzero().flatten().tolist())
    assert set(tokens.tolist()) <= expected
    assert len(set(tokens.tolist())) >= len(expected) - 2  # the rarest may go undrawn


def test_neutral_rows_are_identical_in_every_variant():
    logits = _logits(300, rows=8)
    batch = _batch([SamplingParams()] * 8, 300, prompts=[[1, 2, 3]] * 8)
    rows = list(range(8))
    batch.record(torch.tensor(rows), logits.argmax(-1))
    outs = [
        _sample(logits, batch, rows, use_filters=f, use_penalties=p, want_logprobs=2)
        for f in (False, True)
        for p in (False, True)
    ]
    for out in outs[1:]:
        for got, want in zip(out, outs[0], strict=True):
            assert torch.equal(got, want)


# --- penalties --------------------------------------------------------------------------------


def _penalise(logits, prompt, generated, rep=1.0, presence=0.0, frequency=0.0) -> torch.Tensor:
    vocab = logits.shape[-1]
    mask = torch.zeros(1, vocab, dtype=torch.bool)
    mask[0, prompt] = True
    counts = torch.zeros(1, vocab, dtype=torch.int32)
    for t in generated:
        counts[0, t] += 1
    f32 = torch.float32
    return apply_penalties(
        logits,
        mask,
        counts,
        torch.tensor([rep], dtype=f32),
        torch.tensor([presence], dtype=f32),
        torch.tensor([frequency], dtype=f32),
    )


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5, 0.0]])
    got = _penalise(logits, prompt=[0, 1], generated=[3, 5], rep=2.0)
    # Prompt ids 0, 1 and generated ids 3, 5 are penalised; 2 and 4 are not.
    assert torch.equal(got, torch.tensor([[1.0, -4.0, 3.0, -2.0, 0.5, 0.0]]))


def test_repetition_penalty_matches_transformers_processor():
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    scores = _logits(200, seed=7)
    prompt, generated = [5, 9, 9, 120, 3], [9, 44, 199, 44]
    processor = logits_process.RepetitionPenaltyLogitsProcessor(penalty=1.3)
    input_ids = torch.tensor([prompt + generated])
    want = processor(input_ids, scores.clone())
    assert torch.allclose(_penalise(scores, prompt, generated, rep=1.3), want)


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = _logits(30, seed=2)
    got = _penalise(logits, prompt=[1, 4], generated=[4, 7, 7, 7], presence=0.5, frequency=0.25)
    want = logits.clone()
    # mu[j] - c[j] * frequency - (c[j] > 0) * presence, counting generated tokens only.
    want[0, 4] -= 1 * 0.25 + 0.5
    want[0, 7] -= 3 * 0.25 + 0.5
    assert torch.allclose(got, want)


def test_penalties_steer_greedy_choice_through_sample():
    logits = torch.tensor([[3.0, 2.5, 0.0, -1.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    batch = _batch([params], 4, prompts=[[0]])
    assert _sample(logits, batch, [0]).tokens.tolist() == [1]  # 3/1.5 = 2 < 2.5
    batch.record(torch.tensor([0]), torch.tensor([1]))
    assert _sample(logits, batch, [0]).tokens.tolist() == [0]  # 2 vs 2.5/1.5


# --- determinism and the noise ---------------------------------------------------------------


def test_same_seed_and_step_give_the_same_token():
    logits = torch.zeros(1, 1000)
    first = _sample(logits, _batch([SamplingParams()], 1000, seeds=[42]), [0]).tokens
    again = _sample(logits, _batch([SamplingParams()], 1000, seeds=[42]), [0]).tokens
    assert torch.equal(first, again)


def test_different_seeds_give_different_tokens():
    tokens = _draw_many(torch.zeros(1, 1000), SamplingParams(), 500)
    assert len(set(tokens.tolist())) > 350  # about 390 expected for 500 uniform draws of 1000


def test_steps_of_one_seed_give_different_tokens():
    batch = _batch([SamplingParams()], 1000, seeds=[7])
    tokens = []
    for _ in range(50):
        out = _sample(torch.zeros(1, 1000), batch, [0])
        batch.record(torch.tensor([0]), out.tokens)
        tokens.append(out.tokens.item())
    assert len(set(tokens)) > 40


def test_noise_is_positive_finite_and_unit_mean():
    noise = exponential_noise(torch.arange(64), torch.full((64,), 3), 1000)
    assert noise.shape == (64, 1000) and noise.dtype == torch.float32
    assert torch.isfinite(noise).all() and (noise > 0).all()
    assert abs(noise.mean().item() - 1.0) < 0.02
    assert abs(noise.var().item() - 1.0) < 0.05


def test_noise_depends_on_all_64_seed_bits():
    steps = torch.zeros(3, dtype=torch.int64)
    seeds = torch.tensor([1, 1 + (1 << 40), -1])
    noise = exponential_noise(seeds, steps, 100)
    assert not torch.equal(noise[0], noise[1])
    assert not torch.equal(noise[0], noise[2])


def test_seeded_row_is_identical_alone_and_in_a_batch_of_eight():
    vocab, steps = 256, 12
    target = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.2)
    alone = _batch([target], vocab, prompts=[[3, 4, 5]], seeds=[1234])
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, min_p=0.1),
        SamplingParams(frequency_penalty=0.7),
        SamplingParams(top_k=3),
        SamplingParams(),
        SamplingParams(top_p=0.5, presence_penalty=-1.0),
        SamplingParams(temperature=2.0),
    ]
    params = [*others[:5], target, *others[5:]]
    shared = _batch(params, vocab, prompts=[[3, 4, 5]] * 8, seeds=[9, 8, 7, 6, 5, 1234, 4, 3])
    order = [5, 2, 7, 0, 1, 3, 4, 6]  # the target row sits at position 0 here, row 5 above
    logits = _logits(vocab, seed=11, rows=steps * 8).view(steps, 8, vocab)
    solo, batched = [], []
    for step in range(steps):
        one = _sample(logits[step, :1], alone, [0])
        alone.record(torch.tensor([0]), one.tokens)
        many = _sample(logits[step], shared, order)
        shared.record(torch.tensor(order), many.tokens)
        solo.append(one.tokens.item())
        batched.append(many.tokens[0].item())
    assert solo == batched
    assert len(set(solo)) > 1


@pytest.mark.parametrize(
    "params",
    [SamplingParams(), SamplingParams(temperature=0.7, top_k=4)],
    ids=["plain", "tempered_top_k"],
)
def test_empirical_distribution_matches_softmax(params: SamplingParams):
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, -2.0]])
    n = 20000
    tokens = _draw_many(logits, params, n)
    scaled = logits[0] / params.temperature
    if params.top_k:
        scaled[scaled.argsort(descending=True)[params.top_k :]] = float("-inf")
    expected = torch.softmax(scaled, -1) * n
    observed = torch.bincount(tokens, minlength=6).float()
    support = expected > 0
    assert (observed[~support] == 0).all()
    chi2 = ((observed[support] - expected[support]) ** 2 / expected[support]).sum().item()
    assert chi2 < 20.5  # p = 0.001 for 5 degrees of freedom (3 for top_k 4)


# --- logprobs ---------------------------------------------------------------------------------


def test_logprobs_come_from_penalised_tempered_unfiltered_distribution():
    logits = _logits(100, seed=5, rows=2)
    params = [
        SamplingParams(temperature=0.5, top_k=3, repetition_penalty=2.0),
        SamplingParams(temperature=0.0),
    ]
    batch = _batch(params, 100, prompts=[[0, 1, 2], []])
    out = _sample(logits, batch, [0, 1], want_logprobs=5)
    penalised = _penalise(logits[:1], [0, 1, 2], [], rep=2.0)
    reference = torch.cat(
        [torch.log_softmax(penalised / 0.5, -1), torch.log_softmax(logits[1:], -1)]
    )
    assert torch.allclose(out.logprobs, reference.gather(1, out.tokens[:, None])[:, 0])
    top = reference.topk(5, dim=-1)
    assert torch.equal(out.top_ids, top.indices)
    assert torch.allclose(out.top_logprobs, top.values)


def test_logprobs_are_left_out_when_not_wanted():
    batch = _batch([SamplingParams()], 50)
    none = _sample(_logits(50), batch, [0], want_logprobs=-1)
    chosen_only = _sample(_logits(50), batch, [0])
    assert none.logprobs is None and none.top_ids is None and none.top_logprobs is None
    assert chosen_only.logprobs.shape == (1,) and chosen_only.top_ids is None
    with pytest.raises(ValueError, match="want_logprobs"):
        _sample(_logits(50), batch, [0], want_logprobs=21)


# --- SamplingBatch bookkeeping and validation --------------------------------------------------


def test_record_increments_counts_and_step():
    batch = _batch([SamplingParams()] * 3, 10)
    batch.record(torch.tensor([2, 0]), torch.tensor([5, 5]))
    batch.record(torch.tensor([2]), torch.tensor([5]))
    batch.record(torch.tensor([2]), torch.tensor([7]))
    assert batch.step.tolist() == [1, 0, 3]
    assert batch.counts[2, 5].item() == 2 and batch.counts[2, 7].item() == 1
    assert batch.counts[0, 5].item() == 1 and batch.counts.sum().item() == 4


def test_set_row_resets_state_and_marks_prompt():
    batch = _batch([SamplingParams()], 10, prompts=[[1]])
    batch.record(torch.tensor([0]), torch.tensor([3]))
    batch.set_row(0, SamplingParams(top_k=2, presence_penalty=0.5), torch.tensor([4, 4, 6]), -5)
    assert batch.step.tolist() == [0] and batch.counts.sum().item() == 0
    assert batch.prompt_mask[0].nonzero().flatten().tolist() == [4, 6]
    assert batch.top_k.tolist() == [2] and batch.seed.tolist() == [-5]


def test_params_report_whether_they_need_filters_and_penalties():
    params = [
        SamplingParams(),
        SamplingParams(top_p=0.9),
        SamplingParams(temperature=0.0, top_k=5),  # filters cannot change a greedy pick
        SamplingParams(repetition_penalty=1.1),
    ]
    assert [p.uses_filters for p in params] == [False, True, False, False]
    assert [p.uses_penalties for p in params] == [False, False, False, True]


def test_set_row_rejects_out_of_vocab_prompt_ids():
    with pytest.raises(ValueError, match="prompt_ids"):
        _batch([SamplingParams()], 10, prompts=[[3, 10]])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.01),
    ],
)
def test_validate_rejects_bad_values_naming_the_field(field: str, value: float):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate()


def test_validate_accepts_range_edges():
    SamplingParams(temperature=0.0, top_p=1.0, min_p=1.0, presence_penalty=-2.0).validate()
    SamplingParams(frequency_penalty=2.0, repetition_penalty=0.01, top_k=10**6).validate()
    SamplingParams(seed=2**63 - 1).validate()
    SamplingParams(seed=-(2**63)).validate()


# --- compilation and device sync ---------------------------------------------------------------


def _compile_inputs(
    device: torch.device = CPU,
) -> tuple[torch.Tensor, SamplingBatch, torch.Tensor]:
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, top_k=10, top_p=0.8, min_p=0.02),
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.1),
    ]
    batch = SamplingBatch(3, 128, device)
    for row, (p, prompt) in enumerate(zip(params, [[1, 2], [3], [4, 5, 6]], strict=True)):
        batch.set_row(row, p, prompt, seed=row)
    batch.record(torch.tensor([0, 1, 2], device=device), torch.tensor([7, 8, 9], device=device))
    rows = torch.tensor([2, 0, 1], device=device)
    return _logits(128, rows=3).to(device), batch, rows


@pytest.mark.slow  # about 1-3 s: dynamo's first trace
def test_sample_traces_as_one_graph_without_breaks():
    logits, batch, rows = _compile_inputs()
    kw = {"use_filters": True, "use_penalties": True, "want_logprobs": 4}
    # fullgraph=True raises on any graph break; the eager backend skips the slow codegen.
    compiled = torch.compile(sample, fullgraph=True, backend="eager")
    got, want = compiled(logits, batch, rows, **kw), sample(logits, batch, rows, **kw)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("FERMI_SLOW_TESTS"),
    reason="inductor codegen on CPU took over 60 s (212 s measured); set FERMI_SLOW_TESTS=1",
)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_sample_compiles_with_inductor_fullgraph(device: str):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    logits, batch, rows = _compile_inputs(torch.device(device))
    kw = {"use_filters": True, "use_penalties": True, "want_logprobs": 4}
    torch._dynamo.reset()
    out = torch.compile(sample, fullgraph=True)(logits, batch, rows, **kw)
    want = sample(logits, batch, rows, **kw)
    assert torch.equal(out.tokens, want.tokens)
    assert torch.allclose(out.logprobs, want.logprobs, atol=1e-5)
    assert torch.equal(out.top_ids, want.top_ids)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_and_record_are_sync_free_and_capture_in_a_cuda_graph():
    dev = torch.device("cuda")
    vocab, n = 512, 4
    batch = SamplingBatch(n, vocab, dev)
    for row in range(n):
        batch.set_row(row, SamplingParams(temperature=0.8, top_p=0.9, top_k=40), [row], row)
    logits = torch.randn(n, vocab, device=dev)
    rows = torch.arange(n, device=dev)
    kw = {"use_filters": True, "use_penalties": True, "want_logprobs": 3}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sample(logits, batch, rows, **kw)
        batch.record(rows, out.tokens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = sample(logits, batch, rows, **kw).tokens  # what step 1 should draw

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture, then undo its record
        sample(logits, batch, rows, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sample(logits, batch, rows, **kw)
        batch.record(rows, captured.tokens)
    batch.step.fill_(1)  # capture ran record once; rewind to step 1
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.tokens, expected)
    assert batch.step.tolist() == [2] * n


@pytest.mark.parametrize("vocab", [151936, 1000, 257, 256, 7])
def test_chunked_argmax_equals_argmax_including_ties_and_infinities(vocab):
    from fermi.sampling import chunked_argmax

    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(5, vocab, generator=g)
    x[1] = x[1].round()  # many ties: the first index of the maximum must win
    x[2, :] = float("-inf")  # a fully masked row
    x[3, vocab // 2 :] = x[3].max() + 1  # ties straddling chunk boundaries
    x[4, -1] = float("inf")  # the maximum in the last (padded) chunk
    want = torch.argmax(x, dim=-1)
    for chunks in (256, 64, 3):
        assert torch.equal(chunked_argmax(x, chunks), want)
