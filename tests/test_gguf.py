"""GGUF loading: tiny Llama / Qwen3 checkpoints written as llama.cpp would, loaded back."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf import quants as gguf_quants

from fermi.errors import ModelLoadError
from fermi.gguf import load_gguf
from fermi.gguf_reader import GGUFFile
from fermi.loading import load_folder
from fermi.text.tokenizer import Tokenizer
from tests.gguf_files import dequantized, gguf_name, packed_string, raw_gguf, write_gguf
from tests.tiny import LLAMA3_ROPE, write_checkpoint

CPU = torch.device("cpu")
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
Q = GGMLQuantizationType

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "Grüße aus München — ¿Dónde está la biblioteca? Привет, мир! 你好，世界！こんにちは",
    "Emoji: 😀 🎉 👍🏽 🚀 ❤️ 🐍 and numbers 3.14159 2024",
    "<|im_start|>user\nhi<|im_end|>\n<think>\nhmm</think>  \n\n\tdef f(x):\n    return x",
]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("llama") / "hf", LLAMA, seed=3)


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("qwen3") / "hf", {}, seed=4)


def logits(model, tokens: torch.Tensor, steps: int = 6) -> torch.Tensor:
    """Prefill logits for every position, then greedy cached decode: all stacked [T+steps, V]."""
    model.setup_cache(max_batch=1, max_seq_len=128)
    n = tokens.shape[1]
    with torch.inference_mode():
        out = [model(tokens, torch.arange(n)[None], torch.tensor([0]), n, last_only=False)[0]]
        for i in range(steps):
            tok = out[-1][-1:].argmax(-1, keepdim=True)
            pos = torch.tensor([[n + i]])
            out.append(model(tok, pos, torch.tensor([0]), n + i + 1, last_only=False)[0])
    return torch.cat(out)


def prompt(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, 23), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": False, "num_key_value_heads": 1}),
        ("qwen3", {}),
        ("qwen3", {"tie_word_embeddings": False}),
    ],
)
def test_gguf_f32_round_trip_gives_the_safetensors_weights_and_logits(tmp_path, arch, overrides):
    base = LLAMA if arch == "llama" else {}
    folder = write_checkpoint(tmp_path / "hf", {**base, **overrides}, seed=7)
    path = write_gguf(folder, tmp_path / "m.gguf", arch)
    original = load_folder(folder, CPU, torch.float32)
    loaded = load_gguf(path, CPU, torch.float32)
    assert loaded.config == original.config
    theirs, ours = original.model.state_dict(), loaded.model.state_dict()
    assert theirs.keys() == ours.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name  # exact: names mapped, q/k un-permuted
    tokens = prompt(original.config.vocab_size)
    diff = (logits(loaded.model, tokens) - logits(original.model, tokens)).abs().max()
    assert diff.item() < 1e-5


def test_gguf_llama3_rope_stored_as_rope_freqs_matches_the_original(tmp_path):
    folder = write_checkpoint(tmp_path / "hf", {**LLAMA, **LLAMA3_ROPE}, seed=8)
    path = write_gguf(folder, tmp_path / "m.gguf", "llama")
    original = load_folder(folder, CPU, torch.float32)
    loaded = load_gguf(path, CPU, torch.float32)
    tokens = torch.randint(0, 400, (1, 100), generator=torch.Generator().manual_seed(1))
    diff = (logits(loaded.model, tokens) - logits(original.model, tokens)).abs().max()
    assert diff.item() < 1e-4


@pytest.mark.parametrize(
    ("qtype", "tolerance"), [(Q.F16, 0.005), (Q.Q8_0, 0.05), (Q.Q4_1, 0.6), (Q.Q4_0, 0.6)]
)
def test_gguf_quantized_weights_dequantize_exactly_and_logits_stay_close(
    tmp_path, llama_folder, qtype, tolerance
):
    path = write_gguf(llama_folder, tmp_path / "m.gguf", "llama", weight_type=qtype)
    original = load_folder(llama_folder, CPU, torch.float32)
    loaded = load_gguf(path, CPU, torch.float32)
    ours, theirs = loaded.model.state_dict(), original.model.state_dict()
    for name in ("model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
        assert torch.equal(ours[name], dequantized(theirs[name], qtype)), name
    tokens = prompt(original.config.vocab_size)
    ref = logits(original.model, tokens, steps=0)
    got = logits(loaded.model, tokens, steps=0)
    relative = ((got - ref).norm() / ref.norm()).item()
    assert 0 < relative < tolerance


def test_gguf_loads_into_the_requested_dtype(tmp_path, llama_folder):
    path = write_gguf(llama_folder, tmp_path / "m.gguf", "llama", weight_type=Q.Q8_0)
    loaded = load_gguf(path, CPU, "bf16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_weights_that_would_not_fit_once_dequantized_are_refused_first(
    tmp_path, llama_folder, monkeypatch
):
    import fermi.memory

    path = write_gguf(llama_folder, tmp_path / "m.gguf", "llama", weight_type=Q.Q8_0)
    read: list[str] = []
    monkeypatch.setattr(fermi.gguf, "read_weights", lambda *a: read.append("read") or {})
    monkeypatch.setattr(fermi.memory, "free_memory", lambda device: 1 << 10)
    with pytest.raises(
        ModelLoadError,
        match=r"m\.gguf: dequantizing its weights needs .* KiB and cpu has 1.0 KiB free",
    ):
        load_gguf(path, CPU, "fp32")
    assert not read  # refused before any weight was dequantized


def random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int) -> np.ndarray:
    """Random quantized bytes with every float16 scale field set to a finite value."""
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    data = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    halves = {
        Q.Q4_0: (0,),
        Q.Q4_1: (0, 2),
        Q.Q8_0: (0,),
        Q.Q2_K: (80, 82),
        Q.Q3_K: (108,),
        Q.Q4_K: (0, 2),
        Q.Q5_K: (0, 2),
        Q.Q6_K: (208,),
    }[qtype]
    for at in halves:
        scale = rng.uniform(-0.1, 0.1, data.shape[0]).astype(np.float16)
        data[:, at : at + 2] = scale.view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_gguf_block_dequantization_agrees_with_transformers_implementation(tmp_path, qtype):
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    raw = random_blocks(qtype, 4, 512)
    writer = GGUFWriter(tmp_path / "q.gguf", "llama")
    writer.add_tensor("w", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = GGUFFile(tmp_path / "q.gguf").tensor("w", torch.float32)
    size = GGML_QUANT_SIZES[qtype][1]
    theirs = hf_dequantize(torch.from_numpy(raw.reshape(-1, size)), int(qtype)).reshape(4, 512)
    assert ours.shape == (4, 512)
    assert torch.allclose(ours, theirs.float(), rtol=0, atol=1e-6)
    assert ours.abs().max() > 0


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q5_1])
def test_gguf_q5_round_trip_through_the_gguf_quantizer(tmp_path, qtype):
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    writer = GGUFWriter(tmp_path / "q.gguf", "llama")
    writer.add_tensor("w", gguf_quants.quantize(x, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = GGUFFile(tmp_path / "q.gguf").tensor("w", torch.float32).numpy()
    assert np.abs(ours - x).max() < 0.15 * np.abs(x).max() / 2


def test_gguf_tokenizer_encodes_and_decodes_like_the_original(tmp_path, qwen3_folder):
    path = write_gguf(qwen3_folder, tmp_path / "m.gguf", "qwen3")
    original = Tokenizer.from_folder(qwen3_folder)
    loaded = load_gguf(path, CPU, torch.float32).tokenizer
    assert loaded.vocab_size == original.vocab_size
    assert loaded.special_ids == original.special_ids
    assert loaded.eos_token_id == original.eos_token_id
    for text in TEXTS:
        ids = original.encode(text)
        assert loaded.encode(text) == ids, text
        assert loaded.decode(ids) == text
        assert loaded.decode(ids, skip_special_tokens=True) == original.decode(ids, True)


def test_gguf_chat_template_and_eos_come_from_the_metadata(tmp_path, qwen3_folder):
    path = write_gguf(qwen3_folder, tmp_path / "m.gguf", "qwen3")
    original = Tokenizer.from_folder(qwen3_folder)
    ckpt = load_gguf(path, CPU, torch.float32)
    messages = [{"role": "user", "content": "Bonjour ¿qué tal? 😀"}]
    assert ckpt.tokenizer.render_prompt_ids(messages) == original.render_prompt_ids(messages)
    assert ckpt.generation.eos_token_ids == (original.token_to_id("<|im_end|>"),)


def test_gguf_unsupported_quantization_type_is_named(tmp_path, llama_folder):
    raw = np.zeros((1, GGML_QUANT_SIZES[Q.IQ2_XXS][1]), dtype=np.uint8)
    path = write_gguf(
        llama_folder, tmp_path / "m.gguf", "llama", extra_tensors={"odd.weight": (raw, Q.IQ2_XXS)}
    )
    with pytest.raises(ModelLoadError, match=r"'odd\.weight' is stored as IQ2_XXS"):
        load_gguf(path, CPU, torch.float32)


def test_gguf_unsupported_architecture_is_named(tmp_path, llama_folder):
    writer = GGUFWriter(tmp_path / "m.gguf", "mamba")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="GGUF architecture 'mamba' is not supported"):
        load_gguf(tmp_path / "m.gguf", CPU, torch.float32)


def test_gguf_tensor_with_an_unknown_name_is_named(tmp_path, llama_folder):
    path = write_gguf(llama_folder, tmp_path / "m.gguf", "llama")
    data = path.read_bytes()
    # Rename one tensor in the header to a name no architecture uses.
    name = gguf_name("model.layers.1.mlp.up_proj.weight").encode()
    path.write_bytes(data.replace(name, name.replace(b"ffn_up", b"ffn_xx"), 1))
    with pytest.raises(ModelLoadError, match="ffn_xx"):
        load_gguf(path, CPU, torch.float32)


def test_not_a_gguf_file_and_truncated_files_are_clear_errors(tmp_path, llama_folder):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_gguf(bad, CPU, torch.float32)
    path = write_gguf(llama_folder, tmp_path / "m.gguf", "llama")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:2000])  # inside the tokenizer metadata
    with pytest.raises(ModelLoadError, match="GGUF header is truncated"):
        load_gguf(cut, CPU, torch.float32)
    cut.write_bytes(path.read_bytes()[:-100])  # inside the last tensor
    with pytest.raises(ModelLoadError, match="runs past the end of the file"):
        load_gguf(cut, CPU, torch.float32)


def test_quantized_gguf_on_cpu_defaults_to_fp16_weights_with_fp32_compute(tmp_path, llama_folder):
    from fermi.models.half_weights import HalfWeightLinear

    path = write_gguf(llama_folder, tmp_path / "m.gguf", "llama", weight_type=Q.Q8_0)
    half = load_gguf(path, CPU).model
    full = load_gguf(path, CPU, "fp32").model
    linears = [m for m in half.modules() if isinstance(m, HalfWeightLinear)]
    assert len(linears) == 2 * 4 + 1  # every (fused) projection of both layers, and the head
    assert {m.weight.dtype for m in linears} == {torch.float16}
    # The embedding table is stored in fp16 as well; its rows come out in float32.
    assert half.model.embed_tokens.weight.dtype == torch.float16
    assert full.model.embed_tokens.weight.dtype == torch.float32
    assert half.dtype == torch.float32  # activations: the norms' dtype
    # The KV cache in fp16 as well (use_half_cache; attention widens it to float32), where
    # float32 weights keep a float32 cache.
    half.setup_cache(1, 32)
    full.setup_cache(1, 32)
    assert half.model.layers[0].self_attn.cache.k.dtype == torch.float16
    assert full.model.layers[0].self_attn.cache.k.dtype == torch.float32
    tokens = prompt(full.cfg.vocab_size)
    ref, got = logits(full, tokens), logits(half, tokens)  # prefill (upcast) + decode (fp16)
    assert got.dtype == torch.float32
    assert ((got - ref).norm() / ref.norm()).item() < 1e-3


@pytest.mark.parametrize("weight_type", [Q.Q8_0, Q.Q4_1])
def test_fp16_storage_reads_matrices_as_fp16_and_packs_the_same_values(
    tmp_path, llama_folder, weight_type
):
    """The CPU's fp16 storage reads a GGUF's projection matrices and embedding table straight
    to fp16 and packs them on several threads (perf/LOG.md runs 32, 44); the packs and the
    logits are exactly what the float32 model packed one layer at a time gives."""
    from fermi import gguf as gguf_module
    from fermi.models.half_weights import (
        HalfWeightLinear,
        use_half_cache,
        use_half_embedding,
        use_half_weights,
    )

    path = write_gguf(llama_folder, tmp_path / "m.gguf", "llama", weight_type=weight_type)
    seen: dict[str, torch.dtype] = {}
    packed: dict[str, torch.dtype] = {}
    read, pack = gguf_module.read_weights, gguf_module.use_half_weights

    def spy_read(*args, **kwargs):
        weights = read(*args, **kwargs)
        seen.update({k: v.dtype for k, v in weights.items()})
        return weights

    def spy_pack(model, *args, **kwargs):  # what the model holds when packing starts
        linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        packed.update({n: m.weight.dtype for n, m in linears.items()})
        return pack(model, *args, **kwargs)

    threads = torch.get_num_threads()
    gguf_module.read_weights, gguf_module.use_half_weights = spy_read, spy_pack
    torch.set_num_threads(2)  # packs made on two threads
    try:
        half = load_gguf(path, CPU).model
    finally:
        gguf_module.read_weights, gguf_module.use_half_weights = read, pack
        torch.set_num_threads(threads)
    assert {d for k, d in seen.items() if k.endswith("_proj.weight")} == {torch.float16}
    assert {d for k, d in seen.items() if k.endswith("norm.weight")} == {torch.float32}
    # The layers' projections reach the packing in fp16; this file ties its head to the
    # embedding table, which is read in fp16 too (perf/LOG.md run 44: no float32 copy of
    # it) and packed from there, and stored as read.
    assert seen["model.embed_tokens.weight"] == torch.float16
    assert len(packed) == 2 * 4 + 1 and set(packed.values()) == {torch.float16}, packed
    assert half.model.embed_tokens.weight.dtype == torch.float16

    torch.set_num_threads(1)  # the reference: float32 weights, packed one after another
    try:
        ref = use_half_weights(load_gguf(path, CPU, "fp32").model)
        use_half_embedding(ref)
        use_half_cache(ref)
    finally:
        torch.set_num_threads(threads)
    ours = {n: m for n, m in half.named_modules() if isinstance(m, HalfWeightLinear)}
    theirs = {n: m for n, m in ref.named_modules() if isinstance(m, HalfWeightLinear)}
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 4 + 1
    for name, layer in ours.items():
        assert torch.equal(layer.weight, theirs[name].weight), name
    tokens = prompt(half.cfg.vocab_size)
    assert torch.equal(logits(half, tokens), logits(ref, tokens))


def test_a_head_tied_to_a_float_table_keeps_the_one_table(tmp_path, llama_folder):
    """Halving the table is for models whose head has weights of its own: a head still tied
    to it reads it whole every step, and would lose its float32 weights."""
    from fermi.models.half_weights import use_half_embedding

    path = write_gguf(llama_folder, tmp_path / "m.gguf", "llama", weight_type=Q.Q8_0)
    full = load_gguf(path, CPU, "fp32").model
    assert full.lm_head.weight is full.model.embed_tokens.weight
    use_half_embedding(full)
    assert full.lm_head.weight is full.model.embed_tokens.weight
    assert full.lm_head.weight.dtype == torch.float32


def test_halving_the_table_never_unpacks_a_packed_head(tmp_path, llama_folder, monkeypatch):
    """A packed head's ``weight`` unpacks a float32 copy of it: asking it whether it is
    tied to the table cost SmolLM2-135M's load a 170 MB peak (perf/LOG.md run 44)."""
    from fermi.models.half_weights import (
        HalfEmbedding,
        HalfWeightLinear,
        use_half_embedding,
        use_half_weights,
    )

    path = write_gguf(llama_folder, tmp_path / "m.gguf", "llama", weight_type=Q.Q8_0)
    model = use_half_weights(load_gguf(path, CPU, "fp32").model, "fbgemm")
    assert isinstance(model.lm_head, HalfWeightLinear) and model.lm_head.packed

    def unpacked(self):
        raise AssertionError("the packed head was unpacked")

    monkeypatch.setattr(HalfWeightLinear, "weight", property(unpacked))
    use_half_embedding(model)
    assert isinstance(model.model.embed_tokens, HalfEmbedding)


