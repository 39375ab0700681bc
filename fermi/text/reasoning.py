"""Split streamed model output into reasoning (inside <think>...</think>) and content."""

from __future__ import annotations

import enum


class _State(enum.Enum):
    START = "start"  # nothing but whitespace seen yet: an opening tag may still come
    REASONING = "reasoning"
    AFTER_CLOSE = "after_close"  # just past the closing tag: dropping whitespace
    CONTENT = "content"


def _held_prefix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`.

    That suffix may turn into the tag once more text arrives, so it must not be emitted yet.
    """
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class ReasoningSplitter:
    """Streaming splitter of `<think>` reasoning from the answer.

    `feed` returns (reasoning_delta, content_delta); tags are never emitted and may arrive
    split across feeds. With start_in_reasoning=False an opening tag counts only at the
    very start of the output (after whitespace); otherwise all output is content. With
    start_in_reasoning=True the prompt already opened the block, so output is reasoning
    until the closing tag (a redundant opening tag at the start is swallowed).
    """

    def __init__(
        self, start_in_reasoning: bool, open_tag: str = "<think>", close_tag: str = "</think>"
    ) -> None:
        if not open_tag or not close_tag:
            raise ValueError("reasoning tags must be non-empty")
        self.start_in_reasoning = start_in_reasoning
        self.open_tag = open_tag
        self.close_tag = close_tag
        self._state = _State.START
        self._buf = ""
        # Set right after an opening tag: whitespace there is formatting, not reasoning.
        self._strip_leading = False

    @property
    def in_reasoning(self) -> bool:
        """True while output is (or, at the start, would be) going to reasoning."""
        if self._state is _State.START:
            return self.start_in_reasoning
        return self._state is _State.REASONING

    def _enter_reasoning(self) -> None:
        self._state = _State.REASONING
        self._strip_leading = True

    def feed(self, text: str) -> tuple[str, str]:
        """Consume a chunk of output; return the (reasoning, content) text now safe to emit."""
        self._buf += text
        reasoning: list[str] = []
        content: list[str] = []
        # Each pass either finishes (waiting for more text) or changes state; at most a few.
        while True:
            if self._state is _State.START:
                stripped = self._buf.lstrip()
                if stripped.startswith(self.open_tag):
                    self._buf = stripped[len(self.open_tag) :]
                    self._enter_reasoning()
                    continue
                if not stripped or self.open_tag.startswith(stripped):
                    return "", ""  # still could become an opening tag
                if self.start_in_reasoning:
                    self._enter_reasoning()
                else:
                    self._state = _State.CONTENT
                continue

            if self._state is _State.REASONING:
                if self._strip_leading:
                    self._buf = self._buf.lstrip()
                    if not self._buf:
                        break
                    self._strip_leading = False
                end = self._buf.find(self.close_tag)
                if end >= 0:
                    reasoning.append(self._buf[:end])
                    self._buf = self._buf[end + len(self.close_tag) :]
                    self._state = _State.AFTER_CLOSE
                    continue
                keep = _held_prefix_len(self._buf, self.close_tag)
                reasoning.append(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                break

            if self._state is _State.AFTER_CLOSE:
                self._buf = self._buf.lstrip()
                if not self._buf:
                    break
                self._state = _State.CONTENT
                continue

            content.append(self._buf)
            self._buf = ""
            break
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """End of stream: release held-back text where it belongs."""
        held, self._buf = self._buf, ""
        if self._state is _State.START:
            if self.start_in_reasoning:
                return held.lstrip(), ""
            return "", held
        if self._state is _State.REASONING:
            # A truncated reasoning block stays reasoning, partial closing tag included.
            return held, ""
        return "", held


def split_reasoning(text: str, start_in_reasoning: bool) -> tuple[str, str]:
    """One-shot split of a complete output into (reasoning, content)."""
    splitter = ReasoningSplitter(start_in_reasoning)
    reasoning, content = splitter.feed(text)
    tail_reasoning, tail_content = splitter.flush()
    return reasoning + tail_reasoning, content + tail_content
