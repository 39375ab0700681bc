"""Embedding checkpoints: loaded from Qwen3-Embedding's layout, pooled at the last token and
L2-normalised as transformers' AutoModel gives it, batched between generation steps without
touching a cache slot; through the Python API and a real ``fermi serve`` driven by the
openai SDK and LangChain.

The checkpoints are tiny random Qwen3s written as Qwen3-Embedding's are (``tests/tiny.py``):
bare ``Qwen3Model`` weights under a config naming Qwen3ForCausalLM, a tokenizer that appends
``<|endoftext|>``, sentence-transformers' last-token pooling files.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from dataclasses import replace

import numpy as np
import openai
import pytest
import torch

import fermi
from fermi.engine.embeddings import MAX_INPUTS, plan_batches
from fermi.errors import ModelLoadError, RequestError
from fermi.loading import load_folder
from fermi.runners.torch_cuda import CudaGraphRunner
from fermi.runners.torch_eager import TorchRunner
from fermi.server.health import HealthChecker
from fermi.server.pool import EnginePool
from tests.serving import http, running_server
from tests.test_fuzz_http import bodies, check_reply
from tests.tiny import (
    QUERY_PROMPT,
    hf_embeddings,
    write_checkpoint,
    write_embedding_checkpoint,
)

TOL = 1e-5
SEQ_LEN = 256
HIDDEN = 64
TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "Grüße aus München! " * 6,
    QUERY_PROMPT + "What is the capital of France?",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_embedding_checkpoint(tmp_path_factory.mktemp("embed") / "qwen3-embedding")


@pytest.fixture(scope="module")
def reference(folder):
    return hf_embeddings(folder, TEXTS)


@pytest.fixture(scope="module")
def engine(folder):
    with fermi.load(folder, max_seq_len=SEQ_LEN, max_batch=2) as eng:
        yield eng


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() < TOL


# -- loading ------------------------------------------------------------------------------


def test_the_embedding_layout_loads_as_an_embedding_model(engine):
    spec = engine.embedding
    assert spec is not None and spec.hidden_size == HIDDEN
    assert spec.source == "1_Pooling/config.json pools the last token"
    assert spec.generates  # tied embeddings (as Qwen3-Embedding-0.6B): the head is real


def test_vectors_equal_transformers_last_token_states_normalised(engine, reference):
    vectors = engine.embed(TEXTS)
    assert vectors.dtype == torch.float32 and vectors.device.type == "cpu"
    assert close(vectors, reference)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(len(TEXTS)))


def test_texts_are_tokenised_with_the_appended_end_of_text_token(engine, folder):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = engine.embedding_ids(TEXTS)
    assert ids == tok(TEXTS)["input_ids"]
    assert {row[-1] for row in ids} == {tok.convert_tokens_to_ids("<|endoftext|>")}


def test_one_string_and_token_ids_are_inputs_too(engine, reference):
    ids = engine.embedding_ids(TEXTS)
    assert close(engine.embed(TEXTS[1]), reference[1:2])
    assert close(engine.embed(ids[1]), reference[1:2])
    assert close(engine.embed(ids), reference)
    # Token ids are taken as given: without the end-of-text token it is another vector.
    assert not close(engine.embed(ids[1][:-1]), reference[1:2])


def test_dimensions_keep_the_first_entries_normalised_again(engine, reference):
    short = engine.embed(TEXTS, dimensions=16)
    expected = torch.nn.functional.normalize(reference[:, :16], dim=-1)
    assert close(short, expected)
    assert close(engine.embed(TEXTS, dimensions=HIDDEN), reference)


@pytest.mark.parametrize(
    ("dimensions", "code"),
    [
        (0, "invalid_value"),
        (HIDDEN + 1, "invalid_value"),
        ("8", "invalid_type"),
        (True, "invalid_type"),
    ],
)
def test_dimensions_outside_1_to_the_hidden_size_are_refused(engine, dimensions, code):
    with pytest.raises(RequestError) as err:
        engine.embed("hi", dimensions=dimensions)
    assert (err.value.param, err.value.code) == ("dimensions", code)


@pytest.mark.parametrize(
    ("value", "param", "code"),
    [
        ("", "input", "invalid_value"),
        ([], "input", "invalid_type"),
        (["a", ""], "input[1]", "invalid_value"),
        ([[1, 2], []], "input[1]", "invalid_value"),
        (["a", 1], "input", "invalid_type"),
        ([1.5, 2], "input", "invalid_type"),
        ([[1, 2], "a"], "input", "invalid_type"),
        (["a"] * (MAX_INPUTS + 1), "input", "invalid_value"),
        ("word " * 300, "input", "context_length_exceeded"),
        ([["a"], [1] * (SEQ_LEN + 1)], "input", "invalid_type"),
        ([[1, 2], [1] * (SEQ_LEN + 1)], "input[1]", "context_length_exceeded"),
        ([1, 2, 10**6], "input", "invalid_value"),
        (b"abc", "input", "invalid_type"),  # bytes would pass as the token ids 97, 98, 99
        ([b"abc", b"d"], "input", "invalid_type"),
        (memoryview(b"abc"), "input", "invalid_type"),
    ],
)
def test_bad_inputs_are_refused_naming_the_input(engine, value, param, code):
    with pytest.raises(RequestError) as err:
        engine.embed(value)
    assert (err.value.param, err.value.code) == (param, code)


def test_a_text_too_long_for_any_tokenisation_is_refused_before_tokenising(engine, monkeypatch):
    def encode(*args, **kwargs):
        raise AssertionError("tokenised")

    monkeypatch.setattr(engine.tokenizer, "encode", encode)
    with pytest.raises(RequestError) as err:
        engine.embedding_ids(["ok", "x" * (engine.requests.max_prompt_chars + 1)])
    assert (err.value.param, err.value.code) == ("input[1]", "context_length_exceeded")


def test_a_chat_model_is_refused_naming_the_reason(tmp_path):
    with fermi.load(write_checkpoint(tmp_path / "chat"), max_seq_len=64) as chat:
        assert chat.embedding is None and chat.generates
        with pytest.raises(RequestError) as err:
            chat.embed("hello")
    assert err.value.param == "model"
    assert "is not an embedding checkpoint" in err.value.message
    assert "1_Pooling/config.json" in err.value.message


def test_a_runner_that_cannot_embed_is_refused_naming_it(folder):
    ckpt = load_folder(folder, torch.device("cpu"), torch.float32)
    runner = TorchRunner(ckpt.model, 1, 64)
    runner.capabilities = replace(runner.capabilities, name="onnx", embeds=False)
    engine = fermi.Engine(runner, ckpt.tokenizer, ckpt.generation, "e", embedding=ckpt.embedding)
    with engine, pytest.raises(RequestError) as err:
        engine.embed("hello")
    assert err.value.param == "model"
    assert "the onnx runner cannot compute embeddings" in err.value.message


def test_the_headless_8b_layout_embeds_and_refuses_to_generate(tmp_path):
    """Qwen3-Embedding-4B/8B store no lm_head and do not tie one: detected from the bare
    weights alone here (no sentence-transformers files), embeds, cannot generate, and its
    /health probe is an embedding."""
    folder = write_embedding_checkpoint(
        tmp_path / "8b-like", {"tie_word_embeddings": False}, seed=4, sentence_transformers=False
    )
    with fermi.load(folder, max_seq_len=SEQ_LEN) as engine:
        assert engine.embedding.source == "its weights are a bare backbone without an lm_head"
        assert not engine.generates
        assert close(engine.embed(TEXTS), hf_embeddings(folder, TEXTS))
        with pytest.raises(RequestError) as err:
            engine.generate(prompt="hi", max_tokens=2)
        assert err.value.param == "model"
        assert "embedding checkpoint without an lm_head" in err.value.message
        ok, lines = asyncio.run(HealthChecker(EnginePool([engine], ["cpu"])).check())
        assert ok, lines


def test_another_pooling_mode_is_a_load_error_naming_the_file(tmp_path):
    folder = write_embedding_checkpoint(tmp_path / "mean")
    path = folder / "1_Pooling" / "config.json"
    pooling = json.loads(path.read_text())
    pooling.update(pooling_mode_lasttoken=False, pooling_mode_mean_tokens=True)
    path.write_text(json.dumps(pooling))
    with pytest.raises(ModelLoadError, match=r"1_Pooling/config.json: pooling mean_tokens"):
        load_folder(folder, torch.device("cpu"), torch.float32)


# -- batching beside generation -----------------------------------------------------------


def test_batches_hold_at_most_the_budget_and_every_input_once():
    lengths = [5, 300, 1, 64, 64, 20, 7, 128, 3]
    batches = plan_batches(lengths, 128)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) * longest <= 128 or len(batch) == 1
    assert [1] in batches  # longer than the budget: alone


def test_a_request_split_into_many_batches_gives_the_same_vectors(folder, reference):
    with fermi.load(folder, max_seq_len=SEQ_LEN, prefill_chunk=16) as small:
        assert len(plan_batches([len(i) for i in small.embedding_ids(TEXTS)], 16)) > 2
        assert close(small.embed(TEXTS), reference)


def test_generation_beside_embeddings_is_unchanged_and_keeps_its_cache(folder, reference):
    """Greedy generations run while embedding requests (in many batches) go through the same
    engine: every token equals the generation alone, every vector the reference, and a
    finished request's kept cache is still reused afterwards."""
    prompts = [[5, 77, 120, 33, 400, 9, 18] * 3, [11, 12, 13, 14] * 5]
    kw = {"max_tokens": 40, "temperature": 0, "ignore_eos": True}
    with fermi.load(folder, max_seq_len=SEQ_LEN, max_batch=2, prefill_chunk=8) as alone:
        expected = [alone.generate(prompt_token_ids=p, **kw).token_ids for p in prompts]
        longer = prompts[0] + expected[0] + [7, 8, 9]
        expected_longer = alone.generate(prompt_token_ids=longer, **kw).token_ids
    with fermi.load(folder, max_seq_len=SEQ_LEN, max_batch=2, prefill_chunk=8) as engine:
        got, vectors, running = {}, [], []
        embed_batch = engine.runner.embed

        def watched(token_ids):  # how many generations were under way at each batch
            running.append(engine.stats().running)
            return embed_batch(token_ids)

        engine.runner.embed = watched

        def generate(i):
            got[i] = engine.generate(prompt_token_ids=prompts[i], **kw).token_ids

        def embed():
            for _ in range(3):
                vectors.append(engine.embed(TEXTS))

        threads = [threading.Thread(target=generate, args=(i,)) for i in range(2)]
        threads += [threading.Thread(target=embed) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [got[0], got[1]] == expected
        assert max(running) > 0 and len(running) > 6  # interleaved with the steps
        assert len(vectors) == 6 and all(close(v, reference) for v in vectors)
        out = engine.generate(prompt_token_ids=longer, **kw)
        assert out.token_ids == expected_longer
        cached = engine.stats().cached_tokens
        assert cached >= len(prompts[0]) + len(expected[0]) - 1


def test_a_cancelled_request_stops_before_its_next_batch(folder):
    with fermi.load(folder, max_seq_len=SEQ_LEN, prefill_chunk=2) as engine:
        ran = []  # the cancelled job's batches the runner embedded
        embed_batch = engine.runner.embed

        def counted(token_ids):
            if token_ids == [[1, 2]]:
                ran.append(1)
            return embed_batch(token_ids)

        engine.runner.embed = counted
        ids = [[1, 2]] * 500  # one batch per input
        future = engine.submit_embedding(ids)
        assert future.cancel()
        ran_by_cancel = len(ran)
        assert engine.embed("still serving").shape == (1, HIDDEN)
        deadline = time.monotonic() + 120  # a guard against a hang, not a speed target
        while engine.load and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.load == 0
        # At most the batch under way when the future was cancelled; none after it.
        assert len(ran) <= ran_by_cancel + 1 < len(ids)


def test_the_cuda_runner_embeds_eagerly_without_recompiling_its_layers(folder, reference):
    """On CPU, with Dynamo's eager backend: the same vectors as the eager runner, and the
    warmed-up layers compile nothing more for decode steps after an embedding."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = load_folder(folder, torch.device("cpu"), torch.float32).model
    runner = CudaGraphRunner(model, 2, SEQ_LEN, 32, backend="eager", use_graphs=False)
    assert runner.capabilities.embeds
    before = dict(counters["stats"])
    ids = [[(7 * i + j) % 400 for j in range(n)] for i, n in enumerate((1, 2, 31, 90))]
    eager = TorchRunner(load_folder(folder, torch.device("cpu"), torch.float32).model, 2, SEQ_LEN)
    assert (runner.embed(ids) - eager.embed(ids)).abs().max().item() < TOL
    runner.prefill(0, [3, 4, 5], 0)
    for where in (3, 4):
        runner.decode_sample(
            [0],
            [6],
            [where],
            runner.sampling,
            use_filters=False,
            use_penalties=False,
            want_logprobs=-1,
        )
    assert dict(counters["stats"]) == before


# -- HTTP ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(folder, tmp_path_factory):
    log = tmp_path_factory.mktemp("embed-log") / "serve.log"
    args = ["--max-seq-len", str(SEQ_LEN), "--max-batch", "2"]
    with running_server(folder, *args, log=log) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)


def test_openai_sdk_embeddings_equal_the_reference_base64_and_float(client, engine, reference):
    tokens = sum(map(len, engine.embedding_ids(TEXTS)))
    out = client.embeddings.create(model="qwen3-embedding", input=TEXTS)  # SDK asks base64
    assert out.object == "list" and out.model == "qwen3-embedding"
    assert [d.index for d in out.data] == list(range(len(TEXTS)))
    assert {d.object for d in out.data} == {"embedding"}
    assert close(torch.tensor([d.embedding for d in out.data]), reference)
    assert (out.usage.prompt_tokens, out.usage.total_tokens) == (tokens, tokens)
    floats = client.embeddings.create(model="qwen3-embedding", input=TEXTS, encoding_format="float")
    assert close(torch.tensor([d.embedding for d in floats.data]), reference)
    short = client.embeddings.create(model="qwen3-embedding", input=TEXTS[0], dimensions=8)
    expected = torch.nn.functional.normalize(reference[:1, :8], dim=-1)
    assert close(torch.tensor([short.data[0].embedding]), expected)


def test_a_null_encoding_format_means_float(base, reference):
    status, _, body = http(base + "/v1/embeddings", {"input": TEXTS[:2], "encoding_format": None})
    assert status == 200
    rows = [d["embedding"] for d in json.loads(body)["data"]]
    assert close(torch.tensor(rows), reference[:2])


def test_raw_base64_is_little_endian_float32(base, reference):
    status, _, body = http(
        base + "/v1/embeddings", {"input": TEXTS[:2], "encoding_format": "base64"}
    )
    assert status == 200
    rows = [
        np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in json.loads(body)["data"]
    ]
    assert close(torch.tensor(np.stack(rows)), reference[:2])


def test_token_id_inputs_over_http(client, engine, reference):
    ids = engine.embedding_ids(TEXTS)
    both = client.embeddings.create(model="qwen3-embedding", input=ids[:2])
    assert close(torch.tensor([d.embedding for d in both.data]), reference[:2])
    one = client.embeddings.create(model="qwen3-embedding", input=ids[3])
    assert close(torch.tensor([one.data[0].embedding]), reference[3:4])
    assert one.usage.prompt_tokens == len(ids[3])


def test_langchain_openai_embeddings_give_the_reference(base, reference):
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: send the texts (not tiktoken's ids of OpenAI models).
    lc = OpenAIEmbeddings(
        model="qwen3-embedding",
        base_url=base + "/v1",
        api_key="x",
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    assert close(torch.tensor(lc.embed_documents(TEXTS)), reference)
    assert close(torch.tensor([lc.embed_query(TEXTS[4])]), reference[4:5])


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"input": ""}, "input", "invalid_value"),
        ({"input": []}, "input", "invalid_type"),
        ({"input": ["a"] * (MAX_INPUTS + 1)}, "input", "invalid_value"),
        ({"input": "word " * 300}, "input", "context_length_exceeded"),
        ({"input": ["a", "word " * 300]}, "input[1]", "context_length_exceeded"),
        ({"input": "a", "dimensions": 0}, "dimensions", "invalid_value"),
        ({"input": "a", "dimensions": HIDDEN + 1}, "dimensions", "invalid_value"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
        ({"dimensions": 8}, "input", "missing_required_parameter"),
    ],
)
def test_bad_requests_are_400_in_openais_shape(base, body, param, code):
    status, _, raw = http(base + "/v1/embeddings", body)
    assert status == 400
    error = json.loads(raw)["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="a")


def test_generation_and_embeddings_together_over_http(base, client, reference):
    """A streamed completion on the embedding model (its head is tied, so it generates)
    while embedding requests arrive: the text is what it is alone, the vectors the
    reference."""
    kw = {"model": "qwen3-embedding", "prompt": "Hello", "max_tokens": 48, "temperature": 0}
    kw["extra_body"] = {"ignore_eos": True}
    alone = client.completions.create(**kw).choices[0].text

    async def together():
        aclient = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        stream = await aclient.completions.create(stream=True, **kw)

        async def read():
            return "".join([c.choices[0].text async for c in stream if c.choices])

        async def embed():
            out = await aclient.embeddings.create(model="qwen3-embedding", input=TEXTS)
            return torch.tensor([d.embedding for d in out.data])

        text, *vectors = await asyncio.gather(read(), *(embed() for _ in range(4)))
        await aclient.close()
        return text, vectors

    text, vectors = asyncio.run(together())
    assert text == alone
    assert all(close(v, reference) for v in vectors)
    assert http(base + "/health")[0] == 200


def test_fuzzed_embedding_bodies_get_no_5xx(base):
    from hypothesis import HealthCheck, given, settings

    openapi = json.loads(http(base + "/openapi.json")[2])

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(bodies(openapi, "/v1/embeddings"))
    def fuzz(body):
        status, headers, raw = http(base + "/v1/embeddings", body)
        check_reply("POST", "/v1/embeddings", status, headers, raw)

    fuzz()
    assert http(base + "/health")[0] == 200


def test_a_generative_model_on_a_runner_that_cannot_embed_is_not_sent_to_its_checkpoint(folder):
    """An export folder (no embedding head known, a runner that cannot embed): the refusal
    does not advise loading "the checkpoint folder" with torch, which would refuse again
    for a generative model; it says what embeds."""
    from tests.tiny import write_checkpoint

    chat = write_checkpoint(folder.parent / "chat-for-runner", {})
    ckpt = load_folder(chat, torch.device("cpu"), torch.float32)
    runner = TorchRunner(ckpt.model, 1, 64)
    runner.capabilities = replace(runner.capabilities, name="onnx", embeds=False)
    engine = fermi.Engine(runner, ckpt.tokenizer, ckpt.generation, "art")
    with engine, pytest.raises(RequestError) as err:
        engine.embed("hello")
    assert err.value.param == "model"
    assert err.value.message.startswith("art, run by the onnx runner, cannot compute embeddings")
    assert "only an embedding checkpoint" in err.value.message
