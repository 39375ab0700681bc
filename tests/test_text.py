"""Tests for fermi.text: tokenizer, chat template, detokenizer, reasoning split, stop strings."""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
import tracemalloc
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
import tokenizers

from fermi.engine.types import GenerationRequest
from fermi.errors import RequestError
from fermi.sampling import SamplingParams
from fermi.text.detokenize import IncrementalDetokenizer
from fermi.text.reasoning import ReasoningSplitter, split_reasoning
from fermi.text.stops import StopStringMatcher, StopStrings
from fermi.text.tokenizer import ChatTemplateError, Tokenizer
from tests.tiny_tokenizer import TINY_SPECIAL_IDS, TINY_VOCAB_SIZE, write_tiny_tokenizer

MULTILINGUAL = "Hello, world! Grüße aus München. 你好，世界！こんにちは 😀🎉👍🏽 Привет ❤️ done."

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
    {"role": "user", "content": "And 3+3?"},
]

EXPECTED_PREFIX = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n"
    "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_qwen3")
    write_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tok(tiny_folder: Path) -> Tokenizer:
    return Tokenizer.from_folder(tiny_folder)


def _backend(folder: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


# --- tokenizer -------------------------------------------------------------------------


def test_encode_decode_round_trips_multilingual_text(tok: Tokenizer) -> None:
    ids = tok.encode(MULTILINGUAL)
    assert len(ids) > 10
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == MULTILINGUAL


def test_special_and_think_tokens_encode_to_single_ids(tok: Tokenizer) -> None:
    assert tok.vocab_size == TINY_VOCAB_SIZE
    for text, token_id in TINY_SPECIAL_IDS.items():
        assert tok.encode(text) == [token_id]
        assert tok.token_to_id(text) == token_id
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == TINY_SPECIAL_IDS["<|im_start|>"]
    assert ids[-1] == TINY_SPECIAL_IDS["<|im_end|>"]
    assert tok.token_to_id("<|not_a_token|>") is None


def test_special_ids_hold_only_special_added_tokens(tok: Tokenizer) -> None:
    assert tok.special_ids == {
        TINY_SPECIAL_IDS["<|endoftext|>"],
        TINY_SPECIAL_IDS["<|im_start|>"],
        TINY_SPECIAL_IDS["<|im_end|>"],
    }
    assert tok.eos_token_id == TINY_SPECIAL_IDS["<|im_end|>"]
    assert tok.bos_token_id is None


def test_decode_skip_special_tokens_keeps_think_tags(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\n<think>x</think>y<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>x</think>y"
    assert tok.decode(ids) == "<|im_start|>assistant\n<think>x</think>y<|im_end|>"


def test_add_bos_prepends_bos_only_with_special_tokens(tiny_folder: Path) -> None:
    tok = Tokenizer(_backend(tiny_folder), None, "<|endoftext|>", "<|im_end|>", add_bos=True)
    bos = TINY_SPECIAL_IDS["<|endoftext|>"]
    assert tok.encode("hi", add_special_tokens=True)[0] == bos
    assert tok.encode("<|endoftext|>hi", add_special_tokens=True).count(bos) == 1
    assert bos not in tok.encode("hi")


def test_from_folder_without_tokenizer_json_names_folder_and_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        Tokenizer.from_folder(tmp_path)
    assert "tokenizer.json" in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_from_folder_without_config_has_no_template(tiny_folder: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_folder / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.chat_template is None and tok.eos_token_id is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_plain_variant_has_no_chat_template(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path, template="plain")
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.chat_template is None
    assert tok.eos_token_id == TINY_SPECIAL_IDS["<|im_end|>"]
    with pytest.raises(ValueError, match="no chat template"):
        tok.render_prompt_ids([{"role": "user", "content": "hi"}], None)


def test_from_folder_reads_template_list_and_dict_tokens(tiny_folder: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_folder / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "[{{ bos_token }}|{{ eos_token }}]"},
        ],
        "bos_token": {"content": "<|endoftext|>", "special": True, "__type": "AddedToken"},
        "eos_token": {"content": "<|im_end|>", "lstrip": False},
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.apply_chat_template([]) == "[<|endoftext|>|<|im_end|>]"
    assert tok.bos_token_id == TINY_SPECIAL_IDS["<|endoftext|>"]
    assert tok.eos_token_id == TINY_SPECIAL_IDS["<|im_end|>"]


def test_chat_template_jinja_file_overrides_config(tiny_folder: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_folder / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text("FILE {{ messages | length }}")
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "FILE 1"


# --- chat template -----------------------------------------------------------------------


def test_template_renders_multi_turn_and_strips_past_reasoning(tok: Tokenizer) -> None:
    assert tok.apply_chat_template(CONVERSATION) == EXPECTED_PREFIX
    # enable_thinking=True behaves like "not given": the model decides to think.
    assert tok.apply_chat_template(CONVERSATION, enable_thinking=True) == EXPECTED_PREFIX


def test_template_thinking_off_appends_empty_think_block(tok: Tokenizer) -> None:
    rendered = tok.apply_chat_template(CONVERSATION, enable_thinking=False)
    assert rendered == EXPECTED_PREFIX + "<think>\n\n</think>\n\n"


def test_template_keeps_reasoning_after_last_user_turn(tok: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>greet</think>Hello"},
    ]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert rendered == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>greet</think>Hello<|im_end|>\n"
    )


def test_render_prompt_ids_encodes_rendered_prompt(tok: Tokenizer) -> None:
    ids = tok.render_prompt_ids(CONVERSATION, False)
    assert ids == tok.encode(EXPECTED_PREFIX + "<think>\n\n</think>\n\n")
    assert ids.count(TINY_SPECIAL_IDS["<|im_start|>"]) == 5
    think_at = len(ids) - 1 - ids[::-1].index(TINY_SPECIAL_IDS["<think>"])
    assert TINY_SPECIAL_IDS["</think>"] in ids[think_at:]
    assert tok.decode(ids[think_at:]) == "<think>\n\n</think>\n\n"
    assert tok.decode(ids) == EXPECTED_PREFIX + "<think>\n\n</think>\n\n"


def _with_template(tiny_folder: Path, template: str) -> Tokenizer:
    return Tokenizer(_backend(tiny_folder), template, None, "<|im_end|>")


def test_enable_thinking_is_undefined_unless_given(tiny_folder: Path) -> None:
    tok = _with_template(tiny_folder, "{{ enable_thinking is defined }}/{{ enable_thinking }}")
    assert tok.apply_chat_template([]) == "False/"
    assert tok.apply_chat_template([], enable_thinking=False) == "True/False"


def test_tojson_filter_matches_transformers(tiny_folder: Path) -> None:
    tok = _with_template(tiny_folder, "{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}")
    tools = [{"name": "météo", "html": "<a & 'b'>"}]
    rendered = tok.apply_chat_template([], tools=tools)
    compact, indented = rendered.split("|", 1)
    assert compact == '[{"name": "météo", "html": "<a & \'b\'>"}]'
    assert indented == json.dumps(tools[0], ensure_ascii=False, indent=2)


def test_raise_exception_becomes_value_error(tiny_folder: Path) -> None:
    tok = _with_template(tiny_folder, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template([])
    assert issubclass(ChatTemplateError, ValueError)
    assert issubclass(ChatTemplateError, RequestError)


def test_strftime_loopcontrols_and_generation_tag_work(tiny_folder: Path) -> None:
    template = (
        "{{ strftime_now('%Y') }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    )
    tok = _with_template(tiny_folder, template)
    rendered = tok.apply_chat_template([{"role": "user", "content": "a"}, {"content": "b"}])
    assert rendered == f"{datetime.now().year}a"


def test_template_sees_none_fields_as_missing_but_content_as_empty(tiny_folder: Path) -> None:
    """A None field is left out (a template would write "None"); a None or missing
    content is "" (templates such as Qwen3's read it unguarded)."""
    tok = _with_template(
        tiny_folder, "{{ messages[0].name is defined }}|{{ messages[0].content | tojson }}"
    )
    message = {"role": "assistant", "content": None, "name": None}
    assert tok.apply_chat_template([message]) == 'False|""'
    assert tok.apply_chat_template([{"role": "assistant"}]) == 'False|""'
    assert message == {"role": "assistant", "content": None, "name": None}  # left untouched


def test_invalid_template_syntax_is_value_error(tiny_folder: Path) -> None:
    tok = _with_template(tiny_folder, "{% for %}")
    with pytest.raises(ValueError, match="does not compile"):
        tok.apply_chat_template([])


def test_chat_template_matches_transformers(tiny_folder: Path, tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tiny_folder))
    conversations = [
        CONVERSATION,
        [*CONVERSATION, {"role": "assistant", "content": "<think>add</think>\n\n6"}],
        [{"role": "user", "content": MULTILINGUAL}],
    ]
    for messages in conversations:
        for add_prompt in (True, False):
            for thinking in (None, True, False):
                extra = {} if thinking is None else {"enable_thinking": thinking}
                expected = hf.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_prompt, **extra
                )
                ours = tok.apply_chat_template(
                    messages, add_generation_prompt=add_prompt, enable_thinking=thinking
                )
                assert ours == expected
    prompt = tok.apply_chat_template(CONVERSATION, enable_thinking=False)
    assert tok.encode(prompt) == hf.encode(prompt, add_special_tokens=False)


# --- detokenizer -------------------------------------------------------------------------


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


def test_detokenizer_deltas_concatenate_to_full_decode(tok: Tokenizer) -> None:
    ids = tok.encode(MULTILINGUAL)
    # The test is only meaningful if some tokens hold part of a multi-byte character.
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)
    deltas = _stream(IncrementalDetokenizer(tok), ids)
    assert "".join(deltas) == tok.decode(ids) == MULTILINGUAL
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[-1] == ""  # nothing left over for flush


def test_detokenizer_skips_special_tokens_by_default(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\n<think>r</think>Hi 😀<|im_end|>")
    assert "".join(_stream(IncrementalDetokenizer(tok), ids)) == "assistant\n<think>r</think>Hi 😀"
    kept = "".join(_stream(IncrementalDetokenizer(tok, skip_special_tokens=False), ids))
    assert kept == tok.decode(ids)


def test_detokenizer_flush_releases_incomplete_character(tok: Tokenizer) -> None:
    ids = tok.encode("ok 😀")
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids[:-1]]  # stop before the emoji's last byte
    truncated = tok.decode(ids[:-1])
    assert truncated.startswith("ok") and truncated.endswith("\ufffd")
    assert not any("\ufffd" in d for d in deltas)
    tail = detok.flush()
    assert "\ufffd" in tail
    assert "".join(deltas) + tail == truncated
    assert detok.flush() == ""


def test_detokenizer_with_prompt_context_emits_only_generated_text(tok: Tokenizer) -> None:
    prompt = tok.render_prompt_ids(CONVERSATION, None)
    generated = tok.encode("<think>\nhm</think>\n\nSix 六 🎲")
    text = "".join(_stream(IncrementalDetokenizer(tok, prompt_ids=prompt), generated))
    assert text == tok.decode(generated)


class _CountingTokenizer(Tokenizer):
    """Records the longest id list decoded, to check the detokenizer's window stays small."""

    longest = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.longest = max(self.longest, len(ids))
        return super().decode(ids, skip_special_tokens)


def test_detokenizer_decodes_a_bounded_window(tiny_folder: Path) -> None:
    counting = _CountingTokenizer(_backend(tiny_folder), None, None, None)
    ids = counting.encode(MULTILINGUAL * 20)
    deltas = _stream(IncrementalDetokenizer(counting), ids)
    assert "".join(deltas) == MULTILINGUAL * 20
    assert len(ids) > 500
    assert counting.longest <= 8


# --- reasoning split ---------------------------------------------------------------------

# (output, start_in_reasoning, expected reasoning, expected content)
REASONING_CASES = [
    (
        "<think>\nLet me think.\n</think>\n\nThe answer is 4.",
        False,
        "Let me think.\n",
        "The answer is 4.",
    ),
    (" \n<think>plan</think>answer", False, "plan", "answer"),
    ("Just an answer, no <think> here.", False, "", "Just an answer, no <think> here."),
    ("<thinking is not a tag", False, "", "<thinking is not a tag"),
    ("<<think>x", False, "", "<<think>x"),
    ("<think>\n\n</think>\n\nNo reasoning.", False, "", "No reasoning."),
    ("<think>a</think>b</think>c<think>d", False, "a", "b</think>c<think>d"),
    ("<think>\nunfinished </thi", False, "unfinished </thi", ""),
    ("<thi", False, "", "<thi"),
    ("  ", False, "", "  "),
    ("", False, "", ""),
    ("\nLet me think.\n</think>\n\nAnswer.", True, "Let me think.\n", "Answer."),
    ("a </ b </think", True, "a </ b </think", ""),
    ("a </ b </think>c", True, "a </ b ", "c"),
    ("<think>\nredundant tag</think>x", True, "redundant tag", "x"),
    ("</think>\n\nonly content", True, "", "only content"),
    ("still thinking when cut off", True, "still thinking when cut off", ""),
    ("\n\n", True, "", ""),
]


def _split_streamed(
    text: str, start: bool, cuts: list[int], answer_tags: tuple[str, str] | None = None
) -> tuple[str, str]:
    splitter = ReasoningSplitter(start, answer_tags=answer_tags)
    reasoning, content = [], []
    for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
        r, c = splitter.feed(text[a:b])
        reasoning.append(r)
        content.append(c)
    r, c = splitter.flush()
    return "".join(reasoning) + r, "".join(content) + c


@pytest.mark.parametrize(("text", "start", "reasoning", "content"), REASONING_CASES)
def test_split_reasoning_one_shot(text: str, start: bool, reasoning: str, content: str) -> None:
    assert split_reasoning(text, start) == (reasoning, content)


@pytest.mark.parametrize(("text", "start", "reasoning", "content"), REASONING_CASES)
def test_reasoning_streamed_in_any_chunking_equals_one_shot(
    text: str, start: bool, reasoning: str, content: str
) -> None:
    assert _split_streamed(text, start, list(range(1, len(text)))) == (reasoning, content)
    rng = random.Random(text)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, max(0, len(text) - 1))))
        assert _split_streamed(text, start, cuts) == (reasoning, content)


