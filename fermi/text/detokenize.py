"""Streaming detokenization: turn generated token ids into text deltas, one token at a time."""

from __future__ import annotations

from collections.abc import Sequence

from fermi.text.tokenizer import Tokenizer

# What a byte-level decoder writes for bytes that do not form a complete UTF-8 character.
REPLACEMENT_CHAR = "\ufffd"

# How many prompt tokens to keep as decoding context; a few are enough to give the first
# generated token its leading space under SentencePiece-style decoders.
_PROMPT_CONTEXT = 4


class IncrementalDetokenizer:
    """Decodes a growing token sequence into text deltas without re-decoding everything.

    It keeps a small window of ids: the first `_read_offset` of them were already emitted
    and only serve as context (decoders that strip a leading space or join bytes need to
    see the neighbour), the rest are pending. Each step decodes just that window, so the
    cost per token does not grow with the sequence length. Pending tokens are held while
    their text ends in U+FFFD, i.e. while a multi-byte character is still incomplete.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        prompt_ids: Sequence[int] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._window: list[int] = []
        if prompt_ids:
            context = list(prompt_ids[-_PROMPT_CONTEXT:])
            # A prompt ending mid-character would make the context text unstable.
            if not self._decode(context).endswith(REPLACEMENT_CHAR):
                self._window = context
        self._read_offset = len(self._window)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _texts(self) -> tuple[str, str]:
        """Text of the context alone, and of context plus pending tokens."""
        return self._decode(self._window[: self._read_offset]), self._decode(self._window)

    def _commit(self) -> None:
        # The pending tokens were emitted and become the only context for the next step;
        # older ids can never matter again, so the window stays a few tokens long.
        del self._window[: self._read_offset]
        self._read_offset = len(self._window)

    def add(self, token_id: int) -> str:
        """Add one generated token; return only the text it completes (possibly "")."""
        self._window.append(token_id)
        prefix, full = self._texts()
        # Not longer: e.g. a skipped special token. Ends in U+FFFD: a character is split
        # across tokens and its remaining bytes have not arrived yet.
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR):
            return ""
        self._commit()
        return full[len(prefix) :]

    def flush(self) -> str:
        """Return whatever is still held back; incomplete characters come out as U+FFFD."""
        if self._read_offset >= len(self._window):
            return ""
        prefix, full = self._texts()
        self._commit()
        return full[len(prefix) :]
