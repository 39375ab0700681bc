"""Tool calling: OpenAI's tools checked, the model's calls parsed (streamed exactly as in one
piece), the required-call grammar always giving valid calls, tool turns rendered by the
template, and the whole thing through the engine and a real server with the openai SDK."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import torch

import fermi
from fermi.errors import RequestError
from fermi.grammar import Grammar, GrammarCompiler
from fermi.sampling import mask_words, unpack_bits
from fermi.text.tokenizer import Tokenizer
from fermi.text.tools import (
    ToolCallParser,
    ToolChoice,
    call_grammar,
    parse_tool_calls,
    parse_tool_choice,
    parse_tools,
    tool_format,
)
from tests.serving import running_server
from tests.tiny import write_checkpoint
from tests.tiny_tokenizer import write_tiny_tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 6},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add a number.",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "boolean"},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
TAGS = frozenset({"<tool_call>", "</tool_call>", "<think>", "</think>"})

HERMES_TEXT = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris \\"x\\" }", "n": [1, {"a": 2}]}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"arguments": {"a": 1.5e3, "b": true}, "name": "add"}\n</tool_call>'
)
LLAMA_TEXT = (
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}}; '
    '{"name": "add", "parameters": {"a": 1, "b": false}}'
)


def calls_of(calls) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in calls]


def streamed(text: str, fmt, rng: random.Random, max_calls=None):
    """Content and calls of ``text`` fed in random pieces; the calls rebuilt from events."""
    parser = ToolCallParser(fmt, max_calls)
    cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(len(text), 12))))
    content, events, start = [], [], 0
    for cut in [*cuts, len(text)]:
        piece, got = parser.feed(text[start:cut])
        content.append(piece)
        events += got
        start = cut
    piece, got = parser.finish()
    content.append(piece)
    events += got
    rebuilt: dict[int, list[str]] = {}
    for e in events:
        if e.id is not None:
            assert e.id.startswith("call_") and len(e.id) == 29 and e.arguments == ""
            rebuilt[e.index] = [e.name, ""]
        else:
            rebuilt[e.index][1] += e.arguments
    return "".join(content), [tuple(rebuilt[i]) for i in sorted(rebuilt)]


# -- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "text", "content", "calls"),
    [
        (
            "hermes",
            HERMES_TEXT,
            "Let me check.",
            [
                ("get_weather", '{"city": "Paris \\"x\\" }", "n": [1, {"a": 2}]}'),
                ("add", '{"a": 1.5e3, "b": true}'),
            ],
        ),
        (
            "llama3_json",
            LLAMA_TEXT,
            "",
            [("get_weather", '{"city": "Oslo", "unit": "c"}'), ("add", '{"a": 1, "b": false}')],
        ),
        ("hermes", "No call <tool_ca here, <b>", "No call <tool_ca here, <b>", []),
        ("llama3_json", "It is sunny.", "It is sunny.", []),
        # Text on both sides of a call stays apart: by what the model wrote after the call,
        # or a line break where it wrote nothing (it was joined into "checking.Done").
        (
            "hermes",
            'I am checking.\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\n\nDone.',
            "I am checking.\n\nDone.",
            [("f", "{}")],
        ),
        (
            "hermes",
            'I am checking.<tool_call>{"name": "f", "arguments": {}}</tool_call>Done.',
            "I am checking.\nDone.",
            [("f", "{}")],
        ),
        # Calls after calls, or a call first: no separator at all.
        (
            "hermes",
            '<tool_call>{"name": "f", "arguments": {}}</tool_call>\nDone.',
            "Done.",
            [("f", "{}")],
        ),
    ],
)
def test_streamed_calls_equal_the_whole_parse_at_any_split(fmt, text, content, calls):
    whole_content, whole_calls = parse_tool_calls(text, fmt)
    assert (whole_content, calls_of(whole_calls)) == (content, calls)
    for seed in range(100):
        assert streamed(text, fmt, random.Random(seed)) == (content, calls), seed


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("hermes", "<tool_call>\nnot json\n</tool_call> after"),
        ("hermes", '<tool_call>{"foo": 1}</tool_call>'),
        ("hermes", '<tool_call>{"name": "f"}</tool_call>'),
        ("hermes", '<tool_call>{"name": 3, "arguments": {}}</tool_call>'),
        ("hermes", '<tool_call>{"name": "f", "arguments": "{}"}</tool_call>'),
        ("llama3_json", '{"name": "f", "parameters": [1]}'),
        ("llama3_json", "{not json at all"),
    ],
)
def test_malformed_calls_stay_content_streamed_or_not(fmt, text):
    content, calls = parse_tool_calls(text, fmt)
    assert (content, calls) == (text, [])
    for seed in range(30):
        assert streamed(text, fmt, random.Random(seed)) == (text, []), seed


def test_a_committed_call_cut_short_keeps_what_was_written():
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 4'
    assert calls_of(parse_tool_calls(text, "hermes")[1]) == [("add", '{"a": 4')]


def test_without_parallel_calls_only_the_first_call_is_kept():
    content, calls = parse_tool_calls(HERMES_TEXT, "hermes", max_calls=1)
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather"]
    for seed in range(20):
        assert [c[0] for c in streamed(HERMES_TEXT, "hermes", random.Random(seed), 1)[1]] == [
            "get_weather"
        ]


# -- requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tools", "param"),
    [
        ({"type": "function"}, "tools"),
        ([{"type": "retrieval"}], "tools[0].type"),
        ([{"type": "function"}], "tools[0].function"),
        ([{"type": "function", "function": {"name": "bad name"}}], "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "x" * 65}}], "tools[0].function.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": "{}"}}],
            "tools[0].function.parameters",
        ),
        ([WEATHER, WEATHER], "tools[1].function.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            "tools[0].function.parameters.type",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": ["array"]}}}],
            "tools[0].function.parameters.type",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"required": "a"}}}],
            "tools[0].function.parameters.required",
        ),
    ],
)
def test_wrong_tool_shapes_are_refused_naming_the_field(tools, param):
    with pytest.raises(RequestError) as info:
        parse_tools(tools)
    assert info.value.param == param


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        ("sometimes", "tool_choice must be"),
        ({"type": "function", "function": {"name": "nope"}}, "'nope'"),
        ({"type": "function"}, "named tool_choice"),
    ],
)
def test_a_wrong_tool_choice_is_refused_naming_it(choice, message):
    with pytest.raises(RequestError, match=message) as info:
        parse_tool_choice(choice, parse_tools(TOOLS))
    assert info.value.param == "tool_choice"


def test_tool_choice_defaults_to_auto_with_tools_and_none_without():
    assert parse_tool_choice(None, parse_tools(TOOLS)) == ToolChoice("auto")
    assert parse_tool_choice(None, ()) == ToolChoice("none")


def test_the_call_format_is_read_from_the_chat_template(tmp_path):
    for template, expected in (("qwen3_tools", "hermes"), ("qwen3", None)):
        write_tiny_tokenizer(tmp_path / template, template=template)
        assert tool_format(Tokenizer.from_folder(tmp_path / template).chat_template) == expected
    llama = "{% if tools %}{{ tools | tojson }}{% endif %}<|python_tag|>{{ messages }}"
    assert tool_format(llama) == "llama3_json"


# -- the grammar of required calls -------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools-tok")
    write_tiny_tokenizer(folder, template="qwen3_tools")
    return Tokenizer.from_folder(folder)


def random_walk(compiler: GrammarCompiler, grammar: Grammar, seed: int) -> list[int]:
    """Tokens chosen at random among those the grammar allows, up to its end."""
    rng = random.Random(seed)
    matcher = compiler.matcher(grammar)
    row = torch.zeros(mask_words(compiler.vocab_size), dtype=torch.int32)
    out: list[int] = []
    for _ in range(2000):
        matcher.fill(row)
        allowed = unpack_bits(row[None], compiler.vocab_size)[0]
        token = rng.choice(allowed.nonzero().flatten().tolist())
        assert matcher.advance(token)
        if matcher.finished or token in compiler.eos_ids:
            return out
        out.append(token)
    raise AssertionError("the grammar never ended")


@pytest.mark.parametrize(
    ("fmt", "choice", "parallel"),
    [
        ("hermes", ToolChoice("required"), True),
        ("hermes", ToolChoice("named", "add"), True),
        ("llama3_json", ToolChoice("required"), False),
    ],
)
def test_every_random_walk_through_the_call_grammar_is_a_valid_call(
    tokenizer, fmt, choice, parallel
):
    eos = frozenset({tokenizer.token_to_id("<|im_end|>")})
    compiler = GrammarCompiler(tokenizer, eos, tokenizer.vocab_size)
    grammar = call_grammar(fmt, parse_tools(TOOLS), choice, parallel, tag_tokens=TAGS)
    compiler.check(grammar)
    counts = set()
    for seed in range(50):
        text = tokenizer.decode(random_walk(compiler, grammar, seed))
        content, calls = parse_tool_calls(text, fmt)
        assert calls and content == "", text
        for call in calls:
            if choice.mode == "named":
                assert call.name == "add"
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        counts.add(len(calls))
        if not parallel or choice.mode == "named":
            assert len(calls) == 1
    if parallel and choice.mode == "required":
        assert max(counts) > 1  # several calls do happen


def test_the_call_grammar_lets_a_think_block_come_first(tokenizer):
    eos = frozenset({tokenizer.token_to_id("<|im_end|>")})
    compiler = GrammarCompiler(tokenizer, eos, tokenizer.vocab_size)
    tools = parse_tools([ADD])
    for reasoning, text in (
        ("optional", "<think>\nhmm\n</think>\n\n"),
        ("open", "hmm</think>\n"),
        ("optional", ""),
    ):
        grammar = call_grammar("hermes", tools, ToolChoice("required"), False, reasoning, TAGS)
        matcher = compiler.matcher(grammar)
        call = '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": true}}\n</tool_call>'
        for token in tokenizer.encode(text + call):
            assert matcher.advance(token), (reasoning, text)
        assert matcher.finished


# -- the chat template -------------------------------------------------------------------


def test_a_tool_round_trip_renders_the_calls_and_the_results(tokenizer):
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "3 C"}]},
    ]
    text = tokenizer.apply_chat_template(messages, tools=TOOLS)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Oslo"}}\n</tool_call><|im_end|>\n'
    ) in text
    assert "<|im_start|>user\n<tool_response>\n3 C\n</tool_response><|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


# -- the engine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tools") / "tiny", template="qwen3_tools")


@pytest.fixture(scope="module")
def engine(model_dir):
    with fermi.load(model_dir, max_seq_len=1024, max_batch=2) as eng:
        yield eng


HI = [{"role": "user", "content": "What is the weather in Oslo?"}]


def test_an_answer_with_a_call_streams_tool_call_deltas_and_ends_with_tool_calls(engine):
    from fermi.engine.output import OutputStream

    request = engine.build_request(messages=HI, tools=TOOLS, thinking="off")
    assert request.tool_format == "hermes" and request.grammar is None
    output = OutputStream(engine.tokenizer, request)
    text = 'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": true}}\n</tool_call>'
    content, pieces = [], []
    for token in engine.tokenizer.encode(text):
        delta, reason = output.push(token)
        assert reason is None
        content.append(delta.text)
        pieces += delta.tool_calls or []
    delta, reason = output.push(next(iter(request.eos_token_ids)))
    final = output.finish(reason)
    assert reason == "tool_calls" and final.finish_reason == "tool_calls"
    assert "".join(content) + final.text == "Sure."
    assert pieces[0].name == "add" and pieces[0].id.startswith("call_")
    assert "".join(p.arguments for p in pieces) == '{"a": 1, "b": true}'


def test_required_and_named_choices_carry_the_call_grammar_and_none_parses_nothing(engine):
    required = engine.build_request(messages=HI, tools=TOOLS, tool_choice="required")
    assert required.grammar.kind == "lark" and "get_weather" in required.grammar.source
    named = engine.build_request(
        messages=HI, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}}
    )
    assert "get_weather" not in named.grammar.source
    none = engine.build_request(messages=HI, tools=TOOLS, tool_choice="none")
    assert none.grammar is None and none.tool_format is None
    assert "<tools>" in engine.tokenizer.decode(list(none.prompt_ids))


def test_tools_for_a_template_without_tool_support_are_refused(tmp_path):
    folder = write_checkpoint(tmp_path / "plain-chat", template="qwen3")
    with fermi.load(folder, max_seq_len=256, max_batch=1) as eng:
        with pytest.raises(RequestError, match="does not support tools") as info:
            eng.build_request(messages=HI, tools=TOOLS)
        assert info.value.param == "tools"
        eng.build_request(messages=HI, tools=TOOLS, tool_choice="none")  # not a call


def test_required_and_named_calls_by_a_random_model_are_valid_calls(engine):
    """Only the grammar makes a random model's reply a call: 50 seeded samples, each one
    call of a given function with arguments valid against its schema."""
    choices = ["required", {"type": "function", "function": {"name": "add"}}]

    def ask(seed: int):
        choice = choices[seed % 2]
        done = engine.generate(
            messages=HI, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False,
            thinking="off", seed=seed, temperature=1.0,
        )  # fmt: skip
        return choice, done

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ask, range(50)))
    for choice, done in results:
        assert done.finish_reason == "tool_calls", done.text
        assert len(done.tool_calls) == 1
        call = done.tool_calls[0]
        if choice != "required":
            assert call.name == "add"
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert {d.tool_calls[0].name for c, d in results if c == "required"} == set(SCHEMAS)


ADDRESS = {
    "$defs": {
        "Address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"],
            "additionalProperties": False,
        }
    },
    "type": "object",
    "properties": {"home": {"$ref": "#/$defs/Address"}},
    "required": ["home"],
    "additionalProperties": False,
}
CHAIN = {  # recursive, through the root: a list of numbers as a chain of links
    "type": "object",
    "properties": {"n": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
    "required": ["n", "next"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    "parameters",
    [ADDRESS, CHAIN, {}, {"anyOf": [{"type": "object"}, {"type": "null"}]}, None],
    ids=["defs", "recursive", "empty", "object-or-null", "none"],
)
def test_forced_calls_take_any_object_schema_and_are_calls_only(engine, parameters):
    """A Pydantic model's nested models come as ``$defs`` and ``$ref``s, which the call
    grammar moves into its own ``$defs`` (they were refused: "Pointer '/$defs/Address' does
    not exist"); ``{}`` and a schema that also allows null are narrowed to an object, the
    only arguments the parsers read (a random model's non-object arguments fell through
    to content). A forced reply is calls only: cut off before a call's name, it has no
    content rather than the call syntax's text."""
    function = {"name": "f"} | ({"parameters": parameters} if parameters is not None else {})
    tools = [{"type": "function", "function": function}]
    choices = ["required", {"type": "function", "function": {"name": "f"}}]

    def ask(seed: int):
        return engine.generate(
            messages=HI, tools=tools, tool_choice=choices[seed % 2], thinking="off",
            seed=seed, temperature=1.0, max_tokens=60 if seed < 2 else 300,
        )  # fmt: skip

    done = [ask(seed) for seed in range(10)]
    assert all(d.text == "" for d in done), [d.text for d in done]
    calls = [d for d in done if d.finish_reason == "tool_calls"]
    assert calls, [d.finish_reason for d in done]
    for d in calls:
        for call in d.tool_calls:
            assert call.name == "f"
            jsonschema.validate(json.loads(call.arguments), parameters or {"type": "object"})
            assert isinstance(json.loads(call.arguments), dict)


def test_a_tool_schema_whose_min_properties_a_repeated_key_could_defeat_is_refused(engine):
    loose = {"type": "object", "minProperties": 2}
    tools = [{"type": "function", "function": {"name": "f", "parameters": loose}}]
    with pytest.raises(RequestError, match="minProperties 2 needs") as info:
        engine.build_request(messages=HI, tools=tools, tool_choice="required")
    assert info.value.param == "tools"


def test_a_forced_call_cut_off_before_its_name_is_neither_content_nor_a_call(engine):
    tools = [{"type": "function", "function": {"name": "f", "parameters": ADDRESS}}]
    done = engine.generate(
        messages=HI, tools=tools, tool_choice="required", thinking="off", max_tokens=2
    )
    assert (done.finish_reason, done.text, done.tool_calls) == ("length", "", [])


def test_a_tool_schema_the_grammar_cannot_take_is_named_as_the_tools_not_as_lark(engine):
    """The call grammar is written in lark, but the caller gave tools: the error says a tool
    parameters schema is unsupported, and why, naming ``tools``. (A valid JSON schema: a
    broken one, e.g. ``"type": "strin"``, is refused before, naming its keyword.)"""
    bad = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=a)a"}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": bad}}]
    with pytest.raises(RequestError) as info:
        engine.build_request(messages=HI, tools=tools, tool_choice="required")
    assert info.value.param == "tools"
    assert info.value.message.startswith("unsupported tool parameters schema: ")
    assert "look-around" in info.value.message and "lark" not in info.value.message
    tools[0]["function"]["parameters"]["properties"]["a"] = {"type": "strin"}
    with pytest.raises(RequestError, match="not a valid JSON schema") as info:
        engine.build_request(messages=HI, tools=tools)  # (auto: refused all the same)
    assert info.value.param == "tools[0].function.parameters.properties.a.type"


