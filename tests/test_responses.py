"""``POST /v1/responses`` (OpenAI's Responses API) with real clients against a real
``fermi serve``: the openai SDK's ``responses.create`` (whole and streamed: the event
sequence, the final response equal to the streamed text), ``parse()`` and ``text.format``
json_schema, a function-tool round trip, LangChain's ``ChatOpenAI(use_responses_api=True)``,
reasoning items from a thinking model, log-probabilities, and the refusals (stored state,
other tool types, bad input) in OpenAI's error shape. The events are also checked against
the SDK's own pydantic types, and the prompt of a round trip against the template.

The tools server is a tiny random Qwen3 with a tools template: only the grammar makes its
calls and JSON valid, so both are checked against their schemas. The real SmolLM2-135M
must also get a structured answer right.
"""

from __future__ import annotations

import json
import typing
from types import SimpleNamespace

import jsonschema
import msgspec
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, Field

import fermi
from fermi.engine.types import Delta, TokenLogprob, Usage
from fermi.server.chunks import ChoiceText
from fermi.server.responses import ResponsesStreamReply, ResponseWriter
from fermi.server.responses_build import input_messages, response_request
from fermi.server.responses_protocol import RESPONSES_DECODER, ResponseBody, TextEcho
from fermi.text.tools import ToolCallDelta
from tests.serving import NEEDS_SMOLLM2, http, running_server, thinking_checkpoint
from tests.test_clients import Book
from tests.test_tools import SCHEMAS, TOOLS
from tests.tiny import write_checkpoint

QUESTION = "What is the weather in Oslo?"
# The Responses API's flat function tools: the chat tools of test_tools.py, unwrapped.
FLAT_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]
# A random model spends many tokens on the whitespace JSON allows; thinking off keeps an
# unbounded think block out of the grammar.
BUDGET = 600
OFF = {"effort": "none"}
RESULT = "It is 3 degrees and snowing in Oslo."
# The SDK's event class of every event type, to validate events strictly.
EVENT_TYPES = {
    typing.get_args(cls.model_fields["type"].annotation)[0]: cls
    for cls in typing.get_args(typing.get_args(ResponseStreamEvent)[0])
}


class Pet(BaseModel):
    """A pet."""

    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=30)


def sse_events(raw: bytes) -> list[tuple[str, dict]]:
    """(event name, data) of every server-sent event of a Responses stream."""
    out = []
    for event in raw.decode().strip().split("\n\n"):
        name, data = event.split("\n")
        out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


# -- the writer, against the SDK's types (no server) ---------------------------------------


def head() -> ResponseBody:
    return ResponseBody(
        id="resp_1", created_at=1, status="in_progress", model="m", text=TextEcho({"type": "text"})
    )


def lp(token_id: int, token: str) -> list[TokenLogprob]:
    raw = token.encode()
    top = (TokenLogprob(token_id, token, raw, -0.5), TokenLogprob(9, "x", b"x", -2.0))
    return [TokenLogprob(token_id, token, raw, -0.5, top)]


REPLY = [  # reasoning, a held-back token, text, two calls, the end
    Delta(reasoning="Let me", token_ids=[1]),
    Delta(reasoning=" think.", token_ids=[2]),
    Delta(token_ids=[3]),
    Delta(text="Calling", token_ids=[4]),
    Delta(text=" now.", token_ids=[5]),
    Delta(token_ids=[6], tool_calls=[ToolCallDelta(0, "call_a", "get_weather", "")]),
    Delta(token_ids=[7], tool_calls=[ToolCallDelta(0, arguments='{"city": "Oslo",')]),
    Delta(
        token_ids=[8],
        tool_calls=[
            ToolCallDelta(0, arguments=' "unit": "c"}'),
            ToolCallDelta(1, "call_b", "add", '{"a": 1, "b": true}'),
        ],
    ),
    Delta(token_ids=[9], finish_reason="tool_calls", usage=Usage(5, 9)),
]


def written(deltas: list[Delta], stream: bool) -> tuple[bytes, ResponseBody]:
    writer = ResponseWriter(head(), stream)
    choice = ChoiceText()
    events = [writer.opening()] if stream else []
    for delta in deltas:
        if stream:
            events.append(writer.event(delta))
        else:
            writer.add(delta)
        choice.end(delta)
    response = writer.finish(choice, prompt_tokens=5)
    return b"".join(events) + writer._take(), response


