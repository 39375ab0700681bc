"""Token ids -> text deltas for one sequence: detokenize, stop strings, reasoning split,
and the text of its log-probabilities.

Order matters: stop strings are matched on the model's raw text (so a stop string is
found wherever it appears), the reasoning split runs on what survives, and tool calls are
parsed from the answer the split leaves.

A token's log-probability goes out with the delta that carries its text: while the stop
strings hold text back, they hold back the log-probabilities of the tokens that wrote it,
so that a stop string's tokens, once it is found, are dropped with its text. A token
whose text starts before the stop string stays listed whole.
"""

from __future__ import annotations

import dataclasses

from fermi.engine.types import Delta, FinishReason, GenerationRequest, TokenLogprob
from fermi.text.detokenize import IncrementalDetokenizer
from fermi.text.reasoning import ReasoningSplitter
from fermi.text.stops import StopStringMatcher
from fermi.text.token_bytes import char_offsets, token_text
from fermi.text.tokenizer import Tokenizer
from fermi.text.tools import ToolCallDelta, ToolCallParser


class HeldLogprobs:
    """Log-probabilities waiting for their tokens' text to get past the stop strings.

    Positions count characters of the detokenized text. A token that only begins a
    character decodes to nothing yet: it waits, unplaced, for the text that completes it;
    that text then places the tokens that wrote it, each at the character holding its
    first byte (``char_offsets``)."""

    def __init__(self, hidden: frozenset[int] | set[int] = frozenset()) -> None:
        self.hidden = hidden  # ids whose text the reply leaves out (skipped special tokens)
        self.items: list[tuple[TokenLogprob, int, int]] = []  # (logprob, start, end), placed
        self.unplaced: list[TokenLogprob] = []
        self.decoded = 0  # characters decoded so far
        self.passed = 0  # characters the stop strings let through

    def add(self, logprob: TokenLogprob | None, piece: str, passed: str) -> None:
        """A token (None: text without a new token, at the end) that decoded to ``piece``,
        after which the stop strings let ``passed`` through."""
        if logprob is not None:
            self.unplaced.append(logprob)
        if piece:
            base, end = self.decoded, self.decoded + len(piece)
            shown = (b"" if lp.token_id in self.hidden else lp.token_bytes for lp in self.unplaced)
            starts, _ = char_offsets(shown, base)
            # (clamped: a skipped special token has bytes but no text)
            starts = [min(max(s, base), end) for s in starts]
            self.items += zip(self.unplaced, starts, [*starts[1:], end], strict=True)
            self.unplaced.clear()
            self.decoded = end
        self.passed += len(passed)

    def through(self) -> list[TokenLogprob] | None:
        """Take those whose text is all through, up to the last one that has text of its
        own (the ones before it that have none are part of its first character)."""
        n = 0
        for i, (_, start, end) in enumerate(self.items):
            if end > self.passed:
                break
            if end > start:
                n = i + 1
        out = [_at(lp, start) for lp, start, _ in self.items[:n]]
        del self.items[:n]
        return out or None

    def before_stop(self) -> list[TokenLogprob] | None:
        """A stop string was found: take those whose text starts before it, drop the rest
        (the unplaced ones come after all the text decoded)."""
        out = [_at(lp, start) for lp, start, _ in self.items if start < self.passed]
        self.items.clear()
        self.unplaced.clear()
        return out or None

    def all(self) -> list[TokenLogprob] | None:
        placed = [_at(lp, start) for lp, start, _ in self.items]
        out = [*placed, *(_at(lp, self.decoded) for lp in self.unplaced)]
        self.items.clear()
        self.unplaced.clear()
        return out or None


def _at(logprob: TokenLogprob, start: int) -> TokenLogprob:
    """``logprob`` with where its text starts in the reply (characters)."""
    return dataclasses.replace(logprob, text_offset=start)


