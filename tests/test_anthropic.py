"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) driven by the
official ``anthropic`` SDK against a real ``fermi serve``: text, stop sequences and
max_tokens, streams equal to whole replies, forced tool use whose input fits the tool's
schema and a tool_result round trip, thinking blocks, token counts, x-api-key auth, and
Anthropic's error shape. Then the chunker's events unit by unit, and the real SmolLM2-135M
answering a question.

The tools server is a tiny random Qwen3 with a tools template: only the grammar makes its
calls valid, so every call is checked against its schema. ``max_retries=0``: the SDK's
retries would hide errors.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import anthropic
import jsonschema
import pytest

from fermi.engine.types import Delta
from fermi.server.anthropic import MessageChunker, chat_messages
from fermi.server.anthropic_protocol import (
    ENCODER,
    MESSAGES_DECODER,
    ContentBlockDelta,
    TextDelta,
    ThinkingDelta,
    error_event,
    sse,
)
from fermi.server.app import AsgiApp
from fermi.server.errors import ApiError
from fermi.server.handlers import StreamEndedError
from fermi.text.tokenizer import Tokenizer
from fermi.text.tools import ToolCallDelta
from tests.serving import NEEDS_SMOLLM2, http, running_server, thinking_checkpoint
from tests.test_server_units import api, broken_decode_steps, call_asgi  # noqa: F401 (a fixture)
from tests.test_tools import SCHEMAS, TOOLS
from tests.tiny import write_checkpoint

QUESTION = [{"role": "user", "content": "What is the weather in Oslo?"}]
# OpenAI's function tools of test_tools.py in Anthropic's shape.
ANTHROPIC_TOOLS = [
    {
        "name": t["function"]["name"],
        "description": t["function"]["description"],
        "input_schema": t["function"]["parameters"],
    }
    for t in TOOLS
]
# A random model spends many tokens on the whitespace JSON allows.
BUDGET = 600
FIXED = {"ignore_eos": True}  # Fermi's extension: replies of exactly max_tokens
# This SDK no longer has temperature (nor top_p, top_k) among its arguments; the server
# takes them, as Anthropic's API does for older models.
GREEDY = {"temperature": 0, **FIXED}
KEY = "sk-ant-test"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("anthropic")
    return write_checkpoint(
        root / "tiny", {"max_position_embeddings": 2048}, template="qwen3_tools"
    )


