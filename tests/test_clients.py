"""Real OpenAI-compatible clients against a real ``fermi serve``: LangChain's ChatOpenAI
(tools bound, streamed, structured output by JSON schema and by function calling, a tool
round trip), LiteLLM (tools, streamed, with no connection anywhere but the server) and the
openai SDK's helpers (``parse()`` with a pydantic function tool, a streamed call cut short);
then the Llama 3.1 JSON call format on a random Llama through the engine.

The tools server is a tiny random Qwen3 with a tools template: only the grammar makes its
calls valid, so every call is checked against its schema. The structured-output test uses
the real SmolLM2-135M, which must also get the content right.
"""

from __future__ import annotations

import json
import os
import sys

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

import fermi
from tests.arch_templates import LLAMA31
from tests.serving import NEEDS_SMOLLM2, running_server
from tests.test_tools import SCHEMAS, TOOLS
from tests.tiny import write_checkpoint, write_checkpoint_for

QUESTION = "What is the weather in Oslo?"
# A random model spends many tokens on the whitespace JSON allows; thinking off keeps an
# unbounded think block out of the call grammar.
BUDGET = 600
OFF = {"thinking": "off"}


class Pet(BaseModel):
    """A pet."""

    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=30)


def check_calls(calls: list[tuple[str, dict | str]]) -> None:
    """Each (name, arguments) is a call of a known tool with schema-valid arguments."""
    assert calls
    for name, arguments in calls:
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
        jsonschema.validate(args, SCHEMAS[name])


@pytest.fixture(scope="module")
def tiny_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("clients")
    folder = write_checkpoint(
        root / "tiny", {"max_position_embeddings": 2048}, template="qwen3_tools"
    )
    args = ["--max-seq-len", "2048", "--max-batch", "2"]
    with running_server(folder, *args, log=root / "serve.log") as url:
        yield url + "/v1"


# -- LangChain ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat(tiny_url):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=tiny_url,
        api_key="x",
        model="tiny",
        max_retries=0,
        max_tokens=BUDGET,
        seed=3,
        extra_body=OFF,
    )


@pytest.mark.parametrize("choice", ["required", "add"])
def test_langchain_bound_tools_give_a_valid_call_streamed_or_not(chat, choice):
    bound = chat.bind_tools(TOOLS, tool_choice=choice, parallel_tool_calls=False)
    message = bound.invoke(QUESTION)
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert not message.invalid_tool_calls
    calls = [(c["name"], c["args"]) for c in message.tool_calls]
    check_calls(calls)
    assert len(calls) == 1 and message.tool_calls[0]["id"].startswith("call_")
    if choice == "add":
        assert calls[0][0] == "add"

    merged = None
    for chunk in bound.stream(QUESTION):
        merged = chunk if merged is None else merged + chunk
    assert merged.response_metadata["finish_reason"] == "tool_calls"
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == calls  # the same seed


def test_langchain_structured_output_by_function_calling_is_the_pydantic_object(chat):
    structured = chat.with_structured_output(Pet, method="function_calling", include_raw=True)
    out = structured.invoke("Rex is a dog of 3 years.")
    assert out["parsing_error"] is None
    assert isinstance(out["parsed"], Pet)
    raw = out["raw"]
    # LangChain forced its tool: only that call, made valid by the grammar.
    assert [c["name"] for c in raw.tool_calls] == ["Pet"]
    assert raw.response_metadata["finish_reason"] == "tool_calls"


def test_langchain_tool_round_trip_is_rendered_and_answered(chat):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    call = {"name": "get_weather", "args": {"city": "Oslo", "unit": "c"}, "id": "call_1"}
    conversation = [
        HumanMessage(QUESTION),
        AIMessage("", tool_calls=[call]),
        ToolMessage("It is 3 degrees and snowing in Oslo.", tool_call_id="call_1"),
    ]
    bound = chat.bind_tools(TOOLS).bind(max_tokens=6, extra_body={**OFF, "ignore_eos": True})
    answer = bound.invoke(conversation)
    alone = bound.invoke([HumanMessage(QUESTION)])
    assert isinstance(answer.content, str) and answer.content
    assert answer.response_metadata["finish_reason"] == "length"
    # The call and its result were rendered into the prompt (the tool's text alone is
    # about 30 tokens of the tiny tokenizer).
    grown = answer.usage_metadata["input_tokens"] - alone.usage_metadata["input_tokens"]
    assert grown > 40, grown


