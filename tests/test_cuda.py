"""The CUDA-graph runner on a real GPU (skipped without CUDA).

A tiny random Qwen3 in float32, compiled with Inductor and captured in CUDA graphs, against
the eager runner on CPU with the same weights; and Dynamo's counters across many prompt
lengths, batch shapes and context lengths: nothing compiles after warm-up.
"""

from __future__ import annotations

import pytest
import torch

from fermi.loading import load_folder
from fermi.runners.torch_eager import TorchRunner
from tests.tiny import write_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TOL = 2e-3  # float32 on both sides; the GPU's kernels sum in another order


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cuda") / "qwen3", {}, seed=5)


@pytest.fixture(scope="module")
def runner(folder):
    from fermi.runners.torch_cuda import CudaGraphRunner

    torch._dynamo.reset()
    model = load_folder(folder, torch.device("cuda"), torch.float32).model
    return CudaGraphRunner(model, max_batch=4, max_seq_len=1000, prefill_chunk=64)


def cpu_runner(folder) -> TorchRunner:
    model = load_folder(folder, torch.device("cpu"), torch.float32).model
    return TorchRunner(model, max_batch=4, max_seq_len=1000, prefill_chunk=64)


def test_graph_replays_match_the_cpu_eager_runner(folder, runner):
    ref = cpu_runner(folder)
    vocab = runner.capabilities.vocab_size
    g = torch.Generator().manual_seed(0)
    lengths = {0: 7, 1: 130, 3: 40}  # slot 2 idle: its row is padding
    last, pos = {}, {}
    for slot, n in lengths.items():
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        for start in range(0, n, 64):
            a = runner.prefill(slot, ids[start : start + 64], start).cpu()
            b = ref.prefill(slot, ids[start : start + 64], start)
            assert (a - b).abs().max().item() < TOL
        last[slot], pos[slot] = int(b.argmax()), n
    slots = sorted(lengths)
    for _ in range(20):
        toks, where = [last[s] for s in slots], [pos[s] for s in slots]
        a = runner.decode(slots, toks, where).cpu()
        b = ref.decode(slots, toks, where)
        assert (a - b).abs().max().item() < TOL
        for i, s in enumerate(slots):
            last[s], pos[s] = int(b[i].argmax()), pos[s] + 1


def test_nothing_recompiles_after_warmup(runner):
    from torch._dynamo.utils import counters

    before = dict(counters["stats"])
    vocab = runner.capabilities.vocab_size
    for n in (1, 2, 15, 16, 17, 63, 64):
        runner.prefill(n % 4, [(n * 7 + i) % vocab for i in range(n)], 0)
    runner.prefill(0, [3] * 50, 900)  # context past 900: the largest length bucket
    batch = runner.sampling
    for slots in ([0], [1], [0, 1], [2, 3], [0, 1, 2, 3]):
        for where in (3, 255, 256, 700, 999):
            for filters in (False, True):
                out = runner.decode_sample(
                    slots,
                    [5] * len(slots),
                    [where] * len(slots),
                    batch,
                    use_filters=filters,
                    use_penalties=False,
                    want_logprobs=-1,
                )
                assert out.tokens.shape == (len(slots),)
    assert dict(counters["stats"]) == before


def test_first_warmup_serves_the_tokens_of_a_full_one_and_finishes_while_idle(folder):
    """``warmup="first"`` (the command line's default): the first requests run before most
    graphs exist (captured as met, or by the engine while idle) and get the tokens a
    runner warmed in full gives; once the idle warm-up is done every shape has its graph
    and nothing compiles any more."""
    import time

    from torch._dynamo.utils import counters

    import fermi

    prompt = [5, 77, 120, 33, 400, 9, 18] * 5
    kw = {"prompt_token_ids": prompt, "max_tokens": 40, "ignore_eos": True}
    load = {"device": "cuda", "dtype": "fp32", "max_batch": 2, "max_seq_len": 512}

    def requests(engine):
        greedy = engine.generate(temperature=0, **kw).token_ids
        seeded = engine.generate(temperature=0.8, top_p=0.9, seed=3, **kw).token_ids
        return greedy, seeded

    torch._dynamo.reset()
    with fermi.load(folder, warmup="full", **load) as engine:
        full = engine.runner.startup
        reference = requests(engine)
    torch._dynamo.reset()
    with fermi.load(folder, warmup="first", **load) as engine:
        runner = engine.runner
        first = runner.startup
        assert first.deferred > 0 and first.graphs < full.graphs
        assert first.compiles < full.compiles
        served = requests(engine)
        deadline = time.monotonic() + 300
        while runner.startup.complete_s is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert runner.startup.complete_s is not None, "the idle warm-up did not finish"
        assert runner.startup.graphs == full.graphs
        again = requests(engine)
        before = dict(counters["stats"])
        for slots in ([0], [0, 1]):
            for where in (3, 300, 500):
                runner.decode_sample(
                    slots,
                    [5] * len(slots),
                    [where] * len(slots),
                    runner.sampling,
                    use_filters=where == 300,
                    use_penalties=False,
                    want_logprobs=-1,
                )
        assert dict(counters["stats"]) == before
    assert served == again == reference