@pytest.fixture(scope="module")
def base(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("anthropic-log") / "serve.log"
    args = ["--max-seq-len", "2048", "--max-batch", "2"]
    with running_server(model_dir, *args, log=log) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def thinking_base(tmp_path_factory):
    """A template that opens the think block unless thinking is off, behind an API key."""
    root = tmp_path_factory.mktemp("anthropic-think")
    folder = thinking_checkpoint(root / "tiny-think", max_positions=1024)
    args = ["--max-seq-len", "1024", "--max-batch", "2", "--api-key", KEY]
    args += ["--max-body-bytes", "100000"]
    with running_server(folder, *args, log=root / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def thinker(thinking_base):
    return anthropic.Anthropic(base_url=thinking_base, api_key=KEY, max_retries=0)


def plain(text: str) -> bool:
    return text.isascii() and text.isprintable() and text.strip() == text


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


# -- text ------------------------------------------------------------------------------


def test_a_reply_of_max_tokens_is_one_text_block_ending_with_max_tokens(client):
    message = client.messages.create(
        model="tiny", max_tokens=8, messages=QUESTION, extra_body=GREEDY
    )
    assert message.id.startswith("msg_") and message.type == "message"
    assert (message.role, message.model) == ("assistant", "tiny")
    assert [block.type for block in message.content] == ["text"] and text_of(message)
    assert (message.stop_reason, message.stop_sequence) == ("max_tokens", None)
    assert message.usage.output_tokens == 8
    counted = client.messages.count_tokens(model="tiny", messages=QUESTION).input_tokens
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == counted


def test_a_stop_sequence_ends_the_reply_before_it_and_is_named(client):
    args = dict(model="tiny", messages=QUESTION, extra_body=GREEDY)
    text = text_of(client.messages.create(max_tokens=40, **args))
    # Three plain characters from the middle of the greedy reply: it ends where they first
    # appear (the same greedy reply, cut there).
    start = next(i for i in range(4, len(text) - 3) if plain(text[i : i + 3]))
    stop = text[start : start + 3]
    cut = text[: text.index(stop)]
    whole = client.messages.create(max_tokens=40, stop_sequences=["\x07never", stop], **args)
    assert (whole.stop_reason, whole.stop_sequence) == ("stop_sequence", stop)
    assert text_of(whole) == cut
    with client.messages.stream(max_tokens=40, stop_sequences=[stop], **args) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text_of(final) == cut
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_0_warms_the_cache_and_replies_an_empty_message(client, stream):
    conversation = [{"role": "user", "content": f"Warm the cache ({stream})."}]
    args = dict(model="tiny", messages=conversation)
    if stream:
        with client.messages.stream(max_tokens=0, **args) as events:
            warm = events.get_final_message()
    else:
        warm = client.messages.create(max_tokens=0, **args)
    assert (warm.content, warm.stop_reason, warm.usage.output_tokens) == ([], "max_tokens", 0)
    prompt = warm.usage.input_tokens + warm.usage.cache_read_input_tokens
    after = client.messages.create(max_tokens=1, **args)
    # All of the prompt but its last token (prefilled for the first logits) was cached.
    assert (after.usage.cache_read_input_tokens, after.usage.input_tokens) == (prompt - 1, 1)


def test_a_stream_is_the_whole_reply_in_anthropics_event_order(client):
    args = dict(model="tiny", max_tokens=12, messages=QUESTION, extra_body=GREEDY)
    whole = client.messages.create(**args)
    with client.messages.stream(**args) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == (
        text_of(whole)
    )
    assert text_of(final) == text_of(whole)
    assert (final.stop_reason, final.usage.output_tokens) == ("max_tokens", 12)
    raw = [e.type for e in events if e.type not in ("text",)]  # (the SDK's own text events)
    assert raw[:2] == ["message_start", "content_block_start"]
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(raw[2:-3]) == {"content_block_delta"}
    assert {e.index for e in events if e.type.startswith("content_block")} == {0}


def test_the_beta_endpoint_query_and_headers_are_accepted(client):
    message = client.beta.messages.create(
        model="tiny",
        max_tokens=3,
        messages=QUESTION,
        betas=["interleaved-thinking-2025-05-14"],
        extra_body=FIXED,
    )
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", 3)


def test_the_wire_events_are_named_as_their_bodies_type(base):
    body = {"model": "tiny", "max_tokens": 5, "messages": QUESTION, "stream": True, **FIXED}
    status, headers, raw = http(base + "/v1/messages", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = raw.decode().strip().split("\n\n")
    names = []
    for event in events:
        name, data = event.split("\n")
        names.append(name.removeprefix("event: "))
        assert json.loads(data.removeprefix("data: "))["type"] == names[-1]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    start = json.loads(events[0].split("data: ")[1])["message"]
    assert (start["content"], start["stop_reason"], start["usage"]["output_tokens"]) == (
        [],
        None,
        0,
    )


# -- tools ------------------------------------------------------------------------------


def test_a_forced_tool_gives_one_tool_use_block_whose_input_fits_the_schema(client):
    args = dict(
        model="tiny",
        max_tokens=BUDGET,
        messages=QUESTION,
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "tool", "name": "get_weather"},
        metadata={"user_id": "u-1"},
        extra_body={"seed": 5},
    )
    message = client.messages.create(**args)
    assert message.stop_reason == "tool_use"
    (call,) = [block for block in message.content if block.type == "tool_use"]
    assert call.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(call.input, SCHEMAS["get_weather"])

    with client.messages.stream(**args) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    (streamed,) = [block for block in final.content if block.type == "tool_use"]
    assert (streamed.name, streamed.input) == (call.name, call.input)  # the same seed
    pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta"]
    assert json.loads("".join(pieces)) == call.input


def test_any_tool_without_parallel_use_is_one_valid_call_of_some_tool(client):
    message = client.messages.create(
        model="tiny",
        max_tokens=BUDGET,
        messages=QUESTION,
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        extra_body={"seed": 2},
    )
    calls = [block for block in message.content if block.type == "tool_use"]
    assert message.stop_reason == "tool_use" and len(calls) == 1
    jsonschema.validate(calls[0].input, SCHEMAS[calls[0].name])


def round_trip(call_input: dict) -> list[dict]:
    return [
        *QUESTION,
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": call_input},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "3 C, snowing"},
                {"type": "text", "text": "Thanks!"},
            ],
        },
    ]


