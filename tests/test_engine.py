"""The engine end to end on a tiny random Qwen3: scheduling, stopping, seeds, threads."""

from __future__ import annotations

import threading

import pytest
import torch

import fermi
from fermi.engine.output import OutputStream
from fermi.errors import RequestError
from tests.tiny import every_slot_back, write_checkpoint
from tests.tiny_tokenizer import TINY_SPECIAL_IDS

IM_END = TINY_SPECIAL_IDS["<|im_end|>"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("engine") / "qwen3", {})


@pytest.fixture(scope="module")
def engine(folder):
    eng = fermi.load(folder, max_batch=4, max_seq_len=256)
    yield eng
    eng.close()


def greedy_reference(folder, prompt_ids: list[int], n: int) -> list[int]:
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


PROMPT = [5, 77, 120, 33, 400, 9, 18]


def test_greedy_generation_equals_transformers_generate(engine, folder):
    out = engine.generate(prompt_token_ids=PROMPT, max_tokens=40, temperature=0, ignore_eos=True)
    assert out.token_ids == greedy_reference(folder, PROMPT, 40)
    assert out.finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(PROMPT), 40)


def test_chunked_prefill_equals_single_prefill(folder, engine):
    prompt = [(i * 37) % 440 for i in range(70)]
    whole = engine.generate(prompt_token_ids=prompt, max_tokens=12, temperature=0, ignore_eos=True)
    with fermi.load(folder, max_batch=2, max_seq_len=256, prefill_chunk=16) as chunked:
        parts = chunked.generate(
            prompt_token_ids=prompt, max_tokens=12, temperature=0, ignore_eos=True
        )
    assert parts.token_ids == whole.token_ids


def test_concurrent_requests_each_equal_their_solo_run(engine):
    prompts = [PROMPT, [9, 8, 7], [100 + i for i in range(25)], [3] * 11, [44, 45]]
    kinds = [
        {"temperature": 0},
        {"temperature": 0.9, "seed": 11},
        {"temperature": 1.0, "top_p": 0.9, "seed": 5},
        {"temperature": 0.7, "top_k": 20, "seed": 3, "presence_penalty": 0.5},
        {"temperature": 0},
    ]
    solo = [
        engine.generate(prompt_token_ids=p, max_tokens=24, ignore_eos=True, **k).token_ids
        for p, k in zip(prompts, kinds, strict=True)
    ]
    results: list[list[int] | None] = [None] * len(prompts)

    def run(i):
        out = engine.generate(
            prompt_token_ids=prompts[i], max_tokens=24, ignore_eos=True, **kinds[i]
        )
        results[i] = out.token_ids

    # Five requests on four slots: one waits for a free slot, the rest share the batch.
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == solo


def test_same_seed_same_output_and_different_seed_differs(engine):
    a = engine.generate(prompt="Once upon", max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    b = engine.generate(prompt="Once upon", max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    c = engine.generate(prompt="Once upon", max_tokens=16, temperature=1.0, seed=8, ignore_eos=True)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stop_string_split_across_tokens_is_not_emitted(engine):
    full = engine.generate(prompt="The quick", max_tokens=30, temperature=0, ignore_eos=True)
    text = full.text
    assert len(text) > 12
    stop = text[5:11]  # six characters, almost surely spanning a token boundary
    out = engine.generate(prompt="The quick", max_tokens=30, temperature=0, stop=[stop])
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]
    streamed = "".join(
        d.text for d in engine.stream(prompt="The quick", max_tokens=30, temperature=0, stop=stop)
    )
    assert streamed == out.text


def test_eos_token_stops_generation(folder):
    probe = fermi.load(folder, max_batch=1, max_seq_len=128)
    ids = probe.generate(prompt_token_ids=PROMPT, max_tokens=10, temperature=0, ignore_eos=True)
    probe.close()
    # Pretend the model's fifth greedy token is its eos: generation must end right there.
    with fermi.load(folder, max_batch=1, max_seq_len=128) as engine:
        eos = ids.token_ids[4]
        engine.generation = type(engine.generation)(eos_token_ids=(eos,))
        out = engine.generate(prompt_token_ids=PROMPT, max_tokens=10, temperature=0)
    first = ids.token_ids.index(eos)
    assert out.finish_reason == "stop"
    assert out.token_ids == ids.token_ids[: first + 1]


def test_max_tokens_and_context_end_give_length(engine):
    out = engine.generate(prompt_token_ids=PROMPT, max_tokens=3, temperature=0, ignore_eos=True)
    assert (out.finish_reason, len(out.token_ids)) == ("length", 3)
    long_prompt = [7] * 250  # context 256: room for 6 tokens
    out = engine.generate(
        prompt_token_ids=long_prompt, max_tokens=100, temperature=0, ignore_eos=True
    )
    assert (out.finish_reason, len(out.token_ids)) == ("length", 6)


def test_prompt_longer_than_context_is_rejected_or_truncated(engine):
    ids = list(range(1, 301))  # distinct, so the kept part shows which end it came from
    with pytest.raises(RequestError, match="256") as err:
        engine.generate(prompt_token_ids=ids, max_tokens=4)
    assert err.value.param == "prompt_token_ids"
    out = engine.generate(prompt_token_ids=ids, max_tokens=4, truncate=True, ignore_eos=True)
    assert out.usage.prompt_tokens == 252
    assert len(out.token_ids) == 4
    request = engine.build_request(prompt_token_ids=ids, max_tokens=4, truncate=True)
    assert request.prompt_ids == tuple(ids[-252:])


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}
TEXT = {"type": "text", "text": "what is this?"}