def test_engine_greedy_on_gpu_equals_cpu_and_bf16_runs(folder):
    import fermi

    prompt = [5, 77, 120, 33, 400, 9, 18] * 5
    kw = {"prompt_token_ids": prompt, "max_tokens": 32, "temperature": 0, "ignore_eos": True}
    torch._dynamo.reset()
    with fermi.load(folder, device="cuda", dtype="fp32", max_batch=2, max_seq_len=256) as gpu:
        assert gpu.capabilities.name == "torch-cuda"
        on_gpu = gpu.generate(**kw).token_ids
    with fermi.load(folder, device="cpu", max_batch=2, max_seq_len=256) as cpu:
        on_cpu = cpu.generate(**kw).token_ids
    assert on_gpu == on_cpu
    for dtype in ("bf16", "fp16"):
        torch._dynamo.reset()
        with fermi.load(folder, device="cuda", dtype=dtype, max_batch=2, max_seq_len=256) as e:
            assert e.runner.model.model.embed_tokens.weight.dtype == getattr(
                torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype]
            )
            assert len(e.generate(**kw).token_ids) == 32


def test_a_sequence_moved_to_slot_0_on_the_gpu_continues_unchanged(folder):
    """Slot compaction with graphs: the move's copies queue on the stream the graphs replay
    on, between steps; the moved request then runs the batch-1 graph."""
    import fermi
    from tests.test_slot_compaction import moved_down, moved_run, record_decode_slots, request

    torch._dynamo.reset()
    with fermi.load(folder, device="cuda", dtype="fp32", max_batch=2, max_seq_len=256) as gpu:
        req = request(gpu, [7, 8, 9, 10, 11], 40, temperature=0.8, seed=4, presence_penalty=0.4)
        solo = gpu.generate_request(req).token_ids
        steps = record_decode_slots(gpu)
        moved = moved_run(gpu, req, after=6)
        assert moved_down(steps), steps
        assert moved.token_ids == solo


def test_embeddings_on_the_gpu_equal_the_cpu_and_leave_generation_alone(tmp_path_factory):
    """An embedding checkpoint on the CUDA runner: its eager last-token states equal the
    CPU's; embedding while a greedy generation decodes through the graphs changes none of
    its tokens and compiles nothing."""
    import threading

    from torch._dynamo.utils import counters

    import fermi
    from tests.tiny import write_embedding_checkpoint

    folder = write_embedding_checkpoint(tmp_path_factory.mktemp("cuda-embed") / "emb", seed=2)
    texts = ["hello world", "a", "The quick brown fox jumps over the lazy dog. " * 8]
    ids = [[(7 * i + j) % 400 for j in range(n)] for i, n in enumerate((1, 2, 17, 200))]
    kw = {"prompt_token_ids": [5, 77, 120, 33] * 6, "max_tokens": 64, "temperature": 0}
    kw["ignore_eos"] = True
    with fermi.load(folder, device="cpu", max_batch=2, max_seq_len=256) as cpu:
        want_texts, want_ids = cpu.embed(texts), cpu.embed(ids)
        want_tokens = cpu.generate(**kw).token_ids
    torch._dynamo.reset()
    load = {"device": "cuda", "dtype": "fp32", "max_batch": 2, "max_seq_len": 256}
    # warmup="full": no idle warm-up compiles beside the embeddings this test counts
    with fermi.load(folder, warmup="full", **load) as gpu:
        assert gpu.capabilities.name == "torch-cuda" and gpu.capabilities.embeds
        assert gpu.generate(**kw).token_ids == want_tokens
        before = dict(counters["stats"])
        got = {}
        thread = threading.Thread(target=lambda: got.update(tokens=gpu.generate(**kw).token_ids))
        thread.start()
        vectors = [(gpu.embed(texts), gpu.embed(ids, dimensions=32)) for _ in range(5)]
        thread.join(timeout=120)
        assert got["tokens"] == want_tokens
        assert dict(counters["stats"]) == before
    short = torch.nn.functional.normalize(want_ids[:, :32], dim=-1)
    for a, b in vectors:
        assert (a - want_texts).abs().max().item() < TOL
        assert (b - short).abs().max().item() < TOL
    torch._dynamo.reset()
    with fermi.load(folder, device="cuda", dtype="bf16", max_batch=2, max_seq_len=256) as bf16:
        cosine = (bf16.embed(texts) * want_texts).sum(dim=-1)
        assert cosine.min().item() > 0.99