def test_a_tool_round_trip_renders_the_call_and_the_result_as_the_template_does(model_dir):
    body = MESSAGES_DECODER.decode(
        json.dumps(
            {
                "model": "tiny",
                "max_tokens": 8,
                "system": [{"type": "text", "text": "Be brief."}],
                "messages": round_trip({"city": "Oslo", "unit": "c"}),
            }
        )
    )
    messages = chat_messages(body)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "user"]
    text = Tokenizer.from_folder(model_dir).apply_chat_template(messages, tools=TOOLS)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert (
        '<|im_start|>assistant\nLet me look.\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call><|im_end|>\n'
    ) in text
    assert "<|im_start|>user\n<tool_response>\n3 C, snowing\n</tool_response><|im_end|>\n" in text
    assert text.endswith("<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")


def test_a_tool_result_is_answered_and_counted_as_rendered(client):
    call = client.messages.create(
        model="tiny",
        max_tokens=BUDGET,
        messages=QUESTION,
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"seed": 1},
    )
    (use,) = [block for block in call.content if block.type == "tool_use"]
    conversation = [
        *QUESTION,
        call.to_param(),  # the reply sent back as it came
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "3 C, snowing"}],
        },
    ]
    args = dict(model="tiny", messages=conversation, tools=ANTHROPIC_TOOLS)
    answer = client.messages.create(max_tokens=6, extra_body=FIXED, **args)
    assert answer.stop_reason == "max_tokens" and answer.content
    counted = client.messages.count_tokens(**args).input_tokens
    assert answer.usage.input_tokens + answer.usage.cache_read_input_tokens == counted
    alone = client.messages.count_tokens(model="tiny", messages=QUESTION, tools=ANTHROPIC_TOOLS)
    assert counted > alone.input_tokens + 20  # the call and its result are in the prompt


def test_an_error_result_reaches_the_model_marked_as_one():
    messages = round_trip({"city": "Oslo", "unit": "c"})
    messages[2]["content"][0] |= {"is_error": True, "content": [{"type": "text", "text": "down"}]}
    body = MESSAGES_DECODER.decode(
        json.dumps({"model": "t", "max_tokens": 1, "messages": messages})
    )
    assert chat_messages(body)[2] == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": "Error: down",
    }


@pytest.mark.parametrize("field", ["output_config", "output_format"])
def test_output_config_json_schema_makes_the_text_valid_json(client, field):
    """Also under output_format, the structured-outputs beta's name that older SDKs send
    (it was ignored: free text came back)."""
    schema = SCHEMAS["add"]
    fmt = {"type": "json_schema", "schema": schema}
    given = {"output_config": {"format": fmt}} if field == "output_config" else {}
    message = client.messages.create(
        model="tiny",
        max_tokens=BUDGET,
        messages=[{"role": "user", "content": "Add 3."}],
        **given,
        extra_body={"seed": 4, **({"output_format": fmt} if field == "output_format" else {})},
    )
    assert message.stop_reason == "end_turn"
    jsonschema.validate(json.loads(text_of(message)), schema)


# -- thinking ---------------------------------------------------------------------------