def without_ids(response: dict) -> dict:
    for item in response["output"]:
        item.pop("id")
    return response


def test_every_streamed_event_is_one_the_sdk_validates_and_ends_as_the_whole_response():
    raw, streamed = written(REPLY, stream=True)
    events = sse_events(raw)
    for number, (name, data) in enumerate(events):
        assert data["type"] == name and data["sequence_number"] == number
        EVENT_TYPES[name].model_validate(data)  # strict: every required field, right types
    names = [name.removeprefix("response.") for name, _ in events]
    assert names == [
        "created", "in_progress",
        "output_item.added", "content_part.added", "reasoning_text.delta", "reasoning_text.delta",
        "reasoning_text.done", "content_part.done", "output_item.done",
        "output_item.added", "content_part.added", "output_text.delta", "output_text.delta",
        "output_text.done", "content_part.done", "output_item.done",
        "output_item.added", "function_call_arguments.delta", "function_call_arguments.delta",
        "function_call_arguments.done", "output_item.done",
        "output_item.added", "function_call_arguments.delta", "function_call_arguments.done",
        "output_item.done",
        "completed",
    ]  # fmt: skip
    final = Response.model_validate(events[-1][1]["response"])
    assert [item.type for item in final.output] == [
        "reasoning",
        "message",
        "function_call",
        "function_call",
    ]
    assert final.output[0].content[0].text == "Let me think." and final.output[0].summary == []
    assert final.output_text == "Calling now."
    calls = [(c.call_id, c.name, c.arguments, c.status) for c in final.output[2:]]
    assert calls == [
        ("call_a", "get_weather", '{"city": "Oslo", "unit": "c"}', "completed"),
        ("call_b", "add", '{"a": 1, "b": true}', "completed"),
    ]
    # Three tokens came before the answer began: the reasoning's.
    assert final.usage.output_tokens_details.reasoning_tokens == 3
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.total_tokens) == (
        5,
        9,
        14,
    )
    # The same deltas, not streamed, give the same response.
    _, whole = written(REPLY, stream=False)
    as_dict = msgspec.to_builtins
    assert without_ids(as_dict(whole)) | {"completed_at": 0} == without_ids(as_dict(streamed)) | {
        "completed_at": 0
    }


def test_a_reply_cut_by_max_output_tokens_is_incomplete_and_its_last_item_too():
    deltas = [
        Delta(text="Hello", token_ids=[1]),
        Delta(text=" wor", token_ids=[2], finish_reason="length", usage=Usage(3, 2)),
    ]
    raw, response = written(deltas, stream=True)
    events = sse_events(raw)
    assert events[-1][0] == "response.incomplete"
    assert response.status == "incomplete" and response.completed_at is None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"
    assert response.output[0].content[0].text == "Hello wor"


def test_an_empty_answer_is_one_empty_message():
    _, response = written([Delta(token_ids=[1], finish_reason="stop", usage=Usage(3, 1))], False)
    (message,) = msgspec.to_builtins(response.output)
    assert (message["type"], message["content"][0]["text"]) == ("message", "")


def test_log_probabilities_ride_with_the_text_they_belong_to():
    deltas = [
        Delta(reasoning="hm", token_ids=[1], logprobs=lp(1, "hm")),  # reasoning: none kept
        Delta(token_ids=[2], logprobs=lp(2, "He")),  # held back, comes out with the next
        Delta(text="Hello", token_ids=[3], logprobs=lp(3, "llo")),
        Delta(
            text="!", token_ids=[4], logprobs=lp(4, "!"), finish_reason="stop", usage=Usage(1, 4)
        ),
    ]
    raw, response = written(deltas, stream=True)
    tokens = [lp["token"] for lp in msgspec.to_builtins(response.output[1].content[0].logprobs)]
    assert tokens == ["He", "llo", "!"]
    deltas_seen = [d for name, d in sse_events(raw) if name == "response.output_text.delta"]
    assert [[x["token"] for x in d["logprobs"]] for d in deltas_seen] == [["He", "llo"], ["!"]]
    assert deltas_seen[0]["logprobs"][0]["top_logprobs"][1] == {
        "token": "x",
        "logprob": -2.0,
        "bytes": [120],
    }


