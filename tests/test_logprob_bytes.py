"""Log-probabilities report each token's own bytes: a token that holds part of a character
(a byte-level piece of an emoji, a byte-fallback ``<0xE2>``) has those bytes and a
``bytes:\\xNN`` text, never U+FFFD; and the tokens of a stop string are not listed."""

from __future__ import annotations

import dataclasses

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from fermi.engine.output import OutputStream
from fermi.engine.types import GenerationRequest, TokenLogprob
from fermi.sampling import SamplingParams
from fermi.server.chunks import completion_logprobs
from fermi.text.token_bytes import char_offsets, token_text
from fermi.text.tokenizer import Tokenizer
from tests.tiny_tokenizer import TINY_SPECIAL_IDS, write_tiny_tokenizer

IM_END = TINY_SPECIAL_IDS["<|im_end|>"]
# The tiny tokenizer writes the emoji as " \xf0\x9f", "\x98", "\x80" and the é as "\xc3",
# "\xa9" (its byte-level BPE learned no merge for them).
TEXT = "Hi 😀 café!"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(folder)
    return Tokenizer.from_folder(folder)


def generate(
    tok: Tokenizer, ids: list[int], stop: tuple[str, ...] = ()
) -> tuple[str, list[TokenLogprob]]:
    """Push ``ids`` through an OutputStream as the engine does; the text and logprobs."""
    request = GenerationRequest(
        prompt_ids=(1,),
        params=SamplingParams(),
        max_tokens=len(ids),
        stop=stop,
        eos_token_ids=frozenset({IM_END}),
        logprobs=2,
    )
    return push_all(tok, request, ids, lambda t: [(t, -0.5), (IM_END, -2.0)])


def push_all(
    tok: Tokenizer, request: GenerationRequest, ids: list[int], top=lambda t: []
) -> tuple[str, list[TokenLogprob]]:
    """The text and logprobs of ``ids`` pushed through an OutputStream, up to the first
    that ends the reply, and its finish."""
    stream = OutputStream(tok, request)
    text, logprobs, reason = "", [], None
    for t in ids:
        delta, reason = stream.push(t, stream.logprob(t, -0.5, top(t)))
        text += delta.text
        logprobs += delta.logprobs or []
        if reason:
            break
    final = stream.finish(reason or "length")
    return text + final.text, logprobs + (final.logprobs or [])


def test_tokens_that_are_parts_of_characters_report_their_own_bytes(tok):
    ids = tok.encode(TEXT)
    text, logprobs = generate(tok, ids)
    assert text == TEXT
    assert [lp.token_id for lp in logprobs] == ids
    assert b"".join(lp.token_bytes for lp in logprobs) == TEXT.encode()
    pieces = [(lp.token, lp.token_bytes) for lp in logprobs]
    assert pieces[2:5] == [
        ("bytes: \\xf0\\x9f", b" \xf0\x9f"),
        ("bytes:\\x98", b"\x98"),
        ("bytes:\\x80", b"\x80"),
    ]
    assert pieces[0] == ("H", b"H") and ("bytes:\\xc3", b"\xc3") in pieces


def test_alternatives_carry_their_bytes_and_special_tokens_their_text(tok):
    _, logprobs = generate(tok, tok.encode("é"))
    first, end = logprobs[0].top
    assert (first.token, first.token_bytes, first.logprob) == ("bytes:\\xc3", b"\xc3", -0.5)
    assert (end.token, end.token_bytes) == ("<|im_end|>", b"<|im_end|>")


def test_token_text_is_utf8_or_the_bytes_form_for_partial_characters():
    assert token_text("café".encode()) == "café"
    assert token_text(b"\xe2\x80") == "bytes:\\xe2\\x80"
    assert token_text(b"ab\xf0") == "bytes:ab\\xf0"  # whole characters stay as they are
    assert token_text(b"") == ""


def test_stop_string_tokens_are_not_listed_even_when_held_back_before_it_was_found(tok):
    # "é!" is written by "\xc3", "\xa9" and "!": the first two were held back as a
    # possible start of the stop string, the third completed it.
    text, logprobs = generate(tok, tok.encode(TEXT), stop=("é!",))
    assert text == "Hi 😀 caf"
    assert b"".join(lp.token_bytes for lp in logprobs) == text.encode()


def test_stop_string_inside_an_emoji_split_over_tokens_drops_only_its_bytes(tok):
    text, logprobs = generate(tok, tok.encode(TEXT), stop=("😀",))
    assert text == "Hi "
    # " \xf0\x9f" starts with the space before the stop: it stays, whole; the tokens that
    # hold only the emoji's other bytes are dropped with it.
    assert [lp.token_bytes for lp in logprobs] == [b"H", b"i", b" \xf0\x9f"]