def test_float_gguf_on_cpu_defaults_to_float32(tmp_path, llama_folder):
    path = write_gguf(llama_folder, tmp_path / "m.gguf", "llama", weight_type=Q.F16)
    model = load_gguf(path, CPU).model
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_gguf_sentencepiece_tokenizer_is_refused_by_name(tmp_path, llama_folder):
    path = write_gguf(llama_folder, tmp_path / "m.gguf", "llama")
    data = path.read_bytes()
    # Same length, so the header stays valid: "gpt2" -> "sp_x" as tokenizer.ggml.model.
    path.write_bytes(
        data.replace(b"\x04\x00\x00\x00\x00\x00\x00\x00gpt2", b"\x04" + b"\x00" * 7 + b"sp_x", 1)
    )
    with pytest.raises(ModelLoadError, match="tokenizer model 'sp_x' is not supported"):
        load_gguf(path, CPU, torch.float32)


HUGE = 4294967295


@pytest.mark.timeout(30)
@pytest.mark.parametrize("layers", [1_000_000, HUGE])
def test_gguf_absurd_block_count_fails_at_once_naming_the_field(tmp_path, llama_folder, layers):
    path = write_gguf(
        llama_folder,
        tmp_path / "m.gguf",
        "llama",
        metadata={"llama.block_count": (layers, GGUFValueType.UINT32)},
    )
    with pytest.raises(ModelLoadError, match=rf"m\.gguf: llama\.block_count = {layers} is outside"):
        load_gguf(path, CPU, torch.float32)