def test_thinking_enabled_gives_a_signed_thinking_block_and_absent_gives_none(thinker):
    args = dict(
        model="tiny-think", max_tokens=10, messages=QUESTION, extra_body={"seed": 3, **FIXED}
    )
    message = thinker.messages.create(thinking={"type": "enabled", "budget_tokens": 1024}, **args)
    assert message.content[0].type == "thinking"
    assert message.content[0].thinking and message.content[0].signature
    plain = thinker.messages.create(**args)  # no thinking field: off, as on Anthropic's API
    assert [block.type for block in plain.content] == ["text"]
    disabled = thinker.messages.create(thinking={"type": "disabled"}, **args)
    assert text_of(disabled) == text_of(plain)


def test_streamed_thinking_deltas_are_the_thinking_block_and_its_signature_comes_last(thinker):
    args = dict(
        model="tiny-think",
        max_tokens=10,
        messages=QUESTION,
        thinking={"type": "enabled", "budget_tokens": 1024},
        extra_body={"seed": 3, **FIXED},
    )
    whole = thinker.messages.create(**args)
    with thinker.messages.stream(**args) as stream:
        events = [e for e in stream if e.type.startswith("content_block")]
        final = stream.get_final_message()
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    thinking = [d.thinking for d in deltas if d.type == "thinking_delta"]
    assert len(thinking) > 1 and "".join(thinking) == final.content[0].thinking
    assert final.content[0].thinking == whole.content[0].thinking  # the same seed
    assert events[0].content_block.type == "thinking"
    first_stop = next(i for i, e in enumerate(events) if e.type == "content_block_stop")
    assert events[first_stop - 1].delta.type == "signature_delta"
    assert events[first_stop - 1].delta.signature == final.content[0].signature


def test_adaptive_thinking_follows_the_effort_low_off_and_higher_on(thinker):
    args = dict(
        model="tiny-think",
        max_tokens=10,
        messages=QUESTION,
        thinking={"type": "adaptive"},
        extra_body={"seed": 3, **FIXED},
    )
    low = thinker.messages.create(output_config={"effort": "low"}, **args)
    assert [block.type for block in low.content] == ["text"]
    high = thinker.messages.create(output_config={"effort": "high"}, **args)
    assert high.content[0].type == "thinking" and high.content[0].thinking
    # count_tokens renders the prompt the same way: thinking off adds an empty think block.
    count = {
        effort: thinker.messages.count_tokens(
            model="tiny-think",
            messages=QUESTION,
            thinking={"type": "adaptive"},
            output_config={"effort": effort},
        ).input_tokens
        for effort in ("low", "high")
    }
    assert count["low"] > count["high"], count
    # Explicit thinking wins over the effort.
    on = thinker.messages.create(
        **{**args, "thinking": {"type": "enabled", "budget_tokens": 1024}},
        output_config={"effort": "low"},
    )
    assert on.content[0].type == "thinking"


def test_thinking_blocks_sent_back_are_accepted(thinker):
    conversation = [
        *QUESTION,
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Oslo is cold.", "signature": "x"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "Cold."},
            ],
        },
        {"role": "user", "content": "And tomorrow?"},
    ]
    reply = thinker.messages.create(model="tiny-think", max_tokens=3, messages=conversation)
    assert reply.usage.output_tokens >= 1


def test_thinking_with_a_forced_tool_is_refused_as_anthropic_refuses_it(client):
    with pytest.raises(anthropic.BadRequestError, match="thinking"):
        client.messages.create(
            model="tiny",
            max_tokens=20,
            messages=QUESTION,
            tools=ANTHROPIC_TOOLS,
            tool_choice={"type": "any"},
            thinking={"type": "enabled", "budget_tokens": 1024},
        )


# -- auth and errors --------------------------------------------------------------------


