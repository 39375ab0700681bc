"""The CUDA-graph runner's bucketing, padding and in-graph sampling, run on CPU.

The runner takes ``backend=None`` (or Dynamo's ``eager`` backend) and ``use_graphs=False``
here: the same padded shapes, scratch-position writes and sampling calls as on the GPU,
compared with the eager runner on the same weights.
"""

from __future__ import annotations

import threading

import pytest
import torch

from fermi.engine.api import Engine
from fermi.loading import load_folder
from fermi.runners.torch_cuda import (
    CudaGraphRunner,
    batch_buckets,
    chunk_buckets,
    kv_buckets,
    pick,
    warmup_plans,
)
from fermi.runners.torch_eager import TorchRunner
from tests.tiny import write_checkpoint

TOL = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cuda_runner") / "qwen3", {}, seed=3)


def load(folder):
    return load_folder(folder, torch.device("cpu"), torch.float32)


def graph_runner(folder, backend=None, **kw) -> CudaGraphRunner:
    kw = {
        "max_batch": 4,
        "max_seq_len": 300,
        "prefill_chunk": 32,
        "warmup": backend is not None,
        **kw,
    }
    return CudaGraphRunner(load(folder).model, backend=backend, use_graphs=False, **kw)


def test_buckets_cover_every_size_with_bounded_padding():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert chunk_buckets(512) == [16, 32, 64, 128, 256, 512]
    assert chunk_buckets(100) == [16, 32, 64, 100]
    assert chunk_buckets(8) == [8]
    sizes = kv_buckets(32896)
    assert sizes[:6] == [256, 384, 512, 768, 1024, 1536]
    assert sizes[-1] == 32896 and sizes == sorted(set(sizes))
    assert all(s % 128 == 0 for s in sizes)
    # A live context of n attends at most 1.5x n keys (past the smallest bucket).
    assert all(pick(n, sizes) <= max(256, 1.5 * n) for n in range(1, 32896, 97))


def test_padded_prefill_and_decode_logits_equal_the_eager_runner(folder):
    ours = graph_runner(folder)
    ref = TorchRunner(load(folder).model, max_batch=4, max_seq_len=300, prefill_chunk=32)
    torch.manual_seed(0)
    vocab = ours.capabilities.vocab_size
    prompts = {0: 5, 2: 45, 3: 17}  # slot -> prompt length; 45 takes two chunks
    last = {}
    for slot, n in prompts.items():
        ids = torch.randint(0, vocab, (n,)).tolist()
        for start in range(0, n, 32):
            chunk = ids[start : start + 32]
            a, b = ours.prefill(slot, chunk, start), ref.prefill(slot, chunk, start)
            assert (a - b).abs().max().item() < TOL
        last[slot] = int(b.argmax())
    pos = dict(prompts)
    slots = sorted(prompts)  # [0, 2, 3]: slot 1 is idle, so row 1 is padding
    for _ in range(6):
        toks, where = [last[s] for s in slots], [pos[s] for s in slots]
        a, b = ours.decode(slots, toks, where), ref.decode(slots, toks, where)
        assert a.shape == (3, vocab)
        assert (a - b).abs().max().item() < TOL
        for i, s in enumerate(slots):
            last[s], pos[s] = int(b[i].argmax()), pos[s] + 1


def test_padding_rows_never_touch_a_half_prefilled_slot(folder):
    """Slot 1 is between two prefill chunks while slots 0 and 2 decode over rows 0..3."""
    ours, ref = graph_runner(folder), graph_runner(folder)
    ids = [(7 * i) % 400 + 3 for i in range(50)]
    for r in (ours, ref):
        r.prefill(0, ids[:9], 0)
        r.prefill(2, ids[:11], 0)
    ours.prefill(1, ids[:32], 0)
    for step in range(5):
        ours.decode([0, 2], [ids[step], ids[step + 1]], [9 + step, 11 + step])
    a = ours.prefill(1, ids[32:], 32)
    ref.prefill(1, ids[:32], 0)
    b = ref.prefill(1, ids[32:], 32)
    assert (a - b).abs().max().item() < TOL