def test_an_engine_failure_ends_the_stream_with_response_failed():
    errors = []
    api = SimpleNamespace(metrics=SimpleNamespace(error=errors.append))
    generation = SimpleNamespace(cancel=lambda: None, unfinished=1)
    reply = ResponsesStreamReply(
        api, generation, SimpleNamespace(), ResponseWriter(head(), True), [None]
    )
    raw = reply.opening() + reply.feed(0, Delta(text="Hel", token_ids=[1]))
    raw += reply.feed(0, Delta(error="CUDA error: out of memory", finish_reason="error"))
    assert reply.failed and errors == [500]
    name, data = sse_events(raw)[-1]
    failed = EVENT_TYPES[name].model_validate(data)
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert failed.response.error.code == "server_error"
    assert "out of memory" in failed.response.error.message
    assert failed.response.output[0].content[0].text == "Hel"


def test_an_unexpected_failure_mid_stream_also_ends_with_response_failed():
    """The server adapter's catch-all (a bug while streaming) asks the reply for its last
    events: a Responses stream ends in its own shape, not chat's error + [DONE]."""
    from fermi.server.app import _failure_event
    from fermi.server.errors import internal_error

    errors = []
    api = SimpleNamespace(metrics=SimpleNamespace(error=errors.append))
    generation = SimpleNamespace(cancel=lambda: None, unfinished=1)
    reply = ResponsesStreamReply(
        api, generation, SimpleNamespace(), ResponseWriter(head(), True), [None]
    )
    raw = reply.opening() + reply.feed(0, Delta(text="Hel", token_ids=[1]))
    raw += _failure_event(reply, RuntimeError("a bug"))
    assert errors == [500] and b"[DONE]" not in raw
    name, data = sse_events(raw)[-1]
    failed = EVENT_TYPES[name].model_validate(data)
    assert failed.type == "response.failed"
    assert failed.response.error.message == internal_error().message


# -- input items as chat messages (no server) ----------------------------------------------


