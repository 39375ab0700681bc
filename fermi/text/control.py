"""A caller's text that spells a control token stays text.

A chat template writes control tokens as text (``<|im_start|>``, ``<|im_end|>``), and the
tokenizer turns that text into their ids. Rendered and tokenized as one string, a
message that holds the same text would become the same ids: a user could close their own
turn and open a system one. So before rendering, every occurrence of a control token's
text (a special added token, or an ordinary added token the template writes, such as
Qwen3's <think>) in the caller's strings (message contents, names, tool definitions) is
swapped for a placeholder the template passes through; the rendered prompt is then cut
at the template's own control tokens, and each piece between them, the caller's text put
back, is tokenized with control-token matching off (``encode_special_tokens``). A
conversation without such text takes the usual single ``encode`` and is not changed, and
the pieces come out as that ``encode`` would cut them: a control token that strips the
whitespace beside it (``lstrip``/``rstrip``, Phi-3's) takes it from its neighbours, and a
Metaspace pre-tokenizer that writes "▁" before the first word only (``prepend_scheme``
"first") writes it before the first piece only, not before each.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import tokenizers

# What the tokenizer strips beside an lstrip/rstrip added token: Rust's char::is_whitespace
# (Unicode White_Space), which is not quite Python's str.isspace. (str.strip, linear on a
# caller's megabytes of spaces, where a regex anchored at the end is not.)
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
_WHITESPACE += "\u2028\u2029\u202f\u205f\u3000"


class ControlText:
    """The added tokens of one tokenizer, and how to keep their text out of a caller's."""

    def __init__(self, tok: tokenizers.Tokenizer, template: str | None = None) -> None:
        """The control tokens are the special added tokens, and the ordinary ones the chat
        ``template`` writes (Qwen3's <think>, <tool_call>, <tool_response>); other ordinary
        added tokens (a vocabulary's HTML tags or runs of spaces) are text like any
        other, and stay matched in a caller's text as in the template's."""
        added = tok.get_added_tokens_decoder()
        controls = {
            t.content: i
            for i, t in added.items()
            if t.content and (t.special or (template is not None and t.content in template))
        }
        self._ids = controls
        self._lstrip = {t.content for t in added.values() if t.lstrip and t.content in controls}
        self._rstrip = {t.content for t in added.values() if t.rstrip and t.content in controls}
        self.pattern = re.compile(_trie(self._ids)) if self._ids else None
        self._tok = tok
        # (the first piece, the pieces after it): see _copies
        self._plain: tuple[tokenizers.Tokenizer, tokenizers.Tokenizer] | None = None

    def mask(self, value: Any) -> tuple[Any, Masked | None]:
        """``value`` (strings, lists and mappings of them) with every control token's text
        swapped for a placeholder, and what was swapped; None when nothing was."""
        if self.pattern is None or not _holds(value, self.pattern):
            return value, None
        masked = Masked(secrets.token_hex(8))
        out = masked.walk(value, self.pattern)
        return (out, masked) if masked.texts else (value, None)

    def encode(self, rendered: str, masked: Masked) -> tuple[list[int], str]:
        """The ids of a prompt rendered from masked values, and its text with the caller's
        text put back: the template's control tokens as their ids, the rest as text."""
        first, rest = self._copies()
        assert self.pattern is not None
        pieces: list[str] = []  # text, control token, text, ..., text
        last = 0
        for match in self.pattern.finditer(rendered):
            pieces += [masked.restore(rendered[last : match.start()]), match.group()]
            last = match.end()
        pieces.append(masked.restore(rendered[last:]))
        texts, controls = pieces[::2], pieces[1::2]
        for k, control in enumerate(controls):  # whitespace the control token takes in
            if control in self._lstrip:
                texts[k] = texts[k].rstrip(_WHITESPACE)
            if control in self._rstrip:
                texts[k + 1] = texts[k + 1].lstrip(_WHITESPACE)
        # encode_batch lets go of the GIL while it works (as Tokenizer.encode does for
        # long texts).
        ids = list(first.encode_batch(texts[:1], add_special_tokens=False)[0].ids)
        encoded = rest.encode_batch(texts[1:], add_special_tokens=False)
        for control, piece in zip(controls, encoded, strict=True):
            ids.append(self._ids[control])
            ids += piece.ids
        return ids, "".join(pieces)

    def _copies(self) -> tuple[tokenizers.Tokenizer, tokenizers.Tokenizer]:
        """Copies of the tokenizer whose control tokens are all special, so that
        encode_special_tokens leaves every one of them unmatched (ordinary added tokens,
        such as Qwen3's <think> and <tool_call>, are matched whatever it says; those that
        are not control tokens stay ordinary, matched as one encode matches them): one for
        the prompt's first piece and one for the pieces after a control token, which a
        Metaspace pre-tokenizer with prepend_scheme "first" gives no "▁" of their own."""
        if self._plain is None:
            data = json.loads(self._tok.to_str())
            for token in data.get("added_tokens", []):
                if token.get("content") in self._ids:
                    token["special"] = True
            first = _tokenizer(data)
            rest = _tokenizer(data) if _prepend_never(data.get("pre_tokenizer")) else first
            self._plain = (first, rest)
        return self._plain


def _tokenizer(data: dict) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer.from_str(json.dumps(data))
    tok.encode_special_tokens = True  # (this copy only: others share the original)
    return tok


def _prepend_never(pre: Any) -> bool:
    """Turn every Metaspace of ``pre`` (a pre-tokenizer's JSON) that prepends "▁" to the
    first word only into one that never does; whether there was one."""
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "Sequence":
        found = [_prepend_never(p) for p in pre.get("pretokenizers", [])]
        return any(found)
    if pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "first":
        pre["prepend_scheme"] = "never"
        return True
    return False


def _trie(words: Iterable[str]) -> str:
    """A regex matching any of ``words``, the longest first (as the tokenizer matches
    added tokens), written as a trie: a flat alternation of a thousand tokens tries each
    of them at every "<" of a message, the trie only those that share the text so far."""
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


def strings(value: Any, keys: bool = False) -> Iterator[str]:
    """Every string in ``value`` (strings, lists and mappings of them; with ``keys``, the
    mappings' keys too), walked without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, Mapping):
            if keys:
                stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def _holds(value: Any, pattern: re.Pattern[str]) -> bool:
    """Whether any string in ``value`` holds a match (no copy made: most hold none). Keys
    too: a tool's parameter names are rendered."""
    return any(pattern.search(s) is not None for s in strings(value, keys=True))


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
            return {self.walk(k, pattern): self.walk(v, pattern) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.walk(v, pattern) for v in value]
        return value

    def _swap(self, match: re.Match[str]) -> str:
        self.texts.append(match.group())
        return f"[[fermi-{self.nonce}-{len(self.texts) - 1}]]"

    def restore(self, text: str) -> str:
        restored = self.placeholder.sub(lambda m: self.texts[int(m.group(1))], text)
        # A template that rewrote the placeholder (|upper too: the nonce is hex letters).
        if self.nonce in restored.lower():
            raise ValueError(
                "the chat template changed a message's text that spells a control token"
            )
        return restored
