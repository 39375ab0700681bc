"""Prefill that starts a sequence attends causally over its own keys, with no mask.

``Decoder.forward(causal=True)`` must give the logits and the cache of the masked path
(``causal=False``, the path every chunk after cached context keeps) wherever the runners
choose it (``Decoder.prefill_is_causal``), and layers with a window or soft-capping must keep
their mask. Tiny random models in fp32: the two paths compute the same sums in another order,
so they differ by float32 rounding: at most 3e-6 measured, on logits up to 5.
"""

from __future__ import annotations

import pytest
import torch

from fermi.models.cache import KVCache
from fermi.models.decoder import Decoder, ModelConfig
from fermi.runners.torch_cuda import CudaGraphRunner
from fermi.runners.torch_eager import TorchRunner

TOL = 1e-5
VOCAB = 96


def config(arch: str, kv_heads: int = 2) -> ModelConfig:
    base = {
        "architecture": arch,
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": kv_heads,
        "head_dim": 16,
        "max_position_embeddings": 256,
    }
    if arch == "qwen3":  # q/k norms: q and k rotate apart
        return ModelConfig(**base, qk_norm=True)
    if arch == "llama":  # q and k rotate side by side
        return ModelConfig(**base)
    if arch == "gemma2":  # every layer soft-caps; even layers slide
        return ModelConfig(
            **base,
            hidden_act="gelu_pytorch_tanh",
            sliding_windows=(8, None, 8, None),
            embedding_scale=8.0,
            norm_unit_offset=True,
            sandwich_norms=True,
            attn_logit_softcap=50.0,
            final_logit_softcap=30.0,
            query_pre_attn_scalar=24,
        )
    if arch == "gemma3":  # sliding layers beside global ones, no soft-cap
        return ModelConfig(
            **base,
            qk_norm=True,
            sliding_windows=(8, 8, None, 8),
            norm_unit_offset=True,
            sandwich_norms=True,
            query_pre_attn_scalar=24,
        )
    raise ValueError(arch)


def model_of(cfg: ModelConfig, max_batch: int = 3, max_seq_len: int = 128) -> Decoder:
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    with torch.no_grad():  # norms away from 1, so that they are exercised too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.setup_cache(max_batch, max_seq_len)
    return model


def prefill(model: Decoder, tokens: torch.Tensor, causal: bool, slot: int = 0) -> torch.Tensor:
    t = tokens.shape[1]
    positions = torch.arange(t)[None]
    with torch.inference_mode():
        return model(tokens, positions, torch.tensor([slot]), t, last_only=False, causal=causal)


def caches(model: Decoder) -> list[torch.Tensor]:
    return [
        t.clone()
        for layer in model.model.layers
        for t in (layer.self_attn.cache.k, layer.self_attn.cache.v)
    ]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # query heads per KV head: 1, 2, 4
