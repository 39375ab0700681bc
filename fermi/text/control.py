"""A caller's text that spells a control token stays text.

A chat template writes control tokens as text (``<|im_start|>``, ``<|im_end|>``), and the
tokenizer turns that text into their ids. Rendered and tokenized as one string, a
message that holds the same text would become the same ids: a user could close their own
turn and open a system one. So before rendering, every occurrence of an added token's
text in the caller's strings (message contents, names, tool calls and definitions) is
swapped for a placeholder the template passes through; the rendered prompt is then cut
at the template's own control tokens, and each piece between them, the caller's text put
back, is tokenized with control-token matching off (``encode_special_tokens``). A
conversation without such text takes the usual single ``encode`` and is not changed.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import tokenizers


class ControlText:
    """The added tokens of one tokenizer, and how to keep their text out of a caller's."""

    def __init__(self, tok: tokenizers.Tokenizer) -> None:
        added = tok.get_added_tokens_decoder()
        self._ids = {t.content: i for i, t in added.items() if t.content}
        self.pattern = re.compile(_trie(self._ids)) if self._ids else None
        self._tok = tok
        self._plain: tokenizers.Tokenizer | None = None

    def mask(self, value: Any) -> tuple[Any, Masked | None]:
        """``value`` (strings, lists and mappings of them) with every added token's text
        swapped for a placeholder, and what was swapped; None when nothing was."""
        if self.pattern is None or not _holds(value, self.pattern):
            return value, None
        masked = Masked(secrets.token_hex(8))
        out = masked.walk(value, self.pattern)
        return (out, masked) if masked.texts else (value, None)

    def encode(self, rendered: str, masked: Masked) -> tuple[list[int], str]:
        """The ids of a prompt rendered from masked values, and its text with the caller's
        text put back: the template's control tokens as their ids, the rest as text."""
        if self._plain is None:
            # A copy whose added tokens are all special, so that encode_special_tokens
            # leaves every one of them unmatched (ordinary added tokens, such as Qwen3's
            # <think> and <tool_call>, are matched whatever it says).
            data = json.loads(self._tok.to_str())
            for token in data.get("added_tokens", []):
                token["special"] = True
            plain = tokenizers.Tokenizer.from_str(json.dumps(data))
            plain.encode_special_tokens = True  # (this copy only: others share the original)
            self._plain = plain
        assert self.pattern is not None
        pieces: list[str] = []  # text, control token, text, ..., text
        last = 0
        for match in self.pattern.finditer(rendered):
            pieces += [masked.restore(rendered[last : match.start()]), match.group()]
            last = match.end()
        pieces.append(masked.restore(rendered[last:]))
        texts = pieces[::2]
        # encode_batch lets go of the GIL while it works (as Tokenizer.encode does for
        # long texts).
        encoded = self._plain.encode_batch(texts, add_special_tokens=False)
        ids = list(encoded[0].ids)
        for control, piece in zip(pieces[1::2], encoded[1:], strict=True):
            ids.append(self._ids[control])
            ids += piece.ids
        return ids, "".join(pieces)


def _trie(words: Iterable[str]) -> str:
    """A regex matching any of ``words``, the longest first (as the tokenizer matches
    added tokens), written as a trie: a flat alternation of a thousand tokens tries each
    of them at every "<" of a message (20 s for 6.6 MB of "<" here), the trie a few."""
    root: dict[str, dict] = {}
    for word in words:
        node = root
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}  # a word ends here

    def pattern(node: dict[str, dict]) -> str:
        branches = [re.escape(ch) + pattern(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        ends = "" in node
        body = branches[0] if len(branches) == 1 and not ends else f"(?:{'|'.join(branches)})"
        return body + "?" if ends else body

    return pattern(root)


def _holds(value: Any, pattern: re.Pattern[str]) -> bool:
    """Whether any string in ``value`` holds a match (no copy made: most hold none)."""
    if isinstance(value, str):
        return pattern.search(value) is not None
    if isinstance(value, Mapping):
        return any(_holds(v, pattern) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_holds(v, pattern) for v in value)
    return False


class Masked:
    """The caller's texts swapped out of one conversation, by placeholder."""

    def __init__(self, nonce: str) -> None:
        # ASCII the templates' filters leave alone (tojson escapes no letter or bracket).
        self.placeholder = re.compile(rf"\[\[fermi-{nonce}-(\d+)\]\]")
        self.nonce = nonce
        self.texts: list[str] = []

    def walk(self, value: Any, pattern: re.Pattern[str]) -> Any:
        if isinstance(value, str):
            return pattern.sub(self._swap, value)
        if isinstance(value, Mapping):
            return {k: self.walk(v, pattern) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.walk(v, pattern) for v in value]
        return value

    def _swap(self, match: re.Match[str]) -> str:
        self.texts.append(match.group())
        return f"[[fermi-{self.nonce}-{len(self.texts) - 1}]]"

    def restore(self, text: str) -> str:
        restored = self.placeholder.sub(lambda m: self.texts[int(m.group(1))], text)
        if self.nonce in restored:  # a template that rewrote the placeholder's text
            raise ValueError(
                "the chat template changed a message's text that spells a control token"
            )
        return restored
