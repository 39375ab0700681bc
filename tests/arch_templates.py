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

# Llama 3.1 with JSON tool calling: the tools go into the first user turn with the
# instruction to answer {"name": ..., "parameters": ...}; an assistant's call is written
# back in that shape, a tool's result is an ipython turn.
LLAMA31_TOOLS_TEMPLATE = (
    "{{- bos_token }}"
    "{%- set messages = messages | list -%}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + messages[0]['content'] + "
    "'<|eot_id|>' }}{%- set messages = messages[1:] %}{%- endif %}"
    "{%- if tools %}"
    "{%- set first = messages[0]['content'] %}{%- set messages = messages[1:] %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}"
    "{{- 'Given the following functions, please respond with a JSON for a function call '"
    " + 'with its proper arguments that best answers the given prompt.\\n\\n' }}"
    '{{- \'Respond in the format {"name": function name, "parameters": dictionary of \''
    " + 'argument name and its value}. Do not use variables.\\n\\n' }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- first + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and message.tool_calls %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- for call in message.tool_calls %}"
    "{%- if not loop.first %}{{- '; ' }}{%- endif %}"
    "{%- set args = call.function.arguments %}"
    '{{- \'{"name": "\' + call.function.name + \'", "parameters": \' }}'
    "{{- (args if args is string else args | tojson) + '}' }}"
    "{%- endfor %}{{- '<|eot_id|>' }}"
    "{%- elif message['role'] in ('tool', 'ipython') %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message['content'] + "
    "'<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

LLAMA31 = Family(
    added_tokens=(
        ("<|begin_of_text|>", True),
        ("<|end_of_text|>", True),
        ("<|start_header_id|>", True),
        ("<|end_header_id|>", True),
        ("<|eom_id|>", True),
        ("<|eot_id|>", True),
        ("<|python_tag|>", True),
    ),
    tokenizer_config={
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "add_bos_token": False,
        "chat_template": LLAMA31_TOOLS_TEMPLATE,
    },
    # Llama 3.1's generation_config stops on end_of_text, eom_id and eot_id.
    eos_tokens=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
)