def test_input_items_become_the_chat_turns_the_template_renders():
    body = RESPONSES_DECODER.decode(
        json.dumps(
            {
                "instructions": "Be brief.",
                "input": [
                    {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
                    {"type": "reasoning", "id": "rs_1", "summary": [], "content": []},
                    {
                        "type": "message",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": "Checking."}],
                    },
                    {"type": "function_call", "call_id": "c1", "name": "get_weather",
                     "arguments": "{}"},
                    {"type": "function_call", "call_id": "c2", "name": "add", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c1", "output": "3 C"},
                    {
                        "type": "function_call_output",
                        "call_id": "c2",
                        "output": [{"type": "input_text", "text": "4"}],
                    },
                ],
            }
        ).encode()
    )  # fmt: skip
    call = {"type": "function", "function": {"arguments": "{}"}}
    assert input_messages(body) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": QUESTION},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {**call, "id": "c1", "function": {"name": "get_weather", "arguments": "{}"}},
                {**call, "id": "c2", "function": {"name": "add", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "3 C"},
        {"role": "tool", "tool_call_id": "c2", "name": "add", "content": "4"},
    ]


# -- the tools server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tools_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("responses")
    return write_checkpoint(
        root / "tiny", {"max_position_embeddings": 2048}, template="qwen3_tools"
    )


@pytest.fixture(scope="module")
def url(tools_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("responses-log") / "serve.log"
    args = ["--max-seq-len", "2048", "--max-batch", "2"]
    with running_server(tools_dir, *args, log=log) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def test_the_prompt_of_a_round_trip_holds_the_call_and_its_result(tools_dir):
    body = RESPONSES_DECODER.decode(
        json.dumps(
            {
                "instructions": "Answer in one line.",
                "input": [
                    {"role": "user", "content": QUESTION},
                    {
                        "type": "function_call",
                        "call_id": "call_1",
                        "name": "get_weather",
                        "arguments": '{"city": "Oslo", "unit": "c"}',
                    },
                    {"type": "function_call_output", "call_id": "call_1", "output": RESULT},
                ],
                "tools": FLAT_TOOLS,
                "reasoning": OFF,
            }
        ).encode()
    )
    with fermi.load(tools_dir, max_seq_len=2048, max_batch=1) as engine:
        request = response_request(engine, body)
        prompt = engine.tokenizer.decode(list(request.prompt_ids), skip_special_tokens=False)
    assert prompt.startswith("<|im_start|>system\nAnswer in one line.\n\n# Tools")
    assert '\n{"type": "function", "function": {"name": "get_weather"' in prompt
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Oslo", "unit": "c"}}\n</tool_call><|im_end|>\n'
        f"<|im_start|>user\n<tool_response>\n{RESULT}\n</tool_response><|im_end|>\n"
    ) in prompt
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_create_returns_a_response_with_its_settings_echoed(client):
    response = client.responses.create(
        model="tiny",
        input=QUESTION,
        instructions="Be brief.",
        max_output_tokens=8,
        temperature=0.5,
        top_p=0.9,
        metadata={"run": "1"},
        store=True,  # the SDK's default: accepted, nothing is kept
        extra_body={"seed": 1, "ignore_eos": True},
    )
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.model == "tiny" and response.instructions == "Be brief."
    assert (response.temperature, response.top_p, response.max_output_tokens) == (0.5, 0.9, 8)
    assert response.metadata == {"run": "1"} and response.tools == []
    assert response.tool_choice == "auto" and response.parallel_tool_calls
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.status == "incomplete"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert response.output_text == message.content[0].text != ""
    usage = response.usage
    assert usage.output_tokens == 8 and usage.output_tokens_details.reasoning_tokens == 0
    assert usage.total_tokens == usage.input_tokens + 8 and usage.input_tokens > 10
    # Nothing was stored, so nothing can be read back.
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.retrieve(response.id)
    assert "does not store responses" in info.value.message


def test_streamed_events_come_in_order_and_rebuild_the_whole_response(client, url):
    args = dict(model="tiny", input=QUESTION, max_output_tokens=12)
    args["extra_body"] = {"seed": 2, "ignore_eos": True}
    whole = client.responses.create(**args)
    events = list(client.responses.create(**args, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type.removeprefix("response.") for e in events]
    n = kinds.count("output_text.delta")
    assert kinds == [
        "created", "in_progress", "output_item.added", "content_part.added",
        *["output_text.delta"] * n,
        "output_text.done", "content_part.done", "output_item.done", "incomplete",
    ]  # fmt: skip
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert streamed == events[-4].text == final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens == 12
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {final.output[0].id}
    # The stream helper sees the same events (its get_final_response() wants a completed
    # response: the parse test below reads it).
    with client.responses.stream(**args) as stream:
        assert [e.type for e in stream] == [e.type for e in events]
    # On the wire: each event named, no [DONE] (the Responses API has none).
    status, headers, raw = http(
        url + "/v1/responses", {**args, **args.pop("extra_body"), "stream": True}
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert [name for name, _ in sse_events(raw)] == [e.type for e in events]
    assert b"[DONE]" not in raw


def test_parse_with_a_pydantic_text_format_gives_a_schema_valid_object(client):
    args = dict(
        model="tiny",
        input="Rex is a dog of 3 years.",
        text_format=Pet,
        reasoning=OFF,
        max_output_tokens=BUDGET,
        extra_body={"seed": 5},
    )
    parsed = client.responses.parse(**args)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Pet)
    assert parsed.text.format.type == "json_schema" and parsed.text.format.name == "Pet"
    with client.responses.stream(**args) as stream:
        assert stream.get_final_response().output_parsed == parsed.output_parsed
    # json_object: any JSON object.
    done = client.responses.create(
        model="tiny",
        input="Answer in JSON.",
        text={"format": {"type": "json_object"}},
        reasoning=OFF,
        max_output_tokens=BUDGET,
        extra_body={"seed": 6},
    )
    assert done.status == "completed" and isinstance(json.loads(done.output_text), dict)


def test_json_schema_output_is_valid_against_the_schema(client):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 6}, "n": {"enum": [1, 2]}},
        "required": ["city", "n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "name": "place", "schema": schema, "strict": True}
    for seed in range(3):
        done = client.responses.create(
            model="tiny",
            input=QUESTION,
            text={"format": fmt},
            reasoning=OFF,
            max_output_tokens=BUDGET,
            extra_body={"seed": seed},
        )
        assert done.status == "completed"
        jsonschema.validate(json.loads(done.output_text), schema)
        assert done.text.format.schema_ == schema


def test_a_required_call_is_valid_and_its_round_trip_is_rendered_and_answered(client):
    ask = [{"role": "user", "content": QUESTION}]
    first = client.responses.create(
        model="tiny",
        input=ask,
        tools=FLAT_TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        reasoning=OFF,
        max_output_tokens=BUDGET,
        extra_body={"seed": 1},
    )
    assert first.status == "completed" and first.tool_choice == "required"
    assert [t.name for t in first.tools] == ["get_weather", "add"]
    (call,) = first.output
    assert call.type == "function_call" and call.status == "completed"
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])

    # The call and its output sent back, as the SDK's docs do it (output items as given).
    turns = [*ask, *first.output, {"type": "function_call_output", "call_id": call.call_id}]
    turns[-1]["output"] = RESULT
    args = dict(model="tiny", tools=FLAT_TOOLS, reasoning=OFF, max_output_tokens=6)
    args["extra_body"] = {"seed": 1, "ignore_eos": True}
    answer = client.responses.create(input=turns, **args)
    alone = client.responses.create(input=ask, **args)
    assert answer.output[0].type == "message" and answer.output_text
    # The call and the result were rendered into the prompt (the result alone is about
    # 20 tokens of the tiny tokenizer, the call about 15).
    assert answer.usage.input_tokens > alone.usage.input_tokens + 30