@pytest.mark.parametrize("key", ["llama.embedding_length", "llama.context_length"])
def test_gguf_absurd_size_is_refused_naming_the_file_and_field(tmp_path, llama_folder, key):
    path = write_gguf(
        llama_folder, tmp_path / "m.gguf", "llama", metadata={key: (HUGE, GGUFValueType.UINT32)}
    )
    with pytest.raises(ModelLoadError, match=rf"m\.gguf: {key} = {HUGE} is outside 1\.\."):
        load_gguf(path, CPU, torch.float32)


@pytest.mark.parametrize(
    "value", [(0, GGUFValueType.UINT32), ("abc", GGUFValueType.STRING), (48, GGUFValueType.UINT32)]
)
def test_gguf_alignment_that_is_not_a_power_of_two_is_a_load_error(tmp_path, llama_folder, value):
    path = write_gguf(
        llama_folder, tmp_path / "m.gguf", "llama", metadata={"general.alignment": value}
    )
    with pytest.raises(ModelLoadError, match=r"m\.gguf: general\.alignment must be a positive"):
        GGUFFile(path)


@pytest.mark.timeout(30)
def test_gguf_arrays_nested_20000_deep_are_a_load_error_naming_the_key(tmp_path):
    array = struct.pack("<I", GGUFValueType.ARRAY)
    nested = array + (array + struct.pack("<Q", 1)) * 20_000
    innermost = struct.pack("<IQ", GGUFValueType.UINT8, 0)
    path = tmp_path / "deep.gguf"
    path.write_bytes(raw_gguf(packed_string("general.deep") + nested + innermost, n_kv=1))
    with pytest.raises(ModelLoadError, match=r"deep\.gguf: general\.deep: arrays nested more"):
        GGUFFile(path)