class OutputStream:
    def __init__(self, tokenizer: Tokenizer, request: GenerationRequest) -> None:
        self.request = request
        self.detok = IncrementalDetokenizer(tokenizer, request.skip_special_tokens)
        self.stops = StopStringMatcher(request.stop_strings or request.stop)
        self.splitter = (
            ReasoningSplitter(request.start_in_reasoning, answer_tags=request.answer_tags)
            if request.split_reasoning
            else None
        )
        self.tools = (
            ToolCallParser(
                request.tool_format,
                None if request.parallel_tool_calls else 1,
                forced=request.tool_calls_forced,
            )
            if request.tool_format
            else None
        )
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        hidden = tokenizer.special_ids if request.skip_special_tokens else frozenset()
        self.held = HeldLogprobs(hidden) if request.logprobs is not None else None

    def logprob(
        self, token_id: int, logprob: float, top: list[tuple[int, float]]
    ) -> TokenLogprob | None:
        """The chosen token's log-probability and up to ``request.logprobs`` alternatives,
        with their bytes and text; None when the request asked for none."""
        k = self.request.logprobs
        if k is None:
            return None
        alternatives = tuple(self._token(t, p) for t, p in top[:k])
        return self._token(token_id, logprob, alternatives)

    def _token(
        self, token_id: int, logprob: float, top: tuple[TokenLogprob, ...] = ()
    ) -> TokenLogprob:
        raw = self.tokenizer.token_bytes(token_id)
        return TokenLogprob(token_id, token_text(raw), raw, logprob, top)

    def _split(self, text: str, final: bool) -> tuple[str, str]:
        if self.splitter is None:
            return "", text
        reasoning, content = self.splitter.feed(text) if text else ("", "")
        if final:
            r, c = self.splitter.flush()
            reasoning, content = reasoning + r, content + c
        return reasoning, content

    def _calls(self, content: str, final: bool) -> tuple[str, list[ToolCallDelta] | None]:
        """The answer's text without its tool calls, and the calls' pieces."""
        if self.tools is None:
            return content, None
        text, calls = self.tools.feed(content) if content else ("", [])
        if final:
            tail, more = self.tools.finish()
            text, calls = text + tail, calls + more
        return text, calls or None

    def _ending(self, reason: FinishReason) -> FinishReason:
        """``reason``, or tool_calls when a reply that called tools ended as it should."""
        if reason == "stop" and self.tools is not None and self.tools.calls:
            return "tool_calls"
        return reason

    def push(
        self, token_id: int, logprob: TokenLogprob | None = None
    ) -> tuple[Delta, FinishReason | None]:
        """Add one generated token; return its delta and a finish reason if it ends the
        sequence (an eos token or a stop string: stop, or tool_calls after tool calls)."""
        req = self.request
        self.token_ids.append(token_id)
        delta = Delta(token_ids=[token_id])
        held = self.held
        if token_id in req.eos_token_ids and not req.ignore_eos:
            if held is not None:
                held.add(logprob, "", "")  # (``finish`` sends it, after the text held back)
            return delta, self._ending("stop")
        piece = self.detok.add(token_id)
        text, stopped = self.stops.feed(piece)
        if held is not None:
            held.add(logprob, piece, text)
            delta.logprobs = held.before_stop() if stopped else held.through()
        delta.reasoning, content = self._split(text, final=False)
        delta.text, delta.tool_calls = self._calls(content, final=False)
        return delta, (self._ending("stop") if stopped else None)

    def finish(self, reason: FinishReason) -> Delta:
        """Release held-back text and tool-call pieces at the end of the sequence. The
        delta's finish_reason is ``reason``, or tool_calls when ``reason`` is stop (an eos
        token, a stop string, the grammar complete) and the reply called tools; stop when
        the text held back to the end completes a stop string (it ended the reply, not
        its length)."""
        tail = ""
        logprobs = None
        if not self.stops.stopped:
            piece = self.detok.flush()
            tail, stopped = self.stops.feed(piece)
            if not stopped:
                tail += self.stops.flush()
            if self.held is not None:
                self.held.add(None, piece, tail)
                logprobs = self.held.before_stop() if stopped else self.held.all()
            if stopped and reason == "length":
                reason = "stop"  # the held-back end of the text completed a stop string
        reasoning, content = self._split(tail, final=True)
        text, calls = self._calls(content, final=True)
        return Delta(
            text=text,
            reasoning=reasoning,
            logprobs=logprobs,
            finish_reason=self._ending(reason),
            tool_calls=calls,
            stop_string=self.stops.matched,
        )
