"""Tokenizer settings for the roadmap families, written for the tests.

Each chat template follows the format its family publishes (DeepSeek-R1-Distill,
Phi-3.5-mini-instruct, Gemma 2 instruct), reduced to what the tests exercise. A
``Family`` carries what ``tests.tiny.write_checkpoint_for`` needs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    added_tokens: tuple[tuple[str, bool], ...]
    tokenizer_config: dict
    eos_tokens: tuple[str, ...]


# R1 distills: the generation prompt opens the think block itself; past answers lose
# their reasoning; the system prompt is written bare after BOS.
R1_TEMPLATE = (
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

R1 = Family(
    added_tokens=(
        ("<｜begin▁of▁sentence｜>", True),
        ("<｜end▁of▁sentence｜>", True),
        ("<｜User｜>", False),
        ("<｜Assistant｜>", False),
    ),
    tokenizer_config={
        "bos_token": "<｜begin▁of▁sentence｜>",
        "eos_token": "<｜end▁of▁sentence｜>",
        "add_bos_token": True,
        "chat_template": R1_TEMPLATE,
    },
    eos_tokens=("<｜end▁of▁sentence｜>",),
)

PHI35_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

PHI35 = Family(
    added_tokens=(
        ("<|assistant|>", True),
        ("<|end|>", True),
        ("<|system|>", True),
        ("<|user|>", True),
    ),
    tokenizer_config={
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": PHI35_TEMPLATE,
    },
    # Phi-3.5's generation_config stops on <|end|>, <|assistant|> and <|endoftext|>.
    eos_tokens=("<|end|>", "<|assistant|>", "<|endoftext|>"),
)

# Gemma has no system role and insists on alternating user/model turns.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

GEMMA2 = Family(
    added_tokens=(
        ("<bos>", True),
        ("<eos>", True),
        ("<start_of_turn>", True),
        ("<end_of_turn>", True),
    ),
    tokenizer_config={
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "add_bos_token": True,
        "chat_template": GEMMA2_TEMPLATE,
    },
    eos_tokens=("<eos>", "<end_of_turn>"),
)