@pytest.mark.parametrize("length", [1, 7, 33, 64])
def test_causal_prefill_equals_the_masked_path_logits_and_cache(arch, kv_heads, length):
    model = model_of(config(arch, kv_heads))
    assert model.prefill_is_causal(0)
    tokens = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
    masked = prefill(model, tokens, causal=False)
    masked_cache = caches(model)
    for layer in model.model.layers:  # the causal path must write the cache itself
        layer.self_attn.cache.k.zero_()
        layer.self_attn.cache.v.zero_()
    causal = prefill(model, tokens, causal=True)
    assert causal.shape == (1, length, VOCAB)
    assert (causal - masked).abs().max().item() < TOL
    # The first layer's keys/values come before any attention: written bit for bit; the
    # later layers' inputs carry the attention's rounding.
    got = caches(model)
    assert torch.equal(got[0], masked_cache[0]) and torch.equal(got[1], masked_cache[1])
    for g, want in zip(got, masked_cache, strict=True):
        assert (g - want).abs().max().item() < TOL


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_causal_prefill_on_an_fp16_cache_attends_to_the_keys_the_cache_keeps(arch):
    """A cache that holds fp16 for a float32 model (the CPU loaders' choice under fp16
    storage or quantization): the masked path reads the prompt's keys and values back
    rounded to fp16, so the causal path must attend to them rounded as well, or a prompt
    prefilled at once and one prefilled in chunks (or found in the cache by prefix reuse)
    would differ by the rounding."""
    model = Decoder(config(arch)).eval()
    model.cache_dtype = torch.float16
    torch.manual_seed(0)
    model.setup_cache(1, 128)
    assert model.model.layers[0].self_attn.cache.k.dtype == torch.float16
    tokens = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(4))
    masked = prefill(model, tokens, causal=False)
    causal = prefill(model, tokens, causal=True)
    assert (causal - masked).abs().max().item() < TOL
    with torch.inference_mode():  # 25 tokens, then 15 that read the first 25 back
        first = model(tokens[:, :25], torch.arange(25)[None], torch.tensor([0]), 25, causal=True)
        rest = model(tokens[:, 25:], torch.arange(25, 40)[None], torch.tensor([0]), 40)
    assert (first[0] - masked[0, 24]).abs().max().item() < TOL
    assert (rest[0] - masked[0, -1]).abs().max().item() < TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_model_converted_after_setup_cache_attends_in_its_new_dtype(dtype):
    """``.half()`` / ``.to(dtype)`` after ``setup_cache`` converts the cache with the model:
    the cache then computes in that dtype too (``KVCache.compute``), not in the float32 it
    was set up with, whose keys the converted queries could not attend over."""
    model = model_of(config("llama"))
    model.to(dtype)
    cache = model.model.layers[0].self_attn.cache
    assert cache.k.dtype == cache.compute == dtype and not cache.rounds
    tokens = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model(tokens[:, :5], torch.arange(5)[None], torch.tensor([0]), 5)
        out = model(tokens[:, 5:], torch.tensor([[5]]), torch.tensor([0]), 6)
    assert out.isfinite().all()
    # An fp16 cache under a float32 model, converted back to float32: nothing rounds.
    model = model_of(config("llama"))
    model.cache_dtype = torch.float16
    model.setup_cache(1, 32)
    model.float()
    cache = model.model.layers[0].self_attn.cache
    assert cache.k.dtype == cache.compute == torch.float32 and not cache.rounds


def test_causal_step_builds_no_mask_and_reads_no_cache(monkeypatch):
    model = model_of(config("qwen3"))
    positions = torch.arange(9)[None]
    ctx = model.step_context(positions, torch.tensor([0]), 9, causal=True)
    assert ctx.causal and ctx.masks == {}
    assert set(model.step_context(positions, torch.tensor([0]), 9).masks) == {None}

    def no_read(self, ctx):
        raise AssertionError("a causal step read the cache")

    monkeypatch.setattr(KVCache, "read", no_read)
    prefill(model, torch.arange(9)[None], causal=True)


def test_rows_padded_after_their_tokens_equal_each_prompt_alone():
    """Rows of different lengths, each padded after its last token with the padding at a
    spare cache position (the CUDA runner's layout): a real query never sees a padded key."""
    model = model_of(config("qwen3", kv_heads=1))
    lengths, width, spare = (5, 12, 9), 12, 127
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (1, n), generator=gen) for n in lengths]
    alone = [prefill(model, p, causal=False)[0] for p in prompts]
    tokens = torch.stack([torch.nn.functional.pad(p[0], (0, width - p.shape[1])) for p in prompts])
    positions = torch.full((3, width), spare)
    for row, n in enumerate(lengths):
        positions[row, :n] = torch.arange(n)
    with torch.inference_mode():
        out = model(
            tokens,
            positions,
            torch.arange(3),
            width,
            rows_are_slots=True,
            last_only=False,
            causal=True,
        )
    for row, n in enumerate(lengths):
        assert (out[row, :n] - alone[row]).abs().max().item() < TOL


def test_softcapped_layers_keep_the_masked_path():
    """Gemma 2: every layer soft-caps (and half of them slide), so no prefill is causal, and
    a forced causal step still builds every mask and gives the masked logits."""
    model = model_of(config("gemma2"))
    assert not model.prefill_is_causal(0)
    assert all(layer.self_attn.needs_mask for layer in model.model.layers)
    ctx = model.step_context(torch.arange(20)[None], torch.tensor([0]), 20, causal=True)
    assert set(ctx.masks) == {None, 8}
    tokens = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    masked = prefill(model, tokens, causal=False)
    assert torch.equal(prefill(model, tokens, causal=True), masked)


def test_sliding_layers_keep_their_mask_beside_causal_global_layers():
    """Gemma 3: a prompt longer than the window; the sliding layers read the cache through
    their window's mask, the global layers attend causally, and the logits are the masked
    path's."""
    model = model_of(config("gemma3"))
    assert model.prefill_is_causal(0)
    ctx = model.step_context(torch.arange(20)[None], torch.tensor([0]), 20, causal=True)
    assert set(ctx.masks) == {8}
    tokens = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    masked = prefill(model, tokens, causal=False)
    assert (prefill(model, tokens, causal=True) - masked).abs().max().item() < TOL


