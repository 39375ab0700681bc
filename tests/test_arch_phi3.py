"""Phi-3 / Phi-3.5-mini on the shared decoder equals transformers (fp32), LongRoPE included."""

from __future__ import annotations

import json

import pytest
import torch

from fermi.errors import ModelLoadError
from fermi.loading import load_folder
from fermi.models.phi3 import phi3_config
from fermi.models.rope import inverse_frequencies
from fermi.models.shapes import SHAPES
from fermi.runners.longrope import LongRopeRunner
from tests.arch_parity import TOL, greedy_pair, load_pair, max_error_prefill_and_decode
from tests.arch_templates import PHI35
from tests.tiny import write_checkpoint_for


def _transformers_version() -> tuple[int, ...]:
    import transformers

    return tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())


# The tests that compare with ``generate`` past the switch need a transformers whose generate
# re-encodes the whole sequence there. 5.24 does; 5.17 (checked on the GPU machine) drops the
# cache without the ``next_sequence_length`` reset and gives other tokens from the switch on.
reencoding_generate = pytest.mark.skipif(
    _transformers_version() < (5, 24),
    reason="this transformers' generate does not re-encode the sequence at the LongRoPE switch",
)

ORIGINAL = 32  # tiny stand-in for Phi-3.5's original_max_position_embeddings (4096)

PHI3_BASE = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "original_max_position_embeddings": ORIGINAL,
    # Factors per rotary pair (head_dim 16 -> 8); the long ones stretch far more.
    "rope_scaling": {
        "type": "longrope",
        "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.4, 1.7, 2.0],
        "long_factor": [1.1, 1.5, 2.5, 4.0, 7.0, 12.0, 20.0, 30.0],
    },
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "sliding_window": None,
    "pad_token_id": 0,
    "initializer_range": 0.1,
    "torch_dtype": "float32",
}

CONFIGS = {
    "longrope": {},
    "sliding": {"sliding_window": 16},
    "no_scaling": {"rope_scaling": None},
}


def write(tmp_path, name):
    return write_checkpoint_for(
        tmp_path / name,
        {**PHI3_BASE, **CONFIGS[name]},
        seed=len(name),
        added_tokens=PHI35.added_tokens,
        tokenizer_config=PHI35.tokenizer_config,
        eos_tokens=PHI35.eos_tokens,
    )


def test_checkpoint_is_fused_and_loads_as_it_is(tmp_path):
    from safetensors import safe_open

    folder = write(tmp_path, "longrope")
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        fused = f.get_tensor("model.layers.0.self_attn.qkv_proj.weight")
        gate_up = f.get_tensor("model.layers.0.mlp.gate_up_proj.weight")
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    model = load_folder(folder, torch.device("cpu"), torch.float32).model
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.shape == (64 + 32 + 32, 64)
    assert torch.equal(layer.self_attn.qkv_proj.weight, fused)
    assert torch.equal(layer.mlp.gate_up_proj.weight, gate_up)


# A 20-token prompt decoded 64 steps crosses position 32 mid-decode (short -> long);
# a 40-token prompt starts past it.
@pytest.mark.parametrize(("name", "prompt_len"), [("longrope", 20), ("longrope", 40)])
def test_longrope_short_to_long_switch_matches_transformers(tmp_path, name, prompt_len):
    model, ref = load_pair(write(tmp_path, name))
    assert model.rope_switch == ORIGINAL
    assert max_error_prefill_and_decode(model, ref, prompt_len=prompt_len) < TOL


def test_long_factors_change_the_logits_past_the_original_length(tmp_path):
    # Guards the test above: with only the short table, decoding past 32 goes wrong.
    model, ref = load_pair(write(tmp_path, "longrope"))
    model.rope_cos[1], model.rope_sin[1] = model.rope_cos[0], model.rope_sin[0]
    assert max_error_prefill_and_decode(model, ref, prompt_len=20) > 100 * TOL


@pytest.mark.parametrize("name", ["sliding", "no_scaling"])
def test_prefill_and_64_decode_steps_match_transformers(tmp_path, name):
    model, ref = load_pair(write(tmp_path, name))
    assert max_error_prefill_and_decode(model, ref, prompt_len=40) < TOL


@reencoding_generate
@pytest.mark.parametrize(("prompt_len", "chunk"), [(12, 512), (40, 16)])
def test_engine_greedy_equals_transformers_generate_across_the_switch(tmp_path, prompt_len, chunk):
    # generate re-encodes the whole sequence with the long factors when it first passes
    # 32 tokens; the engine's runner must do the same (during decode for a 12-token
    # prompt, during chunked prefill for a 40-token one).
    import fermi

    folder = write(tmp_path, "longrope")
    _, ref = load_pair(folder)
    torch.manual_seed(2)
    prompt = torch.randint(0, 512, (1, prompt_len))
    with torch.no_grad():
        expected = ref.generate(
            prompt, max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, prompt_len:].tolist()
    # float32 on every device: on CUDA the default bf16 drifts from the float32 reference
    # within 20 tokens of random weights, which says nothing about the switch.
    kw = {"max_seq_len": 128, "max_batch": 2, "prefill_chunk": chunk, "dtype": "float32"}
    with fermi.load(folder, **kw) as engine:
        assert isinstance(engine.runner, LongRopeRunner)
        out = engine.generate(
            prompt_token_ids=prompt[0].tolist(), max_tokens=64, temperature=0, ignore_eos=True
        )
    assert out.token_ids == expected
    assert len(set(expected)) > 1


