"""The chat templates of Qwen3 (hybrid, 2507 Instruct, 2507 Thinking), DeepSeek-R1-0528's
Qwen3 distill, SmolLM3, Gemma 3, Phi-4-mini, Granite 3.3 and Llama 3.2, as published
(``tests/chat_templates``, sources in ``tests/real_templates.py``): rendered exactly as
transformers renders them, and switched by ``thinking`` in each model's own way."""

from __future__ import annotations

import pytest

from fermi.text.tokenizer import Tokenizer
from tests.real_templates import ALL, RealTemplate

SYSTEM = {"role": "system", "content": "You are terse."}
CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "<think>\nEasy one.\n</think>\n\nParis."},
    {"role": "user", "content": "  And of Japan?  "},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def tool_round(arguments) -> list[dict]:
    """A question, the assistant's call of get_weather, and the tool's answer."""
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather"}}
    call["function"]["arguments"] = arguments
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C, sunny"},
    ]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_templates")
    return {key: template.write(root / key) for key, template in ALL.items()}


def hf_render(folder, messages, **kwargs) -> str:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def cases(template: RealTemplate) -> list[tuple[str, list[dict], dict]]:
    """(name, messages, apply_chat_template keywords) this template is compared on."""
    listed = [
        ("system, multi-turn", [SYSTEM, *CONVERSATION], {}),
        ("no system", CONVERSATION, {}),
        ("no generation prompt", [*CONVERSATION, {"role": "assistant", "content": "Tokyo."}], {}),
        ("enable_thinking true", [SYSTEM, *CONVERSATION], {"enable_thinking": True}),
        ("enable_thinking false", [SYSTEM, *CONVERSATION], {"enable_thinking": False}),
        ("thinking true", CONVERSATION, {"thinking": True}),
        ("thinking false", CONVERSATION, {"thinking": False}),
    ]
    if template.name.startswith("DeepSeek"):
        # DeepSeek's template writes the arguments as text: the JSON string clients send.
        listed.append(("a tool round", tool_round('{"city": "Paris"}'), {}))
    elif not template.name.startswith("Gemma"):  # Gemma 3 has no tool role
        listed.append(("a tool round", tool_round({"city": "Paris"}), {}))
    if template.tools:
        listed.append(("tools", [SYSTEM, *tool_round({"city": "Paris"})], {"tools": TOOLS}))
    if template.name.startswith("SmolLM3"):
        no_think = {"role": "system", "content": "You are terse. /no_think"}
        listed.append(("/no_think in the system", [no_think, *CONVERSATION], {}))
    if template.name.startswith("Phi-4"):
        with_tools = {**SYSTEM, "tools": '[{"name": "get_weather"}]'}
        listed.append(("tools in the system message", [with_tools, *CONVERSATION], {}))
    return listed


@pytest.mark.parametrize("key", ALL)
def test_renders_exactly_as_transformers(folders, key):
    ours = Tokenizer.from_folder(folders[key])
    for name, messages, kwargs in cases(ALL[key]):
        generation = name != "no generation prompt"
        want = hf_render(folders[key], messages, add_generation_prompt=generation, **kwargs)
        got = ours.apply_chat_template(messages, add_generation_prompt=generation, **kwargs)
        assert got == want, name


def test_the_templates_are_the_published_texts():
    """Fingerprints of the files as copied, so an edit to the test data shows."""
    import hashlib

    digests = {k: hashlib.sha256(t.text.encode()).hexdigest()[:12] for k, t in ALL.items()}
    assert digests == {
        "qwen3": "87a2728cb8dc",
        "qwen3-2507-instruct": "40c21f34cf67",
        "qwen3-2507-thinking": "3802169b2a02",
        "deepseek-r1-0528-qwen3": "53671bac29bc",
        "smollm3": "3e0e275a527f",
        "gemma3": "7de1c58e208e",
        "phi-4-mini": "febf589225c9",
        "granite-3.3": "3c71df5f6599",
        "llama-3.2": "5816fce10444",
    }


@pytest.mark.parametrize("key", [k for k in ALL if not k.startswith("gemma")])
def test_a_tool_call_turn_without_content_renders_as_one_with_empty_content(folders, key):
    """OpenAI's clients send ``content: null`` beside tool calls (or no content at all).
    Qwen3's and Granite's templates read the content unguarded: it is rendered as "", as
    HTTP's chat completions already pass it, not left out for the template to trip on."""
    ours = Tokenizer.from_folder(folders[key])
    arguments = '{"city": "Paris"}' if key.startswith("deepseek") else {"city": "Paris"}
    empty = tool_round(arguments)
    want = ours.apply_chat_template(empty, add_generation_prompt=True)
    for content in ({"content": None}, {}):
        turn = {k: v for k, v in empty[1].items() if k != "content"} | content
        got = ours.apply_chat_template([empty[0], turn, empty[2]], add_generation_prompt=True)
        assert got == want, content