def test_the_python_api_takes_openai_and_transformers_shaped_tool_histories(engine):
    """A call turn whose content is None is served (rendered as "", as HTTP passes it);
    so are the shapes transformers' tool-use examples give (calls without an id, a tool
    result naming its function instead of a tool_call_id), which Llama 3.x's templates
    render: unlike HTTP and gRPC, which take OpenAI's wire shapes only, the Python API
    leaves the pairing of calls and results to the template."""
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    asked = {"role": "assistant", "content": None, "tool_calls": [call]}
    answer = {"role": "tool", "tool_call_id": "c1", "content": "3"}
    with_content = engine.build_request(messages=[*HI, {**asked, "content": ""}, answer])
    assert engine.build_request(messages=[*HI, asked, answer]).prompt_ids == (
        with_content.prompt_ids
    )
    bare = {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    hf = [*HI, {"role": "assistant", "tool_calls": [bare]}, {"role": "tool", "name": "add",
                                                              "content": "3"}]  # fmt: skip
    assert engine.build_request(messages=hf, tools=TOOLS).prompt_ids


# -- HTTP, with the openai SDK -----------------------------------------------------------


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("tools-log") / "serve.log"
    args = ["--max-seq-len", "1024", "--max-batch", "2"]
    with running_server(model_dir, *args, log=log) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


@pytest.mark.parametrize("path", ["/chat/completions", "/responses", "/messages"])
def test_a_tool_schema_nested_too_deep_is_a_400_naming_tools(client, path):
    """Nested 200 objects deep (a 500 before: RecursionError in the walks over tools)."""
    schema: dict = {"type": "string"}
    for _ in range(200):
        schema = {"type": "object", "properties": {"a": schema}}
    if path == "/chat/completions":
        tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
        body = {"model": "tiny", "messages": HI, "max_tokens": 2, "tools": [tool]}
    elif path == "/responses":
        tool = {"type": "function", "name": "f", "parameters": schema}
        body = {"model": "tiny", "input": "hi", "max_output_tokens": 2, "tools": [tool]}
    else:
        tool = {"name": "f", "input_schema": schema}
        body = {"model": "tiny", "messages": HI, "max_tokens": 2, "tools": [tool]}
    reply = httpx.post(f"{client.base_url}".rstrip("/") + path, json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert "more than 100 deep" in reply.text


def test_wrong_tools_over_http_are_400_naming_the_field(client):
    bad = [{"type": "function", "function": {"name": "no spaces"}}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=HI, tools=bad)
    assert info.value.body["param"] == "tools[0].function.name"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny",
            messages=HI,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "missing"}},
        )
    assert info.value.body["param"] == "tool_choice" and "missing" in info.value.message
    # Not a JSON schema: refused with tool_choice auto too, where the schema only goes into
    # the prompt (it was served; a forced call's grammar refused it).
    wrong = {"type": "object", "properties": {"city": {"type": "strin"}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": wrong}}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=HI, tools=tools)
    assert info.value.body["param"] == "tools[0].function.parameters.properties.city.type"
    assert "not a valid JSON schema: 'strin'" in info.value.message


def test_a_conversation_round_trip_over_http_is_accepted(client):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'},
    }
    messages = [
        *HI,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3 C"},
    ]
    done = client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, max_tokens=4, seed=1
    )
    # The prompt holds the call and the result: longer than the question alone.
    alone = client.chat.completions.create(
        model="tiny", messages=HI, tools=TOOLS, max_tokens=4, seed=1
    )
    assert done.usage.prompt_tokens > alone.usage.prompt_tokens + 20