def test_a_named_call_streams_argument_deltas_that_rebuild_it(client):
    args = dict(
        model="tiny",
        input=QUESTION,
        tools=FLAT_TOOLS,
        tool_choice={"type": "function", "name": "add"},
        reasoning=OFF,
        max_output_tokens=BUDGET,
        extra_body={"seed": 3},
    )
    whole = client.responses.create(**args)
    (call,) = whole.output
    assert call.name == "add"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["add"])
    events = list(client.responses.create(**args, stream=True))
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [(e.item.type, e.item.name, e.item.arguments) for e in added] == [
        ("function_call", "add", "")
    ]
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert "".join(pieces) == done.arguments == call.arguments
    assert events[-1].response.output[0].arguments == call.arguments


def test_input_tokens_counts_the_prompt_a_response_would_have(client):
    args = dict(model="tiny", input=QUESTION, instructions="Be brief.", tools=FLAT_TOOLS)
    counted = client.responses.input_tokens.count(**args)
    assert counted.object == "response.input_tokens"
    done = client.responses.create(
        **args, reasoning=OFF, max_output_tokens=1, extra_body={"ignore_eos": True}
    )
    # Thinking off adds the closed think block to the prompt, so it counts more.
    alone = client.responses.input_tokens.count(**args, reasoning=OFF)
    assert alone.input_tokens == done.usage.input_tokens > counted.input_tokens > 100


def test_log_probabilities_are_returned_when_included(client):
    done = client.responses.create(
        model="tiny",
        input=QUESTION,
        include=["message.output_text.logprobs"],
        top_logprobs=2,
        max_output_tokens=6,
        reasoning=OFF,
        extra_body={"seed": 4, "ignore_eos": True},
    )
    text = done.output[0].content[0]
    assert 1 <= len(text.logprobs) <= 6 and done.top_logprobs == 2
    # (the tiny model writes stray bytes: the text has U+FFFD where they are not UTF-8)
    joined = b"".join(bytes(t.bytes) for t in text.logprobs)
    assert joined.decode(errors="replace") == text.text
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in text.logprobs)


# -- LangChain -----------------------------------------------------------------------------------


def chat_model(url: str, max_tokens: int, **extra):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=url + "/v1",
        api_key="x",
        model="tiny",
        use_responses_api=True,
        max_retries=0,
        max_tokens=max_tokens,
        reasoning=OFF,
        extra_body={"seed": 3, **extra},
    )


def test_langchain_invoke_and_stream_give_the_same_reply(url):
    short = chat_model(url, 10, ignore_eos=True)
    message = short.invoke(QUESTION)
    assert message.text and message.response_metadata["status"] == "incomplete"
    assert message.response_metadata["id"].startswith("resp_")
    assert message.usage_metadata["output_tokens"] == 10
    merged = None
    for chunk in short.stream(QUESTION):
        merged = chunk if merged is None else merged + chunk
    assert merged.text == message.text
    assert merged.usage_metadata["output_tokens"] == 10