def test_decode_sample_returns_the_live_rows_in_slot_order(folder):
    runner = graph_runner(folder)
    for slot in (0, 1, 3):
        runner.prefill(slot, [11 + slot, 12, 13], 0)
    batch = runner.sampling
    greedy = runner.decode([3, 0], [20, 21], [3, 3]).argmax(-1)
    for slot in (0, 3):
        batch.temperature[slot] = 0.0
    out = runner.decode_sample(
        [3, 0], [20, 21], [3, 3], batch, use_filters=False, use_penalties=False, want_logprobs=2
    )
    assert out.tokens.tolist() == greedy.tolist()
    assert out.top_ids.shape == (2, 2) and out.top_ids[:, 0].tolist() == greedy.tolist()
    other = type(batch)(4, runner.capabilities.vocab_size, "cpu")
    assert (
        runner.decode_sample(
            [0], [1], [3], other, use_filters=False, use_penalties=False, want_logprobs=-1
        )
        is None
    )


def test_bad_inputs_raise_clear_errors(folder):
    runner = graph_runner(folder)
    with pytest.raises(ValueError, match="prefill chunk holds"):
        runner.prefill(0, list(range(33)), 0)
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        runner.prefill(0, [1, 2], 299)
    with pytest.raises(ValueError, match="slots must be distinct"):
        runner.decode([1, 1], [3, 4], [0, 0])
    with pytest.raises(ValueError, match="token ids"):
        runner.decode([0], [10**6], [0])
    with pytest.raises(ValueError, match="max_batch"):
        CudaGraphRunner(load(folder).model, 0, 100, backend=None, use_graphs=False)


def test_engine_on_the_graph_runner_matches_the_eager_engine(folder):
    """Greedy and seeded sampling through the scheduler's in-graph sampling path."""
    from fermi.loading import GenerationDefaults
    from fermi.text.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(folder)
    gen = GenerationDefaults()
    prompt = [5, 77, 120, 33, 400, 9, 18] * 6
    kw = {"prompt_token_ids": prompt, "max_tokens": 24, "ignore_eos": True}
    results = []
    for runner in (
        graph_runner(folder),
        TorchRunner(load(folder).model, max_batch=4, max_seq_len=300, prefill_chunk=32),
    ):
        with Engine(runner, tok, gen, model_name="tiny") as engine:
            greedy = engine.generate(temperature=0, **kw).token_ids
            seeded = engine.generate(temperature=0.9, top_k=30, seed=7, **kw).token_ids
            results.append((greedy, seeded))
    assert results[0] == results[1]


def test_no_recompiles_after_warmup_for_any_prompt_or_batch(folder):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    runner = graph_runner(folder, backend="eager", max_seq_len=700)
    assert runner.startup.compiles >= 3
    assert runner.startup.deferred == 0 and runner.startup.complete_s is not None
    assert not runner.warm_more()
    before = dict(counters["stats"])
    every_shape(runner)
    assert dict(counters["stats"]) == before


def test_first_warmup_compiles_a_first_requests_shapes_and_idle_time_the_rest(folder):
    """``warmup="first"``: fewer compiles before the first request; ``warm_more`` one unit
    at a time until every shape a full warm-up covers has run; then nothing compiles."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    full = graph_runner(folder, backend="eager", max_seq_len=700).startup.compiles
    torch._dynamo.reset()
    runner = graph_runner(folder, backend="eager", max_seq_len=700, warmup="first")
    jobs = runner.warm_jobs()
    assert runner.startup.compiles < full
    assert runner.startup.deferred == len(jobs) - len(runner.first_jobs()) > 0
    assert runner.startup.complete_s is None
    units = 1
    while runner.warm_more():
        units += 1
    assert units == runner.startup.deferred
    assert runner.startup.complete_s is not None and not runner.warm_more()
    assert runner._warmed == set(jobs)
    before = dict(counters["stats"])
    every_shape(runner)
    assert dict(counters["stats"]) == before


def test_a_step_before_the_idle_warmup_compiles_its_own_shape(folder):
    """A wider batch before idle time compiled it: the step compiles it itself, and the
    idle warm-up then skips what that step already ran."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    runner = graph_runner(folder, backend="eager", max_seq_len=700, warmup="first")
    before = int(counters["stats"]["unique_graphs"])
    out = sample_step(runner, [0, 1], [1, 2], [3, 3])
    assert out.tokens.shape == (2,)
    assert int(counters["stats"]["unique_graphs"]) > before
    units = 1
    while runner.warm_more():
        units += 1
    assert units == runner.startup.deferred - 1  # the step's own shape was skipped
    assert runner.startup.complete_s is not None


