"""Constrained decoding in the engine's step (``fermi.grammar``): a random-weight model is
the hardest case, since only the grammar's masks can make its output valid."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from fermi.errors import RequestError
from fermi.grammar import Grammar
from fermi.loading import GenerationDefaults
from tests.test_scheduler_overlap import eager, overlapped
from tests.tiny import write_checkpoint
from tests.tiny_tokenizer import TINY_SPECIAL_IDS

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "zip": {"type": "integer"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
CHAT = [{"role": "user", "content": "Describe someone."}]
# Past the limits whatever the model samples: over the tiny tokenizer, this grammar's first
# mask costs llguidance under 10 units of lexer fuel (only `"` may start it) and its second
# about 600, so with 100 a step every reply fails at its second token. (A path-dependent
# trigger, such as SCHEMA with a budget its masks reach only on some paths, passed on one
# machine and not on another.) No other test uses this grammar: the compiled grammar is
# cached with the limits it was built under.
OVER_LIMITS_FUEL = 100
OVER_LIMITS_SCHEMA = {"type": "string", "maxLength": 300}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("grammar") / "qwen3", {}, seed=4)


def _json_request(seed: int, **extra) -> dict:
    return {
        "messages": CHAT,
        "thinking": "off",
        "response_format": RESPONSE_FORMAT,
        "max_tokens": 400,
        "temperature": 1.0,
        "seed": seed,
        **extra,
    }


@pytest.mark.parametrize("make", [eager, overlapped], ids=["eager", "overlapped"])
def test_fifty_seeded_samples_follow_the_schema(folder, make):
    with make(folder) as engine, ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda s: engine.generate(**_json_request(s)), range(50)))
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({o.text for o in outs}) > 40  # sampled, not one forced answer


def count_continued(runner) -> list[bool]:
    """Wrap the runner's masked forward pass; the list records, per masked decode step,
    whether it continued the step in flight (its ids fed back on the device)."""
    continued, forward = [], runner._decode_logits

    def counting(rows):
        continued.append(rows.token_ids is None)
        return forward(rows)

    runner._decode_logits = counting
    return continued


def test_the_overlapped_runner_queues_masked_steps_before_reading_the_last(folder):
    """Steps under a grammar still continue the step in flight: their sampling waits for
    that step's tokens, their forward pass does not."""
    with overlapped(folder) as engine:
        continued = count_continued(engine.runner)
        out = engine.generate(**_json_request(7))
    jsonschema.validate(json.loads(out.text), SCHEMA)
    assert sum(continued) > len(continued) // 2


@pytest.mark.parametrize("make", [eager, overlapped], ids=["eager", "overlapped"])
def test_regex_and_lark_grammars_match_in_full(folder, make):
    pattern = r"[a-z]{3}-[0-9]{2,4}( ok)?"
    lark = 'start: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]{1,3}/'
    with make(folder) as engine:
        for seed in range(10):
            out = engine.generate(
                prompt="Answer:", grammar=Grammar.regex(pattern), max_tokens=40, seed=seed,
                temperature=1.0,
            )  # fmt: skip
            assert re.fullmatch(pattern, out.text), out.text
            assert out.finish_reason == "stop"
            out = engine.generate(
                prompt="Answer:", grammar={"type": "lark", "value": lark}, max_tokens=40,
                seed=seed, temperature=1.0,
            )  # fmt: skip
            assert re.fullmatch(r"yes|no|maybe [0-9]{1,3}", out.text), out.text


@pytest.mark.parametrize("make", [eager, overlapped], ids=["eager", "overlapped"])
def test_a_constrained_row_beside_a_free_one_gives_what_each_gives_alone(folder, make):
    # The constrained reply is 113 tokens; the free one is short, so it ends while the
    # constrained stream still runs even when this thread is scheduled late (CI at 26b208c,
    # on a loaded machine, saw a 40-token free reply end after it).
    free = {"prompt_token_ids": [9, 10, 11], "max_tokens": 12, "ignore_eos": True, "seed": 1}
    with make(folder) as engine:
        free_alone = engine.generate(**free).token_ids
        json_alone = engine.generate(**_json_request(3)).token_ids
        stream = engine.stream(**_json_request(3))
        first = next(stream)
        free_beside = engine.generate(**free).token_ids
        ran_beside = engine.stats().running == 1  # the constrained stream had not ended
        json_beside = first.token_ids + [t for d in stream for t in d.token_ids]
    assert ran_beside
    assert free_beside == free_alone
    assert json_beside == json_alone