def test_x_api_key_and_bearer_are_accepted_and_a_wrong_key_is_an_authentication_error(
    thinking_base,
):
    args = dict(model="tiny-think", max_tokens=2, messages=QUESTION)
    bearer = anthropic.Anthropic(base_url=thinking_base, auth_token=KEY, max_retries=0)
    assert bearer.messages.create(**args).usage.output_tokens >= 1
    wrong = anthropic.Anthropic(base_url=thinking_base, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        wrong.messages.create(**args)
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.count_tokens(model="tiny-think", messages=QUESTION)


# A tool result answering no tool_use of an earlier message.
ORPHAN_RESULT = {"type": "tool_result", "tool_use_id": "toolu_nowhere", "content": "42"}
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"extra_body": {"temperature": -1.0}}, "temperature"),
        ({"extra_body": {"temperature": 1.5}}, "temperature must be between 0 and 1"),
        ({"stop_sequences": [""]}, "stop_sequences"),
        ({"messages": [{"role": "user", "content": [IMAGE]}]}, "'image'"),
        ({"messages": [{"role": "system", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [*QUESTION, {"role": "assistant", "content": "It is"}]}, "prefill"),
        ({"messages": []}, "messages"),
        ({"system": [{"type": "text"}]}, "system[0].text"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search_2025"),
        ({"tools": [{"name": "no spaces", "input_schema": {}}]}, "tools[0].name"),
        ({"tools": ANTHROPIC_TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, "'nope'"),
        ({"tools": ANTHROPIC_TOOLS, "tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
        ({"thinking": {"type": "enabled"}}, "budget_tokens"),
        ({"thinking": {"type": "enabled", "budget_tokens": 0}}, "at least 1024"),
        ({"output_config": {"effort": "extreme"}}, "output_config.effort"),
        # The engine's words in this API's: not "tool_choice required" / "named"
        ({"tool_choice": {"type": "any"}}, 'tool_choice {"type": "any"} needs tools'),
        ({"tool_choice": {"type": "tool", "name": "f"}}, 'tool_choice {"type": "tool"} needs'),
        (
            {"tools": [{"name": "f", "input_schema": {"type": "array"}}]},
            'input_schema must describe an object (type "object")',
        ),
        ({"messages": [{"role": "user", "content": "x " * 5000}]}, "context"),
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
        (  # an empty assistant turn between two questions (rendered as one, before)
            {"messages": [*QUESTION, {"role": "assistant", "content": []}, *QUESTION]},
            "messages[1].content",
        ),
        (
            {
                "messages": [
                    *QUESTION,
                    {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "xx"}]},
                    *QUESTION,
                ]
            },
            "must hold text or tool_use blocks",
        ),
        (
            {
                "extra_body": {"output_format": {"type": "json_schema", "schema": {}}},
                "output_config": {"format": {"type": "json_schema", "schema": {}}},
            },
            "send one of them",
        ),
        ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": " \n"}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]},
            "messages[0].content[0].text",
        ),
        ({"messages": [], "system": "You are terse."}, "at least one message"),
        (
            {"messages": [{"role": "user", "content": [ORPHAN_RESULT]}]},
            "messages[0].content[0].tool_use_id",
        ),
        # Counted before any item is decoded: the malformed last item is never reached.
        ({"messages": [*QUESTION] * 2049 + [{"role": 5}]}, "2050 messages cannot fit"),
        ({"tools": [*ANTHROPIC_TOOLS] * 129 + [{"name": 5}]}, "at most 128 tools"),
        ({"messages": [*QUESTION, {"role": 5}]}, "messages[1].role"),
        # Features this server does not have, and a seed past 64 bits.
        ({"extra_body": {"mcp_servers": [{"type": "url", "url": "x"}]}}, "mcp_servers"),
        ({"extra_body": {"container": "c1"}}, "(container) are not supported"),
        ({"extra_body": {"context_management": {"edits": []}}}, "context_management"),
        ({"extra_body": {"seed": 2**64}}, "seed"),
    ],
)
def test_a_bad_request_is_a_400_in_anthropics_shape_naming_what_is_wrong(client, change, named):
    args = {"model": "tiny", "max_tokens": 4, "messages": QUESTION, **change}
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(**args)
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert named in info.value.body["error"]["message"]


def test_count_tokens_refuses_what_messages_refuses(client):
    for messages in ([], [{"role": "user", "content": ""}]):
        with pytest.raises(anthropic.BadRequestError) as info:
            client.messages.count_tokens(model="tiny", messages=messages, system="Be terse.")
        assert info.value.body["error"]["type"] == "invalid_request_error"


def test_an_unknown_model_is_a_not_found_error(client):
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="claude-x", max_tokens=2, messages=QUESTION)
    assert info.value.body["error"]["type"] == "not_found_error"
    assert "'claude-x'" in info.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="claude-x", messages=QUESTION)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "kind", "named"),
    [
        ("POST", "/v1/messages", b"{", 400, "invalid_request_error", "not valid JSON"),
        (
            "POST",
            "/v1/messages",
            b'{"model": "tiny", "max_tokens": "8", "messages": []}',
            400,
            "invalid_request_error",
            "$.max_tokens",
        ),
        ("POST", "/v1/messages", b'{"model": "tiny", "messages": []}', 400, "", "max_tokens"),
        ("POST", "/v1/messages", b"x" * 150_000, 413, "request_too_large", "larger than"),
        ("GET", "/v1/messages", None, 405, "invalid_request_error", "GET"),
        ("POST", "/v1/messages/batches", b"{}", 404, "not_found_error", "no such endpoint"),
        ("POST", "/v1/messages", b"{}", 401, "authentication_error", "API key"),
    ],
)
def test_decode_auth_size_and_route_errors_take_anthropics_shape(
    thinking_base, method, path, body, status, kind, named
):
    headers = {"anthropic-version": "2023-06-01", "anthropic-beta": "x"}
    if status != 401:
        headers["x-api-key"] = KEY
    got, _, raw = http(thinking_base + path, body, headers=headers, method=method)
    reply = json.loads(raw)
    assert got == status and reply["type"] == "error", raw
    assert reply["error"]["type"] == (kind or "invalid_request_error")
    assert named in reply["error"]["message"]