def test_engine_finishes_the_warmup_while_idle_without_changing_a_token(folder):
    """The engine runs ``warm_more`` between requests. The warm-up's steps write only the
    scratch position: a later request reusing the cache an earlier one kept, greedy and
    seeded, gets the same tokens as on a runner warmed in full."""
    import time

    from fermi.loading import GenerationDefaults
    from fermi.text.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(folder)
    prompt = [5, 77, 120, 33, 400, 9, 18] * 6
    kw = {"prompt_token_ids": prompt, "max_tokens": 24, "ignore_eos": True}

    def both(engine):
        greedy = engine.generate(temperature=0, **kw).token_ids
        seeded = engine.generate(temperature=0.9, top_k=30, seed=7, **kw).token_ids
        return greedy, seeded

    with Engine(graph_runner(folder), tok, GenerationDefaults(), model_name="t") as engine:
        reference = both(engine)
    runner = graph_runner(folder, warmup="first")
    assert runner.startup.deferred > 0
    with Engine(runner, tok, GenerationDefaults(), model_name="t") as engine:
        before = both(engine)  # served before the idle warm-up, or during it
        reused = engine.stats().cached_tokens
        deadline = time.monotonic() + 120
        while runner.startup.complete_s is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner.startup.complete_s is not None, "the engine never finished the warm-up"
        assert runner._warmed >= set(runner.warm_jobs())
        after = both(engine)  # the kept cache of the same prompt, reused
        assert engine.stats().cached_tokens > reused
    assert before == after == reference


def test_a_deferred_shape_that_fails_moves_the_runner_to_the_next_kernel_setup(folder, monkeypatch):
    """As at load: a failure in the idle warm-up (here the wider decode step's first run,
    which a step met first) gives way to the next (row kernels, decode attention) set-up,
    and every shape is warmed again under it."""
    runner = graph_runner(folder, warmup="first", row_kernels=True, compile_cache=False)
    assert runner.row_kernels and runner.startup.deferred > 0
    decode_body = runner._decode_body

    def fails_wide(b, kv, variant):  # one shape only: the idle warm-up must retry it
        if (b, kv, variant) == (2, 256, (False, False, -1)) and runner.row_kernels:
            raise RuntimeError("no kernel for this batch")
        return decode_body(b, kv, variant)

    monkeypatch.setattr(runner, "_decode_body", fails_wide)
    # A step meets the failing shape before idle time: its requests fail; the shape stays
    # due, so the idle warm-up meets the failure too and changes set-up.
    with pytest.raises(RuntimeError, match="no kernel for this batch"):
        sample_step(runner, [0, 1], [5, 6], [3, 3])
    while runner.warm_more():
        pass
    assert not runner.row_kernels and not runner.startup.row_kernels
    assert runner.startup.notes[0].startswith("fused row products with sdpa decode attention")
    assert runner._warmed >= set(runner.warm_jobs())
    ref = TorchRunner(load(folder).model, max_batch=4, max_seq_len=300, prefill_chunk=32)
    a, b = runner.prefill(0, [5, 6, 7], 0), ref.prefill(0, [5, 6, 7], 0)
    assert (a - b).abs().max().item() < TOL
    a = runner.decode([0, 1], [int(b.argmax())] * 2, [3, 3])[0]
    b = ref.decode([0, 1], [int(b.argmax())] * 2, [3, 3])[0]
    assert (a - b).abs().max().item() < TOL


