"""Chat templates of the roadmap families render exactly as transformers renders them,
and the engine's thinking modes behave on an R1-style template that opens <think> itself."""

from __future__ import annotations

import pytest
import torch

from fermi.loading import load_folder
from fermi.text.tokenizer import ChatTemplateError, Tokenizer
from tests.arch_templates import GEMMA2, PHI35, R1
from tests.tiny import write_checkpoint_for

TINY = {
    "vocab_size": 512,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "torch_dtype": "float32",
}
ARCHS = {
    "r1": (R1, {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}),
    "phi35": (PHI35, {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}),
    "gemma2": (GEMMA2, {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"}),
}

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "<think>\nEasy one.\n</think>\n\nParis."},
    {"role": "user", "content": "  And of Japan?  "},
    {"role": "assistant", "content": "Tokyo."},
    {"role": "user", "content": "Thanks! One more: Italy?"},
]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def write(tmp_path, name: str):
    family, arch = ARCHS[name]
    return write_checkpoint_for(
        tmp_path / name,
        {**TINY, **arch},
        added_tokens=family.added_tokens,
        tokenizer_config=family.tokenizer_config,
        eos_tokens=family.eos_tokens,
    )


def hf_render(folder, messages, **kwargs) -> str:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("name", ["r1", "phi35"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_multi_turn_with_system_renders_as_transformers(tmp_path, name, generation_prompt):
    folder = write(tmp_path, name)
    messages = [SYSTEM, *CONVERSATION]
    ours = Tokenizer.from_folder(folder).apply_chat_template(
        messages, add_generation_prompt=generation_prompt
    )
    assert ours == hf_render(folder, messages, add_generation_prompt=generation_prompt)


def test_gemma_multi_turn_renders_as_transformers(tmp_path):
    folder = write(tmp_path, "gemma2")
    ours = Tokenizer.from_folder(folder).apply_chat_template(CONVERSATION)
    assert ours == hf_render(folder, CONVERSATION, add_generation_prompt=True)
    assert ours.startswith("<bos><start_of_turn>user\nWhat is the capital")
    assert "<start_of_turn>model\nTokyo.<end_of_turn>\n" in ours  # assistant -> model
    assert "\nAnd of Japan?<end_of_turn>" in ours  # content is trimmed


def test_gemma_rejects_a_system_message_like_transformers(tmp_path):
    import jinja2

    folder = write(tmp_path, "gemma2")
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        Tokenizer.from_folder(folder).apply_chat_template([SYSTEM, *CONVERSATION])
    with pytest.raises(jinja2.TemplateError, match="System role not supported"):
        hf_render(folder, [SYSTEM, *CONVERSATION], add_generation_prompt=True)


def test_r1_template_drops_past_reasoning_and_opens_think(tmp_path):
    ours = Tokenizer.from_folder(write(tmp_path, "r1")).apply_chat_template(CONVERSATION)
    assert "Easy one" not in ours
    assert ours.endswith("<｜User｜>Thanks! One more: Italy?<｜Assistant｜><think>\n")


@pytest.mark.parametrize(
    ("name", "eos"),
    [
        ("r1", ["<｜end▁of▁sentence｜>"]),
        ("phi35", ["<|end|>", "<|assistant|>", "<|endoftext|>"]),
        ("gemma2", ["<eos>", "<end_of_turn>"]),
    ],
)
def test_generation_stops_on_the_family_eos_tokens(tmp_path, name, eos):
    ckpt = load_folder(write(tmp_path, name), torch.device("cpu"), torch.float32)
    ids = [ckpt.tokenizer.token_to_id(t) for t in eos]
    assert list(ckpt.generation.eos_token_ids[: len(ids)]) == ids


@pytest.fixture
def r1_engine(tmp_path):
    import fermi

    with fermi.load(write(tmp_path, "r1"), max_seq_len=64, max_batch=1) as engine:
        yield engine


def test_thinking_off_closes_the_think_block_the_r1_template_opens(r1_engine):
    chat = r1_engine.chat_prompt(CONVERSATION, thinking="off")
    assert chat.text.endswith("<｜Assistant｜><think>\n</think>\n\n")
    assert not chat.start_in_reasoning
    assert chat.token_ids == r1_engine.tokenizer.encode(chat.text)


@pytest.mark.parametrize("thinking", ["on", "auto"])
def test_thinking_on_and_auto_start_in_reasoning(r1_engine, thinking):
    chat = r1_engine.chat_prompt(CONVERSATION, thinking=thinking)
    assert chat.text.endswith("<｜Assistant｜><think>\n")
    assert chat.start_in_reasoning
    assert r1_engine.supports_thinking