@pytest.mark.parametrize("choice", ["required", "add"])
def test_langchain_bound_tools_give_a_valid_call_streamed_or_not(url, choice):
    bound = chat_model(url, BUDGET).bind_tools(TOOLS, tool_choice=choice, parallel_tool_calls=False)
    message = bound.invoke(QUESTION)
    assert not message.invalid_tool_calls
    (call,) = message.tool_calls
    jsonschema.validate(call["args"], SCHEMAS[call["name"]])
    assert call["id"].startswith("call_") and (choice == "required" or call["name"] == "add")
    merged = None
    for chunk in bound.stream(QUESTION):
        merged = chunk if merged is None else merged + chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(call["name"], call["args"])]


def test_langchain_tool_round_trip_is_rendered_and_answered(url):
    from langchain_core.messages import HumanMessage, ToolMessage

    bound = chat_model(url, BUDGET).bind_tools(TOOLS, tool_choice="required")
    first = bound.invoke([HumanMessage(QUESTION)])
    (call,) = first.tool_calls[:1]
    conversation = [HumanMessage(QUESTION), first, ToolMessage(RESULT, tool_call_id=call["id"])]
    short = chat_model(url, 6, ignore_eos=True).bind_tools(TOOLS)
    answer = short.invoke(conversation)
    alone = short.invoke([HumanMessage(QUESTION)])
    assert answer.text and answer.usage_metadata["output_tokens"] == 6
    # LangChain sent the call back as a function_call item and the result as its output.
    grown = answer.usage_metadata["input_tokens"] - alone.usage_metadata["input_tokens"]
    assert grown > 30, grown


# -- refusals, in OpenAI's error shape --------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id", "store"),
        ({"input": "hi", "conversation": "conv_1"}, "conversation", "store"),
        ({"input": "hi", "background": True}, "background", "store"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type", "'web_search'"),
        ({"input": "hi", "tools": [{"type": "function", "name": "no spaces"}]},
         "tools[0].name", "name"),
        ({"input": "hi", "tool_choice": {"type": "file_search"}}, "tool_choice", "file_search"),
        # (chat's shape: the message asked for the shape that was sent)
        ({"input": "hi", "tool_choice": {"type": "function", "function": {"name": "f"}}},
         "tool_choice.name", '{"type": "function", "name": ...}'),
        ({"input": 42}, "input", "Expected"),
        ({}, "input", "required"),
        ({"input": []}, "input", "empty"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input[0].content[0].type", "text only"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "role"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
         "input[0].call_id", "required"),
        ({"input": [{"type": "function_call_output", "call_id": "c9", "output": "x"}]},
         "input[0].call_id", "'c9'"),
        ({"input": [{"type": "computer_call", "call_id": "c"}]}, "input[0].type", "computer_call"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].id", "store"),
        ({"input": [{"content": "no role"}]}, "input[0].type", "type"),
        ({"input": "hi", "include": ["file_search_call.results"]}, "include[0]", "file_search"),
        ({"input": "hi", "reasoning": {"effort": "extreme"}}, "reasoning.effort", "extreme"),
        ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "a b", "schema": {}}}},
         "text.format.name", "name"),
        ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format.type", "yaml"),
        ({"input": "hi", "text": {"verbosity": "low"}}, "text.verbosity", "low"),
        ({"input": "hi", "max_output_tokens": 100_000}, "max_output_tokens", "context"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", "max_output_tokens must"),
        ({"input": "hi", "top_logprobs": 21}, "top_logprobs", "20"),
        ({"input": "hi", "metadata": {str(i): "v" for i in range(17)}}, "metadata", "16"),
        ({"input": "hi", "max_tool_calls": -1}, "max_tool_calls", "0 or more"),
    ],
)  # fmt: skip
def test_refusals_are_400s_in_openais_shape_naming_the_field(url, body, param, words):
    status, _, raw = http(url + "/v1/responses", body)
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"], error


def test_stored_state_is_refused_by_the_sdk_with_a_clear_message(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="tiny", input="hi", previous_response_id="resp_1")
    assert info.value.body["param"] == "previous_response_id"
    assert "does not store responses" in info.value.message
    for method, path in [
        ("GET", "/v1/responses/resp_1"),
        ("DELETE", "/v1/responses/resp_1"),
        ("POST", "/v1/responses/resp_1/cancel"),
        ("GET", "/v1/responses/resp_1/input_items"),
    ]:
        status, _, raw = http(
            client.base_url.join(path.removeprefix("/v1/")).__str__(), method=method
        )
        assert status == 404 and json.loads(raw)["error"]["code"] == "not_found", (path, raw)


