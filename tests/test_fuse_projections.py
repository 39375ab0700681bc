"""Fused projections made once at load: one qkv_proj and one gate_up_proj, the same logits."""

from __future__ import annotations

import copy

import pytest
import torch

from fermi.errors import ModelLoadError
from fermi.loading import build_model
from fermi.models.decoder import Decoder, projection_parts
from fermi.models.gemma2 import gemma2_config
from fermi.models.gemma3 import gemma3_config
from fermi.models.granite import granite_config
from fermi.models.half_weights import HalfWeightLinear, use_half_weights
from fermi.models.llama import llama_config
from fermi.models.phi3 import phi3_config
from fermi.models.qwen3 import qwen3_config
from fermi.models.registry import Adapter
from fermi.models.smollm3 import smollm3_config

SHAPE = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
}

CONFIGS = {
    "qwen3": lambda: qwen3_config({**SHAPE, "tie_word_embeddings": True}),
    "llama_bias": lambda: llama_config({**SHAPE, "attention_bias": True, "mlp_bias": True}),
    "phi3_window": lambda: phi3_config({**SHAPE, "sliding_window": 8}),
    "gemma2": lambda: gemma2_config(
        {**SHAPE, "sliding_window": 8, "hidden_activation": "gelu_pytorch_tanh"}
    ),
    # Sliding and global layers with their own rope bases, q/k norm x (1 + weight).
    "gemma3": lambda: gemma3_config(
        {**SHAPE, "sliding_window": 8, "sliding_window_pattern": 2, "rope_local_base_freq": 100}
    ),
    "smollm3_nope": lambda: smollm3_config({**SHAPE, "no_rope_layers": [1, 0]}),
    "granite": lambda: granite_config(
        {
            **SHAPE,
            "embedding_multiplier": 12.0,
            "attention_multiplier": 0.1,
            "residual_multiplier": 0.22,
            "logits_scaling": 8.0,
        }
    ),
}


def random_decoder(cfg, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(cfg).eval()
    with torch.no_grad():  # default init leaves norms at 1 and biases small: perturb them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def run(model: Decoder, steps: int = 12) -> torch.Tensor:
    """Logits of a 20-token prefill (every position) and ``steps`` greedy decode steps,
    two rows in slots 1 and 0 (so the cache is gathered by slot, not read as a view)."""
    model.setup_cache(max_batch=2, max_seq_len=64)
    torch.manual_seed(1)
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 20))
    positions = torch.arange(20)[None].expand(2, 20)
    slots = torch.tensor([1, 0])
    out = []
    with torch.inference_mode():
        logits = model(prompt, positions, slots, kv_len=20, last_only=False)
        out.append(logits.flatten())
        token = logits[:, -1].argmax(-1, keepdim=True)
        for i in range(steps):
            pos = torch.full((2, 1), 20 + i)
            logits = model(token, pos, slots, kv_len=21 + i)
            out.append(logits.flatten())
            token = logits.argmax(-1, keepdim=True)
    return torch.cat(out)


def separate_checkpoint(model: Decoder) -> dict[str, torch.Tensor]:
    """``model``'s tensors as most checkpoints store them: q/k/v and gate/up apart."""
    out = {}
    for name, tensor in model.state_dict().items():
        module, _, kind = name.rpartition(".")
        for fused, parts in projection_parts(model.cfg).items():
            if module.endswith("." + fused):
                prefix = module.removesuffix(fused)
                pieces = tensor.split([rows for _, rows in parts])
                for (part, _), piece in zip(parts, pieces, strict=True):
                    out[f"{prefix}{part}.{kind}"] = piece
                break
        else:
            out[name] = tensor
    return out


def load(tensors: dict[str, torch.Tensor], cfg) -> Decoder:
    adapter = Adapter(cfg.architecture, lambda hf: cfg)
    return build_model(cfg, adapter, tensors, torch.device("cpu"), torch.float32, "test")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_separate_checkpoint_projections_load_fused_with_the_same_logits(name):
    model = random_decoder(CONFIGS[name]())
    expected = run(model)
    tensors = separate_checkpoint(model)
    assert "model.layers.0.self_attn.k_proj.weight" in tensors
    fused = load(tensors, model.cfg)
    got = run(fused)
    assert (got - expected).abs().max().item() < 1e-5
    for layer in fused.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert not hasattr(attn, "q_proj") and not hasattr(mlp, "gate_proj")
        cfg = fused.cfg
        rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
        assert attn.qkv_proj.weight.shape == (rows, cfg.hidden_size)
        assert mlp.gate_up_proj.weight.shape == (2 * cfg.intermediate_size, cfg.hidden_size)
        assert (attn.qkv_proj.bias is not None) == cfg.attention_bias
        assert (mlp.gate_up_proj.bias is not None) == cfg.mlp_bias
    parts = {part for n, _ in fused.named_parameters() for part in n.split(".")}
    assert parts.isdisjoint({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
    assert {"qkv_proj", "gate_up_proj"} <= parts


def test_fp16_storage_keeps_one_fused_product():
    model = random_decoder(CONFIGS["llama_bias"]())
    half = use_half_weights(copy.deepcopy(model))
    qkv = half.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, HalfWeightLinear) and qkv.weight.dtype == torch.float16
    assert qkv.bias.dtype == torch.float32
    # fp16 weights and, for few rows, fp16 activations: within fp16 rounding of fp32.
    assert (run(half) - run(model)).abs().max().item() < 5e-3


def test_a_missing_part_of_a_fused_projection_is_named():
    model = random_decoder(CONFIGS["llama_bias"]())
    tensors = separate_checkpoint(model)
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        load(tensors, model.cfg)