def causal_reference(q, k, v, scale: float) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k/v [B, Hkv, T, D], query t seeing keys 0..t, in
    float32, spelled out."""
    groups = q.shape[1] // k.shape[1]
    k, v = (x.float().repeat_interleave(groups, dim=1) for x in (k, v))
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    t = q.shape[2]
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("kv_heads", [16, 8, 4])
def test_causal_prefill_attention_runs_on_the_flash_kernel_in_bf16(kv_heads):
    """The causal prefill path's inputs, laid out as ``Attention.attend`` makes them (views
    of one q/k/v product, heads on dim 2), are taken by the flash kernel alone: forced to
    flash, SDPA would raise "No available kernel" otherwise. Against float32 math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fermi.models.decoder import Attention, ModelConfig

    cfg = ModelConfig(
        architecture="qwen3",
        vocab_size=64,
        hidden_size=2048,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=16,
        num_key_value_heads=kv_heads,
        head_dim=128,
    )
    attn = Attention(cfg, 0)
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, 300, 16 + 2 * kv_heads, 128)
    qkv = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = (x.transpose(1, 2) for x in qkv.split([16, kv_heads, kv_heads], dim=2))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = attn._attend_causal(q, k, v)
    want = causal_reference(q, k, v, cfg.attn_scale)
    # bf16 output (half an ulp: 0.2%) and flash's bf16 probabilities: a few ulps at most
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=1e-2)


def test_a_step_that_admits_and_samples_a_first_token_never_waits_for_the_device(runner):
    """The engine queues step n+1 before it reads step n, so nothing in a step may wait for
    the device: a request's admission (its prompt's ids go to the device) and the sampling
    of its first token after the prefill (the sampled row's index goes there) used to copy
    from pageable memory, which waits for every step queued before it. Under the sync
    debug mode any such wait raises."""
    from fermi.runners.base import Admission, Batch, Decode, PrefillChunk, SamplingOptions
    from fermi.sampling import SamplingParams

    params = SamplingParams(temperature=0.8, top_p=0.9)
    opts = SamplingOptions(use_filters=True)
    first = Batch(
        admitted=(Admission(0, params, (5, 6, 7), 11),),
        prefill=PrefillChunk(0, (5, 6, 7), 0, True, opts),
    )
    out = runner.execute(first)  # shapes met first may compile: outside the debug mode
    out.wait()
    second = Batch(
        admitted=(Admission(1, params, (9, 8, 7, 6), 12),),
        prefill=PrefillChunk(1, (9, 8, 7, 6), 0, True, opts),
        decode=Decode((0,), None, (3,), opts),  # slot 0's first token, fed on the device
    )
    runner.execute(second).wait()  # (again: the same shapes, now met)
    third = Batch(
        admitted=(Admission(2, params, (4, 4), 13),),
        prefill=PrefillChunk(2, (4, 4), 0, True, opts),
        decode=Decode((0, 1), None, (5, 5), opts),
    )
    runner.execute(Batch(decode=Decode((0, 1), None, (4, 4), opts))).wait()  # slot 1 joins
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = runner.execute(third)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out.wait()
    assert 0 <= int(out.prefill.tokens[0]) < runner.capabilities.vocab_size
    assert len(out.decode.tokens) == 2