# Granite 3.3 asked to think: <think>...</think><response>...</response>.
# (output, start_in_reasoning, expected reasoning, expected content)
ANSWER_CASES = [
    ("<think>plan</think><response>Paris</response>", False, "plan", "Paris"),
    ("<think>plan</think>\n<response>\nParis\n</response>\n", False, "plan", "\nParis\n"),
    ("<response>Paris</response>", False, "", "Paris"),
    ("plan</think><response>Paris</response>", True, "plan", "Paris"),
    ("<think>a</think>Paris</response>", False, "a", "Paris</response>"),
    ("<think>a</think><response>x</response> more", False, "a", "x</response> more"),
    ("<think>a</think><response>x</response></response>", False, "a", "x</response>"),
    ("<think>a</think><respo", False, "a", "<respo"),
    ("<think>a</think><response>x</resp", False, "a", "x</resp"),
    ("Paris <response>", False, "", "Paris <response>"),
]
GRANITE_TAGS = ("<response>", "</response>")


@pytest.mark.parametrize(("text", "start", "reasoning", "content"), ANSWER_CASES)
def test_an_answer_wrapped_in_response_tags_loses_them_in_any_chunking(
    text: str, start: bool, reasoning: str, content: str
) -> None:
    assert split_reasoning(text, start, GRANITE_TAGS) == (reasoning, content)
    rng = random.Random(text)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1)))
        assert _split_streamed(text, start, cuts, GRANITE_TAGS) == (reasoning, content)