# -- LiteLLM ------------------------------------------------------------------------------

_connections: list[tuple[str, object]] = []
_watching: list[bool] = []


def _audit(event: str, args: tuple) -> None:
    if _watching and event in ("socket.connect", "socket.getaddrinfo"):
        _connections.append((event, args[1] if event == "socket.connect" else args[0]))


@pytest.fixture(scope="module")
def litellm(tiny_url):
    """LiteLLM imported offline-safe: its model price map is read from the package, not
    fetched at import; every connection it opens from here on is recorded."""
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    sys.addaudithook(_audit)
    _watching.append(True)
    try:
        import litellm

        litellm.suppress_debug_info = True
        yield litellm
    finally:
        _watching.clear()


def only_loopback() -> None:
    assert _connections  # the hook saw the connections to the server
    hosts = set()
    for _event, where in _connections:
        host = where[0] if isinstance(where, tuple) else where
        hosts.add(host.decode() if isinstance(host, bytes) else str(host))
    assert hosts <= {"127.0.0.1", "localhost"}, _connections


def test_litellm_tool_calls_streamed_reassemble_to_the_whole_reply(litellm, tiny_url):
    args = dict(
        model="openai/tiny",
        api_base=tiny_url,
        api_key="x",
        messages=[{"role": "user", "content": QUESTION}],
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=BUDGET,
        seed=1,
        extra_body=OFF,
    )
    whole = litellm.completion(**args)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    check_calls(calls)

    rebuilt: dict[int, list[str]] = {}
    reasons = []
    for chunk in litellm.completion(**args, stream=True):
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for piece in c.delta.tool_calls or []:
                if piece.id is not None:
                    rebuilt[piece.index] = [piece.function.name, piece.function.arguments or ""]
                else:
                    rebuilt[piece.index][1] += piece.function.arguments or ""
    assert [tuple(rebuilt[i]) for i in sorted(rebuilt)] == calls
    assert "tool_calls" in reasons
    only_loopback()


# -- the openai SDK's helpers -------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_url):
    return openai.OpenAI(base_url=tiny_url, api_key="x", max_retries=0)


def test_openai_parse_with_a_pydantic_function_tool_gives_parsed_arguments(client):
    args = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Rex is a dog of 3 years."}],
        tools=[openai.pydantic_function_tool(Pet)],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=BUDGET,
        seed=5,
        extra_body=OFF,
    )
    completion = client.chat.completions.parse(**args)
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "Pet" and isinstance(call.function.parsed_arguments, Pet)

    # The stream helper parses the streamed call the same way.
    with client.chat.completions.stream(**args) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
    assert [e.parsed_arguments for e in done] == [call.function.parsed_arguments]


def test_a_streamed_call_cut_by_max_tokens_equals_the_whole_reply(client):
    """The last delta of a call cut short carries a fragment of a call begun earlier; the
    server once failed such a stream (IndexError merging it into no call)."""
    args = dict(
        model="tiny",
        messages=[{"role": "user", "content": QUESTION}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}},
        max_tokens=150,
        seed=2,
        extra_body=OFF,
    )
    whole = client.chat.completions.create(**args).choices[0]
    assert whole.finish_reason == "length"
    (call,) = whole.message.tool_calls
    assert call.function.name == "add" and call.function.arguments.startswith("{")
    rebuilt = ["", ""]
    reasons = []
    for chunk in client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for piece in c.delta.tool_calls or []:
                rebuilt[0] += piece.function.name or ""
                rebuilt[1] += piece.function.arguments or ""
    assert rebuilt == ["add", call.function.arguments]
    assert reasons[-1] == "length"