def test_direct_forward_greedy_equals_generate_before_the_switch(tmp_path):
    model, ref = load_pair(write(tmp_path, "longrope"))
    ours, expected = greedy_pair(model, ref, prompt_len=4, steps=ORIGINAL - 4)
    assert ours == expected


def test_real_phi35_rope_equals_transformers_short_and_long():
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = SHAPES["Phi-3.5-mini-instruct"]
    cfg = phi3_config(hf)
    assert cfg.rope.params["original_max_position_embeddings"] == 4096
    ref_cfg = transformers.Phi3Config(**{k: v for k, v in hf.items() if k != "architectures"})
    longrope = ROPE_INIT_FUNCTIONS["longrope"]
    for seq_len in (None, 4097):
        expected, expected_scale = longrope(ref_cfg, None, seq_len=seq_len)
        ours, scale = inverse_frequencies(cfg.rope, cfg.head_dim, seq_len)
        assert torch.allclose(ours, expected, rtol=1e-6)
        assert scale == pytest.approx(expected_scale)
    assert scale == pytest.approx(1.1902380714238083)  # sqrt(1 + ln 32 / ln 4096)


def test_wrong_number_of_rope_factors_is_a_clear_load_error(tmp_path):
    folder = write(tmp_path, "longrope")
    config = json.loads((folder / "config.json").read_text())
    scaling = config.get("rope_parameters") or config["rope_scaling"]
    good = scaling["long_factor"]
    for factors, shown in ((good[:5], r"\[1\.1"), ([float("nan")] * 8, "nan"), ([0.0] * 8, "0.0")):
        scaling["long_factor"] = factors
        (folder / "config.json").write_text(json.dumps(config))
        # (a NaN or a zero made every logit NaN, silently)
        said = rf"long_factor must be 8 positive numbers \(one per rotated pair\), not .*{shown}"
        with pytest.raises(ModelLoadError, match=said):
            load_folder(folder, torch.device("cpu"), torch.float32)


def test_padded_prefill_on_the_graph_runner_keeps_the_short_factors(tmp_path):
    """The CUDA-graph runner pads a prefill chunk with a spare position past the cache
    (here 128, past the switch at 32): the padding must not select the long factors for a
    12-token prompt. Run on CPU with the runner's uncompiled, uncaptured path."""
    from fermi.runners.torch_cuda import CudaGraphRunner
    from fermi.runners.torch_eager import TorchRunner

    folder = write(tmp_path, "longrope")
    load = lambda: load_folder(folder, torch.device("cpu"), torch.float32).model  # noqa: E731
    padded = CudaGraphRunner(
        load(), 2, 128, prefill_chunk=32, backend=None, use_graphs=False, warmup=False
    )
    plain = TorchRunner(load(), 2, 128, prefill_chunk=32)
    prompt = list(range(3, 15))
    a, b = padded.prefill(0, prompt, 0), plain.prefill(0, prompt, 0)
    assert padded.scratch > ORIGINAL
    assert (a - b).abs().max().item() < TOL


@reencoding_generate
def test_engine_on_the_graph_runner_equals_transformers_across_the_switch(tmp_path):
    """LongRoPE wrapped around the CUDA-graph runner (run uncompiled on CPU): the scheduler
    must hand every step its tokens (the wrapper records them for the re-encode), so it does
    not use the runner's device-side token feedback here."""
    from fermi.engine.api import Engine
    from fermi.loading import GenerationDefaults
    from fermi.runners.longrope import with_longrope
    from fermi.runners.torch_cuda import CudaGraphRunner
    from fermi.text.tokenizer import Tokenizer

    folder = write(tmp_path, "longrope")
    _, ref = load_pair(folder)
    prompt = list(range(7, 19))  # 12 tokens: decoding crosses position 32
    with torch.no_grad():
        expected = ref.generate(
            torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()  # fmt: skip
    model = load_folder(folder, torch.device("cpu"), torch.float32).model
    inner = CudaGraphRunner(model, 2, 128, prefill_chunk=16, backend=None, use_graphs=False)
    runner = with_longrope(inner, model)
    assert isinstance(runner, LongRopeRunner) and not runner.capabilities.overlaps
    tok = Tokenizer.from_folder(folder)
    with Engine(runner, tok, GenerationDefaults(), model_name="phi") as engine:
        out = engine.generate(
            prompt_token_ids=prompt, max_tokens=40, temperature=0, ignore_eos=True
        )
    assert out.token_ids == expected