def test_the_command_line_warms_one_engine_first_and_a_pool_in_full(monkeypatch):
    from fermi.cli import command_line_warmup

    monkeypatch.delenv("FERMI_WARMUP", raising=False)
    assert command_line_warmup() == "first" and command_line_warmup(2) == "full"
    monkeypatch.setenv("FERMI_WARMUP", "full")
    assert command_line_warmup() == "full"


def test_a_warmup_that_is_no_scope_is_refused(folder):
    import fermi

    with pytest.raises(ValueError, match="warmup must be one of first, full"):
        graph_runner(folder, warmup="later")
    with pytest.raises(ValueError, match="warmup must be one of first, full"):
        fermi.load(folder, device="cpu", warmup="later")


def every_shape(runner) -> None:
    """Prompts, batches and contexts across every bucket of a max_seq_len-700 runner."""
    vocab = runner.capabilities.vocab_size
    for slot, n in enumerate((1, 31, 32, 3)):
        runner.prefill(slot, [(slot * 13 + i) % vocab for i in range(n)], 0)
    runner.prefill(0, [1] * 20, 600)  # a long context: the largest length bucket
    for slots in ([0], [0, 1], [1, 3], [0, 1, 2, 3]):
        for where in (5, 300, 650):
            n = len(slots)
            sample_step(runner, slots, [1] * n, [where] * n, filters=where == 300)


def sample_step(runner, slots, tokens, positions, filters: bool = False):
    """One decode step sampled in the runner's graph (no penalties, no logprobs)."""
    return runner.decode_sample(
        slots,
        tokens,
        positions,
        runner.sampling,
        use_filters=filters,
        use_penalties=False,
        want_logprobs=-1,
    )


@pytest.mark.parametrize("kind", ["math", "flex"])
def test_decode_attention_kernels_equal_sdpa(folder, kind):
    ref, ours = graph_runner(folder), graph_runner(folder)
    for layer in ours.model.model.layers:
        layer.self_attn.decode_kernel = kind
    ids = [(5 * i) % 400 + 1 for i in range(40)]
    for r in (ref, ours):
        r.prefill(0, ids[:30], 0)
        r.prefill(2, ids[:12], 0)
    a = ours.decode([0, 2], [7, 9], [30, 12])
    b = ref.decode([0, 2], [7, 9], [30, 12])
    assert (a - b).abs().max().item() < TOL


def test_fed_back_tokens_continue_the_previous_step(folder):
    """``token_ids=None`` feeds each slot the id the previous step sampled, on the device."""
    fed, host = graph_runner(folder), graph_runner(folder)
    for r in (fed, host):
        r.prefill(0, [11, 12, 13], 0)
        r.prefill(2, [21, 22, 23, 24], 0)
        r.sampling.temperature[:] = 0.0
    kw = {"use_filters": False, "use_penalties": False, "want_logprobs": -1}
    slots, pos = [2, 0], [4, 3]
    tokens = [5, 6]
    out_fed = fed.decode_sample(slots, tokens, pos, fed.sampling, **kw)
    for step in range(1, 6):
        out_host = host.decode_sample(
            slots, tokens, [p + step - 1 for p in pos], host.sampling, **kw
        )
        assert out_fed.tokens.tolist() == out_host.tokens.tolist()
        tokens = out_host.tokens.tolist()
        out_fed = fed.decode_sample(slots, None, [p + step for p in pos], fed.sampling, **kw)
    # A row may leave (slot 2 ended): slot 0 goes on from its own fed-back id.
    out_host = host.decode_sample(slots, tokens, [p + 5 for p in pos], host.sampling, **kw)
    assert out_fed.tokens.tolist() == out_host.tokens.tolist()
    host_next = host.decode_sample([0], out_host.tokens.tolist()[1:], [9], host.sampling, **kw)
    fed_next = fed.decode_sample([0], None, [9], fed.sampling, **kw)
    assert fed_next.tokens.tolist() == host_next.tokens.tolist()
    with pytest.raises(ValueError, match="slots the previous step sampled"):
        fed.decode_sample([0, 1], None, [10, 3], fed.sampling, **kw)  # slot 1 sampled nothing
    fed.decode([0], [1], [10])  # a logits-only step breaks the chain too
    with pytest.raises(ValueError, match="slots the previous step sampled"):
        fed.decode_sample([0], None, [11], fed.sampling, **kw)