def test_required_tool_calls_over_http_streamed_equal_the_whole_reply(client):
    args = dict(
        model="tiny",
        messages=HI,
        tools=TOOLS,
        tool_choice="required",
        seed=7,
        extra_body={"thinking": "off"},
    )
    whole = client.chat.completions.create(**args)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)

    rebuilt: dict[int, list[str]] = {}
    reasons = []
    for chunk in client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for piece in c.delta.tool_calls or []:
                if piece.id is not None:
                    assert piece.type == "function" and piece.function.arguments == ""
                    rebuilt[piece.index] = [piece.function.name, ""]
                else:
                    rebuilt[piece.index][1] += piece.function.arguments
    assert [tuple(rebuilt[i]) for i in sorted(rebuilt)] == calls
    assert reasons[-1] == "tool_calls"


# -- gRPC --------------------------------------------------------------------------------


def test_grpc_requests_carry_tools_and_replies_carry_tool_call_deltas():
    from fermi.engine.types import Delta
    from fermi.rpc.convert import generate_kwargs, response
    from fermi.rpc.generated import fermi_pb2 as pb
    from fermi.text.tools import ToolCallDelta

    call = pb.ToolCall(id="call_1", name="add", arguments='{"a": 1}')
    request = pb.GenerateRequest(
        conversation=pb.Conversation(
            messages=[
                pb.Message(role="user", content="hi"),
                pb.Message(role="assistant", tool_calls=[call]),
                pb.Message(role="tool", content="2", tool_call_id="call_1"),
            ]
        ),
        tools=[json.dumps(ADD)],
        tool_choice="add",
        parallel_tool_calls=False,
    )
    kwargs = generate_kwargs(request)
    assert kwargs["tools"] == [ADD] and kwargs["parallel_tool_calls"] is False
    assert kwargs["tool_choice"] == {"type": "function", "function": {"name": "add"}}
    assert kwargs["messages"][1]["tool_calls"][0]["function"] == {
        "name": "add",
        "arguments": '{"a": 1}',
    }
    assert kwargs["messages"][2]["tool_call_id"] == "call_1"
    with pytest.raises(RequestError) as info:
        generate_kwargs(pb.GenerateRequest(conversation=request.conversation, tools=["{"]))
    assert info.value.param == "tools[0]"

    pieces = [ToolCallDelta(0, "call_x", "add", ""), ToolCallDelta(0, arguments='{"a": 1}')]
    out = response(Delta(tool_calls=pieces, finish_reason="tool_calls"))
    assert out.finish_reason == "tool_calls"
    assert [(t.index, t.id, t.name, t.arguments) for t in out.tool_calls] == [
        (0, "call_x", "add", ""),
        (0, "", "", '{"a": 1}'),
    ]


def test_reading_a_template_for_its_tool_syntax_computes_none_of_it():
    """The template comes from the model's folder: reading which variables it uses must not
    run it (a plain jinja2 environment folds constants such as ``'a' * 10**9`` then)."""
    import tracemalloc

    template = "{{ 'a' * 1000000000 }}{% for t in tools %}<tool_call>{% endfor %}"
    tracemalloc.start()
    try:
        assert tool_format(template) == "hermes"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20


def test_arguments_nested_past_the_parsers_limit_are_rendered_as_their_text():
    """A sent-back call whose arguments are JSON nested deeper than Python's parser recurses
    stays the text it is (the template writes that), not an internal error."""
    from fermi.text.tokenizer import _template_call

    deep = {"id": "a", "type": "function", "function": {"name": "f", "arguments": "[" * 100_000}}
    assert _template_call(deep) is deep
    flat = {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    assert _template_call(flat)["function"]["arguments"] == {"x": 1}
