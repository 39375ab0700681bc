"""``thinking="on" | "off" | "auto"`` on each real chat template (tests/real_templates.py):
the prompt each mode renders (compared with transformers given the model's own switch),
where the output starts (inside the reasoning or not), the reasoning split of a given
output, and "on" refused, naming the model, where the model cannot think: through the
Python API, HTTP (chat completions, responses, Anthropic messages), gRPC and the chat CLI.

The weights are random, so nothing here depends on what the model writes: outputs are
given, or forced by a logit bias."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import grpc
import jsonschema
import pytest

import fermi
from fermi.engine.output import OutputStream
from fermi.engine.requests import RequestBuilder
from fermi.errors import RequestError
from fermi.loading import GenerationDefaults
from fermi.rpc.generated import fermi_pb2 as pb
from fermi.rpc.generated import fermi_pb2_grpc as pb_grpc
from fermi.rpc.server import ServerThread
from fermi.rpc.sessions import SessionConfig
from fermi.server.app import AsgiApp
from fermi.server.config import ServerConfig
from fermi.server.handlers import Api
from fermi.server.pool import load_pool
from fermi.text.tokenizer import Tokenizer
from tests.real_templates import ALL
from tests.test_real_templates import CONVERSATION, SYSTEM, hf_render
from tests.test_server_units import call_asgi

MODEL = "the-model"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("thinking")
    return {key: template.write(root / key) for key, template in ALL.items()}


def builder(folder) -> RequestBuilder:
    tok = Tokenizer.from_folder(folder)
    return RequestBuilder(tok, GenerationDefaults(), tok.vocab_size, 2048, model_name=MODEL)


def refused(build, messages, thinking) -> RequestError:
    with pytest.raises(RequestError) as err:
        build.chat_prompt(messages, thinking)
    return err.value


# -- the prompt of each mode --------------------------------------------------------------

# key -> {mode: (transformers' keywords for the same prompt, how the prompt ends,
#                output starts in the reasoning, the model may open <think> itself)}
# A mode missing from a row is refused.
EXPECTED = {
    "qwen3": {
        "auto": ({}, "<|im_start|>assistant\n", False, True),
        "on": ({"enable_thinking": True}, "<|im_start|>assistant\n", False, True),
        "off": ({"enable_thinking": False}, "<think>\n\n</think>\n\n", False, False),
    },
    "qwen3-2507-instruct": {
        "auto": ({}, "<|im_start|>assistant\n", False, False),
        "off": ({}, "<|im_start|>assistant\n", False, False),
    },
    "qwen3-2507-thinking": {
        "auto": ({}, "<|im_start|>assistant\n<think>\n", True, False),
        "on": ({}, "<|im_start|>assistant\n<think>\n", True, False),
        # (closed by Fermi: the template has no switch)
        "off": (None, "<|im_start|>assistant\n<think>\n</think>\n\n", False, False),
    },
    "deepseek-r1-0528-qwen3": {
        "auto": ({}, "<｜Assistant｜>", False, True),
        "on": ({}, "<｜Assistant｜>", False, True),
        "off": (None, "<｜Assistant｜><think>\n\n</think>\n\n", False, False),
    },
    "smollm3": {
        "auto": ({}, "<|im_start|>assistant\n", False, True),
        "on": ({"enable_thinking": True}, "<|im_start|>assistant\n", False, True),
        "off": ({"enable_thinking": False}, "<think>\n\n</think>\n", False, False),
    },
    "gemma3": {
        "auto": ({}, "<start_of_turn>model\n", False, False),
        "off": ({}, "<start_of_turn>model\n", False, False),
    },
    "phi-4-mini": {
        "auto": ({}, "<|assistant|>", False, False),
        "off": ({}, "<|assistant|>", False, False),
    },
    "granite-3.3": {
        "auto": ({}, "<|start_of_role|>assistant<|end_of_role|>", False, True),
        "on": ({"thinking": True}, "<|start_of_role|>assistant<|end_of_role|>", False, True),
        "off": ({"thinking": False}, "<|start_of_role|>assistant<|end_of_role|>", False, False),
    },
    "llama-3.2": {
        "auto": ({}, "<|start_header_id|>assistant<|end_header_id|>\n\n", False, False),
        "off": ({}, "<|start_header_id|>assistant<|end_header_id|>\n\n", False, False),
    },
}


@pytest.mark.parametrize(
    ("key", "mode"), [(k, m) for k in ALL for m in ("auto", "on", "off")], ids=str
)
def test_each_mode_renders_the_models_own_switch(folders, key, mode):
    build = builder(folders[key])
    if mode not in EXPECTED[key]:
        err = refused(build, CONVERSATION, mode)
        assert err.param == "thinking" and MODEL in err.message and "cannot think" in err.message
        assert str(err).endswith("(use thinking='auto' or 'off')")
        assert not build.supports_thinking
        return
    kwargs, ending, start_in_reasoning, may_open = EXPECTED[key][mode]
    chat = build.chat_prompt(CONVERSATION, mode)
    assert chat.text.endswith(ending)
    assert (chat.start_in_reasoning, chat.may_open) == (start_in_reasoning, may_open)
    if kwargs is not None:
        want = hf_render(folders[key], CONVERSATION, add_generation_prompt=True, **kwargs)
        assert chat.text == want
    else:  # Fermi closed the block the template (or the model) opens: the rest is the template's
        plain = hf_render(folders[key], CONVERSATION, add_generation_prompt=True)
        assert chat.text.startswith(plain.rstrip("\n"))
    assert chat.token_ids == build.tokenizer.encode(chat.text)
    assert build.supports_thinking == ("on" in EXPECTED[key])


def test_smollm3_explicit_modes_win_over_the_system_flags(folders):
    """SmolLM3's template reads /think and /no_think in the system message before
    enable_thinking; an explicit mode takes the flags out (the template drops them from
    the instructions it writes anyway), "auto" leaves them to decide."""
    build, folder = builder(folders["smollm3"]), folders["smollm3"]
    no_think = [{"role": "system", "content": "Be brief. /no_think"}, *CONVERSATION]
    think = [{"role": "system", "content": "Be brief. /think"}, *CONVERSATION]
    bare = [{"role": "system", "content": "Be brief."}, *CONVERSATION]

    auto = build.chat_prompt(no_think, "auto")
    assert auto.text == hf_render(folder, no_think, add_generation_prompt=True)
    assert "Reasoning Mode: /no_think" in auto.text and auto.text.endswith("</think>\n")
    assert not auto.may_open

    on = build.chat_prompt(no_think, "on")
    assert on.text == hf_render(folder, bare, add_generation_prompt=True, enable_thinking=True)
    assert "Reasoning Mode: /think" in on.text and on.may_open

    off = build.chat_prompt(think, "off")
    assert off.text == hf_render(folder, bare, add_generation_prompt=True, enable_thinking=False)
    assert "Reasoning Mode: /no_think" in off.text and not off.may_open
    assert build.chat_prompt(think, "auto").text == hf_render(
        folder, think, add_generation_prompt=True
    )


def test_granite_thinks_only_without_a_system_message(folders):
    build = builder(folders["granite-3.3"])
    on = build.chat_prompt(CONVERSATION, "on")
    assert "Write your thoughts between <think></think>" in on.text
    assert "Write your thoughts" not in build.chat_prompt(CONVERSATION, "auto").text
    err = refused(build, [SYSTEM, *CONVERSATION], "on")
    assert err.param == "thinking" and MODEL in err.message and "system message" in err.message
    assert build.chat_prompt([SYSTEM, *CONVERSATION], "off").text == hf_render(
        folders["granite-3.3"], [SYSTEM, *CONVERSATION], add_generation_prompt=True
    )


def test_qwen3_non_thinking_sampling_applies_to_qwen3s_switch_only(folders):
    qwen = builder(folders["qwen3"])
    assert qwen.build(messages=QUESTION, thinking="off").params.top_k == 20
    for key in ("smollm3", "deepseek-r1-0528-qwen3", "granite-3.3"):
        request = builder(folders[key]).build(messages=QUESTION, thinking="off")
        assert request.params.top_k == 0, key  # the model's (here neutral) defaults


# -- the reasoning split of a given output ------------------------------------------------


@pytest.mark.parametrize(
    ("key", "mode", "output", "reasoning", "text"),
    [
        ("qwen3-2507-thinking", "auto", "Sure.\n</think>\n\nParis.", "Sure.\n", "Paris."),
        ("qwen3-2507-thinking", "on", "cut off while thinking", "cut off while thinking", ""),
        ("qwen3-2507-thinking", "off", "Paris.", "", "Paris."),
        ("deepseek-r1-0528-qwen3", "auto", "<think>\nhmm\n</think>\n\nParis.", "hmm\n", "Paris."),
        ("qwen3", "on", "<think>\nhmm\n</think>\n\nParis.", "hmm\n", "Paris."),
        ("qwen3", "off", "Paris.", "", "Paris."),
        ("smollm3", "auto", "<think>\nhmm\n</think>\nParis.", "hmm\n", "Paris."),
        ("granite-3.3", "on", "<think>hmm</think><response>Paris.</response>", "hmm", "Paris."),
        ("gemma3", "auto", "<think>x</think>Paris.", "x", "Paris."),
    ],
)
def test_the_output_splits_where_the_prompt_left_off(folders, key, mode, output, reasoning, text):
    build = builder(folders[key])
    request = build.build(messages=QUESTION, thinking=mode)
    stream = OutputStream(build.tokenizer, request)
    deltas = [stream.push(token)[0] for token in build.tokenizer.encode(output)]
    deltas.append(stream.finish("stop"))
    assert "".join(d.reasoning for d in deltas) == reasoning
    assert "".join(d.text for d in deltas) == text


# -- a grammar after a template-opened think block ----------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}},
    "required": ["city"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}


def test_a_grammar_waits_for_the_end_of_a_think_block_the_template_opened(folders):
    """Qwen3-2507 Thinking's prompt opens <think>: the output starts in the reasoning, which
    is free except that it may not end there; the grammar applies from </think> on. The
    bias makes the random model want to end at once, else close the block."""
    with fermi.load(folders["qwen3-2507-thinking"], max_seq_len=512, max_batch=1) as engine:
        tok = engine.tokenizer
        close, eos = tok.token_to_id("</think>"), tok.token_to_id("<|im_end|>")
        request = engine.build_request(
            messages=QUESTION,
            response_format=RESPONSE_FORMAT,
            logit_bias={str(eos): 100, str(close): 90},
            max_tokens=120,
            temperature=1.0,
            seed=3,
        )
        assert request.start_in_reasoning and not request.reasoning_may_open
        out = engine.generate_request(request)
    assert out.token_ids[0] == close  # not the end of sequence: masked in the reasoning
    assert out.reasoning == "" and out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), SCHEMA)


def test_reasoning_may_open_only_where_the_prompt_leaves_it_open(folders):
    r1 = builder(folders["deepseek-r1-0528-qwen3"])
    smol = builder(folders["smollm3"])
    no_think = [{"role": "system", "content": "/no_think"}, *QUESTION]
    assert r1.chat_prompt(QUESTION, "auto").may_open
    assert not smol.chat_prompt(no_think, "auto").may_open
    assert not builder(folders["gemma3"]).chat_prompt(QUESTION, "auto").may_open


# -- "on" refused through every front end -------------------------------------------------


@pytest.fixture(scope="module")
def gemma(folders):
    with fermi.load(folders["gemma3"], max_seq_len=512, max_batch=1) as engine:
        yield engine


def test_python_api_refuses_thinking_on_naming_the_model(gemma):
    with pytest.raises(RequestError) as err:
        gemma.generate(messages=QUESTION, thinking="on", max_tokens=2)
    assert err.value.param == "thinking"
    assert gemma.model_name in err.value.message
    assert not gemma.supports_thinking
    assert gemma.generate(messages=QUESTION, thinking="off", max_tokens=2).finish_reason


@pytest.fixture(scope="module")
def http_api(folders):
    folder = str(folders["gemma3"])
    pool = load_pool(folder, [None], max_seq_len=512, max_batch=1)
    api = Api(pool, ServerConfig(model=folder))
    yield api
    api.close()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": QUESTION, "thinking": "on", "max_tokens": 8}),
        (
            "/v1/chat/completions",
            {"messages": QUESTION, "thinking": "on", "max_tokens": 8, "stream": True},
        ),
        (
            "/v1/chat/completions",
            {"messages": QUESTION, "chat_template_kwargs": {"enable_thinking": True}},
        ),
        ("/v1/responses", {"input": "Capital of France?", "reasoning": {"effort": "high"}}),
        (
            "/v1/messages",
            {
                "model": "gemma3",
                "messages": QUESTION,
                "max_tokens": 64,
                "thinking": {"type": "enabled", "budget_tokens": 1024},
            },
        ),
    ],
)
def test_http_refuses_thinking_on_with_a_400_naming_the_model(http_api, path, body):
    status, raw = asyncio.run(call_asgi(AsgiApp(http_api), path, body))
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert "cannot think" in error["message"]
    assert str(http_api.pool.replicas[0].engine.model_name) in error["message"]
    if path != "/v1/messages":  # (Anthropic's error shape has no param)
        assert error["param"] == ("reasoning.effort" if path == "/v1/responses" else "thinking")
    assert "thinking='" not in error["message"]  # (the Python API's advice, not HTTP's)


def test_http_thinking_off_and_auto_answer(http_api):
    for mode in ("off", "auto"):
        body = {"messages": QUESTION, "thinking": mode, "max_tokens": 2}
        status, raw = asyncio.run(call_asgi(AsgiApp(http_api), "/v1/chat/completions", body))
        assert status == 200, raw


def test_grpc_refuses_thinking_on_as_invalid_argument(gemma):
    server = ServerThread(gemma, SessionConfig()).start()
    channel = grpc.insecure_channel(server.address)
    try:
        stub = pb_grpc.FermiStub(channel)
        conversation = pb.Conversation(messages=[pb.Message(role="user", content="Hi")])
        generate = pb.GenerateRequest(conversation=conversation, thinking=pb.THINKING_ON)
        chat = pb.ChatRequest(message=pb.Message(content="Hi"), thinking=pb.THINKING_ON)
        for call in (lambda: list(stub.Generate(generate)), lambda: list(stub.Chat(chat))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith("thinking: ")
            assert "cannot think" in err.value.details()
            assert err.value.details().endswith("(use THINKING_AUTO or THINKING_OFF)")
        assert not stub.ListModels(pb.ListModelsRequest()).models[0].supports_thinking
    finally:
        channel.close()
        server.stop()


def test_chat_cli_refuses_thinking_on_before_the_chat(folders):
    args = ["chat", "--model", str(folders["gemma3"]), "--thinking", "on"]
    res = subprocess.run(
        [sys.executable, "-m", "fermi.cli", *args],
        input="hello\n",
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert res.returncode == 2, res.stderr
    assert "--thinking" in res.stderr and "cannot think" in res.stderr
    assert "use --thinking auto or off" in res.stderr
    assert "fermi chat ·" not in res.stdout  # refused before the session started