def test_overlapped_scheduling_equals_the_eager_engine(folder):
    """The scheduler queues step n+1 before reading step n on this runner: requests that end
    at different steps (length, stop string, eos), join late, sample with seeds and
    penalties or ask for logprobs all get what the eager engine gives them alone."""
    from fermi.loading import GenerationDefaults
    from fermi.text.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(folder)
    gen = GenerationDefaults()
    requests = [
        {"prompt_token_ids": [5, 77, 120, 33], "max_tokens": 1, "temperature": 0},
        {"prompt_token_ids": [9, 8, 7], "max_tokens": 20, "temperature": 0.9, "seed": 4},
        {"prompt_token_ids": [100 + i for i in range(40)], "max_tokens": 9, "temperature": 0},
        {
            "prompt_token_ids": [3] * 11,
            "max_tokens": 14,
            "temperature": 0.7,
            "top_k": 20,
            "seed": 3,
            "presence_penalty": 0.5,
            "logprobs": 2,
        },
        {"prompt_token_ids": [44, 45], "max_tokens": 17, "temperature": 0, "ignore_eos": False},
    ]
    with Engine(
        TorchRunner(load(folder).model, max_batch=4, max_seq_len=300, prefill_chunk=32),
        tok,
        gen,
        model_name="tiny",
    ) as eager:
        solo = [eager.generate(**r) for r in requests]
        # a stop string from the middle of a greedy continuation: the request ends early
        stop = solo[2].text[3:7]
        requests[2]["stop"] = [stop]
        solo[2] = eager.generate(**requests[2])
    assert solo[2].finish_reason == "stop"

    runner = graph_runner(folder)
    calls = {"fed": 0}
    decode_sample = runner.decode_sample

    def counting(slots, token_ids, *args, **kw):
        calls["fed"] += token_ids is None
        return decode_sample(slots, token_ids, *args, **kw)

    runner.decode_sample = counting
    results = [None] * len(requests)
    with Engine(runner, tok, gen, model_name="tiny") as engine:

        def run(i):
            results[i] = engine.generate(**requests[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
        for t in threads:  # five requests on four slots: one joins when another ends
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert calls["fed"] > 10
    for got, want in zip(results, solo, strict=True):
        assert got.token_ids == want.token_ids
        assert got.finish_reason == want.finish_reason
        assert got.text == want.text
    assert [lp.token_id for lp in results[3].logprobs] == solo[3].token_ids
    for a, b in zip(results[3].logprobs, solo[3].logprobs, strict=True):
        assert abs(a.logprob - b.logprob) < 1e-4


def test_warmup_tries_each_attention_kernel_with_and_without_the_row_products():
    assert warmup_plans(True, "split") == [
        (True, "split"),
        (False, "split"),
        (True, "sdpa"),
        (False, "sdpa"),
    ]
    assert warmup_plans(False, "flex") == [(False, "flex"), (False, "math"), (False, "sdpa")]
    assert warmup_plans(True, "sdpa") == [(True, "sdpa"), (False, "sdpa")]


def test_row_products_that_fail_at_warmup_give_way_to_the_plain_ones(folder, monkeypatch):
    from fermi.models import decoder

    def fail(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(decoder, "row_linear", fail)
    runner = graph_runner(folder, row_kernels=True, warmup=True, compile_cache=False)
    assert not runner.row_kernels and not runner.startup.row_kernels
    assert not runner.model.row_kernels
    assert not any(layer.row_kernels for layer in runner.model.model.layers)
    assert len(runner.startup.notes) == 1
    assert runner.startup.notes[0].startswith("fused row products with sdpa decode attention")
    ref = TorchRunner(load(folder).model, max_batch=4, max_seq_len=300, prefill_chunk=32)
    a, b = runner.prefill(0, [5, 6, 7], 0), ref.prefill(0, [5, 6, 7], 0)
    assert (a - b).abs().max().item() < TOL
    a, b = runner.decode([0], [int(b.argmax())], [3]), ref.decode([0], [int(b.argmax())], [3])
    assert (a - b).abs().max().item() < TOL


def test_row_products_that_fail_with_pdl_are_tried_without_it_first(folder, monkeypatch):
    """PDL is the newest part of the row products: a warm-up that fails with it keeps the
    fused products and drops PDL, the note saying so. (On CPU the products are their torch
    reference whatever the setting; the stand-in fails while PDL is on.)"""
    from fermi.models import decoder
    from fermi.models import gemv as G

    def fail_with_pdl(*args, pdl, **kwargs):
        if pdl:
            raise RuntimeError("this driver cannot launch with PDL")
        return G.gemv_reference(*args, **kwargs)

    monkeypatch.setattr(G, "pdl_wanted", lambda device: True)
    monkeypatch.setattr(decoder, "row_linear", fail_with_pdl)
    runner = graph_runner(folder, row_kernels=True, warmup=True, compile_cache=False)
    assert runner.row_kernels and runner.startup.row_kernels
    assert not runner.pdl and not runner.startup.pdl
    assert not runner.model.row_pdl
    assert not any(layer.row_pdl for layer in runner.model.model.layers)
    assert len(runner.startup.notes) == 1
    assert runner.startup.notes[0].startswith(
        "fused row products launched with PDL, with sdpa decode attention, failed"
    )
    ref = TorchRunner(load(folder).model, max_batch=4, max_seq_len=300, prefill_chunk=32)
    a, b = runner.prefill(0, [5, 6, 7], 0), ref.prefill(0, [5, 6, 7], 0)
    assert (a - b).abs().max().item() < TOL


def test_row_kernels_false_turns_off_products_an_earlier_runner_turned_on(folder):
    model = load(folder).model
    first = CudaGraphRunner(model, 2, 300, 32, backend=None, use_graphs=False, warmup=False)
    first_on = model.row_kernels
    CudaGraphRunner(model, 2, 300, 32, backend=None, use_graphs=False, warmup=False)
    assert not first.row_kernels and not first_on  # CPU: off unless asked for
    on = CudaGraphRunner(
        model, 2, 300, 32, backend=None, use_graphs=False, warmup=False, row_kernels=True
    )
    assert on.row_kernels and model.row_kernels
    off = CudaGraphRunner(
        model, 2, 300, 32, backend=None, use_graphs=False, warmup=False, row_kernels=False
    )
    assert not off.row_kernels and not model.row_kernels
    assert not any(layer.row_kernels for layer in model.model.layers)


def test_the_compile_key_tells_the_fp16_weight_layouts_apart():
    """fermi's kernels' layout, FBGEMM's packs (x86) and plain fp16 weights compile to
    different code: one key for all would make a shared compile cache start cold on one of
    them every time."""
    from fermi import native
    from fermi.models.half_weights import fbgemm_available, use_half_weights
    from fermi.runners.torch_cuda import quantization_label
    from tests.test_causal_prefill import config, model_of

    assert quantization_label(model_of(config("qwen3"))) is None
    plain = use_half_weights(model_of(config("qwen3")), "plain")
    assert quantization_label(plain) == "fp16-storage"
    if fbgemm_available():
        packed = use_half_weights(model_of(config("qwen3")), "fbgemm")
        assert quantization_label(packed) == "fp16-packed"
    if native.available():
        blocked = use_half_weights(model_of(config("qwen3")), "native")
        assert quantization_label(blocked) == "fp16-native"