def test_without_answer_tags_a_response_tag_is_content() -> None:
    text = "<think>a</think><response>x</response>"
    assert split_reasoning(text, False) == ("a", "<response>x</response>")


def test_reasoning_holds_back_split_close_tag() -> None:
    splitter = ReasoningSplitter(start_in_reasoning=True)
    assert splitter.feed("step one</th") == ("step one", "")
    assert splitter.in_reasoning
    assert splitter.feed("ink>\n\nDone") == ("", "Done")
    assert not splitter.in_reasoning
    assert splitter.flush() == ("", "")


def test_reasoning_waits_for_possible_open_tag_at_start() -> None:
    splitter = ReasoningSplitter(start_in_reasoning=False)
    assert splitter.feed("\n<th") == ("", "")
    assert splitter.feed("ink>\nidea") == ("idea", "")
    assert splitter.in_reasoning


def test_a_long_text_tokenises_as_a_short_one_and_lets_other_threads_run(tiny_folder: Path) -> None:
    tok = Tokenizer.from_folder(tiny_folder)
    text = "The quick brown fox. Grüße 你好 " * 40_000  # 1.2 M characters
    assert tok.encode(text[:70_000]) == tok.backend.encode(text[:70_000]).ids
    woke, done = [0], threading.Event()

    def other() -> None:
        while not done.is_set():
            woke[0] += 1
            time.sleep(0.001)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        woke[0] = 0
        tok.encode(text)
    finally:
        done.set()
        thread.join()
    # Holding the GIL throughout, encode let the other thread run a handful of times.
    assert woke[0] >= 50, woke[0]