@pytest.mark.timeout(30)
def test_gguf_counts_the_file_cannot_hold_are_refused_before_any_loop(tmp_path):
    # 2**40 strings of at least 8 bytes each, in a file of a few dozen bytes.
    kv = packed_string("tokenizer.ggml.tokens") + struct.pack(
        "<IIQ", GGUFValueType.ARRAY, GGUFValueType.STRING, 1 << 40
    )
    path = tmp_path / "counts.gguf"
    path.write_bytes(raw_gguf(kv, n_kv=1))
    with pytest.raises(ModelLoadError, match=r"ggml\.tokens declares 1099511627776 items"):
        GGUFFile(path)
    path.write_bytes(raw_gguf(b"", n_kv=0, n_tensors=HUGE))
    with pytest.raises(ModelLoadError, match=f"tensor count declares {HUGE} items"):
        GGUFFile(path)


def test_gguf_tensor_whose_shape_needs_more_bytes_than_the_file_is_refused(tmp_path):
    dims = struct.pack("<IQQ", 2, 1 << 31, 1 << 31)  # 2**62 float32 values
    info = packed_string("token_embd.weight") + dims + struct.pack("<IQ", Q.F32, 0)
    path = tmp_path / "big.gguf"
    path.write_bytes(raw_gguf(b"", n_kv=0, tensors=info, n_tensors=1) + bytes(64))
    with pytest.raises(ModelLoadError, match=r"'token_embd\.weight' of shape .* needs 1844"):
        GGUFFile(path)