def test_fields_that_change_nothing_here_are_accepted(client):
    done = client.responses.create(
        model="tiny",
        input=QUESTION,
        include=["reasoning.encrypted_content"],  # reasoning is returned whole, in the clear
        service_tier="auto",
        truncation="disabled",
        user="u1",
        reasoning=OFF,
        max_output_tokens=2,
        extra_body={"seed": 1, "ignore_eos": True},
    )
    assert done.status == "incomplete" and done.user == "u1" and done.service_tier == "default"


def test_truncation_auto_keeps_the_end_of_an_over_long_input(client):
    long_input = "Oslo weather " * 1500  # about 3000 tokens, more than the 2048 of context
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="tiny", input=long_input, max_output_tokens=4)
    assert info.value.body["param"] == "input"
    done = client.responses.create(
        model="tiny", input=long_input, truncation="auto", max_output_tokens=4, reasoning=OFF
    )
    assert done.truncation == "auto" and done.usage.input_tokens <= 2048 - 4


def test_the_asgi_interface_streams_the_same_events(tools_dir, tmp_path):
    args = ["--max-seq-len", "2048", "--interface", "asgi"]
    with running_server(tools_dir, *args, log=tmp_path / "serve.log") as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        request = dict(model="tiny", input=QUESTION, max_output_tokens=10, reasoning=OFF)
        request["extra_body"] = {"seed": 1, "ignore_eos": True}
        whole = client.responses.create(**request)
        events = list(client.responses.create(**request, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == whole.output_text != ""


# -- reasoning, with a thinking model ---------------------------------------------------------


@pytest.fixture(scope="module")
def thinking(tmp_path_factory):
    root = tmp_path_factory.mktemp("responses-thinking")
    folder = thinking_checkpoint(root / "tiny", max_positions=512)
    with running_server(folder, "--max-seq-len", "512", log=root / "serve.log") as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)


@pytest.mark.parametrize("effort", ["high", None])
def test_reasoning_comes_back_as_a_reasoning_item(thinking, effort):
    args = dict(model="tiny", input=QUESTION, max_output_tokens=12)
    args["extra_body"] = {"seed": 1, "ignore_eos": True}
    if effort is not None:
        args["reasoning"] = {"effort": effort}
    done = thinking.responses.create(**args)
    first = done.output[0]
    assert first.type == "reasoning" and first.id.startswith("rs_") and first.summary == []
    assert first.content[0].type == "reasoning_text" and first.content[0].text
    assert done.reasoning.effort == effort
    details = done.usage.output_tokens_details
    assert 0 < details.reasoning_tokens <= done.usage.output_tokens == 12

    events = list(thinking.responses.create(**args, stream=True))
    kinds = [e.type for e in events]
    assert kinds[2:5] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
    ]
    assert events[3].part.type == "reasoning_text"
    streamed = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert streamed == events[-1].response.output[0].content[0].text == first.content[0].text


def test_reasoning_effort_none_turns_thinking_off(thinking):
    done = thinking.responses.create(
        model="tiny",
        input=QUESTION,
        reasoning={"effort": "none"},
        max_output_tokens=6,
        extra_body={"seed": 1, "ignore_eos": True},
    )
    assert [item.type for item in done.output] == ["message"]
    assert done.usage.output_tokens_details.reasoning_tokens == 0


# -- the real SmolLM2 --------------------------------------------------------------------------


@NEEDS_SMOLLM2
def test_parse_with_smollm2_extracts_the_right_object(tmp_path):
    args = ("--device", "cpu", "--max-batch", "1", "--max-seq-len", "512")
    with running_server("smollm2-135m", *args, log=tmp_path / "serve.log") as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        parsed = client.responses.parse(
            model="smollm2-135m",
            instructions="Extract the book as JSON.",
            input="Dune was written by Frank Herbert in 1965.",
            text_format=Book,
            temperature=0,
            max_output_tokens=60,
        )
    assert parsed.status == "completed"
    assert parsed.output_parsed == Book(title="Dune", author="Frank Herbert", year=1965)