# --- stop strings ------------------------------------------------------------------------


def _feed_all(matcher: StopStringMatcher, chunks: list[str]) -> tuple[str, bool]:
    out = []
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def test_stop_split_across_feeds_is_never_emitted() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("Hello ST") == ("Hello ", False)
    assert matcher.feed("O") == ("", False)
    assert matcher.feed("P and more") == ("", True)
    assert matcher.matched == "STOP"
    assert matcher.feed("later") == ("", True)
    assert matcher.flush() == ""


def test_held_prefix_is_released_when_it_is_not_a_stop() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("a ST") == ("a ", False)
    assert matcher.feed("ART") == ("START", False)
    assert matcher.feed("x STO") == ("x ", False)
    assert matcher.flush() == "STO"
    assert not matcher.stopped


def test_stop_at_very_start_emits_nothing() -> None:
    matcher = StopStringMatcher(["\n\n"])
    assert matcher.feed("\n") == ("", False)
    assert matcher.feed("\nrest") == ("", True)


def test_overlapping_stops_first_completed_wins() -> None:
    # "bc" completes before "abcd" would, so token-by-token generation stops there.
    assert _feed_all(StopStringMatcher(["abcd", "bc"]), ["xabcd"]) == ("xa", True)
    assert _feed_all(StopStringMatcher(["abcd", "bc"]), list("xabcd")) == ("xa", True)
    # Same end: the longer (earlier-starting) stop cuts more.
    matcher = StopStringMatcher(["b", "ab"])
    assert _feed_all(matcher, ["xab"]) == ("x", True)
    assert matcher.matched == "ab"
    assert _feed_all(StopStringMatcher(["</s>", "</stop>"]), ["a</st", "op>b"]) == ("a", True)
    assert _feed_all(StopStringMatcher(["aab"]), ["a", "a", "a", "b"]) == ("a", True)