def test_an_openai_error_stays_openais(thinking_base):
    status, _, raw = http(thinking_base + "/v1/chat/completions", b"{")
    assert status == 401 and set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}


def test_a_full_engine_is_529_overloaded_and_the_param_is_named_in_the_message():
    full = ApiError(429, "the engine is full", type="rate_limit_error", code="engine_overloaded")
    assert ENCODER.encode(error_event(full)) == (
        b'{"type":"error","error":{"type":"overloaded_error","message":"the engine is full"}}'
    )
    named = error_event(ApiError(400, "must be at least 1", param="max_tokens"))
    assert named.error.message == "max_tokens: must be at least 1"


# -- the chunker ------------------------------------------------------------------------


def events_of(raw: bytes) -> list[dict]:
    out = []
    for event in raw.decode().strip().split("\n\n"):
        name, data = event.split("\n")
        body = json.loads(data.removeprefix("data: "))
        assert body["type"] == name.removeprefix("event: ")
        out.append(body)
    return out


def test_spliced_delta_events_are_the_encoded_events():
    chunker = MessageChunker("msg_1", "m", 7)
    chunker.event(0, Delta(text="a"))  # opens the text block
    assert chunker.event(0, Delta(text='b"\n')) == sse(ContentBlockDelta(0, TextDelta('b"\n')))
    chunker.event(0, Delta(reasoning="r"))
    assert chunker.event(0, Delta(reasoning="é")) == sse(ContentBlockDelta(1, ThinkingDelta("é")))


def test_blocks_open_and_close_as_the_output_changes_kind():
    chunker = MessageChunker("msg_1", "m", 7)
    raw = chunker.opening()
    for delta in (
        Delta(reasoning="hm"),
        Delta(reasoning="m", text="Hi"),
        Delta(),  # held back: nothing to send
        Delta(text="!"),
        Delta(tool_calls=[ToolCallDelta(0, "call_a", "add", "")]),
        Delta(tool_calls=[ToolCallDelta(0, arguments='{"a": 1')]),
        Delta(tool_calls=[ToolCallDelta(0, arguments="}"), ToolCallDelta(1, "call_b", "f", "{}")]),
        Delta(finish_reason="tool_calls"),
    ):
        raw += chunker.event(0, delta)
    kinds = [
        (e["type"], e.get("index"), (e.get("delta") or e.get("content_block") or {}).get("type"))
        for e in events_of(raw)
    ]
    assert kinds == [
        ("message_start", None, None),
        ("content_block_start", 0, "thinking"),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "signature_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, "text"),
        ("content_block_delta", 1, "text_delta"),
        ("content_block_delta", 1, "text_delta"),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None),
        ("content_block_start", 3, "tool_use"),
        ("content_block_delta", 3, "input_json_delta"),
        ("content_block_stop", 3, None),
    ]
    starts = [e["content_block"] for e in events_of(raw) if e["type"] == "content_block_start"]
    assert starts[2] == {"type": "tool_use", "id": "call_a", "name": "add", "input": {}}
    assert starts[0] == {"type": "thinking", "thinking": "", "signature": ""}