@pytest.mark.parametrize("make", [eager, overlapped], ids=["eager", "overlapped"])
def test_streamed_and_whole_results_are_equal(folder, make):
    with make(folder) as engine:
        whole = engine.generate(**_json_request(11))
        deltas = list(engine.stream(**_json_request(11)))
    assert "".join(d.text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert deltas[-1].finish_reason == whole.finish_reason == "stop"


def test_reasoning_is_free_and_the_answer_follows_the_schema(folder):
    """With thinking on, the first token may open a think block; the grammar applies after
    it closes. The bias makes a random model think, then close; the mask still wins over
    the bias once the answer starts."""
    think, close = TINY_SPECIAL_IDS["<think>"], TINY_SPECIAL_IDS["</think>"]
    with eager(folder) as engine:
        request = engine.build_request(
            **{**_json_request(5), "thinking": "on"},
            logit_bias={str(think): 100, str(close): 100},
        )
        assert request.reasoning_may_open
        out = engine.generate_request(request)
    assert out.token_ids[0] == think
    assert close in out.token_ids
    jsonschema.validate(json.loads(out.text), SCHEMA)


@pytest.mark.parametrize("make", [eager, overlapped], ids=["eager", "overlapped"])
def test_a_reply_cannot_end_in_its_reasoning_before_the_grammar_ran(folder, make):
    """An end of sequence inside the think block would end the reply with no constrained
    output at all (an empty answer finishing 'stop'): under a grammar it is masked there.
    The bias makes a random model want to end right after opening the block."""
    think, close = TINY_SPECIAL_IDS["<think>"], TINY_SPECIAL_IDS["</think>"]
    ends = GenerationDefaults(eos_token_ids=(TINY_SPECIAL_IDS["<|im_end|>"],))
    with make(folder, generation=ends) as engine:
        # First token: the grammar forbids ending and closing, so the block opens. In it:
        # ending if it may, else closing.
        bias = {str(think): 80, str(close): 90}
        bias |= {str(eos): 100 for eos in engine.generation.eos_token_ids}
        request = engine.build_request(**{**_json_request(7), "thinking": "on"}, logit_bias=bias)
        out = engine.generate_request(request)
    assert out.token_ids[:2] == [think, close]
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), SCHEMA)


def test_thinking_off_keeps_the_grammar_from_the_first_token(folder):
    with eager(folder) as engine:
        assert not engine.build_request(**_json_request(5)).reasoning_may_open
        plain = engine.build_request(messages=CHAT, thinking="on")
        assert plain.grammar is None and not plain.reasoning_may_open


@pytest.mark.parametrize(
    ("response_format", "param", "words"),
    [
        ("json", "response_format", "type"),
        ({"type": "xml"}, "response_format.type", "xml"),
        ({"type": "json_schema"}, "response_format.json_schema", "json_schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}},
            "response_format.json_schema.name",
            "name",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
            "response_format.json_schema.schema",
            "schema",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "not": {"const": "a"}}},
            },
            "response_format",
            '"not"',  # the keyword, quoted (not the "not" of "cannot")
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"$ref": "#/definitions/missing"}},
            },
            "response_format",
            "missing",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"a": {"minProperties": 2}}},
                },
            },
            "response_format",
            "minProperties 2 needs additionalProperties: false",
        ),
    ],
)
def test_bad_or_unsupported_formats_are_refused_naming_the_problem(
    folder, response_format, param, words
):
    with eager(folder) as engine, pytest.raises(RequestError) as info:
        engine.build_request(messages=CHAT, response_format=response_format)
    assert info.value.param == param
    assert words in info.value.message


