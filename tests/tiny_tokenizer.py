"""Test helper: a tiny Qwen3-like byte-level BPE tokenizer folder, built in well under a second.

Not a test module. `write_tiny_tokenizer(folder)` writes tokenizer.json and
tokenizer_config.json; the trained vocab is followed by Qwen3's added tokens in Qwen3's order.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

# Target size of the trained part (256 byte symbols + merges); the added tokens follow it.
TRAINED_VOCAB_SIZE = 448

# Added tokens in id order, with Qwen3's special flags: the ChatML markers are special
# (dropped by skip_special_tokens) while the think and tool-call tags are ordinary added
# tokens.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<tool_call>", False),
    ("</tool_call>", False),
)
TINY_VOCAB_SIZE = TRAINED_VOCAB_SIZE + len(ADDED_TOKENS)
# Ids are fixed because the added tokens come right after the trained vocab.
TINY_SPECIAL_IDS: dict[str, int] = {
    text: TRAINED_VOCAB_SIZE + index for index, (text, _) in enumerate(ADDED_TOKENS)
}

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Let me think about this step by step before I answer the question.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159",
    "You are a helpful assistant. Answer the user's question clearly.",
    "system user assistant tool content role message",
    "Bonjour le monde, comment ça va ? Très bien, merci.",
    "Grüße aus München! Straße, Käse, Übermut.",
    "¿Dónde está la biblioteca? Mañana será otro día.",
    "Привет, мир! Как дела?",
    "你好，世界！今天天气很好。",
    "こんにちは世界。ありがとう。",
    "안녕하세요 세계",
    "Emoji: 😀 🎉 👍 🚀 ❤️ 🐍",
]


def _training_text() -> list[str]:
    # Repeating the English lines makes their merges dominate, so common words become
    # single tokens while rarer scripts and emoji stay split into byte pieces.
    return _CORPUS[:8] * 4 + _CORPUS


def _chat_template() -> str:
    """A ChatML template with Qwen3's thinking behaviour, written for these tests."""
    return (
        "{%- set ns = namespace(last_user=-1) -%}\n"
        "{%- for message in messages -%}\n"
        "    {%- if message.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- for message in messages -%}\n"
        "    {%- set content = message.content if message.content is string else '' -%}\n"
        "    {#- Past turns lose their reasoning; the current turn keeps what it has. -#}\n"
        "    {%- if message.role == 'assistant' and loop.index0 < ns.last_user"
        " and '</think>' in content -%}\n"
        "        {%- set content = content.split('</think>')[-1].lstrip() -%}\n"
        "    {%- endif -%}\n"
        "    {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' -}}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "    {{- '<|im_start|>assistant\\n' -}}\n"
        "    {%- if enable_thinking is defined and enable_thinking is false -%}\n"
        "        {{- '<think>\\n\\n</think>\\n\\n' -}}\n"
        "    {%- endif -%}\n"
        "{%- endif -%}\n"
    )


def _tools_chat_template() -> str:
    """The ChatML template with Qwen3's tool rendering, written for these tests: the tools
    listed in a system block inside <tools></tools>, the assistant's calls as <tool_call>
    blocks, tool results as <tool_response> blocks in a user turn."""
    return (
        "{%- if tools -%}\n"
        "    {{- '<|im_start|>system\\n' -}}\n"
        "    {%- if messages[0].role == 'system' -%}"
        "{{- messages[0].content + '\\n\\n' -}}{%- endif -%}\n"
        "    {{- '# Tools\\n\\nYou may call one or more functions. Their signatures are "
        "within <tools></tools>:\\n<tools>' -}}\n"
        "    {%- for tool in tools -%}{{- '\\n' + tool | tojson -}}{%- endfor -%}\n"
        "    {{- '\\n</tools>\\n\\nFor each call, answer with a JSON object of the "
        "function name and arguments within <tool_call></tool_call>:\\n<tool_call>\\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\\n'
        "</tool_call><|im_end|>\\n' -}}\n"
        "{%- elif messages[0].role == 'system' -%}\n"
        "    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' -}}\n"
        "{%- endif -%}\n"
        "{%- for message in messages -%}\n"
        "    {%- set content = message.content if message.content is string else '' -%}\n"
        "    {%- if message.role == 'system' and loop.first -%}\n"
        "    {%- elif message.role == 'assistant' -%}\n"
        "        {{- '<|im_start|>assistant\\n' + content -}}\n"
        "        {%- for call in message.tool_calls or [] -%}\n"
        "            {%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}\n"
        "            {%- set args = call.function.arguments -%}\n"
        '            {{- \'<tool_call>\\n{"name": "\' + call.function.name'
        ' + \'", "arguments": \' -}}\n'
        "            {{- (args if args is string else args | tojson) + '}\\n</tool_call>' -}}\n"
        "        {%- endfor -%}\n"
        "        {{- '<|im_end|>\\n' -}}\n"
        "    {%- elif message.role == 'tool' -%}\n"
        "        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}"
        "{{- '<|im_start|>user' -}}{%- endif -%}\n"
        "        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' -}}\n"
        "        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}"
        "{{- '<|im_end|>\\n' -}}{%- endif -%}\n"
        "    {%- else -%}\n"
        "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' -}}\n"
        "    {%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "    {{- '<|im_start|>assistant\\n' -}}\n"
        "    {%- if enable_thinking is defined and enable_thinking is false -%}\n"
        "        {{- '<think>\\n\\n</think>\\n\\n' -}}\n"
        "    {%- endif -%}\n"
        "{%- endif -%}\n"
    )


@functools.cache
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    if tok.get_vocab_size() != TRAINED_VOCAB_SIZE:
        raise RuntimeError(f"tiny corpus trained {tok.get_vocab_size()} tokens, not enough")
    for text, special in ADDED_TOKENS:
        token = AddedToken(text, special=special, normalized=False)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    return tok.to_str()


def build_tiny_tokenizer() -> Tokenizer:
    """The tiny tokenizer as a `tokenizers.Tokenizer` (e.g. for building GGUF test files)."""
    return Tokenizer.from_str(_tokenizer_json())


def write_tiny_tokenizer(folder: Path, template: str = "qwen3") -> None:
    """Write tokenizer.json and tokenizer_config.json into `folder`.

    template="qwen3" includes the Qwen3-like chat template; "qwen3_tools" the same with
    Qwen3's tool rendering; "plain" has no chat template.
    """
    if template not in ("qwen3", "qwen3_tools", "plain"):
        raise ValueError(f"unknown tiny tokenizer template {template!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(_tokenizer_json(), encoding="utf-8")
    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
    }
    if template == "qwen3":
        config["chat_template"] = _chat_template()
    elif template == "qwen3_tools":
        config["chat_template"] = _tools_chat_template()
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def tiny_special_ids(folder: Path) -> dict[str, int]:
    """Ids of the added tokens, read back from the written tokenizer.json."""
    tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    ids = {text: tok.token_to_id(text) for text, _ in ADDED_TOKENS}
    return {text: token_id for text, token_id in ids.items() if token_id is not None}
