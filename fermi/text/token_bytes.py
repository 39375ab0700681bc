"""Each token's own bytes, for log-probabilities.

A token may hold part of a character: a byte-fallback token such as ``<0xE2>``, or a
byte-level BPE piece that is half of an emoji. Decoding such a token alone gives U+FFFD,
so its bytes are read from the vocabulary instead, the way the tokenizer's decoder would
turn the piece into bytes: byte-level BPE spells each byte with one printable stand-in
character (GPT-2's table); SentencePiece-style vocabularies write a space as ``▁`` and a
lone byte as ``<0xNN>``. Added tokens (special or not) are their text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable

import tokenizers

# A byte-fallback token: one byte, written <0xNN>.
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level stand-ins: printable Latin-1 bytes stand for themselves, the
    others (controls, space, and a few more) for the characters from U+0100 on, in order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    alphabet = {chr(b): b for b in printable}
    alphabet.update({chr(0x100 + i): b for i, b in enumerate(others)})
    return alphabet


_BYTE_LEVEL = _byte_level_alphabet()


def _byte_level(piece: str) -> bytes:
    if all(c in _BYTE_LEVEL for c in piece):
        return bytes(_BYTE_LEVEL[c] for c in piece)
    return piece.encode()  # not a byte-level spelling: the piece's own text


def _sentencepiece(replace: list[tuple[str, str]], byte_fallback: bool) -> Callable[[str], bytes]:
    def to_bytes(piece: str) -> bytes:
        if byte_fallback and (match := _BYTE_PIECE.fullmatch(piece)):
            return bytes([int(match[1], 16)])
        for old, new in replace:
            piece = piece.replace(old, new)
        return piece.encode()

    return to_bytes


def _piece_reader(decoder: dict | None) -> Callable[[str], bytes] | None:
    """How the decoder turns one vocabulary piece into bytes; None for a decoder this
    does not know. Decoders that work on the whole text (Strip, Fuse) change nothing here."""
    if decoder is None:
        return None
    steps = decoder["decoders"] if decoder.get("type") == "Sequence" else [decoder]
    replace: list[tuple[str, str]] = []
    byte_fallback = False
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            return _byte_level
        if kind == "ByteFallback":
            byte_fallback = True
        elif kind == "Metaspace":
            replace.append((step.get("replacement", "▁"), " "))
        elif kind == "Replace" and "String" in step.get("pattern", {}):
            replace.append((step["pattern"]["String"], step.get("content", "")))
        elif kind not in ("Fuse", "Strip"):
            return None
    return _sentencepiece(replace, byte_fallback)


class TokenBytes:
    """Token id -> its bytes, each worked out on first use and kept."""

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        self._backend = backend
        decoder = backend.decoder
        self._read = _piece_reader(json.loads(decoder.__getstate__()) if decoder else None)
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self._known: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        found = self._known.get(token_id)
        if found is None:
            found = self._known[token_id] = self._bytes(token_id)
        return found

    def _bytes(self, token_id: int) -> bytes:
        added = self._added.get(token_id)
        if added is not None:
            return added.encode()
        piece = self._backend.id_to_token(token_id)
        if piece is None:  # past the vocabulary (a padded embedding's id)
            return b""
        if self._read is None:  # a decoder we cannot read: its text, whole characters only
            return self._backend.decode([token_id], skip_special_tokens=False).encode()
        return self._read(piece)


def token_text(raw: bytes) -> str:
    """A token's text as logprobs report it: its bytes as UTF-8 text; for bytes that are
    not whole characters, ``bytes:`` then the text with each byte of a partial character
    written ``\\xNN`` (OpenAI's form), so that distinct tokens never share a text."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + raw.decode(errors="backslashreplace")


def char_offsets(tokens: Iterable[bytes], offset: int) -> tuple[list[int], int]:
    """Where each of ``tokens`` (their bytes, in order) starts in their text, counting
    characters from ``offset``, and the offset after the last. A token starts at the
    character that holds its first byte: one that continues a character an earlier token
    began starts where that character does."""
    starts = []
    for raw in tokens:
        continues = bool(raw) and raw[0] & 0xC0 == 0x80  # a UTF-8 continuation byte
        starts.append(offset - 1 if continues and offset else offset)
        offset += sum(b & 0xC0 != 0x80 for b in raw)  # characters that begin in it
    return starts, offset