@pytest.mark.parametrize(
    ("pattern", "said"),
    [
        ("a(b", "unclosed group"),
        ("[z-a]", "invalid character class range"),
        ("a" * 2000 + "(", "unclosed group"),  # the pattern cut, the reason kept
    ],
)
def test_a_bad_regex_is_refused_saying_what_is_wrong(folder, pattern, said):
    """The compiler reports a regex error over several lines (a drawing, then "error: ...");
    the message keeps what is wrong, and not the position in fermi's own grammar text."""
    with eager(folder) as engine, pytest.raises(RequestError) as info:
        engine.build_request(prompt="x", grammar=Grammar.regex(pattern))
    assert info.value.param == "grammar"
    assert said in info.value.message and pattern[:50] in info.value.message
    assert len(info.value.message) < 200
    assert "\n" not in info.value.message and not re.search(r"at \d+\(", info.value.message)


def test_grammar_and_response_format_together_are_refused(folder):
    with eager(folder) as engine:
        with pytest.raises(RequestError, match="not both"):
            engine.build_request(
                messages=CHAT, response_format={"type": "json_object"},
                grammar=Grammar.regex("a+"),
            )  # fmt: skip
        with pytest.raises(RequestError) as info:
            engine.build_request(prompt="x", grammar={"type": "regex", "value": ""})
        assert info.value.param == "grammar"


def test_text_response_format_means_no_constraint(folder):
    with eager(folder) as engine:
        request = engine.build_request(messages=CHAT, response_format={"type": "text"})
    assert request.grammar is None


@pytest.mark.parametrize(
    "grammar",
    [Grammar.json_schema({"$ref": "#"}), Grammar.regex(r"[^\x00-\U0010FFFF]")],
    ids=["self-reference", "empty-class"],
)
def test_a_grammar_that_matches_nothing_is_refused_not_an_empty_stop(folder, grammar):
    """Such a grammar compiles; before this check the request ended at once with no output
    and finish_reason stop, which JSON mode and parse() then fail on."""
    with eager(folder) as engine, pytest.raises(RequestError, match="matches no output") as info:
        engine.build_request(prompt="x", grammar=grammar)
    assert info.value.param == "grammar"


def test_the_engine_thread_copies_the_grammar_the_request_compiled(folder, monkeypatch):
    """A request carries its compiled grammar: when 64 other grammars pushed it out of the
    cache before it was admitted, the engine's thread still does not compile it again."""
    with eager(folder) as engine:
        request = engine.build_request(**_json_request(3))
        assert request.compiled_grammar is not None
        engine.grammars._cache.clear()  # as if evicted

        def compile_again(*args):
            raise AssertionError("compiled on the engine thread")

        monkeypatch.setattr(engine.grammars, "_prototype", compile_again)
        out = engine.generate_request(request)
    jsonschema.validate(json.loads(out.text), SCHEMA)


def test_a_grammar_past_its_limits_mid_reply_ends_in_an_error_not_a_clean_stop(folder, monkeypatch):
    """With too little fuel a step, llguidance's mask allows only the end: the reply used to
    stop there, cut-off JSON with finish_reason "stop"."""
    import fermi.grammar

    monkeypatch.setitem(fermi.grammar.LIMITS, "step_lexer_fuel", OVER_LIMITS_FUEL)
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "s", "schema": OVER_LIMITS_SCHEMA},
    }
    with eager(folder) as engine:
        with pytest.raises(
            RequestError, match="more work for one token than a request may take"
        ) as info:
            engine.generate(**_json_request(1, response_format=response_format))
        # The request's fault, as a bad parameter is (HTTP 400, gRPC INVALID_ARGUMENT).
        assert (info.value.code, info.value.param) == ("grammar_too_complex", None)
        # The engine goes on serving, and an unconstrained request is untouched.
        assert engine.generate(messages=CHAT, max_tokens=3, thinking="off").finish_reason