def test_empty_stop_list_and_empty_strings_pass_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.feed("any text") == ("any text", False)
    assert matcher.flush() == ""
    matcher = StopStringMatcher(["", "X"])
    assert matcher.feed("abc") == ("abc", False)
    assert matcher.feed("dXe") == ("d", True)


def _reference_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Char-by-char semantics: stop at the first position where any stop string ends."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if s and text[:end].endswith(s)]
        if starts:
            return text[: min(starts)], True
    return text, False


def test_stop_matcher_agrees_with_reference_for_random_chunkings() -> None:
    rng = random.Random(7)
    for _ in range(300):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 20)))
        stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 4))) for _ in range(2)]
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, max(0, len(text) - 1))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert _feed_all(StopStringMatcher(stops), chunks) == _reference_stop(text, stops)


def test_stop_matcher_agrees_with_reference_for_many_overlapping_stops() -> None:
    rng = random.Random(11)
    for _ in range(200):
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 40)))
        stops = [
            "".join(rng.choice("abc ") for _ in range(rng.randint(1, 6)))
            for _ in range(rng.randint(1, 16))
        ]
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, max(0, len(text) - 1))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        matcher = StopStringMatcher(StopStrings(stops))
        assert _feed_all(matcher, chunks) == _reference_stop(text, stops), (text, stops)