def test_token_that_straddles_the_stop_string_is_listed_whole(tok):
    ids = tok.encode(TEXT)
    assert tok.token_bytes(ids[5]) == b" c"
    text, logprobs = generate(tok, ids, stop=("ca",))
    assert text == "Hi 😀 "
    assert [lp.token_id for lp in logprobs] == ids[:6]
    assert b"".join(lp.token_bytes for lp in logprobs) == "Hi 😀 c".encode()


def test_end_of_sequence_token_is_listed_last_with_its_text(tok):
    text, logprobs = generate(tok, [*tok.encode("Hi"), IM_END])
    assert text == "Hi"
    assert [lp.token for lp in logprobs] == ["H", "i", "<|im_end|>"]


def test_char_offsets_put_a_continued_character_at_its_start():
    parts = [b"H", b" \xf0\x9f", b"\x98", b"\x80", b"!"]
    assert char_offsets(parts, 0) == ([0, 1, 2, 2, 3], 4)
    assert char_offsets([b"\xa9x"], 5) == ([4], 6)


def sentencepiece_tokenizer() -> Tokenizer:
    """A SentencePiece-style vocabulary: ``▁`` for a space, ``<0xNN>`` byte fallback."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "H": 4, "i": 5, "▁H": 6, "▁Hi": 7}
    vocab.update({f"<0x{b:02X}>": 8 + b for b in range(256)})
    merges = [("▁", "H"), ("▁H", "i")]
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)
    backend = HFTokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    backend.add_special_tokens([AddedToken("</s>", special=True)])
    return Tokenizer(backend, None, "<s>", "</s>")


def test_sentencepiece_byte_fallback_and_spaces_give_the_tokens_bytes():
    tok = sentencepiece_tokenizer()
    ids = tok.encode("Hi 😀")
    assert tok.decode(ids) == " Hi 😀"
    assert [tok.token_bytes(i) for i in ids] == [b" Hi", b" ", b"\xf0", b"\x9f", b"\x98", b"\x80"]
    assert tok.token_bytes(tok.token_to_id("</s>")) == b"</s>"


def test_text_offsets_follow_the_reply_text_where_the_decoder_strips_its_first_space():
    """A Llama-2-style decoder drops the reply's first space: the first token's bytes hold
    it, the text does not, and the offsets count the text."""
    tok = sentencepiece_tokenizer()
    backend = tok.backend
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    end = tok.token_to_id("</s>")
    request = GenerationRequest(
        prompt_ids=(1,),
        params=SamplingParams(),
        max_tokens=9,
        eos_token_ids=frozenset({end}),
        logprobs=0,
    )
    text, logprobs = push_all(tok, request, tok.encode("Hi Hi"))
    assert text == "Hi Hi"
    body, _ = completion_logprobs(logprobs, 0, False)
    assert body.text_offset == [0, 2]


def test_skipped_special_tokens_take_no_characters_in_the_offsets(tok):
    """Special tokens written mid-reply (ignore_eos) are not in the text: each starts where
    the next text does."""
    ids = [IM_END, *tok.encode("Hi there"), IM_END, *tok.encode(" you")]
    request = GenerationRequest(
        prompt_ids=(1,),
        params=SamplingParams(),
        max_tokens=len(ids),
        eos_token_ids=frozenset({IM_END}),
        ignore_eos=True,
        logprobs=0,
    )
    text, logprobs = push_all(tok, request, ids)
    assert text == "Hi there you"
    assert [lp.token for lp in logprobs] == [
        "<|im_end|>",
        "H",
        "i",
        " the",
        "re",
        "<|im_end|>",
        " you",
    ]
    body, _ = completion_logprobs(logprobs, 0, False)
    assert body.text_offset == [0, 0, 1, 2, 6, 8, 8]


def test_a_stop_string_found_only_in_the_final_flush_ends_the_reply_as_stop(tok):
    # The reply is cut by max_tokens inside the emoji: its held-back bytes come out at the
    # end as U+FFFD, which is the stop string here. The stop string ended the text, so the
    # finish reason is stop, not length.
    ids = tok.encode("Hi 😀")[:-1]
    request = GenerationRequest(
        prompt_ids=(1,),
        params=SamplingParams(),
        max_tokens=len(ids),
        stop=("\ufffd",),
        eos_token_ids=frozenset({IM_END}),
    )
    stream = OutputStream(tok, request)
    text = ""
    for t in ids:
        delta, reason = stream.push(t)
        assert reason is None
        text += delta.text
    final = stream.finish("length")
    assert text + final.text == "Hi "
    assert final.stop_string == "\ufffd"
    assert final.finish_reason == "stop"
    # without the stop string, the same reply ends by its length, the bytes as U+FFFD
    stream = OutputStream(tok, dataclasses.replace(request, stop=()))
    for t in ids:
        stream.push(t)
    final = stream.finish("length")
    assert final.finish_reason == "length" and final.text.endswith("\ufffd")