def test_a_token_outside_the_grammar_is_not_taken_for_its_limits(folder):
    import torch

    with eager(folder) as engine:
        matcher = engine.grammars.matcher(Grammar.regex("abc"))
        row = torch.zeros((engine.grammars.vocab_size + 31) // 32, dtype=torch.int32)
        matcher.fill(row)
        refused = next(
            i for i in range(engine.grammars.vocab_size) if not row[i // 32] >> i % 32 & 1
        )
        assert not matcher.advance(refused)
        assert matcher.error and not matcher.over_limits


def test_a_tokenizer_llguidance_cannot_read_refuses_constrained_requests_clearly(folder, tmp_path):
    """Before: the engine's background thread died with a traceback, and each constrained
    request then failed with llguidance's ValueError (a 500 on the server)."""
    import shutil

    broken = tmp_path / "no-decoder"
    shutil.copytree(folder, broken)
    spec = json.loads((broken / "tokenizer.json").read_text())
    spec["decoder"] = None  # llguidance cannot tell how ids become text
    (broken / "tokenizer.json").write_text(json.dumps(spec))
    with eager(broken) as engine:
        engine.grammars.wait_prepared()
        for _ in range(2):  # refused every time, not only the first
            with pytest.raises(RequestError, match="llguidance cannot read") as info:
                engine.generate(**_json_request(1))
            assert info.value.param == "response_format"
        # Unconstrained requests are untouched.
        assert engine.generate(messages=CHAT, max_tokens=3, thinking="off").finish_reason


def test_the_grammar_view_of_the_tokenizer_waits_for_an_idle_engine(folder, monkeypatch):
    """llguidance's view of the tokenizer is built on a background thread once the engine
    has idled, not at load: built at load, it held the GIL through the first request of
    `fermi chat` (perf/LOG.md run 32). A constrained request before then builds it itself."""
    import fermi.engine.core as core

    monkeypatch.setattr(core, "IDLE_WORK_AFTER_S", 3600.0)
    with eager(folder) as engine:
        assert engine.grammars._preparing is None  # not started at load
        out = engine.generate(messages=CHAT, max_tokens=3, thinking="off")
        assert out.finish_reason
        assert engine.grammars._preparing is None  # nor by a request that needs no grammar
        # A constrained request before the idle start builds the view on its own thread.
        assert engine.generate(**_json_request(2)).finish_reason
        assert engine.grammars._tok is not None

    monkeypatch.setattr(core, "IDLE_WORK_AFTER_S", 0.05)
    with eager(folder) as engine:
        for _ in range(200):  # an idle engine starts it within IDLE_WORK_AFTER_S
            if engine.grammars._preparing is not None:
                break
            time.sleep(0.05)
        assert engine.grammars._preparing is not None
        engine.grammars.wait_prepared()
        assert engine.grammars._tok is not None
        # Requests still run after the idle work started.
        assert engine.generate(messages=CHAT, max_tokens=3, thinking="off").finish_reason


def test_an_engine_told_not_to_warm_grammars_builds_the_view_at_the_first_constrained_request(
    folder, monkeypatch
):
    """``warm_grammars=False`` (the CLI's chat and generate, which never constrain): the
    view (~56 MB for SmolLM2-135M) is not built when the engine idles; a constrained
    request still gets it."""
    import fermi
    import fermi.engine.core as core

    monkeypatch.setattr(core, "IDLE_WORK_AFTER_S", 0.05)
    with fermi.load(folder, device="cpu", max_batch=1, max_seq_len=512, warm_grammars=False) as e:
        time.sleep(0.5)  # ten times the idle delay
        assert e.grammars._preparing is None and e.grammars._tok is None
        out = e.generate(**_json_request(3))
        jsonschema.validate(json.loads(out.text), SCHEMA)
        assert e.grammars._tok is not None


def test_json_whitespace_between_tokens_is_bounded(folder):
    """The bound is llguidance's ``whitespace_pattern``, which llguidance before 1.8
    ignores (1.6 and 1.7 took 50 spaces in a row here, and a random model then spent its
    whole budget on whitespace): hence pyproject's floor."""
    with eager(folder) as engine:
        tokenizer = engine.tokenizer
        for grammar in (Grammar.json_object(), Grammar.json_schema(SCHEMA)):
            matcher = engine.grammars.matcher(grammar)
            assert all(matcher.advance(t) for t in tokenizer.encode("{"))
            space = tokenizer.encode(" ")
            taken = 0
            while taken < 50 and all(matcher.advance(t) for t in space):
                taken += 1
            assert taken == 1, f"{grammar.kind}: {taken} spaces in a row"


@pytest.mark.parametrize(
    ("grammar", "text"),
    [
        (Grammar.json_schema({"const": "<think>"}), '"<think>"'),
        (Grammar.json_schema({"const": "</tool_call>"}), '"</tool_call>"'),
        (Grammar.json_schema({"type": "string", "pattern": "^<\\|im_end\\|>$"}), '"<|im_end|>"'),
        (Grammar.regex("x</think>y"), "x</think>y"),
        (Grammar.regex("<think>ab"), "<think>ab"),
        (Grammar.lark('start: "<tool_call>" "x"'), "<tool_call>x"),
    ],
)
def test_text_a_grammar_forces_is_spelled_out_even_where_it_is_an_added_token(
    folder, grammar, text
):
    """The text of an added token (``<think>``, ``<|im_end|>``), forced by a grammar, comes
    in ordinary tokens: the tokenizer's encode returned the added token, which llguidance
    keeps out of text, and every reply failed with a grammar error (a 500 over HTTP)."""
    with eager(folder) as engine:
        added = set(engine.tokenizer.backend.get_added_tokens_decoder())
        for seed in range(3):
            out = engine.generate(
                prompt="x", grammar=grammar, max_tokens=40, temperature=1.0, seed=seed
            )
            assert (out.finish_reason, out.text) == ("stop", text)
            assert not added & set(out.token_ids[:-1])  # (the last is the end of text)


def test_a_grammar_names_an_added_token_as_a_token(folder):
    with eager(folder) as engine:
        think = engine.tokenizer.token_to_id("<think>")
        out = engine.generate(prompt="x", grammar=Grammar.lark('start: <think> "x"'), max_tokens=9)
        assert (out.finish_reason, out.text, out.token_ids[0]) == ("stop", "<think>x", think)


def test_min_properties_holds_where_no_key_can_repeat(folder):
    """A repeated key counts once in the parsed object, and llguidance keeps only listed
    keys from repeating: with additional keys allowed, ``{"b": 1, "b": 2}`` passed the
    grammar and failed ``minProperties: 2`` (hence the refusal above). Closed (and, as
    llguidance asks, every listed key required), it is served."""
    schema = {
        "type": "object",
        "properties": {k: {"type": "integer", "maximum": 9} for k in "abc"},
        "required": list("abc"),
        "minProperties": 2,
        "additionalProperties": False,
    }
    with eager(folder) as engine:
        for seed in range(8):
            out = engine.generate(
                prompt="x", grammar=Grammar.json_schema(schema), max_tokens=80, seed=seed,
                temperature=1.0,
            )  # fmt: skip
            if out.finish_reason == "stop":
                jsonschema.validate(json.loads(out.text), schema)


def _sentencepiece_shaped(normalized: bool):
    """A Llama-2-shaped tokenizer: "▁" for spaces, put before the text by a Prepend
    normalizer (``normalized``) or by Metaspace's "first" prepend scheme, byte fallback."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁"]
    pieces += [c for c in 'abcdefghijklmnopqrstuvwxyz{}":,<>/|' if c not in pieces]
    pieces += ["▁a", "ab", "▁ab", "hi", "▁hi"]
    merges = [("▁", "a"), ("a", "b"), ("▁a", "b"), ("h", "i"), ("▁", "hi")]
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    if normalized:
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    # (the decoder llguidance reads: it cannot read a Metaspace decoder)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok


@pytest.mark.parametrize("normalized", [True, False], ids=["prepend-normalizer", "metaspace"])
def test_forced_text_is_encoded_without_a_prefix_space_on_sentencepiece_tokenizers(normalized):
    """The view's encoder runs the tokenizer's own normalizer and pre-tokenizer, which on
    Llama-2-shaped tokenizers put "▁" before the text: every forced piece came out with a
    space in front (" {" for "{"), and every constrained reply failed."""
    from fermi.grammar import _TextTokens

    tok = _sentencepiece_shaped(normalized)
    view = _TextTokens(tok, 2, tok.get_vocab_size())
    for text in ("hi ab", "{", '"ab"'):
        assert b"".join(view.tokens[t] for t in view(text)) == text.encode()