# -- LangChain with the real SmolLM2 ------------------------------------------------------


class Book(BaseModel):
    title: str
    author: str
    year: int


@NEEDS_SMOLLM2
def test_langchain_structured_output_by_json_schema_with_smollm2(tmp_path):
    from langchain_openai import ChatOpenAI

    args = ("--device", "cpu", "--max-batch", "2", "--max-seq-len", "512")
    with running_server("smollm2-135m", *args, log=tmp_path / "serve.log") as url:
        llm = ChatOpenAI(
            base_url=url + "/v1",
            api_key="x",
            model="smollm2-135m",
            max_retries=0,
            max_tokens=60,
            temperature=0,
        )
        structured = llm.with_structured_output(Book, method="json_schema")
        book = structured.invoke(
            [
                ("system", "Extract the book as JSON."),
                ("user", "Dune was written by Frank Herbert in 1965."),
            ]
        )
    assert book == Book(title="Dune", author="Frank Herbert", year=1965)


# -- Llama 3.1 JSON calls through the engine ------------------------------------------------

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 2048,
    "torch_dtype": "float32",
    "initializer_range": 0.1,
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = write_checkpoint_for(
        tmp_path_factory.mktemp("llama31") / "tiny",
        LLAMA,
        added_tokens=LLAMA31.added_tokens,
        tokenizer_config=LLAMA31.tokenizer_config,
        eos_tokens=LLAMA31.eos_tokens,
    )
    with fermi.load(folder, max_seq_len=2048, max_batch=2) as engine:
        yield engine


def test_llama31_required_calls_are_json_calls_with_parameters(llama):
    messages = [{"role": "user", "content": QUESTION}]
    request = llama.build_request(messages=messages, tools=TOOLS)
    assert request.tool_format == "llama3_json"
    prompt = llama.tokenizer.decode(list(request.prompt_ids), skip_special_tokens=False)
    assert '"name": "get_weather"' in prompt and prompt.endswith("assistant<|end_header_id|>\n\n")
    for seed in range(3):
        done = llama.generate(
            messages=messages, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
            seed=seed, temperature=1.0, max_tokens=BUDGET,
        )  # fmt: skip
        assert done.finish_reason == "tool_calls" and done.text == ""
        (call,) = done.tool_calls
        check_calls([(call.name, call.arguments)])
        # What the model wrote is Llama's own shape: one {"name", "parameters"} object.
        written = json.loads(llama.tokenizer.decode(done.token_ids, skip_special_tokens=True))
        assert written == {"name": call.name, "parameters": json.loads(call.arguments)}


def test_llama31_auto_parses_a_written_call_and_renders_the_round_trip(llama):
    from fermi.engine.output import OutputStream

    messages = [{"role": "user", "content": QUESTION}]
    request = llama.build_request(messages=messages, tools=TOOLS)
    assert request.grammar is None  # auto: the model chooses, the reply is parsed
    output = OutputStream(llama.tokenizer, request)
    reply = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}}'
    pieces = []
    for token in llama.tokenizer.encode(reply):
        delta, reason = output.push(token)
        assert reason is None and delta.text == ""
        pieces += delta.tool_calls or []
    delta, reason = output.push(llama.tokenizer.token_to_id("<|eot_id|>"))
    final = output.finish(reason)
    pieces += (delta.tool_calls or []) + (final.tool_calls or [])
    assert final.finish_reason == "tool_calls" and final.text == ""
    assert pieces[0].name == "get_weather" and pieces[0].id.startswith("call_")
    assert "".join(p.arguments for p in pieces) == '{"city": "Oslo", "unit": "c"}'

    call = {"id": pieces[0].id, "type": "function"}
    call["function"] = {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}
    turns = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "3 C"},
    ]
    text = llama.tokenizer.apply_chat_template(turns, tools=TOOLS)
    assert (
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", '
        '"parameters": {"city": "Oslo", "unit": "c"}}<|eot_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\n3 C<|eot_id|>"
    ) in text