# Found by tests/test_fuzz_gguf.py: each raised TypeError, ValueError or IndexError before.
@pytest.mark.parametrize(
    "key, value, message",
    [
        ("general.architecture", (["llama"], GGUFValueType.ARRAY), "must be a string, not"),
        ("tokenizer.ggml.eos_token_id", ("2", GGUFValueType.STRING), "must be an integer"),
        ("llama.rope.scaling.factor", ("x", GGUFValueType.STRING), "must be a number"),
        ("tokenizer.ggml.eos_token_id", (10**6, GGUFValueType.UINT32), "outside the vocabulary"),
        ("tokenizer.ggml.bos_token_id", (10**6, GGUFValueType.UINT32), "outside the vocabulary"),
        ("tokenizer.ggml.token_type", ([1, 1], GGUFValueType.ARRAY), " has 2 entries"),
    ],
)
def test_gguf_metadata_of_the_wrong_type_or_range_is_a_load_error_naming_the_key(
    tmp_path, llama_folder, key, value, message
):
    path = write_gguf(llama_folder, tmp_path / "m.gguf", "llama", metadata={key: value})
    with pytest.raises(ModelLoadError, match=rf"m\.gguf: {re.escape(key)}.*{message}"):
        load_gguf(path, CPU, torch.float32)