# -- in process: delivery and failures --------------------------------------------------

HI = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


async def pushed_or_pulled(api, body: dict, pushed: bool) -> bytes:  # noqa: F811
    reply = await api.handle("POST", "/v1/messages", {}, json.dumps(body).encode())
    pieces: list[bytes] = []
    try:
        if pushed:
            await reply.push(pieces.append)
        else:
            async for piece in reply.chunks():
                pieces.append(piece)
    except StreamEndedError:
        pass
    return b"".join(pieces)


def test_a_pushed_stream_is_the_pulled_one(api):  # noqa: F811
    body = {**HI, "max_tokens": 12, "stream": True, "ignore_eos": True, "seed": 3}
    body["thinking"] = {"type": "enabled", "budget_tokens": 1024}  # (a think block opens)

    def without_ids(raw: bytes) -> list[dict]:
        events = events_of(raw)
        events[0]["message"]["id"] = ""
        return [e for e in events if e.get("delta", {}).get("type") != "signature_delta"]

    pulled = asyncio.run(pushed_or_pulled(api, body, pushed=False))
    pushed = asyncio.run(pushed_or_pulled(api, body, pushed=True))
    assert without_ids(pushed) == without_ids(pulled)
    assert events_of(pushed)[-2]["usage"]["output_tokens"] == 12


@pytest.mark.parametrize("pushed", [False, True])
def test_a_failing_engine_step_ends_the_stream_with_anthropics_error_event(api, pushed):  # noqa: F811
    body = {**HI, "stream": True, "ignore_eos": True}
    with broken_decode_steps(api):
        raw = asyncio.run(pushed_or_pulled(api, body, pushed))
    events = events_of(raw)
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "error"
    assert events[-1]["error"]["type"] == "api_error"
    assert "simulated device fault" in events[-1]["error"]["message"]
    assert "message_stop" not in [e["type"] for e in events]


def test_an_unexpected_exception_is_a_500_api_error_without_traceback(api, monkeypatch):  # noqa: F811
    def explode(**kwargs):
        raise KeyError("internal detail")

    monkeypatch.setattr(api.pool.engine, "build_request", explode)
    status, raw = asyncio.run(call_asgi(AsgiApp(api), "/v1/messages", HI))
    assert status == 500
    reply = json.loads(raw)
    assert reply["type"] == "error" and reply["error"]["type"] == "api_error"
    assert "internal detail" not in reply["error"]["message"]


# -- the real SmolLM2-135M --------------------------------------------------------------


@NEEDS_SMOLLM2
def test_smollm2_answers_through_the_sdk_and_stops_at_a_stop_sequence(tmp_path: Path):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    args = ("--device", "cpu", "--max-batch", "1", "--max-seq-len", "512")
    with running_server("smollm2-135m", *args, log=tmp_path / "serve.log") as url:
        client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0)
        model = "smollm2-135m"
        reply = client.messages.create(
            model=model,
            max_tokens=30,
            system="You are a helpful assistant.",
            messages=question,
            extra_body={"temperature": 0},
        )
        assert "Paris" in text_of(reply) and reply.stop_reason == "end_turn"
        with client.messages.stream(
            model=model,
            max_tokens=30,
            messages=question,
            stop_sequences=["Paris"],
            extra_body={"temperature": 0},
        ) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "Paris")
        assert streamed == text_of(final) and "Paris" not in streamed and streamed