def _deep(levels: int, leaf):
    for _ in range(levels):
        leaf = [leaf]
    return leaf


DEEP_LIST = _deep(600, "x")
_schema: dict = {"type": "string"}
for _ in range(200):
    _schema = {"type": "object", "properties": {"a": _schema}}
DEEP_TOOL = {"type": "function", "function": {"name": "f", "parameters": _schema}}


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({}, "messages"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "messages"),
        ({"prompt": "a", "temperature": -1}, "temperature"),
        ({"prompt": "a", "top_p": 0}, "top_p"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt_token_ids": [1, 99999]}, "prompt_token_ids"),
        ({"messages": []}, "messages"),
        ({"prompt": "a", "thinking": "maybe"}, "thinking"),
        # (each below was accepted: the first failed every request in its batch, the next
        # ones were dropped or ignored without a word, the deep ones a RecursionError)
        # (a stop string met inside the grammar's output ended it unfinished, as "stop")
        ({"prompt": "d", "grammar": {"type": "regex", "value": "[0-9]{4}"}, "stop": ["-"]}, "stop"),
        ({"prompt": "d", "response_format": {"type": "json_object"}, "stop": ['"']}, "stop"),
        ({"prompt_token_ids": [1.9, 2.2]}, "prompt_token_ids"),  # (was: truncated to 1, 2)
        ({"prompt_token_ids": [True, 3]}, "prompt_token_ids"),
        ({"prompt_token_ids": ["12"]}, "prompt_token_ids"),
        ({"prompt": "a", "skip_special_tokens": "no"}, "skip_special_tokens"),
        ({"prompt": "a", "truncate": "yes"}, "truncate"),
        ({"prompt": "a", "thinking": "on"}, "thinking"),
        ({"prompt_token_ids": [1, 2], "thinking": "off"}, "thinking"),
        ({"messages": [{"role": "user", "content": [IMAGE, TEXT]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": [1, 2]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "a", "x": DEEP_LIST}]}, "messages"),
        ({"messages": [{"role": "user", "content": "a"}], "tools": [DEEP_TOOL]}, "tools"),
    ],
)
def test_bad_requests_raise_request_error_naming_the_field(engine, kwargs, param):
    with pytest.raises(RequestError) as err:
        engine.generate(**kwargs)
    assert err.value.param == param


def test_closing_a_stream_cancels_and_frees_the_slot(engine):
    stream = engine.stream(prompt_token_ids=PROMPT, max_tokens=200, temperature=0, ignore_eos=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    for _ in range(200):
        if engine.load == 0:
            break
        threading.Event().wait(0.01)
    assert engine.load == 0
    assert every_slot_back(engine)


def test_logprobs_are_returned_for_each_token(engine):
    out = engine.generate(
        prompt_token_ids=PROMPT, max_tokens=5, temperature=0, logprobs=3, ignore_eos=True
    )
    assert out.logprobs is not None and len(out.logprobs) == 5
    for lp, tok in zip(out.logprobs, out.token_ids, strict=True):
        assert lp.token_id == tok
        assert lp.logprob <= 0
        assert len(lp.top) == 3
        assert lp.top[0].token_id == tok  # greedy: the chosen token is the most likely


def test_thinking_off_renders_an_empty_think_block(engine):
    msgs = [{"role": "user", "content": "hi"}]
    off = engine.chat_prompt(msgs, "off")
    on = engine.chat_prompt(msgs, "on")
    assert off.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.text.endswith("<|im_start|>assistant\n")
    assert not off.start_in_reasoning and not on.start_in_reasoning


def test_thinking_off_uses_non_thinking_sampling_defaults(engine):
    req = engine.build_request(messages=[{"role": "user", "content": "hi"}], thinking="off")
    assert (req.params.temperature, req.params.top_p, req.params.top_k) == (0.7, 0.8, 20)
    req = engine.build_request(
        messages=[{"role": "user", "content": "hi"}], thinking="off", temperature=0.2
    )
    assert req.params.temperature == 0.2 and req.params.top_p == 1.0


def test_output_stream_splits_reasoning_and_stops_at_eos(engine):
    tok = engine.tokenizer
    req = engine.build_request(messages=[{"role": "user", "content": "hi"}], thinking="on")
    stream = OutputStream(tok, req)
    ids = [*tok.encode("<think>\nLet me see.\n</think>\n\nParis."), IM_END]
    reasoning, text, reason = "", "", None
    for t in ids:
        delta, reason = stream.push(t)
        reasoning, text = reasoning + delta.reasoning, text + delta.text
        if reason:
            break
    final = stream.finish(reason)
    reasoning, text = reasoning + final.reasoning, text + final.text
    assert reason == "stop"
    assert reasoning.strip() == "Let me see."
    assert text == "Paris."


def test_generation_config_defaults_apply(folder, tmp_path):
    import json
    import shutil

    copy = tmp_path / "greedy"
    shutil.copytree(folder, copy)
    gen = json.loads((copy / "generation_config.json").read_text())
    gen.update(do_sample=False, temperature=0.6, top_k=20)
    (copy / "generation_config.json").write_text(json.dumps(gen))
    with fermi.load(copy, max_batch=1, max_seq_len=64) as eng:
        req = eng.build_request(prompt="hi")
        assert req.params.temperature == 0.0 and req.params.top_k == 20
        assert req.eos_token_ids == {IM_END, TINY_SPECIAL_IDS["<|endoftext|>"]}


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"seed": "1"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"stop": [5]}, "stop"),
        ({"logprobs": 1.5}, "logprobs"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": float("inf")}, "temperature"),
    ],
)
def test_wrongly_typed_fields_are_request_errors(engine, kwargs, param):
    with pytest.raises(RequestError) as err:
        engine.generate(prompt="a", **kwargs)
    assert err.value.param == param


def test_a_request_that_fails_at_admission_fails_alone(engine):
    """A malformed request that slips past validation ends with an error; a request running
    beside it is untouched and every slot comes back."""
    import dataclasses

    from fermi.errors import FermiError

    innocent = engine.stream(prompt_token_ids=PROMPT, max_tokens=60, temperature=0, ignore_eos=True)
    first = next(innocent)
    good = engine.build_request(prompt_token_ids=PROMPT, max_tokens=4)
    bad = dataclasses.replace(good, params=dataclasses.replace(good.params, seed="x"))
    with pytest.raises(FermiError, match="TypeError"):
        engine.generate_request(bad)
    rest = list(innocent)
    assert len(first.token_ids) + sum(len(d.token_ids) for d in rest) == 60
    assert rest[-1].finish_reason == "length"
    solo = engine.generate(prompt_token_ids=PROMPT, max_tokens=60, temperature=0, ignore_eos=True)
    assert first.token_ids + [t for d in rest for t in d.token_ids] == solo.token_ids
    assert engine.load == 0
    assert every_slot_back(engine)


def test_a_vanishing_temperature_is_greedy(engine):
    greedy = engine.generate(prompt_token_ids=PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
    tiny = engine.generate(
        prompt_token_ids=PROMPT, max_tokens=8, temperature=1e-40, logprobs=0, ignore_eos=True
    )
    assert tiny.token_ids == greedy.token_ids
    assert all(lp.logprob == lp.logprob for lp in tiny.logprobs)  # no NaN


def test_truncate_without_max_tokens_leaves_room_to_answer(engine):
    ids = list(range(1, 301))
    out = engine.generate(prompt_token_ids=ids, truncate=True, temperature=0, ignore_eos=True)
    assert out.usage.prompt_tokens == 256 - 64
    assert len(out.token_ids) == 64
    assert engine.build_request(prompt_token_ids=ids, truncate=True).prompt_ids == tuple(
        ids[-(256 - 64) :]
    )


def test_truncate_with_max_tokens_near_the_context_keeps_half_the_context_of_prompt(engine):
    """max_tokens 250 of a 256-token context: the prompt keeps its last 128 tokens (was: 6,
    and 1 with max_tokens at the context), and the reply gets the other 128."""
    ids = list(range(1, 301))
    for asked in (250, 256, 1000):
        request = engine.build_request(prompt_token_ids=ids, max_tokens=asked, truncate=True)
        assert request.prompt_ids == tuple(ids[-128:])
        assert request.max_tokens == 128
    short = engine.build_request(prompt_token_ids=ids, max_tokens=16, truncate=True)
    assert short.prompt_ids == tuple(ids[-240:])  # (room for 16, as before)


def test_build_request_takes_settings_and_keywords_the_keywords_winning(engine):
    from fermi.engine.requests import SamplingSettings

    settings = SamplingSettings(temperature=0.5, top_k=7, max_tokens=3)
    req = engine.build_request(prompt="a", settings=settings, temperature=0.0)
    assert (req.params.temperature, req.params.top_k, req.max_tokens) == (0.0, 7, 3)
    assert settings.temperature == 0.5  # the caller's settings are left as they were
    # a keyword passed as None is not given (wrappers pass None for "unset"): it does not
    # wipe the setting back to the model's default
    req = engine.build_request(prompt="a", settings=settings, temperature=None, top_k=None)
    assert (req.params.temperature, req.params.top_k) == (0.5, 7)
    # settings may be a dict of the same fields, checked as keywords are
    req = engine.build_request(prompt="a", settings={"temperature": 0.0, "max_tokens": 2})
    assert (req.params.temperature, req.max_tokens) == (0.0, 2)
    with pytest.raises(TypeError, match="settings got an unexpected keyword argument 'temp'"):
        engine.build_request(prompt="a", settings={"temp": 0.0})
    with pytest.raises(TypeError, match="settings must be a SamplingSettings or a dict"):
        engine.build_request(prompt="a", settings=[("temperature", 0.0)])


def test_prompt_token_ids_may_be_any_iterable_of_integers(engine):
    """A generator is read once (it was used up by the type check, leaving "the prompt is
    empty"); numpy's integers count as integers, bools do not."""
    import numpy as np

    want = engine.build_request(prompt_token_ids=PROMPT, max_tokens=2).prompt_ids
    got = engine.build_request(prompt_token_ids=(t for t in PROMPT), max_tokens=2).prompt_ids
    assert got == want
    ids = np.array(PROMPT, dtype=np.int64)
    assert engine.build_request(prompt_token_ids=ids, max_tokens=2).prompt_ids == want
    with pytest.raises(RequestError, match="list of integers"):
        engine.build_request(prompt_token_ids=iter([1, True]), max_tokens=2)
    for raw in (b"ab", bytearray(b"ab"), memoryview(b"ab")):  # bytes iterate as ints
        with pytest.raises(RequestError, match="list of integers"):
            engine.build_request(prompt_token_ids=raw, max_tokens=2)


def test_an_unknown_keyword_of_build_request_is_a_type_error(engine):
    with pytest.raises(TypeError, match="'temprature'"):
        engine.build_request(prompt="a", temprature=0.5)


def test_close_called_from_a_sink_stops_the_engine_without_a_self_join(folder):
    """A sink runs on the engine thread: close() there raised "cannot join current thread"
    (caught and logged by the engine) instead of stopping it."""
    import threading

    eng = fermi.load(folder, max_batch=2, max_seq_len=64)
    errors = []
    done = threading.Event()

    def sink(delta):
        if delta.finish_reason is None:
            try:
                eng.close()
            except Exception as exc:
                errors.append(exc)
        else:
            done.set()

    eng.submit(eng.build_request(prompt_token_ids=PROMPT, max_tokens=20), sink)
    assert done.wait(30)
    eng._core._thread.join(30)
    assert not errors and not eng._core._thread.is_alive()
    with pytest.raises(RuntimeError):
        eng.generate(prompt_token_ids=PROMPT, max_tokens=2)


def test_submit_refuses_what_is_not_a_request_or_a_sink(engine):
    """Refused at once, in the caller's thread (a None sink was accepted and failed later,
    on the engine thread, only in the log)."""
    request = engine.build_request(prompt_token_ids=PROMPT, max_tokens=2)
    with pytest.raises(TypeError, match="sink must be callable"):
        engine.submit(request, None)
    with pytest.raises(TypeError, match="GenerationRequest"):
        engine.submit("hello", print)
    assert engine.load == 0