def test_gguf_tensor_with_a_zero_dimension_is_a_load_error(tmp_path):
    info = packed_string("token_embd.weight") + struct.pack("<IQQIQ", 2, 0, 8, 0, 0)
    path = tmp_path / "zero.gguf"
    path.write_bytes(raw_gguf(b"", n_kv=0, tensors=info, n_tensors=1) + bytes(64))
    with pytest.raises(ModelLoadError, match=r"zero\.gguf: tensor 'token_embd\.weight' has a dim"):
        GGUFFile(path)


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("llama.attention.head_count", 3, "llama.attention.head_count = 3 heads of"),
        ("llama.attention.head_count_kv", 0, "llama.attention.head_count_kv = 0 is outside"),
        ("llama.attention.head_count_kv", 3, "llama.attention.head_count_kv = 3 heads of"),
    ],
)
def test_gguf_head_counts_that_do_not_fit_the_tensors_are_refused_naming_the_field(
    tmp_path, llama_folder, key, value, said
):
    """A head count the q/k tensors cannot hold failed in the rotary un-permute with a
    traceback, and a head_count_kv of 0 was quietly read as the head count."""
    path = write_gguf(
        llama_folder, tmp_path / "m.gguf", "llama", metadata={key: (value, GGUFValueType.UINT32)}
    )
    with pytest.raises(ModelLoadError, match=re.escape(f"m.gguf: {said}")):
        load_gguf(path, CPU, torch.float32)