def _state_reads(stops: list[str], text: str) -> tuple[int, int]:
    """(automaton states read, most text held back) to match ``text`` fed 3 characters a
    token: the work of matching, counted rather than timed."""
    automaton = StopStrings(stops)
    reads = [0]

    class Counted(list):
        def __getitem__(self, index):
            reads[0] += 1
            return list.__getitem__(self, index)

    automaton.goto, automaton.fail = Counted(automaton.goto), Counted(automaton.fail)
    matcher, fed, emitted, held = StopStringMatcher(automaton), 0, 0, 0
    for i in range(0, len(text), 3):
        out, stopped = matcher.feed(text[i : i + 3])
        assert not stopped
        fed, emitted = fed + len(text[i : i + 3]), emitted + len(out)
        held = max(held, fed - emitted)
    return reads[0], held


def test_stop_matching_work_per_character_does_not_grow_with_the_number_of_stops() -> None:
    rng = random.Random(3)
    text = "".join(rng.choice("ab") for _ in range(3000))
    # Stop strings that share long prefixes with the text and never complete in it.
    many = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 12))) + "!" for _ in range(5000)]
    one_reads, _ = _state_reads(["ab!"], text)
    many_reads, held = _state_reads(many, text)
    # One goto read per character plus at most one failure link per character, amortised:
    # the same bound for one stop string and for 5000 (a scan per stop would read 5000x).
    assert one_reads <= 3 * len(text)
    assert many_reads <= 3 * len(text)
    assert held <= 12  # never more than the longest stop string's prefix is held back


def test_a_requests_copies_share_one_stop_automaton() -> None:
    params = SamplingParams()
    request = GenerationRequest(prompt_ids=(1,), params=params, max_tokens=4, stop=("a", "b"))
    assert request.stop_strings.strings == ("a", "b")
    copy = replace(request, params=replace(params, seed=5))
    assert copy.stop_strings is request.stop_strings
    changed = replace(request, stop=("c",))
    assert changed.stop_strings.strings == ("c",)


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'a' * 10000000000 }}",
        "{{ [1] * 10000000000 }}",
        "{% for i in range(10**12) %}{% endfor %}",
        "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
        "{{ 'a'.ljust(10**10) }}",
        "{% set width = 10**10 %}{{ 'a' | center(width) }}",
        "{{ 2 ** 100000000 }}",
        "{{ 10.0 ** 400 }}",
        "{% set s = 'a' * 30000000 %}{% for i in range(3) %}{{ s }}{% endfor %}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",  # (a RecursionError)
    ],
)
def test_a_runaway_template_is_a_chat_template_error_without_allocating_gigabytes(
    tiny_folder: Path, template: str
) -> None:
    tok = _with_template(tiny_folder, template)
    tracemalloc.start()
    try:
        with pytest.raises(ChatTemplateError, match="chat template error") as err:
            tok.apply_chat_template([{"role": "user", "content": "hi"}])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.param == "messages"
    assert peak < 200 * 2**20  # the largest case builds its 30 MB string, then stops


def test_templates_within_the_bounds_render_as_before(tiny_folder: Path) -> None:
    template = (
        "{{ '-' * 3 }}{{ 2 ** 10 }}{% for i in range(3) %}{{ i }}{% endfor %}"
        "{{ 'a' | center(5) }}|{{ messages[0].content.ljust(4) }}|"
    )
    tok = _with_template(tiny_folder, template)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "---1024012  a  |hi  |"