def test_only_a_chunk_that_starts_its_sequence_is_causal():
    model = model_of(config("llama"))
    assert model.prefill_is_causal(0)
    assert not model.prefill_is_causal(1)
    assert not model.prefill_is_causal(64)
    model.causal_prefill = False
    assert not model.prefill_is_causal(0)


def eager_runner(arch: str, causal: bool) -> TorchRunner:
    model = model_of(config(arch))
    model.causal_prefill = causal
    return TorchRunner(model, max_batch=2, max_seq_len=128, prefill_chunk=16)


def graph_runner(arch: str, causal: bool) -> CudaGraphRunner:
    model = model_of(config(arch))
    model.causal_prefill = causal
    return CudaGraphRunner(model, 2, 128, 16, backend=None, use_graphs=False, warmup=False)


@pytest.mark.parametrize("make", [eager_runner, graph_runner])
@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_runner_prefill_in_chunks_then_decode_equals_the_masked_runner(make, arch):
    """A 40-token prompt in chunks of 16, 16 and 8 (the first causal, the others after
    cached context; the graph runner pads the last to 16), then greedy decode steps."""
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    runs = []
    for causal in (True, False):
        runner = make(arch, causal)
        logits = [runner.prefill(1, ids[i : i + 16], i) for i in range(0, 40, 16)]
        token = int(logits[-1].argmax())
        for step in range(8):
            out = runner.decode([1], [token], [40 + step])[0]
            logits.append(out)
            token = int(out.argmax())
        runs.append(torch.stack(logits))
    assert (runs[0] - runs[1]).abs().max().item() < TOL


@pytest.mark.parametrize("length", [1, 5, 15, 16])
def test_graph_runner_padded_first_chunk_equals_the_masked_runner(length):
    ids = torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(5)).tolist()
    causal = graph_runner("qwen3", True).prefill(0, ids, 0)
    masked = graph_runner("qwen3", False).prefill(0, ids, 0)
    assert (causal - masked).abs().max().item() < TOL


@pytest.mark.parametrize("arch", ["qwen3", "gemma2"])
def test_graph_runner_warms_the_prefill_graphs_every_first_chunk_uses(arch):
    """Warm-up runs a causal and a masked prefill per chunk bucket (masked only where no
    layer can go causal), and a first chunk of any length reuses its bucket's causal key."""
    model = model_of(config(arch))
    runner = CudaGraphRunner(model, 2, 128, 32, backend=None, use_graphs=False, warmup=False)
    keys = []
    run = runner._run
    runner._run = lambda key, body: keys.append(key) or run(key, body)
    runner.warmup(compile_cache=False)
    causal = arch == "qwen3"
    paths = (False, True) if causal else (False,)
    warmed = {k for k in keys if k[0] == "prefill"}
    buckets = runner.chunk_sizes
    assert warmed == {("prefill", t, runner.kv_sizes[0], c) for t in buckets for c in paths}
    keys.clear()
    for n in (1, 9, 17, 32):
        runner.prefill(0, list(range(1, n + 1)), 0)
    runner.prefill(0, [1, 2, 3], 32)  # after cached context: masked
    assert keys[:4] == [("prefill", t, runner.kv_sizes[0], causal) for t in (16, 16, 32, 32)]
    assert keys[4] == ("prefill", 16, runner.kv_sizes[0], False)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_a_non_finite_padding_row_never_reaches_the_real_rows(arch):
    """A padded chunk's padding rows are among a causal step's keys: masked, but 0 x NaN is
    NaN, so a padding row holding a NaN (a windowed layer's padded query that saw no key
    gives one on some CUDA kernels) spoiled every real row before its keys and values were
    zeroed. The padding id's embedding set to inf stands for any such row."""
    logits = {}
    for causal in (False, True):
        torch.manual_seed(0)
        model = model_of(config(arch))
        model.causal_prefill = causal
        with torch.no_grad():
            model.model.embed_tokens.weight[0] = float("inf")  # the id padding rows carry
        runner = CudaGraphRunner(model, 2, 128, 16, backend=None, use_graphs=False, warmup=False)
        logits[causal] = runner.prefill(0, [5, 6, 7, 8, 9], 0)  # padded to 16 with id 0
    assert torch.isfinite(logits[True]).all()
    torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=1e-5)