@pytest.mark.parametrize(
    ("metadata", "said"),
    [
        (
            {"llama.rope.freq_base": (0.0, GGUFValueType.FLOAT32)},
            "llama.rope.freq_base = 0.0 must be positive (read as rope_theta)",
        ),
        (
            {"llama.attention.layer_norm_rms_epsilon": (-1.0, GGUFValueType.FLOAT32)},
            "llama.attention.layer_norm_rms_epsilon = -1.0 must be positive (read as rms_norm_eps)",
        ),
        (
            {
                "llama.rope.scaling.type": ("linear", GGUFValueType.STRING),
                "llama.rope.scaling.factor": (-2.0, GGUFValueType.FLOAT32),
            },
            "llama.rope.scaling.factor = -2.0 must be positive (read as rope_scaling.factor)",
        ),
        (
            {"llama.rope.scaling.type": ("weird", GGUFValueType.STRING)},
            "llama.rope.scaling.type 'weird' is not supported (supported: none, linear, yarn)",
        ),
        (
            {"llama.rope.dimension_count": (3, GGUFValueType.UINT32)},
            "llama.rope.dimension_count = 3 must be an even number from 2 to the head size, 16",
        ),
    ],
)
def test_gguf_settings_the_config_checks_refuse_are_named_by_their_metadata_key(
    tmp_path, llama_folder, metadata, said
):
    """The shared config checks speak config.json's names; a GGUF file has none of them
    (a zero rope base, an odd rotary count: the latter loaded and rotated wrongly)."""
    path = write_gguf(llama_folder, tmp_path / "m.gguf", "llama", metadata=metadata)
    with pytest.raises(ModelLoadError) as caught:
        load_gguf(path, CPU, torch.float32)
    assert str(caught.value) == f"{path}: {said}"


def test_a_config_check_message_without_a_known_field_keeps_its_words():
    from fermi.gguf import _metadata_words

    assert _metadata_words("config.json: unreadable rope settings (x)", "llama") == (
        "unreadable rope settings (x) (a setting read from its metadata)"
    )
    assert _metadata_words("rope_scaling of type linear has no factor", "llama") == (
        "rope_scaling of type linear has no factor (a setting read from its metadata)"
    )


def test_gguf_tensor_with_no_dimensions_or_listed_twice_is_a_load_error(tmp_path):
    """ggml tensors have 1 to 4 dimensions (none reached the loader as an IndexError); a
    name listed twice let the last entry win, silently."""
    none = packed_string("token_embd.weight") + struct.pack("<IIQ", 0, 0, 0)
    path = tmp_path / "nodims.gguf"
    path.write_bytes(raw_gguf(b"", n_kv=0, tensors=none, n_tensors=1) + bytes(64))
    with pytest.raises(ModelLoadError, match=r"'token_embd\.weight' has 0 dimensions"):
        GGUFFile(path)
    one = packed_string("output_norm.weight") + struct.pack("<IQIQ", 1, 4, 0, 0)
    path = tmp_path / "twice.gguf"
    path.write_bytes(raw_gguf(b"", n_kv=0, tensors=one + one, n_tensors=2) + bytes(64))
    with pytest.raises(ModelLoadError, match=r"'output_norm\.weight' is listed twice"):
        GGUFFile(path)


def test_a_gguf_layer_tensor_name_without_a_layer_number_is_unexpected_not_a_crash():
    from fermi.gguf import our_name

    assert our_name("blk.attn_norm.weight", "llama") is None
    assert our_name("blk.x.attn_norm.weight", "llama") is None
    assert our_name("blk.3.attn_norm.weight", "llama") == "model.layers.3.input_layernorm.weight"


@pytest.mark.parametrize(
    ("merges", "said"),
    [
        (["abc"], r"tokenizer\.ggml\.merges\[0\] = 'abc' is not two tokens separated by a"),
        (["x "], r"tokenizer\.ggml\.merges\[0\] = 'x ' is not two tokens"),
        (["一 丁"], "tokenizer.ggml.tokens and tokenizer.ggml.merges do not make a tokenizer"),
    ],
)
def test_gguf_merges_that_make_no_tokenizer_are_a_load_error_naming_them(
    tmp_path, llama_folder, merges, said
):
    """tokenizers raised a bare Exception or TypeError, naming no file."""
    path = write_gguf(
        llama_folder,
        tmp_path / "m.gguf",
        "llama",
        metadata={"tokenizer.ggml.merges": (merges, GGUFValueType.ARRAY)},
    )
    with pytest.raises(ModelLoadError, match=rf"m\.gguf: {said}"):
        load_gguf(path, CPU, torch.float32)
