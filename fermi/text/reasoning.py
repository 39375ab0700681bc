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

    ``answer_tags`` (Granite 3.3's ``<response>``, ``</response>``): an answer that opens
    with the first tag, after the reasoning or at the start, loses it, and the second tag
    too when it ends the output.
    """

    def __init__(
        self,
        start_in_reasoning: bool,
        open_tag: str = "<think>",
        close_tag: str = "</think>",
        answer_tags: tuple[str, str] | None = None,
    ) -> None:
        if not open_tag or not close_tag or (answer_tags and not all(answer_tags)):
            raise ValueError("reasoning tags must be non-empty")
        self.start_in_reasoning = start_in_reasoning
        self.open_tag = open_tag
        self.close_tag = close_tag
        self.answer_tags = answer_tags
        self._state = _State.START
        self._buf = ""
        # Set right after an opening tag: whitespace there is formatting, not reasoning.
        self._strip_leading = False
        self._in_answer = False  # inside an answer the first answer tag opened

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
                answer = self.answer_tags[0] if self.answer_tags else None
                if answer and not self.start_in_reasoning and stripped.startswith(answer):
                    self._buf = stripped[len(answer) :]
                    self._in_answer, self._state = True, _State.CONTENT
                    continue
                tags = (self.open_tag,) if self.start_in_reasoning else (self.open_tag, answer)
                if not stripped or any(t and t.startswith(stripped) for t in tags):
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
                if self.answer_tags:
                    answer = self.answer_tags[0]
                    if self._buf.startswith(answer):
                        self._buf, self._in_answer = self._buf[len(answer) :], True
                    elif answer.startswith(self._buf):
                        break  # still could become the answer's opening tag
                self._state = _State.CONTENT
                continue

            keep = self._answer_end_held() if self._in_answer else 0
            content.append(self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            break
        return "".join(reasoning), "".join(content)

    def _answer_end_held(self) -> int:
        """Characters at the end of the buffer that may be the answer's closing tag at the
        end of the output: the tag (and whitespace after it), or the start of it."""
        assert self.answer_tags is not None
        close = self.answer_tags[1]
        tail = self._buf.rstrip()
        if tail.endswith(close):
            return len(self._buf) - len(tail) + len(close)
        return _held_prefix_len(self._buf, close)

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
        if self._in_answer and self.answer_tags and held.rstrip() == self.answer_tags[1]:
            return "", ""  # the answer's closing tag ended the output
        return "", held


def split_reasoning(
    text: str, start_in_reasoning: bool, answer_tags: tuple[str, str] | None = None
) -> tuple[str, str]:
    """One-shot split of a complete output into (reasoning, content)."""
    splitter = ReasoningSplitter(start_in_reasoning, answer_tags=answer_tags)
    reasoning, content = splitter.feed(text)
    tail_reasoning, tail_content = splitter.flush()
    return reasoning + tail_reasoning, content + tail_content
